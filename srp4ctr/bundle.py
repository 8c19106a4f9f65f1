"""Serving bundles: a fine-tuned model and everything serving needs, in one self-contained folder.

A bundle is a checkpoint folder (``config.json``, ``model.safetensors``) plus the dataset's
serving tables (``serving.json``, ``serving.npz``: raw item and user id maps, the item
side-information table, the user feature table, vocabularies, behaviour-value rules, the
dataset fingerprint; see :func:`srp4ctr.data.dataset.save_serving_tables`) and ``bundle.json``,
which lists every one of those files with its size and sha256. No interaction arrays: serving
from a bundle needs no data directory and no download.

``srp4ctr finetune`` writes its run folder as a bundle (``metrics.json`` and ``curves.png``
beside it are not part of it); ``srp4ctr bundle --run RUN --out DIR`` writes a compact copy, or
makes one for a run trained before bundles existed (then the prepared dataset must be found, as
:meth:`Engine.load <srp4ctr.engine.Engine.load>` finds it). ``Engine.load(bundle)`` reads it with
:func:`read_bundle` first, so an incomplete, truncated, altered or other-version bundle is
refused with :class:`~srp4ctr.errors.BundleError` naming the file.

Standard library and numpy only (no torch): a serving process can check a bundle cheaply.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from srp4ctr._files import atomic_write_dir, sha256_file, shareable
from srp4ctr._identity import model_identity
from srp4ctr.errors import BundleError, InputError

__all__ = ["BUNDLE_FILE", "BUNDLE_FORMAT", "BUNDLE_VERSION", "is_bundle", "make_bundle",
           "read_bundle", "write_bundle_files"]

BUNDLE_FORMAT = "srp4ctr-bundle"
BUNDLE_VERSION = 1
BUNDLE_FILE = "bundle.json"
_CONFIG, _WEIGHTS = "config.json", "model.safetensors"
#: files whose sha256 :func:`read_bundle` checks; the weights' is checked when the checkpoint
#: loads (against config.json, which is hashed here), so a large file is not hashed twice
_HASHED_ON_LOAD = (_WEIGHTS,)


def is_bundle(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder with a ``bundle.json``."""
    return (Path(path) / BUNDLE_FILE).is_file()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: unreadable ({e})") from None


