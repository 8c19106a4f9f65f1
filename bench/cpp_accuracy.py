"""Accuracy of the engine's scoring paths on a trained model and real data (not a timing).

For a fine-tuned SRP4CTR checkpoint on MovieLens-100k, every test-split CTR sample (history =
the user's earlier interactions, as in training; candidate = the interaction's item; label =
rating >= 4) is served through the engine with each scoring path, and the whole catalogue is
scored for every user (history = all their interactions). Reported per path, against the torch
backend in fp32 (the reference the engine tests tie to the training forward):

- the largest and mean absolute difference of the click probabilities (catalogue and test),
- test AUC and logloss (``srp4ctr.metrics``), so a precision mode's effect on ranking shows.

Usage::

    python bench/cpp_accuracy.py --run RUN_DIR [--out bench/results/cpp_accuracy.json]

Paths: ``torch`` fp32, ``cpp`` fp32, ``cpp`` bf16 (the instruction set ``auto`` picks: AMX where
the CPU has it), ``cpp_bf16_avx512`` (AVX512-BF16, only where ``auto`` picks AMX), ``torch``
bf16 (whichever can run here).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from benchlib import raw_history

PATHS = {  # name: (backend, dtype, the C++ instruction set or None for the default)
    "torch_fp32": ("torch", torch.float32, None),
    "cpp_fp32": ("cpp", torch.float32, None),
    "cpp_bf16": ("cpp", torch.bfloat16, None),
    "cpp_bf16_avx512": ("cpp", torch.bfloat16, "avx512"),
    "torch_bf16": ("torch", torch.bfloat16, None),
}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load(run, ds, backend, dtype, isa):
    from srp4ctr.engine import Engine

    return Engine.load(run, dataset=ds, backend=backend, dtype=dtype,
                       **({} if isa is None else {"isa": isa}))


def main(argv=None) -> dict:
    from srp4ctr import data
    from srp4ctr.metrics import auc, logloss

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="fine-tuning checkpoint (SRP4CTR)")
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--out", default="bench/results/cpp_accuracy.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = data.prepare(args.dataset)
    engines = {}
    for name, (backend, dtype, isa) in PATHS.items():
        try:
            e = _load(args.run, ds, backend, dtype, isa)
        except RuntimeError as err:  # the forced instruction set is not on this CPU
            print(f"{name}: skipped ({err})", flush=True)
            continue
        if e.backend != backend:  # cpp falls back to torch when not built: skip, do not mislabel
            continue
        if isa is not None and engines.get("cpp_bf16") is not None and \
                engines["cpp_bf16"]._backend.describe()["isa"] == isa:
            continue  # the default already is this instruction set
        engines[name] = e
    test_rows = np.flatnonzero(ds.split == 2)
    users = ds.user[test_rows]
    labels = ds.label[test_rows].astype(np.float64)
    cand = ds.item_raw[ds.item[test_rows]]
    catalogue = ds.item_raw[1 : ds.n_items + 1]
    out = {"run": str(args.run), "dataset": args.dataset, "n_test": int(len(test_rows)),
           "n_users": int(ds.n_users), "n_items": int(ds.n_items), "paths": {},
           "machine": {"cpu": _cpu_model(), "platform": platform.platform(),
                       "torch": torch.__version__, "threads": args.threads}}
    ref_test = ref_cat = None
    for name, e in engines.items():
        t0 = time.perf_counter()
        test_p = np.empty(len(test_rows))
        # one request per test sample: its own history (the user's rows before it)
        for i, (u, r) in enumerate(zip(users, test_rows)):
            c = e.encode_user(raw_history(ds, int(u), int(r)))
            test_p[i] = float(e.score(c, [cand[i]])[0])
        cat = []
        for u in range(1, ds.n_users + 1):
            c = e.encode_user(raw_history(ds, u, ds.user_rows(u).stop))
            cat.append(e.score(c, catalogue).numpy())
        cat_p = np.concatenate(cat)
        if ref_test is None:
            ref_test, ref_cat = test_p, cat_p
        rec = {"backend": e.backend, "dtype": str(e.dtype).replace("torch.", ""),
               "describe": e._backend.describe(),
               "test_auc": float(auc(labels, test_p)), "test_logloss": float(logloss(labels, test_p)),
               "max_abs_diff_test": float(np.abs(test_p - ref_test).max()),
               "mean_abs_diff_test": float(np.abs(test_p - ref_test).mean()),
               "max_abs_diff_catalogue": float(np.abs(cat_p - ref_cat).max()),
               "mean_abs_diff_catalogue": float(np.abs(cat_p - ref_cat).mean()),
               "seconds": time.perf_counter() - t0}
        out["paths"][name] = rec
        print(f"{name:11s} AUC {rec['test_auc']:.6f} logloss {rec['test_logloss']:.6f} "
              f"max|Δp| test {rec['max_abs_diff_test']:.2e} catalogue "
              f"{rec['max_abs_diff_catalogue']:.2e} (mean {rec['mean_abs_diff_catalogue']:.1e})",
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
