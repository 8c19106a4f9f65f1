"""Taobao-size data end to end, one command, bounded in time::

    python bench/scale.py [--events 10_000_000] [--out bench/results/scale.json]

A synthetic log in Taobao UserBehavior's format (``user,item,category,behavior,timestamp``, no
header; 1M users, 4M items, 10k categories; every item once (so that the vocabulary is the
whole catalogue, as in the public log's 4.2M items over 100M events), the other events' items
drawn by a power law of popularity (exponent 1.1, over shuffled ids), user activity a power law
too (exponent 0.6), behaviour pv / cart / fav / buy at 89 / 5.5 / 3 /
2.5%, nine days of timestamps) is generated on the fly, then run through every stage, each in its
own process so that its peak RSS is its own:

1. ``prepare`` — ``srp4ctr.data.prepare("taobao", path=...)``: wall time, events/s, peak RSS;
2. ``pretrain`` — FG-BERT, one epoch slice of ``--steps`` steps (batch 64, history 50, d 64, 2
   layers; the item head a sampled softmax, ``ModelConfig.softmax="auto"``): sequences/s and
   peak RSS; then the same slice under ``torchrun`` with 2 ranks (gloo, 1 thread each): each
   rank's peak RSS and its proportional set size (PSS, shared pages split between the ranks);
3. ``finetune`` — SRP4CTR from that checkpoint, one slice: samples/s, peak RSS;
4. ``engine`` — ``Engine.load`` of the fine-tuned run (time, RSS) and requests: one user's
   50-event history encoded and C = 1000 items scored (each round its own history and
   candidates, drawn by the log's popularity), median of 30.

The same stages run on a reference log with the same events per user but 100k items and
1/10 of the events (``reference`` in the JSON), for the goals' ratios: pre-training throughput
at 4M items against 100k items, and the request latency at 4M against 100k. ``--events
100_000_000`` is the full Taobao size (about 10 minutes on 2 cores, most of it preparing;
with ``--no-reference``). Writes JSON (every stage's figures, the machine) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BEHAVIOURS = ("pv", "cart", "fav", "buy")
BEHAVIOUR_P = (0.89, 0.055, 0.03, 0.025)
T0, DAYS = 1511539200, 9  # 2017-11-25 00:00 UTC, like the public log
CHUNK = 5_000_000
ALPHA = 1.1  # item popularity: P(rank r) ∝ (r + 1)^-ALPHA


# ----------------------------------------------------------------------------- generating
def _power_law(rng, n: int, size: int, a: float):
    """``size`` draws of ranks 0..n-1 with P(r) ∝ (r + 1)^-a (inverse CDF of the continuous
    power law, truncated at n)."""
    import numpy as np

    u = rng.random(size)
    lo, hi = 1.0, float(n + 1)
    e = 1.0 - a
    x = (lo ** e + u * (hi ** e - lo ** e)) ** (1.0 / e)
    return np.minimum(np.floor(x).astype(np.int64) - 1, n - 1)


def generate(path: Path, events: int, users: int, items: int, categories: int = 10_000,
             seed: int = 0) -> dict:
    """Write the synthetic log to ``path`` (CSV, no header) in chunks; returns its shape."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    item_ids = rng.permutation(items).astype(np.int64) + 1  # popularity rank -> raw item id
    user_ids = rng.permutation(users).astype(np.int64) + 1
    item_cat = rng.integers(1, categories + 1, size=items + 1)
    t0 = time.perf_counter()
    opts = pacsv.WriteOptions(include_header=False, quoting_style="none")
    with open(path, "wb") as f:
        for s in range(0, events, CHUNK):
            n = min(CHUNK, events - s)
            rank = _power_law(rng, items, n, ALPHA)
            sweep = np.arange(s, s + n) < items  # the first `items` rows: each item once
            rank[sweep] = np.arange(s, s + n)[sweep]
            it = item_ids[rank]
            us = user_ids[_power_law(rng, users, n, 0.6)]
            beh = np.asarray(BEHAVIOURS)[rng.choice(4, size=n, p=BEHAVIOUR_P)]
            ts = T0 + rng.integers(0, DAYS * 86400, size=n)
            table = pa.table({"u": us, "i": it, "c": item_cat[it], "b": beh, "t": ts})
            pacsv.write_csv(table, f, write_options=opts)
    return {"events": events, "users_drawn": users, "items_drawn": items,
            "categories": categories, "bytes": path.stat().st_size,
            "generate_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- stages
def _memory() -> dict:
    """This process's peak RSS and current RSS / PSS (MiB; Linux). The peak is VmHWM, the high
    water mark of this process image: ``ru_maxrss`` would carry the parent's peak over the
    fork and exec that started the stage."""
    from srp4ctr._memory import proc_status_mib

    peak = proc_status_mib("VmHWM")
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
           if math.isnan(peak) else peak}
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            k, *v = line.split()
            if k in ("Rss:", "Pss:"):
                out[k[:-1].lower() + "_mib"] = int(v[0]) / 1024
    except OSError:
        pass
    return out


