"""Checkpoints: a directory with ``config.json`` and ``model.safetensors``.

``config.json`` records every hyperparameter, the model kind, the dataset fingerprint and the
sha256 of the weights file; :func:`load_checkpoint` checks all of it, so a truncated or swapped
weights file, or a checkpoint of another dataset, is refused with :class:`CheckpointError`.
Directories are written atomically: everything goes to a temporary sibling directory that is
renamed into place, so a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from srp4ctr.errors import CheckpointError

FORMAT = "srp4ctr-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def atomic_write_dir(final: str | os.PathLike, write) -> Path:
    """Call ``write(tmpdir)`` then move ``tmpdir`` to ``final`` (replacing an old directory)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, trash / "old")
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; clone so tied weights are saved once per name
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        key = t.data_ptr()
        if key in seen and t.numel() > 0:
            t = t.clone()
        seen[key] = name
        out[name] = t.contiguous()
    return out


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    config: dict[str, Any],
) -> Path:
    """Write ``model``'s weights and ``config`` (JSON-able) atomically to directory ``path``."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        weights = tmp / WEIGHTS_FILE
        save_file(_state_for_saving(model), str(weights))
        cfg = dict(config)
        cfg["format"] = FORMAT
        cfg["format_version"] = FORMAT_VERSION
        cfg["weights_sha256"] = sha256_file(weights)
        with open(tmp / CONFIG_FILE, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")

    return atomic_write_dir(path, write)


@dataclass
class Checkpoint:
    path: Path
    config: dict[str, Any]
    state: dict[str, torch.Tensor]

    @property
    def fingerprint(self) -> str:
        """Identity of the model: the sha256 of its weights file."""
        return self.config["weights_sha256"]


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: missing {CONFIG_FILE}")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if cfg.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: not an srp4ctr checkpoint")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path}: format version {cfg.get('format_version')} (expected {FORMAT_VERSION})"
        )
    return cfg


def load_checkpoint(
    path: str | os.PathLike,
    *,
    expect_kind: str | tuple[str, ...] | None = None,
    dataset_fingerprint: str | None = None,
) -> Checkpoint:
    """Read and verify a checkpoint directory (files present, weights hash, kind, dataset)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg = read_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path}: missing {WEIGHTS_FILE}")
    digest = sha256_file(weights)
    if digest != cfg.get("weights_sha256"):
        raise CheckpointError(
            f"{weights}: sha256 {digest[:12]}… does not match config.json "
            f"({str(cfg.get('weights_sha256'))[:12]}…): truncated or replaced"
        )
    if expect_kind is not None:
        kinds = (expect_kind,) if isinstance(expect_kind, str) else tuple(expect_kind)
        if cfg.get("kind") not in kinds:
            raise CheckpointError(
                f"{path}: a {cfg.get('kind')!r} checkpoint, expected {' or '.join(kinds)}"
            )
    if dataset_fingerprint is not None:
        got = cfg.get("dataset", {}).get("fingerprint")
        if got != dataset_fingerprint:
            raise CheckpointError(
                f"{path}: trained on dataset {str(got)[:12]}…, not on {dataset_fingerprint[:12]}…"
            )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: cannot be read ({e})") from None
    return Checkpoint(path=path, config=cfg, state=state)
