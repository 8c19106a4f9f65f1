"""The end-to-end demo on MovieLens-100k (``srp4ctr demo``).

Prepare the data, pre-train FG-BERT, fine-tune SRP4CTR from it and a DIN baseline on the same
split, compare them on the test split, and write ``OUT/summary.json`` (checkpoints in
``OUT/pretrain``, ``OUT/ctr`` and ``OUT/din``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from srp4ctr.errors import InputError

# Settings of the two demo sizes; measured on 2 CPU cores: the full demo 3.8 min (Xeon) to
# 8.1 min (EPYC Zen 3), the quick one about 1 to 2 (README, "End-to-end demo").
DEMO_SETTINGS = {
    "full": {"max_len": 50, "pre_epochs": 20, "ft_epochs": 3, "ft_steps": None, "batch": 256},
    "quick": {"max_len": 50, "pre_epochs": 8, "ft_epochs": 1, "ft_steps": 150, "batch": 256},
}


def run_demo(out: str = "srp4ctr-demo", quick: bool = False, data_dir: str | None = None,
             progress: bool = True) -> dict:
    from srp4ctr import data
    from srp4ctr.models import ModelConfig
    from srp4ctr.train import TrainConfig, finetune, pretrain

    s = DEMO_SETTINGS["quick" if quick else "full"]
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ds = data.prepare("ml-100k", data_dir=data_dir, progress=progress)
    summary: dict = {"settings": s, "data": ds.summary()}
    _say(f"data: {ds.n_users} users, {ds.n_items} items, {len(ds.item)} interactions", progress)

    mcfg = ModelConfig(max_len=s["max_len"])
    pre_tc = TrainConfig(epochs=s["pre_epochs"], batch_size=64, progress=progress, patience=3)
    pre = pretrain(ds, out_dir / "pretrain", model_config=mcfg, train_config=pre_tc)
    summary["pretrain"] = {"test": pre["test"], "valid": pre["valid"],
                           "sequences_per_s": pre["sequences_per_s"],
                           "seconds": pre["train_seconds"]}
    _say(f"FG-BERT pre-training: test HR@10 {pre['test']['hr@10']:.4f}, "
         f"NDCG@10 {pre['test']['ndcg@10']:.4f} (full ranking)", progress)

    ft_tc = TrainConfig(epochs=s["ft_epochs"], batch_size=s["batch"], progress=progress,
                        max_steps_per_epoch=s["ft_steps"], patience=1)
    runs = {}
    for name, kind, pretrained in (("ctr", "srp4ctr", out_dir / "pretrain"),
                                   ("din", "din", None)):
        r = finetune(ds, out_dir / name, kind=kind, model_config=mcfg, train_config=ft_tc,
                     pretrained=pretrained, name=kind)
        runs[kind] = {"test": r["test"], "valid": r["valid"], "samples_per_s": r["samples_per_s"],
                      "seconds": r["train_seconds"], "checkpoint": str(out_dir / name)}
        _say(f"{kind}: test AUC {r['test']['auc']:.4f}, gAUC {r['test']['gauc']:.4f}, "
             f"logloss {r['test']['logloss']:.4f}", progress)
    summary["ctr"] = runs
    summary["serving"] = serve_demo(ds, out_dir / "ctr", progress=progress)
    summary["onnx"] = onnx_demo(ds, out_dir / "ctr", out_dir / "onnx", progress=progress)
    summary["seconds"] = time.perf_counter() - t0
    with open(out_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(_table(summary))
    print(f"\nwritten to {out_dir}: summary.json; checkpoints pretrain/, din/ and ctr/ (a serving "
          f"bundle: srp4ctr serve --model {out_dir / 'ctr'}); the ONNX export onnx/")
    return summary


def raw_history(ds, user: int, before_split: int = 2) -> dict:
    """User ``user``'s raw MovieLens history (ids, ratings, unix seconds) before a split."""
    rows = ds.user_rows(user)
    keep = ds.split[rows] < before_split
    items = ds.item_raw[ds.item[rows][keep]]
    tokens = ds.behaviour["rating"][rows][keep]
    ratings = [ds.value_vocab[t - 1] for t in tokens.tolist()]
    return {"item_id": [int(i) for i in items], "rating": ratings,
            "timestamp": [int(t) for t in ds.timestamp[rows][keep]]}