def _model_config(args):
    from srp4ctr.models import ModelConfig

    # the item head sampled in both logs by rule (the 100k-item reference's vocabulary,
    # 100,002 with padding and OOV, would clear the default 100k threshold only by those two)
    return ModelConfig(d_model=64, n_layers=2, n_heads=2, max_len=args.max_len, n_queries=4,
                       sampled_softmax_above=50_000)


def _train_config(args, **kw):
    from srp4ctr.train import TrainConfig

    return TrainConfig(epochs=1, batch_size=64, max_steps_per_epoch=args.steps, patience=1,
                       eval_max_samples=args.eval_samples, eval_batch_size=256,
                       progress=False, num_threads=args.threads, **kw)


def stage_prepare(args) -> dict:
    from srp4ctr import data

    t = time.perf_counter()
    ds = data.prepare("taobao", path=args.csv, data_dir=args.data_dir, progress=False)
    wall = time.perf_counter() - t
    return {"wall_s": wall, "events_per_s": ds.n_interactions / wall, "users": ds.n_users,
            "items": ds.n_items, "events": ds.n_interactions, "prepared": str(ds.path),
            "prepared_bytes": sum(f.stat().st_size for f in Path(ds.path).rglob("*")
                                  if f.is_file()), **_memory()}


def _load(args):
    from srp4ctr.data import load_prepared

    return load_prepared(args.prepared, verify=False)


def stage_pretrain(args) -> dict:
    from srp4ctr.train import pretrain
    from srp4ctr.train.distributed import World

    ds = _load(args)
    t = time.perf_counter()
    res = pretrain(ds, args.run_dir, model_config=_model_config(args), train_config=_train_config(args))
    wall = time.perf_counter() - t
    h = res["history"][0]
    rank = int(os.environ.get("RANK", "0"))
    out = {"wall_s": wall, "train_seconds": h["train_seconds"],
           "sequences_per_s": h["train_samples_per_s"], "steps": args.steps,
           "softmax": res["softmax"], "rank": rank, "world": int(os.environ.get("WORLD_SIZE", 1)),
           **_memory()}
    del World
    return out


def stage_finetune(args) -> dict:
    from srp4ctr.train import finetune

    ds = _load(args)
    t = time.perf_counter()
    res = finetune(ds, args.run_dir, kind="srp4ctr", model_config=_model_config(args),
                   train_config=_train_config(args), pretrained=args.pretrained)
    h = res["history"][0]
    return {"wall_s": time.perf_counter() - t, "train_seconds": h["train_seconds"],
            "samples_per_s": h["train_samples_per_s"], "steps": args.steps, **_memory()}


