"""Training: FG-BERT pre-training, CTR fine-tuning, evaluation, experiments.

Checkpoint I/O and :func:`load_model` live in :mod:`srp4ctr.models.checkpoint`; they are
re-exported here for training code.
"""

from srp4ctr.models.checkpoint import load_checkpoint, load_model, save_checkpoint
from srp4ctr.train.config import TrainConfig
from srp4ctr.train.loop import evaluate, finetune, pretrain

__all__ = [
    "TrainConfig",
    "evaluate",
    "finetune",
    "load_checkpoint",
    "load_model",
    "pretrain",
    "save_checkpoint",
]
