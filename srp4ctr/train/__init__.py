"""Training: FG-BERT pre-training, CTR fine-tuning, evaluation, experiments, checkpoints."""

from srp4ctr.train.checkpoint import load_checkpoint, save_checkpoint
from srp4ctr.train.config import TrainConfig
from srp4ctr.train.loop import evaluate, finetune, load_model, pretrain

__all__ = [
    "TrainConfig",
    "evaluate",
    "finetune",
    "load_checkpoint",
    "load_model",
    "pretrain",
    "save_checkpoint",
]
