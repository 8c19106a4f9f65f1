"""Checkpoints: a directory with ``config.json`` and ``model.safetensors``, and the models in them.

``config.json`` records every hyperparameter, the model kind, the dataset fingerprint and the
sha256 of the weights file; :func:`load_checkpoint` checks all of it, so a truncated or swapped
weights file, or a checkpoint of another dataset, is refused with :class:`CheckpointError`.
Directories are written atomically: everything goes to a temporary sibling directory that is
renamed into place, so a crash never leaves a half-written checkpoint under the final name.
:func:`load_model` rebuilds the model of a checkpoint through the model registry (its ``kind``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from srp4ctr._files import atomic_write_dir, sha256_file
from srp4ctr._identity import COMPUTATION_KEYS, config_sha256, model_identity
from srp4ctr.errors import CheckpointError, InputError
from srp4ctr.models.fgbert import FGBERT
from srp4ctr.models.registry import model_entry, model_kinds
from srp4ctr.models.spec import ModelConfig, ModelSpec

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "Checkpoint",
    "atomic_write_dir",
    "config_sha256",
    "model_identity",
    "load_checkpoint",
    "load_model",
    "read_config",
    "save_checkpoint",
    "sha256_file",
]

FORMAT = "srp4ctr-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


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
    extra: Callable[[Path], Any] | None = None,
) -> Path:
    """Write ``model``'s weights and ``config`` (JSON-able) atomically to directory ``path``.

    ``extra(folder)``, if given, writes more files into the folder once the checkpoint's are
    there, before it is renamed into place (the serving bundle's, :mod:`srp4ctr.bundle`)."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        weights = tmp / WEIGHTS_FILE
        save_file(_state_for_saving(model), str(weights))
        cfg = dict(config)
        cfg["format"] = FORMAT
        cfg["format_version"] = FORMAT_VERSION
        cfg["weights_sha256"] = sha256_file(weights)
        cfg["config_sha256"] = config_sha256(cfg)
        with open(tmp / CONFIG_FILE, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        if extra is not None:
            extra(tmp)

    return atomic_write_dir(path, write)


@dataclass
class Checkpoint:
    path: Path
    config: dict[str, Any]
    state: dict[str, torch.Tensor]

    @property
    def fingerprint(self) -> str:
        """Identity of the model: its weights and the config that defines its computation
        (:func:`model_identity`)."""
        return model_identity(self.config)


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
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: not a checkpoint config (a JSON "
                              f"{type(cfg).__name__}, not an object)")
    if cfg.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: not an srp4ctr checkpoint")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path}: format version {cfg.get('format_version')} (expected {FORMAT_VERSION})"
        )
    for key, kind in (("kind", str), ("model_config", dict), ("spec", dict),
                      ("weights_sha256", str)):
        if not isinstance(cfg.get(key), kind):
            raise CheckpointError(f"{cfg_path}: field {key!r} is "
                                  + ("missing" if key not in cfg else
                                     f"a {type(cfg[key]).__name__}, not a {kind.__name__}"))
    stored = cfg.get("config_sha256")
    if stored is not None and stored != config_sha256(cfg):
        changed = ", ".join(COMPUTATION_KEYS)
        raise CheckpointError(f"{cfg_path}: the model's settings ({changed}) do not match the "
                              "config_sha256 written with the weights: config.json was edited")
    return cfg


def load_checkpoint(
    path: str | os.PathLike,
    *,
    expect_kind: str | tuple[str, ...] | None = None,
    dataset_fingerprint: str | None = None,
    dataset: Any = None,
) -> Checkpoint:
    """Read and verify a checkpoint directory (files present, weights hash, kind, dataset).

    ``dataset`` (a prepared dataset) or ``dataset_fingerprint``: the run must have been trained
    on it; a mismatch names both datasets (name, source, folder, size)."""
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
    if dataset is not None:
        dataset_fingerprint = dataset.fingerprint
    if dataset_fingerprint is not None:
        info = cfg.get("dataset") if isinstance(cfg.get("dataset"), dict) else {}
        if info.get("fingerprint") != dataset_fingerprint:
            from srp4ctr.data.recorded import describe_dataset, describe_record

            given = (describe_dataset(dataset) if dataset is not None
                     else f"fingerprint {dataset_fingerprint[:12]}…")
            raise CheckpointError(
                f"{path}: trained on dataset {describe_record(info)}, not on the one given, "
                f"{given}: pass the dataset it was trained on (or leave it out: runs find "
                "their recorded dataset)"
            )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: cannot be read ({e})") from None
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{weights}: tensor {name!r} holds {bad} NaN or inf value(s)")
    return Checkpoint(path=path, config=cfg, state=state)


def load_model(path: str | os.PathLike, *, dataset_fingerprint: str | None = None,
               device: str = "cpu", dataset: Any = None) -> tuple[nn.Module, dict]:
    """Rebuild a model from a checkpoint directory; returns ``(model, config)``.

    The checkpoint's ``kind`` names the class (:mod:`srp4ctr.models.registry`); any registered
    kind loads, pre-training ones first in the error message's list.
    """
    ck = load_checkpoint(path, expect_kind=model_kinds("pretrain") + model_kinds("ctr"),
                         dataset_fingerprint=dataset_fingerprint, dataset=dataset)
    cfg_path = Path(path) / CONFIG_FILE
    for key, parse in (("spec", ModelSpec.from_dict), ("model_config", ModelConfig.from_dict)):
        try:
            parse(ck.config[key])
        except (InputError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{cfg_path}: field {key!r} is not valid ({e})") from None
    spec = ModelSpec.from_dict(ck.config["spec"])
    mcfg = ModelConfig.from_dict(ck.config["model_config"])
    entry = model_entry(ck.config["kind"])
    try:
        encoder = FGBERT(spec, mcfg) if entry.takes_encoder else None
        model = entry.build(spec, mcfg, encoder=encoder)
    except (InputError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{cfg_path}: the model it describes cannot be built ({e})") \
            from None
    try:
        missing, unexpected = model.load_state_dict(ck.state, strict=False)
    except RuntimeError as e:  # shapes of the weights and of the config's model differ
        first = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path}: the weights do not fit the model config.json describes "
                              f"({first})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the model (missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]})"
        )
    model.to(device).eval()
    return model, ck.config