def _requests(engine, ds, args) -> dict:
    """Median / p90 of whole requests (a 50-event history encoded, C candidates scored) and
    of the candidate side alone (the user cached), 30 rounds after 3 warm-ups. Every round
    has its own history and candidates, drawn by popularity like the log's events: the same
    candidates every round would score from rows already in the CPU's caches, hiding what a
    large catalogue costs."""
    import numpy as np

    rng = np.random.default_rng(0)
    raw_items = np.asarray(ds.item_raw[1:])
    weights = np.bincount(np.asarray(ds.item, dtype=np.int64), minlength=len(ds.item_raw))[1:]
    p = weights / weights.sum()
    n = args.max_len
    rounds = [({"item_id": rng.choice(raw_items, n, p=p).tolist(),
                "timestamp": (T0 + np.sort(rng.integers(0, DAYS * 86400, n))).tolist(),
                "behavior": rng.choice(BEHAVIOURS, n).tolist()},
               rng.choice(raw_items, args.candidates, p=p)) for _ in range(33)]
    whole, score = [], []
    for i, (history, cands) in enumerate(rounds):
        t = time.perf_counter()
        cache = engine.encode_user(history)
        t1 = time.perf_counter()
        engine.score(cache, cands)
        t2 = time.perf_counter()
        if i >= 3:
            whole.append(t2 - t)
            score.append(t2 - t1)
    return {"request_ms_median": 1e3 * float(np.median(whole)),
            "request_ms_p90": 1e3 * float(np.percentile(whole, 90)),
            "score_ms_median": 1e3 * float(np.median(score)), "candidates": args.candidates}


def stage_engine(args) -> dict:
    """``Engine.load`` as configured by default (per-item tables only within the budget), then,
    where that built none, the same engine forced to build them: the cost of folding the
    candidates' rows per request is the difference of the two."""
    from srp4ctr._memory import release_memory
    from srp4ctr.engine import Engine

    ds = _load(args)
    out: dict = {}
    for name, overrides in (("default", {}), ("tables", {"fold_items": True})):
        release_memory()
        before = _memory()
        t = time.perf_counter()
        engine = Engine.load(args.run_dir, dataset=ds, threads=args.threads, **overrides)
        load_s = time.perf_counter() - t
        loaded = _memory()
        d = _jsonable(engine.describe())
        tables = (d.get("folded") or {}).get("item_tables")
        rec = {"load_s": load_s, "rss_before_load_mib": before.get("rss_mib"),
               "rss_after_load_mib": loaded.get("rss_mib"), "backend": d.get("backend"),
               "item_tables": tables, "item_table_bytes": (d.get("folded") or {}).get(
                   "item_table_bytes"), **_requests(engine, ds, args), **_memory(),
               "describe": d}
        del engine
        if name == "default":
            out.update(rec)
            if tables:
                break
        else:
            out["with_tables"] = rec
    return out


def _jsonable(o):
    return json.loads(json.dumps(o, default=str))


STAGES = {"prepare": stage_prepare, "pretrain": stage_pretrain, "finetune": stage_finetune,
          "engine": stage_engine}


def _stage_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("stage", choices=sorted(STAGES))
    for k in ("csv", "data_dir", "prepared", "run_dir", "pretrained", "result"):
        p.add_argument(f"--{k.replace('_', '-')}", dest=k)
    for k, v in (("steps", 40), ("max_len", 50), ("threads", 2), ("eval_samples", 200),
                 ("candidates", 1000)):
        p.add_argument(f"--{k.replace('_', '-')}", dest=k, type=int, default=v)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    res = STAGES[args.stage](args)
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{args.result}.{rank}").write_text(json.dumps(res))


