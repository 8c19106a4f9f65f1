"""The end-to-end demo on MovieLens-100k (``srp4ctr demo``).

Prepare the data, pre-train FG-BERT, fine-tune SRP4CTR from it and a DIN baseline on the same
split, compare them on the test split, and write ``OUT/summary.json`` (checkpoints in
``OUT/pretrain``, ``OUT/ctr`` and ``OUT/din``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from srp4ctr.errors import InputError

# Settings of the two demo sizes; the full demo fits in about 10 minutes on 2 CPU cores, the
# quick one in about 2 (measured, see README).
DEMO_SETTINGS = {
    "full": {"max_len": 50, "pre_epochs": 8, "ft_epochs": 2, "ft_steps": None, "batch": 256},
    "quick": {"max_len": 30, "pre_epochs": 2, "ft_epochs": 1, "ft_steps": 60, "batch": 256},
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
    pre_tc = TrainConfig(epochs=s["pre_epochs"], batch_size=128, progress=progress, patience=3)
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
    summary["seconds"] = time.perf_counter() - t0
    with open(out_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(_table(summary))
    return summary


def _say(msg: str, enabled: bool) -> None:
    if enabled:
        print(f"[demo] {msg}", flush=True)


def _table(summary: dict) -> str:
    lines = ["", "MovieLens-100k, test split (per-user 80/10/10 by time; label = rating >= 4)",
             f"{'model':<10} {'AUC':>8} {'gAUC':>8} {'logloss':>8}"]
    for kind, r in summary["ctr"].items():
        t = r["test"]
        lines.append(f"{kind:<10} {t['auc']:>8.4f} {t['gauc']:>8.4f} {t['logloss']:>8.4f}")
    lines.append(f"total {summary['seconds']:.0f} s")
    return "\n".join(lines)
