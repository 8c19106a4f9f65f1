"""What a run records of the dataset it was trained on, and finding that dataset again.

Every run (pre-training or fine-tuning checkpoint) stores :func:`dataset_record` of its dataset
in ``config.json``: the name and fingerprint that identify it, the source it was prepared from
(``path`` and ``columns``, the arguments of :func:`~srp4ctr.data.prepare`), where the prepared
copy was (``prepared``) and its size. :func:`dataset_of_run` turns that back into the prepared
dataset, so ``srp4ctr evaluate``, the exports, ``bundle`` and ``serve`` need no ``--dataset``
flags, and :func:`describe_record` names a dataset in errors by name, source and folder rather
than by fingerprint alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from srp4ctr.errors import CheckpointError, DataError

__all__ = ["dataset_of_run", "dataset_record", "describe_dataset", "describe_record",
           "find_prepared"]


def dataset_record(ds: Any) -> dict[str, Any]:
    """The record a run keeps of its prepared dataset ``ds`` (JSON-able)."""
    source = ds.meta.get("source") if isinstance(ds.meta, dict) else None
    source = source if isinstance(source, dict) else {}
    path = source.get("path")
    return {
        "name": ds.name,
        "fingerprint": ds.fingerprint,
        "source": None if path is None else Path(str(path)).name,
        "path": None if path is None else str(path),
        "columns": source.get("columns"),
        "prepared": None if getattr(ds, "path", None) is None else str(Path(ds.path).resolve()),
        "n_users": int(ds.n_users),
        "n_items": int(ds.n_items),
    }


def describe_record(info: dict[str, Any]) -> str:
    """``'ml-1m' from /data/ml-1m (6040 users, 3706 items; prepared in /cache/ml-1m-…;
    fingerprint 4505d776c3f6…)`` of a :func:`dataset_record` (older runs record less)."""
    parts = [repr(info.get("name"))]
    if info.get("path") or info.get("source"):
        parts.append(f"from {info.get('path') or info.get('source')}")
    facts = []
    if info.get("n_users") is not None and info.get("n_items") is not None:
        facts.append(f"{info['n_users']} users, {info['n_items']} items")
    if info.get("prepared"):
        facts.append(f"prepared in {info['prepared']}")
    facts.append(f"fingerprint {str(info.get('fingerprint'))[:12]}…")
    return " ".join(parts) + f" ({'; '.join(facts)})"


def describe_dataset(ds: Any) -> str:
    """:func:`describe_record` of a prepared dataset."""
    return describe_record(dataset_record(ds))


def find_prepared(root: Path, name: str, fingerprint: str) -> Path | None:
    """The folder under ``root`` holding a prepared ``name`` dataset with ``fingerprint``."""
    if not root.is_dir():
        return None
    for sub in sorted(root.iterdir()):
        meta = sub / "meta.json"
        if not (sub.is_dir() and meta.is_file()):
            continue
        try:
            m = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(m, dict) and m.get("fingerprint") == fingerprint and m.get("name") == name:
            return sub
    return None


def dataset_of_run(where: str | os.PathLike, info: dict[str, Any], *,
                   data_dir: str | os.PathLike | None = None, progress: bool = False) -> Any:
    """The prepared dataset a run was trained on, from its record ``info``.

    Tried in order: the prepared folder the run recorded; a prepared copy with the same name and
    fingerprint under ``data_dir`` (default: the recorded folder's parent, then
    ``$SRP4CTR_DATA_DIR`` or the user cache); preparing the recorded source again into
    ``data_dir`` (its ``path`` and ``columns``; MovieLens-100k downloads itself).
    The result's fingerprint is the run's, else :class:`~srp4ctr.errors.CheckpointError` names
    both datasets.
    """
    from srp4ctr.data.dataset import load_prepared
    from srp4ctr.data.pipeline import default_data_dir, prepare

    name, fingerprint = info.get("name"), info.get("fingerprint")
    if not name or not fingerprint:
        raise CheckpointError(f"{where}: config.json does not name the dataset it was trained on")
    recorded = Path(info["prepared"]) if info.get("prepared") else None
    if data_dir is not None:
        root = Path(data_dir).expanduser()
    else:  # where the run's copy was prepared, else the default cache
        root = recorded.parent if recorded is not None else default_data_dir()
    roots = [root] + ([default_data_dir()] if data_dir is None else [])
    for folder in (recorded, *(find_prepared(r, name, fingerprint) for r in roots)):
        if folder is None or not (folder / "meta.json").is_file():
            continue
        try:
            ds = load_prepared(folder)
        except DataError:
            continue
        if ds.fingerprint == fingerprint:
            return ds
    source = info.get("path")
    if name == "ml-100k" or (source and Path(source).exists()):
        ds = prepare(name, path=None if name == "ml-100k" else source, data_dir=root,
                     columns=info.get("columns"), progress=progress)
        if ds.fingerprint != fingerprint:
            raise CheckpointError(
                f"{where}: trained on dataset {describe_record(info)}; preparing its source "
                f"again gave {describe_dataset(ds)} (the source files changed?)")
        return ds
    raise CheckpointError(
        f"{where}: trained on dataset {describe_record(info)}, which is neither in its recorded "
        f"folder nor under {root}"
        + (f", and its source {source} is gone" if source else "")
        + "; pass the dataset (--dataset/--path, or dataset=) or where it was prepared "
        "(--data-dir, data_dir=)")
