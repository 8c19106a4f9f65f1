"""``srp4ctr experiment``: every model, several seeds, one table.

For each seed: pre-train FG-BERT and the item-id-only BERT on the training part, then fine-tune
every CTR model on the same split and evaluate on the test split. The ``gbdt`` baseline
(:mod:`srp4ctr.train.gbdt`, LightGBM on statistics of the same samples' histories) trains beside
them, with no pre-training. Results are written after each run, so an interrupted experiment
keeps what it finished and ``resume=True`` skips it.

Two protocol details (:func:`protocol_text` states both next to the numbers):

- **Long tail.** Every run also reports its test metrics split by the candidate item's training
  count (``test_by_popularity``, :func:`metrics_by_popularity`): *tail* = test samples whose
  candidate item has at most ``T`` training-split interactions, where ``T`` is the 20th
  percentile of the training counts of **all** catalogue items (items 1..n_items, an item
  without training interactions counted as 0), taken as the nearest rank (the
  ``ceil(0.2 n)``-th smallest count). Items tied at ``T`` all belong to the tail, so the tail
  may hold more than 20% of the catalogue; items never seen in training are always tail.
  *Head* = the rest. The threshold depends on the dataset only: the same for every model, seed
  and negatives variant.
- **Strict time.** ``strict_time=True`` (``srp4ctr experiment --strict-time``) restricts every
  CTR sample's history to interactions strictly earlier in time than the candidate
  (:class:`~srp4ctr.data.samples.CTRDataset`), for the deep models and the GBDT baseline; by
  default interactions of the same second that sort before the candidate are in its history.
  Pre-training is the same either way. One results folder holds one protocol: resuming into a
  folder of the other is an :class:`~srp4ctr.errors.InputError`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from srp4ctr.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    kind: str
    pretrain: str | None = None  # "fgbert", "bert" or None
    overrides: dict = field(default_factory=dict)
    label: str = ""


VARIANTS: dict[str, Variant] = {
    "din": Variant("din", label="DIN"),
    "bst": Variant("bst", label="BST"),
    "user_vector": Variant("user_vector", "fgbert", label="pre-trained user vector as a feature"),
    "srp4ctr_nopretrain": Variant("srp4ctr", None, label="SRP4CTR without pre-training"),
    "srp4ctr_bert": Variant("srp4ctr", "bert", label="SRP4CTR, item-id-only BERT pre-training"),
    "srp4ctr_fgbert": Variant("srp4ctr", "fgbert", label="SRP4CTR (FG-BERT) — full method"),
    "srp4ctr_no_xattn": Variant("srp4ctr", "fgbert", {"use_xattn": False},
                                label="SRP4CTR without uni cross-attention"),
    "srp4ctr_no_qformer": Variant("srp4ctr", "fgbert", {"use_qformer": False},
                                  label="SRP4CTR without Q-Former"),
    # no torch model: srp4ctr.train.gbdt (LightGBM, the gbdt extra) on the same samples
    "gbdt": Variant("gbdt", label="GBDT (LightGBM) on history statistics"),
}

#: model keys trained by srp4ctr.train.gbdt instead of srp4ctr.train.loop.finetune
GBDT_KINDS = ("gbdt",)

METRICS = ("auc", "gauc", "logloss")

#: the long-tail analysis: the tail is the bottom TAIL_SHARE of the catalogue by training count
TAIL_SHARE = 0.2
POPULARITY_GROUPS = ("tail", "head")


def item_train_counts(ds) -> np.ndarray:
    """Training-split interactions of every internal item id, int64 [n_items + 2] (0 for the
    padding id 0, the out-of-vocabulary id n_items + 1 and items never in the training split)."""
    return ds.training_counts({"item": ds.n_items + 2})["item"]


def popularity_threshold(ds, counts: np.ndarray | None = None,
                         tail_share: float = TAIL_SHARE) -> int:
    """The tail's largest training count ``T``: the nearest-rank ``tail_share`` percentile of
    the training counts of all catalogue items 1..n_items (zero-count items included), i.e. the
    ``ceil(tail_share * n_items)``-th smallest count. An item is tail when its count is <= T."""
    counts = item_train_counts(ds) if counts is None else np.asarray(counts, np.int64)
    cat = np.sort(counts[1 : ds.n_items + 1])
    if cat.size == 0:
        return 0
    k = min(cat.size, max(1, math.ceil(round(tail_share * cat.size, 9))))
    return int(cat[k - 1])


def popularity_info(ds, tail_share: float = TAIL_SHARE) -> dict:
    """The split of the catalogue: threshold, and how many items fall in the tail."""
    counts = item_train_counts(ds)
    t = popularity_threshold(ds, counts, tail_share)
    cat = counts[1 : ds.n_items + 1]
    return {"tail_share": tail_share, "threshold": t, "catalogue_items": int(cat.size),
            "tail_items": int((cat <= t).sum()), "untrained_items": int((cat == 0).sum())}


def metrics_by_popularity(ds, user: np.ndarray, label: np.ndarray, prob: np.ndarray,
                          cand_item: np.ndarray, tail_share: float = TAIL_SHARE) -> dict:
    """CTR metrics of the samples split by their candidate item's training count.

    ``{"tail": {auc, gauc, logloss, n, threshold, items}, "head": {...}}``: tail = candidates
    whose item has at most ``threshold`` (:func:`popularity_threshold`) training-split
    interactions, head = the rest; ``items`` = distinct candidate items of the group. A group
    without samples has NaN metrics and ``n`` 0; AUC and gAUC are NaN for a group of one class.
    """
    from srp4ctr import metrics

    counts = item_train_counts(ds)
    t = popularity_threshold(ds, counts, tail_share)
    cand = np.asarray(cand_item, dtype=np.int64).reshape(-1)
    user, label, prob = (np.asarray(a).reshape(-1) for a in (user, label, prob))
    if not cand.size == user.size == label.size == prob.size:
        raise ValueError(f"{cand.size} candidates for {label.size} predictions")
    tail = counts[cand] <= t
    out = {}
    for name, m in (("tail", tail), ("head", ~tail)):
        n = int(m.sum())
        if n:
            got = metrics.ctr_metrics(label[m], prob[m], user[m])
            res = {k: float(got[k]) for k in METRICS}
        else:
            res = {k: float("nan") for k in METRICS}
        out[name] = {**res, "n": n, "threshold": t, "items": int(np.unique(cand[m]).size)}
    return out


def protocol_text(ds, max_len: int, seeds: list[int], negatives: str | None, *,
                  strict_time: bool = False, same_second: float | None = None,
                  popularity: dict | None = None) -> str:
    sample = ("every interaction of the split is a sample, label = rating >= 4"
              if negatives is None else f"sampled negatives ({negatives})")
    if strict_time:
        history = (f"{max_len} interactions of the same user with a timestamp strictly earlier "
                   "than the candidate's (strict-time protocol: interactions of the same second "
                   "are left out")
    else:
        history = (f"{max_len} earlier interactions of the same user in the (timestamp, raw item "
                   "id) order (interactions of the same second that sort before the candidate "
                   "included")
    if same_second is not None and np.isfinite(same_second):
        history += (f"; {same_second:.1%} of test samples have such a same-second interaction "
                    "in the default history")
    history += ")"
    pop = ""
    if popularity:
        pop = (
            f" Long tail: tail = test samples whose candidate item has at most "
            f"{popularity['threshold']} training interactions, the 20th percentile (nearest rank) "
            f"of the training counts of all {popularity['catalogue_items']} catalogue items, items "
            "without training interactions counted as 0 and always tail; every item tied at the "
            f"threshold is tail ({popularity['tail_items']} items, "
            f"{popularity['tail_items'] / max(popularity['catalogue_items'], 1):.1%} of the "
            "catalogue); head = the rest.")
    return (
        f"{ds.name}: {ds.n_users} users, {ds.n_items} items, {len(ds.item)} interactions. "
        "Per-user time-ordered split by position (first 80% train, next 10% validation, last 10% "
        "test). CTR samples: " + sample + "; history = up to " + history + ". Pre-training sees "
        "training interactions only. Metrics on the test split: AUC; gAUC = per-user AUC "
        "weighted by the user's sample count, users with one class skipped; logloss. Early "
        f"stopping and model choice on validation AUC only. Seeds {seeds}." + pop
    )


def check_pretrain_overrides(overrides, pretrain_config: TrainConfig) -> dict[str, dict]:
    """``{kind: {TrainConfig field: value}}`` checked: every kind a pre-training kind, every
    field a ``TrainConfig`` field that gives a valid config over ``pretrain_config``
    (:class:`~srp4ctr.errors.InputError` naming what is wrong). Returns plain dicts."""
    from srp4ctr.errors import InputError
    from srp4ctr.models.registry import model_kinds

    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise InputError(f"pretrain_overrides must map a pre-training kind to settings, got "
                         f"{overrides!r}")
    out = {}
    for kind, ov in overrides.items():
        if kind not in model_kinds("pretrain"):
            raise InputError(f"pretrain_overrides: {kind!r} is not a pre-training kind; "
                             f"known: {list(model_kinds('pretrain'))}")
        if not isinstance(ov, dict):
            raise InputError(f"pretrain_overrides.{kind} must be a mapping of settings")
        for key in ("seed", "progress"):
            if key in ov:
                raise InputError(f"pretrain_overrides.{kind}.{key}: set by the experiment")
        TrainConfig.from_dict({**pretrain_config.to_dict(), **ov})
        out[kind] = dict(ov)
    return out


def run_experiment(
    ds, out: str | os.PathLike, *, seeds: int | list[int] = 5, models: list[str] | None = None,
    model_config=None, train_config: TrainConfig | None = None, resume: bool = True,
    progress: bool = True, pretrain_config: TrainConfig | None = None, jobs: int = 1,
    pretrain_model_config=None, strict_time: bool = False,
    pretrain_overrides: dict[str, dict] | None = None,
) -> dict:
    """Run every (model, seed) not finished yet in ``out`` and write the tables.

    ``jobs > 1`` runs that many trainings at once in worker processes, each with
    ``torch.get_num_threads() // jobs`` threads (or ``train_config.num_threads``): small models
    on few cores gain more from running side by side than from more threads per run. A
    fine-tuning run starts once the pre-training it needs (same seed) has finished.
    ``pretrain_model_config`` (default ``model_config``) may differ from it only in settings that
    do not change the architecture (dropout, mask rate). ``strict_time``: CTR histories hold only
    interactions strictly earlier than the candidate (see the module docstring); a folder holds
    results of one setting only (resuming into one of the other is an ``InputError``).
    ``pretrain_overrides``: per pre-training kind (``"fgbert"``, ``"bert"``), the
    ``TrainConfig`` fields that differ from ``pretrain_config`` for it (each kind tuned on its
    own, e.g. ``{"bert": {"lr": 1e-3}}``).
    """
    from srp4ctr.data.samples import same_second_history_share
    from srp4ctr.errors import InputError
    from srp4ctr.models import ModelConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    models = list(models or VARIANTS)
    if not isinstance(jobs, int) or jobs < 1:
        raise InputError(f"jobs must be an integer >= 1, got {jobs!r}")
    if not isinstance(strict_time, (bool, np.bool_)):
        raise InputError(f"strict_time must be True or False, got {strict_time!r}")
    strict_time = bool(strict_time)
    unknown = [m for m in models if m not in VARIANTS]
    if unknown:
        raise InputError(f"unknown model keys {unknown}; known: {list(VARIANTS)}")
    if any(VARIANTS[m].kind in GBDT_KINDS for m in models):
        from srp4ctr.train.gbdt import require_lightgbm

        require_lightgbm()  # before any training: a missing extra fails at once
    mcfg = model_config or ModelConfig()
    tcfg = train_config or TrainConfig()
    pcfg = pretrain_config or default_pretrain_config(tcfg)
    pmcfg = pretrain_model_config or mcfg
    overrides = check_pretrain_overrides(pretrain_overrides, pcfg)
    results_path = out / "results.json"
    results = _load(results_path) if resume else None
    if results is None or results.get("dataset") != ds.name or results.get("fingerprint") != ds.fingerprint:
        results = {"dataset": ds.name, "fingerprint": ds.fingerprint, "runs": {}, "pretrain": {},
                   "details": {}}
    elif bool(results.get("strict_time", False)) != strict_time:
        # results.json from before the option: the default protocol (strict_time false)
        raise InputError(
            f"{results_path}: holds results of strict_time={bool(results.get('strict_time'))}; "
            f"this experiment asks for strict_time={strict_time}: results of the two protocols "
            "are never mixed in one folder (use another --out, or --no-resume to replace them)")
    results["strict_time"] = strict_time
    results["same_second_history_share"] = {
        name: same_second_history_share(ds, name) for name in ("train", "valid", "test")}
    results["popularity"] = popularity_info(ds)
    results["protocol"] = protocol_text(
        ds, mcfg.max_len, seeds, tcfg.negatives, strict_time=strict_time,
        same_second=results["same_second_history_share"]["test"],
        popularity=results["popularity"])
    results["model_config"] = mcfg.to_dict()
    results["train_config"] = tcfg.to_dict()
    results["pretrain_config"] = pcfg.to_dict()
    results["pretrain_model_config"] = pmcfg.to_dict()
    results["pretrain_overrides"] = overrides
    results["machine"] = machine_info()
    results["seeds"] = seeds
    _write_resolved(out, ds, mcfg, pmcfg, tcfg, pcfg, seeds, models, jobs, strict_time,
                    overrides)
    t_start = time.perf_counter()
    tasks = _plan(results, seeds, models, out, mcfg, pmcfg, tcfg, pcfg,
                  progress and jobs == 1, strict_time, overrides)
    threads = _threads_per_job(tcfg, jobs)
    results["parallel"] = {"jobs": jobs, "threads_per_job": threads}

    def record(task: _Task, r: dict) -> None:
        section = "pretrain" if task.kind == "pretrain" else "details"
        results[section].setdefault(task.name, {})[str(task.seed)] = _slim(r)
        _save(results_path, results)
        from srp4ctr.train.loop import metrics_text

        log.info(f"experiment: done {task.kind} {task.name} seed {task.seed} "
                 f"({r.get('train_seconds', 0):.0f} s): test {metrics_text(r.get('test', {}))}")

    _run_tasks(tasks, ds, jobs, threads, record)
    # one value per seed, in seed order
    results["runs"] = {
        m: {k: [results["details"][m][str(s)]["test"][k] for s in seeds
                if str(s) in results["details"].get(m, {})] for k in METRICS}
        for m in models
    }
    results["valid_runs"] = {
        m: {k: [results["details"][m][str(s)]["valid"][k] for s in seeds
                if str(s) in results["details"].get(m, {})] for k in METRICS}
        for m in models
    }
    results["runs_by_popularity"] = popularity_runs(results, seeds, models)
    results["throughput"] = throughput_summary(results)
    results["cost"] = cost_table(mcfg)
    results["wall_seconds_this_call"] = time.perf_counter() - t_start
    _save(results_path, results)
    write_markdown(out / "results.md", results)
    plot_results(out / "results.png", results)
    return results


# Longest first within a seed, so parallel workers finish together; pre-training before the
# fine-tuning that needs it.
_ORDER = ("srp4ctr_nopretrain", "bst", "srp4ctr_fgbert", "srp4ctr_no_xattn", "srp4ctr_bert",
          "srp4ctr_no_qformer", "user_vector", "din", "gbdt")


@dataclass(frozen=True)
class _Task:
    kind: str  # "pretrain" or "finetune"
    name: str  # pre-training kind or model key
    seed: int
    out_dir: str
    kwargs: dict
    needs: tuple = ()  # (kind, name, seed) keys that must finish first

    @property
    def key(self) -> tuple:
        return (self.kind, self.name, self.seed)


def _plan(results, seeds, models, out: Path, mcfg, pmcfg, tcfg, pcfg, progress: bool,
          strict_time: bool = False, pretrain_overrides: dict | None = None) -> list[_Task]:
    """The runs still to do, in the order they should start."""
    tasks = []
    ordered = sorted(models, key=lambda m: _ORDER.index(m) if m in _ORDER else len(_ORDER))
    for seed in seeds:
        tc = TrainConfig.from_dict({**tcfg.to_dict(), "seed": seed, "progress": progress})
        needed = {VARIANTS[m].pretrain for m in models} - {None}
        pre_dirs, pending = {}, set()
        for pkind in sorted(needed):
            pdir = out / "runs" / f"seed{seed}" / f"pretrain_{pkind}"
            pre_dirs[pkind] = pdir
            done = results["pretrain"].get(pkind, {}).get(str(seed))
            if done is not None and (pdir / "config.json").exists():
                continue
            ptc = TrainConfig.from_dict({**pcfg.to_dict(),
                                         **(pretrain_overrides or {}).get(pkind, {}),
                                         "seed": seed, "progress": progress})
            tasks.append(_Task("pretrain", pkind, seed, str(pdir),
                               {"model_config": pmcfg, "train_config": ptc, "kind": pkind}))
            pending.add(pkind)
        for m in ordered:
            if str(seed) in results["details"].get(m, {}):
                continue
            v = VARIANTS[m]
            mc = type(mcfg).from_dict({**mcfg.to_dict(), **v.overrides})
            needs = (("pretrain", v.pretrain, seed),) if v.pretrain in pending else ()
            tasks.append(_Task(
                "finetune", m, seed, str(out / "runs" / f"seed{seed}" / m),
                {"kind": v.kind, "model_config": mc, "train_config": tc,
                 "pretrained": str(pre_dirs[v.pretrain]) if v.pretrain else None,
                 "name": f"{m} seed {seed}", "strict_time": strict_time}, needs))
    return tasks


def _threads_per_job(tcfg: TrainConfig, jobs: int) -> int:
    if tcfg.num_threads:
        return int(tcfg.num_threads)
    import torch

    return max(1, torch.get_num_threads() // jobs)


def _execute(task: _Task, ds, threads: int | None) -> dict:
    from srp4ctr.train.loop import finetune, pretrain

    kwargs = dict(task.kwargs)
    if threads:
        tc = kwargs["train_config"]
        kwargs["train_config"] = TrainConfig.from_dict({**tc.to_dict(), "num_threads": threads})
    if task.kind == "pretrain":
        fn = pretrain
    elif kwargs["kind"] in GBDT_KINDS:
        from srp4ctr.train.gbdt import train_gbdt as fn
    else:
        fn = finetune
    return fn(ds, task.out_dir, **kwargs)


_WORKER_DS = None


def _worker_init(ds) -> None:
    global _WORKER_DS
    _WORKER_DS = ds


def _worker_run(task: _Task, threads: int) -> dict:
    return _execute(task, _WORKER_DS, threads)


def _run_tasks(tasks: list[_Task], ds, jobs: int, threads: int, record) -> None:
    """Run ``tasks`` (dependencies respected) inline or in ``jobs`` worker processes, calling
    ``record(task, result)`` in this process as each finishes."""
    if jobs == 1:
        for t in tasks:
            record(t, _execute(t, ds, None))
        return
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    finished: set = set()
    waiting = list(tasks)
    running: dict = {}
    # spawn: a fork of a process that has run torch's thread pools can hang
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                             initializer=_worker_init, initargs=(ds,)) as pool:
        while waiting or running:
            for t in list(waiting):
                if len(running) >= jobs:
                    break
                if all(n in finished for n in t.needs):
                    waiting.remove(t)
                    running[pool.submit(_worker_run, t, threads)] = t
            if not running:  # unreachable unless a dependency is missing
                raise RuntimeError(f"experiment tasks wait on runs that never start: {waiting}")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                t = running.pop(fut)
                record(t, fut.result())  # a failed run stops here; finished runs are saved
                finished.add(t.key)


#: the settings an experiment resolved, in the ``--config`` format (:mod:`srp4ctr.runconfig`)
CONFIG_FILE = "config.yaml"


def _write_resolved(out: Path, ds, mcfg, pmcfg, tcfg, pcfg, seeds, models, jobs,
                    strict_time: bool = False, pretrain_overrides: dict | None = None) -> None:
    from srp4ctr.data.recorded import dataset_record
    from srp4ctr.runconfig import PRETRAIN_MODEL_KEYS, write_run_config

    rec = dataset_record(ds)
    dataset = {"name": ds.name} | {k: rec[k] for k in ("path", "columns") if rec[k] is not None}
    pre_model = {k: getattr(pmcfg, k) for k in PRETRAIN_MODEL_KEYS
                 if getattr(pmcfg, k) != getattr(mcfg, k)}
    write_run_config(out / CONFIG_FILE, {
        "dataset": dataset, "model": mcfg.to_dict(), "pretrain_model": pre_model,
        "finetune": tcfg.to_dict(), "pretrain": pcfg.to_dict(),
        "experiment": {"seeds": list(seeds), "models": list(models), "jobs": int(jobs),
                       "strict_time": bool(strict_time),
                       **({"pretrain_overrides": pretrain_overrides}
                          if pretrain_overrides else {})},
    }, f"the settings of this experiment: srp4ctr experiment --config {CONFIG_FILE} --out DIR "
       "repeats it")


def default_pretrain_config(finetune: TrainConfig) -> TrainConfig:
    """Pre-training sees ~1k sequences per epoch on MovieLens-100k: small batches, more epochs."""
    return TrainConfig.from_dict({**finetune.to_dict(), "batch_size": 64, "epochs": 30,
                                  "patience": 3, "max_steps_per_epoch": None})


def _slim(r: dict) -> dict:
    """A run's result as the tables keep it: no history, and its dataset by name and
    fingerprint only (results are published; the run folders keep the paths)."""
    out = {k: v for k, v in r.items() if k != "history"} | {"epochs_run": len(r.get("history", []))}
    if isinstance(out.get("dataset"), dict):
        out["dataset"] = {k: out["dataset"].get(k) for k in ("name", "fingerprint")}
    return out


def _load(path: Path):
    if path.exists():
        with open(path) as f:
            return json.load(f)
    return None


def _save(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def machine_info() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def throughput_summary(results: dict) -> dict:
    out = {}
    for pkind, per_seed in results.get("pretrain", {}).items():
        vals = [r["sequences_per_s"] for r in per_seed.values() if "sequences_per_s" in r]
        if vals:
            out[f"pretrain_{pkind}_sequences_per_s"] = float(np.median(vals))
    for m, per_seed in results.get("details", {}).items():
        vals = [r["samples_per_s"] for r in per_seed.values() if "samples_per_s" in r]
        if vals:
            out[f"finetune_{m}_samples_per_s"] = float(np.median(vals))
    return out


def cost_table(mcfg, candidates=(1, 100)) -> list[dict]:
    """Analytic FLOPs per request (the paper's efficiency- and inference-FLOPs)."""
    from srp4ctr.models import flops_per_request

    rows = []
    for kind in ("din", "bst", "srp4ctr"):
        for c in candidates:
            f = flops_per_request(kind, mcfg, mcfg.max_len, c)
            rows.append({"model": kind, "candidates": c, **f})
    return rows


def popularity_runs(results: dict, seeds=None, models=None) -> dict:
    """Per model, one value per seed (in seed order) of the tail and head test metrics and of
    the AUC gap (head - tail), from the runs' ``test_by_popularity``; runs recorded before the
    analysis existed are left out, models with none of it too."""
    details = results.get("details", {})
    seeds = [str(s) for s in (results.get("seeds", []) if seeds is None else seeds)]
    out = {}
    for m in (details if models is None else models):
        per_seed = [details.get(m, {}).get(s, {}).get("test_by_popularity") for s in seeds]
        per_seed = [p for p in per_seed if isinstance(p, dict) and
                    all(isinstance(p.get(g), dict) for g in POPULARITY_GROUPS)]
        if not per_seed:
            continue
        row = {g: {k: [float(p[g].get(k, float("nan"))) for p in per_seed]
                   for k in (*METRICS, "n")} for g in POPULARITY_GROUPS}
        row["auc_gap"] = [h - t for h, t in zip(row["head"]["auc"], row["tail"]["auc"])]
        row["threshold"] = [p["tail"].get("threshold") for p in per_seed]
        out[m] = row
    return out


def _mean_std(xs) -> str:
    if not xs:
        return "—"
    a = np.asarray(xs, dtype=float)
    sd = a.std(ddof=1) if len(a) > 1 else 0.0
    return f"{a.mean():.4f} ± {sd:.4f}"


def write_markdown(path: Path, results: dict) -> None:
    lines = [f"# Results on {results['dataset']}", "", "## Protocol", "", results["protocol"], "",
             f"Mean ± sample standard deviation over {len(results['seeds'])} seeds, test split.",
             "", "| model | AUC | gAUC | logloss | valid AUC |", "|---|---|---|---|---|"]
    for m, vals in results["runs"].items():
        label = VARIANTS[m].label
        lines.append(
            f"| `{m}` ({label}) | {_mean_std(vals['auc'])} | {_mean_std(vals['gauc'])} | "
            f"{_mean_std(vals['logloss'])} | {_mean_std(results['valid_runs'][m]['auc'])} |"
        )
    lines += _popularity_lines(results)
    if results.get("pretrain"):
        lines += ["", "## Pre-training (next-item prediction, test: each user's first test item)", "",
                  "| pre-training | HR@10 | NDCG@10 | HR@10 (100 neg.) | NDCG@10 (100 neg.) |",
                  "|---|---|---|---|---|"]
        for pkind, per_seed in results["pretrain"].items():
            t = [r["test"] for r in per_seed.values()]
            lines.append(
                f"| {pkind} | {_mean_std([x['hr@10'] for x in t])} | "
                f"{_mean_std([x['ndcg@10'] for x in t])} | "
                f"{_mean_std([x['hr@10_sampled100'] for x in t])} | "
                f"{_mean_std([x['ndcg@10_sampled100'] for x in t])} |"
            )
    lines += ["", "## Cost per request (analytic FLOPs, user side computed once)", "",
              "| model | candidates | user-side FLOPs (once) | FLOPs per candidate | total |",
              "|---|---|---|---|---|"]
    for r in results["cost"]:
        lines.append(f"| {r['model']} | {r['candidates']} | {r['user']:.3g} | "
                     f"{r['per_candidate']:.3g} | {r['total']:.3g} |")
    if results.get("throughput"):
        lines += ["", "## Training throughput", "", "| what | per second |", "|---|---|"]
        for k, v in results["throughput"].items():
            lines.append(f"| {k} | {v:.0f} |")
    mi = results["machine"]
    lines += ["", f"Machine: {mi['processor']}, {mi['cpu_count']} CPUs, torch {mi['torch']}, "
              f"{mi['threads']} threads."]
    path.write_text("\n".join(lines) + "\n")


def _popularity_lines(results: dict) -> list[str]:
    """The long-tail table; none for results recorded before the analysis existed."""
    pop = results.get("runs_by_popularity")
    if pop is None:
        pop = popularity_runs(results)
    if not pop:
        return []
    models = list(results.get("runs") or pop)
    info = results.get("popularity") or {}
    t = info.get("threshold")
    if t is None:
        ts = sorted({x for r in pop.values() for x in r.get("threshold", []) if x is not None})
        t = ts[0] if len(ts) == 1 else None
    lines = ["", (f"## Test AUC by candidate popularity (tail = bottom {TAIL_SHARE:.0%} of "
                  "items by training count)"), ""]
    if t is not None:
        lines += [(f"Tail: test samples whose candidate item has at most {t} training-split "
                   "interactions (the 20th percentile of all catalogue items' training counts; "
                   "ties at the threshold and items never in training are tail); head: the "
                   "rest. Gap = head AUC - tail AUC, per seed; mean ± sample standard deviation "
                   "over seeds; samples: the mean per run."), ""]
    lines += [("| model | tail AUC | head AUC | gap (head − tail) | tail gAUC | head gAUC | "
               "tail samples | head samples |"), "|---|---|---|---|---|---|---|---|"]

    def n_text(xs) -> str:
        return "—" if not xs else f"{np.mean(xs):.0f}"

    for m in models:
        r = pop.get(m)
        if r is None:  # runs from before the analysis
            lines.append(f"| {m} | — | — | — | — | — | — | — |")
            continue
        lines.append(
            f"| {m} | {_mean_std(r['tail']['auc'])} | {_mean_std(r['head']['auc'])} "
            f"| {_mean_std(r['auc_gap'])} | {_mean_std(r['tail']['gauc'])} | "
            f"{_mean_std(r['head']['gauc'])} | {n_text(r['tail']['n'])} | "
            f"{n_text(r['head']['n'])} |")
    return lines


def plot_results(path: Path, results: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(results["runs"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, k in zip(axes, METRICS):
        vals = [np.asarray(results["runs"][m][k], float) for m in names]
        means = [v.mean() if len(v) else np.nan for v in vals]
        sds = [v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals]
        colors = ["C3" if m == "srp4ctr_fgbert" else "C0" for m in names]
        ax.bar(range(len(names)), means, yerr=sds, color=colors, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"test {k} (mean ± sd, {len(results['seeds'])} seeds)")
        finite = [m for m in means if np.isfinite(m)]
        if finite:
            lo, hi = min(finite), max(finite)
            pad = max(hi - lo, 1e-3)
            ax.set_ylim(lo - pad, hi + pad)
    fig.suptitle(f"{results['dataset']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
