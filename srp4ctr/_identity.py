"""The identity of a checkpoint's model (torch-free: bundles and the serving runtime use it)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["COMPUTATION_KEYS", "config_sha256", "model_identity"]

#: the config.json entries that define what a checkpoint computes (its identity with the weights)
COMPUTATION_KEYS = ("kind", "model_config", "spec")


def config_sha256(cfg: dict[str, Any]) -> str:
    """sha256 of the entries of ``cfg`` that define the computation (:data:`COMPUTATION_KEYS`),
    as canonical JSON."""
    doc = {k: cfg.get(k) for k in COMPUTATION_KEYS}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def model_identity(cfg: dict[str, Any]) -> str:
    """The fingerprint of a checkpoint's model: sha256 over its weights' and its computation
    config's sha256, so two checkpoints with the same weights but another architecture
    (``n_heads``, ...) never share caches or exports."""
    return hashlib.sha256(f"{cfg['weights_sha256']}:{config_sha256(cfg)}".encode()).hexdigest()
