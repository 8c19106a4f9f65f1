"""What callers hand the engine: raw user histories and raw candidate ids, checked and normalised
(the torch-free rules of :mod:`srp4ctr.serving.inputs`, shared with the ONNX runtime), and the
model batch built from encoded histories.

Everything here turns malformed input into :class:`~srp4ctr.errors.InputError` before any model
work starts, so a failed call changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from srp4ctr.serving.inputs import History, as_history_dict, as_raw_ids

__all__ = ["History", "as_history_dict", "as_raw_ids", "model_batch"]


def model_batch(ds: Any, arrays: Sequence[Mapping[str, np.ndarray]],
                device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded model batch (the training layout) of histories encoded by the dataset's
    ``encode_user_history``, on ``device``."""
    lens = [int(a["hist_len"]) for a in arrays]
    width = max(1, max(lens))
    B = len(arrays)

    def padded(key: str) -> torch.Tensor:
        out = np.zeros((B, width), dtype=np.int64)
        for r, a in enumerate(arrays):
            out[r, : lens[r]] = a[key]
        return torch.from_numpy(out)

    batch = {"hist_item": padded("hist_item"), "hist_len": torch.tensor(lens, dtype=torch.int64)}
    for f in ds.behaviour_fields:
        batch[f"hist_{f}"] = padded(f"hist_{f}")
    batch["user"] = torch.tensor([int(a.get("user", 0)) for a in arrays], dtype=torch.int64)
    for f, table in ds.user_table.items():
        batch[f"user_{f}"] = torch.tensor(
            [int(a[f"user_{f}"]) if f"user_{f}" in a else int(table[0]) for a in arrays],
            dtype=torch.int64,
        )
    return {k: v.to(device) for k, v in batch.items()}
