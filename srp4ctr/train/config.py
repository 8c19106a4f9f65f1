"""Training hyperparameters."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class TrainConfig:
    """Optimisation settings shared by pre-training and fine-tuning.

    Early stopping watches the validation metric (NDCG@10 for pre-training, AUC for CTR) after
    every epoch; training stops after ``patience`` epochs without improvement and the best
    epoch's weights are kept.
    """

    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.02
    lr_power: float = 1.0
    end_lr_ratio: float = 0.0
    patience: int = 2
    seed: int = 0
    max_steps_per_epoch: int | None = None
    eval_batch_size: int = 1024
    negatives: str | None = None
    device: str = "cpu"
    num_threads: int | None = None
    progress: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