def write_bundle_files(directory: str | os.PathLike, ds: Any) -> dict[str, Any]:
    """Make the checkpoint folder ``directory`` a bundle: write ``ds``'s serving tables and
    ``bundle.json`` beside ``config.json`` and ``model.safetensors``. ``ds`` is the prepared
    dataset the model was trained on (its fingerprint must be the checkpoint's). Returns the
    bundle document."""
    from srp4ctr import __version__
    from srp4ctr.data.dataset import save_serving_tables

    d = Path(directory)
    for name in (_CONFIG, _WEIGHTS):
        if not (d / name).is_file():
            raise BundleError(f"{d}: no {name}; a bundle is made from a checkpoint folder")
    cfg = _read_json(d / _CONFIG)
    if not isinstance(cfg, dict):
        raise BundleError(f"{d / _CONFIG}: not a checkpoint config")
    info = cfg.get("dataset") if isinstance(cfg.get("dataset"), dict) else {}
    if info.get("fingerprint") != ds.fingerprint:
        raise BundleError(
            f"{d}: trained on dataset fingerprint {str(info.get('fingerprint'))[:12]}…, the "
            f"dataset given has {ds.fingerprint[:12]}…")
    max_len = (cfg.get("model_config") or {}).get("max_len", ds.max_len)
    names = [_CONFIG, _WEIGHTS] + save_serving_tables(ds.serving_view(int(max_len)), d)
    doc = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "srp4ctr": __version__,
        "kind": cfg.get("kind"),
        "model_fingerprint": model_identity(cfg),
        "dataset": {"name": ds.name, "fingerprint": ds.fingerprint,
                    "n_items": int(ds.n_items), "n_users": int(ds.n_users)},
        "files": {n: {"bytes": (d / n).stat().st_size, "sha256": sha256_file(d / n)}
                  for n in names},
    }
    with open(d / BUNDLE_FILE, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return doc


def read_bundle(path: str | os.PathLike) -> dict[str, Any]:
    """Check the bundle at ``path`` and return ``bundle.json``.

    Every listed file must be present with its recorded size, and every one but the weights
    (checked against ``config.json`` when the checkpoint loads) with its recorded sha256.

    Raises:
        BundleError: no ``bundle.json``, another format or version, a missing, truncated or
            altered file, or a ``config.json`` whose weights hash is not the bundle's.
    """
    d = Path(path)
    bpath = d / BUNDLE_FILE
    if not bpath.is_file():
        raise BundleError(f"{d}: not a serving bundle (no {BUNDLE_FILE})")
    doc = _read_json(bpath)
    if not isinstance(doc, dict) or doc.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{bpath}: not an srp4ctr serving bundle")
    if doc.get("format_version") != BUNDLE_VERSION:
        raise BundleError(f"{bpath}: bundle format version {doc.get('format_version')!r}, this "
                          f"srp4ctr reads {BUNDLE_VERSION}")
    files = doc.get("files")
    needed = {_CONFIG, _WEIGHTS, "serving.json", "serving.npz"}
    if not isinstance(files, dict) or not needed <= set(files):
        raise BundleError(f"{bpath}: does not list {sorted(needed)}")
    for name, rec in files.items():
        p = d / name
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise BundleError(f"{bpath}: bad file name {name!r}")
        if not p.is_file():
            raise BundleError(f"{p}: missing from the bundle")
        if not isinstance(rec, dict) or p.stat().st_size != rec.get("bytes"):
            raise BundleError(f"{p}: {p.stat().st_size} bytes, the bundle records "
                              f"{rec.get('bytes') if isinstance(rec, dict) else '?'} "
                              "(truncated or replaced)")
        if name not in _HASHED_ON_LOAD and sha256_file(p) != rec.get("sha256"):
            raise BundleError(f"{p}: sha256 does not match {BUNDLE_FILE} (altered or replaced)")
    cfg = _read_json(d / _CONFIG)
    try:
        # the model's identity (weights and computation config); bundles written before it
        # existed recorded the weights' sha256
        ok = doc.get("model_fingerprint") in (model_identity(cfg), cfg["weights_sha256"])
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise BundleError(f"{d / _CONFIG}: its weights hash is not the bundle's model")
    return doc


def make_bundle(run: str | os.PathLike, out: str | os.PathLike, *, dataset: Any = None,
                data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write the bundle of the fine-tuning run ``run`` to the folder ``out`` (atomically; an
    existing ``out`` is replaced only if it is empty or a bundle).

    A run that is already a bundle is copied (its listed files only, checked first); for an
    older run the prepared dataset it was trained on is found as :meth:`Engine.load
    <srp4ctr.engine.Engine.load>` finds it (``dataset=`` its folder or object, or under
    ``data_dir``). Returns the bundle document.
    """
    run, out = Path(run), Path(out)
    if out.resolve() == run.resolve():
        raise InputError(f"{out}: the bundle must be written to another folder than the run")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_bundle(out))):
        raise InputError(f"{out}: exists, is not empty and is not a bundle; refusing to replace it")
    if is_bundle(run) and dataset is None:
        doc = read_bundle(run)

        def copy(tmp: Path) -> None:
            for name in doc["files"]:
                shutil.copy2(run / name, tmp / name)
            shutil.copy2(run / BUNDLE_FILE, tmp / BUNDLE_FILE)
            shareable(tmp)

        atomic_write_dir(out, copy)
        return read_bundle(out)

    from srp4ctr.engine.loading import SERVING_KIND, resolve_dataset
    from srp4ctr.models.checkpoint import load_checkpoint, read_config

    cfg = read_config(run)
    if cfg.get("kind") != SERVING_KIND:
        raise BundleError(f"{run}: a {cfg.get('kind')!r} checkpoint; bundles are made of "
                          f"{SERVING_KIND!r} fine-tuning runs")
    load_checkpoint(run)  # weights present and matching config.json
    ds = resolve_dataset(run, cfg.get("dataset") or {}, dataset, data_dir)

    def write(tmp: Path) -> None:
        for name in (_CONFIG, _WEIGHTS):
            shutil.copy2(run / name, tmp / name)
        write_bundle_files(tmp, ds)
        shareable(tmp)

    atomic_write_dir(out, write)
    return read_bundle(out)