def serve_demo(ds, checkpoint, *, n_users: int = 5, top: int = 5, progress: bool = True) -> dict:
    """Encode a few test users with the engine and score every item for each."""
    import numpy as np
    import torch

    from srp4ctr.engine import Engine

    engine = Engine.load(checkpoint, dataset=ds)
    all_items = [int(x) for x in ds.item_raw[1:]]
    users = list(range(1, n_users + 1))
    # warm-up request (first-call allocations are not part of serving latency)
    engine.score(engine.encode_user(raw_history(ds, users[0])), all_items)
    out = []
    for u in users:
        hist = raw_history(ds, u)  # everything before the user's test interactions
        t0 = time.perf_counter()
        cache = engine.encode_user(hist)
        t1 = time.perf_counter()
        probs = engine.score(cache, all_items)
        t2 = time.perf_counter()
        seen = set(hist["item_id"])
        order = torch.argsort(probs, descending=True).tolist()
        best = [(all_items[i], float(probs[i])) for i in order if all_items[i] not in seen][:top]
        out.append({"user": int(ds.user_raw[u]), "history_len": len(hist["item_id"]),
                    "encode_ms": 1e3 * (t1 - t0), "score_ms": 1e3 * (t2 - t1),
                    "n_candidates": len(all_items), "cache_bytes": cache.nbytes,
                    "top": best})
        _say(f"user {ds.user_raw[u]}: history {len(hist['item_id'])}, encode "
             f"{1e3 * (t1 - t0):.1f} ms + score {len(all_items)} items {1e3 * (t2 - t1):.1f} ms; "
             f"top unseen items {[i for i, _ in best]}", progress)
    lat = np.array([r["encode_ms"] + r["score_ms"] for r in out])
    return {"backend": engine.backend, "threads": torch.get_num_threads(), "users": out,
            "request_ms_median": float(np.median(lat))}


def onnx_demo(ds, checkpoint, out, *, progress: bool = True) -> dict:
    """Export the CTR model to ONNX and check ONNX Runtime against the engine."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        _say("onnxruntime is not installed: ONNX export skipped (pip install 'srp4ctr[onnx]')",
             progress)
        return {"skipped": "onnxruntime is not installed"}
    from srp4ctr.engine.onnx_export import export_onnx

    m = export_onnx(checkpoint, out, dataset=ds)
    v = m["verification"]
    _say(f"ONNX export in {out}: ONNX Runtime {v.get('onnxruntime')} vs engine, max abs diff "
         f"probabilities {v['max_abs_diff']['probs']:.1e}, encoder outputs "
         f"{v['max_abs_diff']['encoder']:.1e} (tolerance {v['atol']})", progress)
    return {"out": str(out), "verification": v}


def _say(msg: str, enabled: bool) -> None:
    if enabled:
        logging.getLogger(__name__).info(f"demo: {msg}")


def _table(summary: dict) -> str:
    lines = ["", "MovieLens-100k, test split (per-user 80/10/10 by time; label = rating >= 4)",
             f"{'model':<10} {'AUC':>8} {'gAUC':>8} {'logloss':>8}"]
    for kind, r in summary["ctr"].items():
        t = r["test"]
        lines.append(f"{kind:<10} {t['auc']:>8.4f} {t['gauc']:>8.4f} {t['logloss']:>8.4f}")
    sv = summary["serving"]
    lines += ["", f"Serving ({sv['backend']} backend, {sv['threads']} threads): one request = "
              f"encode_user + score all {sv['users'][0]['n_candidates']} items"]
    for r in sv["users"]:
        top = ", ".join(f"{i} ({p:.2f})" for i, p in r["top"])
        lines.append(f"  user {r['user']:>4}: {r['encode_ms'] + r['score_ms']:6.1f} ms; "
                     f"highest P(click) among unseen items: {top}")
    lines.append(f"median request latency {sv['request_ms_median']:.1f} ms")
    lines.append(f"total {summary['seconds']:.0f} s")
    return "\n".join(lines)
