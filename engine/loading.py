"""Where an engine's model and dataset come from: checkpoints, the serving view of a prepared
dataset, and the identity of an in-memory model. Imports nothing from ``srp4ctr.train``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from srp4ctr.bundle import is_bundle, read_bundle
from srp4ctr.errors import BundleError, CheckpointError, DataError, InputError
from srp4ctr.models import SRP4CTR

__all__ = ["SERVING_KIND", "load_serving_model", "model_fingerprint", "resolve_dataset",
           "serving_view"]

#: the model kind the engine serves (the SRP4CTR class's registered kind)
SERVING_KIND = SRP4CTR.kind


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes, bytes): the identity used when a
    model does not come from a checkpoint (checkpoints use their weights file's sha256)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def serving_view(ds: Any, max_len: int | None = None) -> Any:
    """A copy of a prepared dataset that keeps only what serving needs
    (:meth:`PreparedDataset.serving_view <srp4ctr.data.PreparedDataset.serving_view>`)."""
    return ds.serving_view(max_len)


def resolve_dataset(where: Path, info: dict, dataset: Any, data_dir: Any) -> Any:
    """The prepared dataset of the run at ``where`` (its config's dataset record ``info``):
    ``dataset`` (a prepared dataset or its folder) if given, else the one the run recorded
    (:func:`srp4ctr.data.recorded.dataset_of_run`); its fingerprint must be the run's."""
    from srp4ctr.data import PreparedDataset, load_prepared
    from srp4ctr.data.recorded import dataset_of_run, describe_dataset, describe_record

    if dataset is None:
        return dataset_of_run(where, info, data_dir=data_dir)
    if isinstance(dataset, PreparedDataset):
        ds = dataset
    elif isinstance(dataset, (str, os.PathLike)):
        ds = load_prepared(dataset)
    else:
        raise InputError(
            f"dataset must be a PreparedDataset or its folder, got {type(dataset).__name__}"
        )
    if not info.get("name") or not info.get("fingerprint"):
        raise CheckpointError(f"{where}: config.json does not name the dataset it was trained on")
    if ds.fingerprint != info.get("fingerprint"):
        raise CheckpointError(
            f"{where}: trained on dataset {describe_record(info)}, but the dataset given is "
            f"{describe_dataset(ds)}"
        )
    return ds


def load_serving_model(path: str | os.PathLike, dataset: Any = None,
                       data_dir: str | os.PathLike | None = None):
    """(model, dataset, weights fingerprint) of the fine-tuning checkpoint or bundle ``path``.

    A bundle (:mod:`srp4ctr.bundle`) brings its own serving tables; ``dataset`` (if given) is
    used instead. A plain checkpoint needs the prepared dataset (:func:`resolve_dataset`).

    Raises:
        BundleError: an incomplete, truncated, altered or other-version bundle.
        CheckpointError: not a checkpoint, truncated or altered weights, another kind than
            ``srp4ctr``, or a dataset whose fingerprint is not the checkpoint's.
    """
    from srp4ctr.models import load_model, model_kinds, read_config

    path = Path(path)
    bundled = is_bundle(path) and dataset is None
    if bundled:
        read_bundle(path)  # every listed file as recorded, before any of them is read
    cfg = read_config(path)
    kind = cfg.get("kind")
    if kind != SERVING_KIND:
        hint = (" (a pre-training checkpoint: fine-tune it first)"
                if kind in model_kinds("pretrain") else "")
        raise CheckpointError(
            f"{path}: a {kind!r} checkpoint{hint}; the engine serves SRP4CTR fine-tuning "
            f"checkpoints (kind {SERVING_KIND!r})"
        )
    if not isinstance(cfg.get("dataset") or {}, dict):
        raise CheckpointError(f"{path}: config.json field 'dataset' is not a mapping "
                              f"(got {type(cfg.get('dataset')).__name__})")
    if bundled:
        # a bundle carries its serving tables: no data directory, no download
        from srp4ctr.data.dataset import load_serving_tables

        try:
            ds = load_serving_tables(path)
        except DataError as e:
            raise BundleError(str(e)) from None
        info = cfg.get("dataset") or {}
        if ds.fingerprint != info.get("fingerprint"):
            raise BundleError(f"{path}: serving tables of dataset {ds.fingerprint[:12]}…, the "
                              f"model was trained on {str(info.get('fingerprint'))[:12]}…")
    else:
        ds = resolve_dataset(path, cfg.get("dataset") or {}, dataset, data_dir)
    model, cfg = load_model(path, dataset=ds)
    from srp4ctr.models.checkpoint import model_identity

    return model, ds, model_identity(cfg)
