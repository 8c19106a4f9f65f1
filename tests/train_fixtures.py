"""A tiny synthetic MovieLens-like dataset, written by the tests as an ml-1m folder, and the
helpers the engine and ONNX tests share: the tiny model config, spread-out random weights, a
user's raw history and the training forward on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from srp4ctr import data

def cpu_backends() -> list[str]:
    """The CPU backends a test runs on: torch, and cpp where the extension is built or required
    (``SRP4CTR_REQUIRE_CPP=1``: a missing extension then fails those tests instead of dropping
    them)."""
    import os

    from srp4ctr import _ext

    required = os.environ.get("SRP4CTR_REQUIRE_CPP", "0") not in ("", "0")
    return ["torch"] + (["cpp"] if required or _ext.extension() is not None else [])


# A small SRP4CTR for the engine tests (max_len 16).
TINY = {"d_model": 16, "n_layers": 2, "n_heads": 2, "max_len": 16, "n_queries": 2,
        "head_hidden": (16, 8)}


def write_tiny_ml1m(folder: Path, n_users: int = 40, n_items: int = 60, per_user=(12, 40),
                    seed: int = 0) -> Path:
    """ratings.dat / movies.dat / users.dat in the MovieLens-1M ``::`` format.

    Users like items whose genre matches their taste, so there is a signal to learn.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    genres = ["Action", "Comedy", "Drama", "Horror", "Romance"]
    item_genre = rng.integers(0, len(genres), size=n_items + 1)
    with open(folder / "movies.dat", "w", encoding="latin-1") as f:
        for i in range(1, n_items + 1):
            g = genres[item_genre[i]]
            g2 = genres[(item_genre[i] + 1) % len(genres)]
            f.write(f"{i}::Movie {i} ({1970 + i % 40})::{g}|{g2}\n")
    with open(folder / "users.dat", "w") as f:
        f.writelines(f"{u}::{'MF'[u % 2]}::{[1, 18, 25, 35][u % 4]}::{u % 20}::0000{u}\n" for u in range(1, n_users + 1))
    rows = []
    for u in range(1, n_users + 1):
        taste = u % len(genres)
        n = int(rng.integers(per_user[0], per_user[1] + 1))
        items = rng.choice(np.arange(1, n_items + 1), size=min(n, n_items), replace=False)
        t = 978300000 + int(rng.integers(0, 10**6))
        for it in items:
            t += int(rng.integers(0, 50000))
            like = item_genre[it] == taste
            r = int(np.clip(rng.normal(4.3 if like else 2.7, 0.8), 1, 5).round())
            rows.append(f"{u}::{it}::{r}::{t}\n")
    with open(folder / "ratings.dat", "w") as f:
        f.writelines(rows)
    return folder


def prepare_tiny(root: Path, cache: str = "cache", **kw):
    """``write_tiny_ml1m`` into ``root / "ml-1m"`` (``kw`` passed on), then ``data.prepare`` it
    with ``root / cache`` as the data folder."""
    src = write_tiny_ml1m(root / "ml-1m", **kw)
    return data.prepare("ml-1m", path=str(src), data_dir=str(root / cache), progress=False)


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """Random weights with some spread (fresh models score everything near 0.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def raw_history(ds, user: int, end: int | None = None, user_id: bool = True,
                lists: bool = True) -> dict:
    """User ``user``'s raw interactions (its rows before flat row ``end``), as a caller has them:
    Python lists, or with ``lists=False`` the numpy arrays."""
    rows = ds.user_rows(user)
    stop = rows.stop if end is None else end
    sl = slice(rows.start, stop)
    h = {
        "item_id": ds.item_raw[ds.item[sl]],
        "rating": np.asarray(ds.value_vocab)[ds.behaviour["rating"][sl] - 1],
        "timestamp": ds.timestamp[sl],
    }
    if lists:
        h = {k: v.tolist() for k, v in h.items()}
    if user_id:
        h["user_id"] = int(ds.user_raw[user])
    return h


def model_probs(model, ds, history: dict, raw_cands) -> torch.Tensor:
    """The training forward on a batch of C copies of the history (built by the data pipeline)."""
    arr = ds.encode_user_history(history, max_len=model.config.max_len)
    cand = torch.as_tensor(ds.encode_items(np.asarray(raw_cands)))
    C, n = cand.shape[0], int(arr["hist_len"])
    width = max(n, 1)

    def rows(key):
        a = np.zeros(width, np.int64)
        a[:n] = arr[key]
        return torch.as_tensor(a).expand(C, width)

    batch = {"hist_item": rows("hist_item"), "hist_len": torch.full((C,), n), "cand_item": cand}
    for f in ds.behaviour_fields:
        batch[f"hist_{f}"] = rows(f"hist_{f}")
    for f, t in ds.user_table.items():
        batch[f"user_{f}"] = torch.full((C,), int(arr.get(f"user_{f}", t[0])))
    with torch.no_grad():
        return torch.sigmoid(model(batch))


def spread_bundle(root: Path, ds, config: dict, seed: int, name: str = "bundle") -> Path:
    """``finetune`` one step on ``ds``, spread the weights (:func:`perturbed`: one step leaves
    every probability near 0.5) and save them as a serving bundle ``root / name``."""
    from srp4ctr.bundle import write_bundle_files
    from srp4ctr.models import ModelConfig
    from srp4ctr.train import TrainConfig, finetune, load_model
    from srp4ctr.train.checkpoint import save_checkpoint

    tc = TrainConfig(epochs=1, max_steps_per_epoch=1, batch_size=64, progress=False)
    finetune(ds, root / f"{name}-ft", model_config=ModelConfig(**config), train_config=tc)
    model, cfg = load_model(root / f"{name}-ft", dataset_fingerprint=ds.fingerprint)
    perturbed(model, seed=seed, scale=0.2)
    cfg = {k: v for k, v in cfg.items() if k not in ("format", "format_version",
                                                      "weights_sha256")}
    return save_checkpoint(root / name, model, cfg,
                           extra=lambda tmp: write_bundle_files(tmp, ds))