# ----------------------------------------------------------------------------- driver
def _run(stage: str, result: Path, *, torchrun: int = 0, **kw) -> dict | list[dict]:
    cmd = [sys.executable]
    if torchrun:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    cmd += [str(Path(__file__).resolve()), "stage", stage, "--result", str(result)]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    print(f"  {stage}{' x%d ranks' % torchrun if torchrun else ''}: "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    outs = [json.loads(Path(f"{result}.{r}").read_text()) for r in range(max(torchrun, 1))]
    return outs if torchrun else outs[0]


def run_scale(work: Path, events: int, users: int, items: int, steps: int, threads: int,
              ddp: bool = True) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    csv = work / "UserBehavior.csv"
    print(f"generating {events:,} events ({users:,} users, {items:,} items)", flush=True)
    gen = generate(csv, events, users, items)
    res: dict = {"log": gen}
    prep = _run("prepare", work / "prepare.json", csv=csv, data_dir=work / "data",
                threads=threads)
    res["prepare"] = prep
    csv.unlink()  # the prepared arrays are what every later stage reads
    common = {"prepared": prep["prepared"], "steps": steps, "threads": threads}
    res["pretrain"] = _run("pretrain", work / "pretrain.json", run_dir=work / "pre", **common)
    if ddp:
        ranks = _run("pretrain", work / "ddp.json", torchrun=2, run_dir=work / "pre-ddp",
                     **{**common, "threads": 1})
        one = res["pretrain"]["peak_rss_mib"]
        res["pretrain_ddp"] = {
            "ranks": ranks,
            "sum_peak_rss_mib": sum(r["peak_rss_mib"] for r in ranks),
            "sum_pss_mib": sum(r.get("pss_mib", 0.0) for r in ranks),
            "sum_peak_rss_over_one_rank": sum(r["peak_rss_mib"] for r in ranks) / one,
            "sum_pss_over_one_rank_rss": sum(r.get("pss_mib", 0.0) for r in ranks)
            / res["pretrain"].get("rss_mib", one),
        }
        shutil.rmtree(work / "pre-ddp", ignore_errors=True)
    res["finetune"] = _run("finetune", work / "finetune.json", run_dir=work / "ft",
                           pretrained=work / "pre", **common)
    res["engine"] = _run("engine", work / "engine.json", run_dir=work / "ft", **common)
    return res


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "stage":
        return _stage_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=4_000_000)
    p.add_argument("--steps", type=int, default=40, help="training steps per slice")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-reference", action="store_true", help="skip the 100k-item reference")
    p.add_argument("--no-ddp", action="store_true", help="skip the 2-rank run")
    p.add_argument("--work", help="scratch folder (default: a temporary one, removed after)")
    p.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    a = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from benchlib import machine

    # absolute: the stages run in their own processes from the repository root
    work = Path(a.work).resolve() if a.work else Path(tempfile.mkdtemp(prefix="srp4ctr-scale-"))
    t0 = time.perf_counter()
    try:
        doc = {"command": "python bench/scale.py " + " ".join(argv),
               "machine": machine(), "python": platform.python_version()}
        doc["scale"] = run_scale(work / "scale", a.events, a.users, a.items, a.steps,
                                 a.threads, ddp=not a.no_ddp)
        if not a.no_reference:
            ratio = 10
            doc["reference"] = run_scale(work / "ref", a.events // ratio, a.users // ratio,
                                         100_000, a.steps, a.threads, ddp=False)
            s, r = doc["scale"], doc["reference"]
            doc["ratios"] = {
                "pretrain_throughput_4m_over_100k":
                    s["pretrain"]["sequences_per_s"] / r["pretrain"]["sequences_per_s"],
                "request_latency_4m_over_100k":
                    s["engine"]["request_ms_median"] / r["engine"]["request_ms_median"],
            }
        doc["total_s"] = time.perf_counter() - t0
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the scratch folder's paths (prepared data, runs) as $WORK: nothing of this machine's
    out.write_text(json.dumps(doc, indent=1).replace(str(work), "$WORK") + "\n")
    print(json.dumps({k: doc[k] for k in ("ratios", "total_s") if k in doc}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
