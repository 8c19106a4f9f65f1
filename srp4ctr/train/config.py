"""Training hyperparameters."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

from srp4ctr.errors import InputError

NEGATIVES = ("uni100",)


@dataclass
class TrainConfig:
    """Optimisation settings shared by pre-training and fine-tuning.

    Early stopping watches the validation metric (NDCG@10 for pre-training, AUC for CTR) after
    every epoch; training stops after ``patience`` epochs without improvement and the best
    epoch's weights are kept; with ``early_stopping=False`` every epoch runs and the last one's
    weights are kept (validation is still recorded each epoch). ``eval_max_samples``: validation and test metrics on a fixed
    seeded subset of at most that many samples per split (all when None; for very large data).
    ``pretrained_lr_ratio``: fine-tuning from a pre-trained checkpoint, the parameters loaded from
    it train at ``lr * pretrained_lr_ratio`` (same schedule), the new ones at ``lr``; no effect
    without a pre-trained checkpoint.
    """

    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.02
    lr_power: float = 1.0
    end_lr_ratio: float = 0.0
    pretrained_lr_ratio: float = 1.0
    patience: int = 2
    early_stopping: bool = True
    seed: int = 0
    max_steps_per_epoch: int | None = None
    eval_batch_size: int = 1024
    eval_max_samples: int | None = None
    negatives: str | None = None
    device: str = "cpu"
    num_threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        def positive_int(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be a positive integer, got {v!r}")

        for name in ("epochs", "batch_size", "eval_batch_size"):
            positive_int(name)
        positive_int("max_steps_per_epoch", allow_none=True)
        positive_int("num_threads", allow_none=True)
        positive_int("eval_max_samples", allow_none=True)
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or \
                self.patience < 0:
            raise InputError(f"patience must be an integer >= 0, got {self.patience!r}")
        if not isinstance(self.early_stopping, bool):
            raise InputError(f"early_stopping must be true or false, got {self.early_stopping!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"seed must be an integer, got {self.seed!r}")
        for name, lo, hi, open_lo in (("lr", 0.0, math.inf, True),
                                      ("weight_decay", 0.0, math.inf, False),
                                      ("warmup_ratio", 0.0, 1.0, False),
                                      ("end_lr_ratio", 0.0, 1.0, False),
                                      ("lr_power", 0.0, math.inf, True),
                                      ("pretrained_lr_ratio", 0.0, math.inf, True)):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
                and (v > lo if open_lo else v >= lo) and v <= hi
            if not ok:
                bound = f"> {lo:g}" if open_lo else f">= {lo:g}"
                raise InputError(f"{name} must be a finite number {bound}"
                                 + (f" and <= {hi:g}" if math.isfinite(hi) else "")
                                 + f", got {v!r}")
        if self.negatives is not None and self.negatives not in NEGATIVES:
            raise InputError(f"negatives must be None or one of {NEGATIVES}, got "
                             f"{self.negatives!r}")
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise InputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")

    def check_device(self) -> None:
        """:class:`~srp4ctr.errors.InputError` when ``device`` cannot run here (a CUDA device
        on a machine or a torch build without one). Training calls it before any work."""
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise InputError(f"device {self.device!r}: this torch ({torch.__version__}) "
                                 "sees no CUDA device; use --device cpu")
            index = int(self.device.split(":")[1]) if ":" in self.device else 0
            if index >= torch.cuda.device_count():
                raise InputError(f"device {self.device!r}: only {torch.cuda.device_count()} "
                                 "CUDA device(s)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The config of a mapping of its fields; an unknown key is an
        :class:`~srp4ctr.errors.InputError` naming it (never silently dropped)."""
        if not isinstance(d, dict):
            raise InputError(f"a training config is a mapping, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f"unknown training setting(s) {unknown}; known: {sorted(names)}")
        return cls(**d)
