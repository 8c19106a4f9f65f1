"""The ``srp4ctr`` command line.

Every subcommand imports what it needs when it runs, so ``srp4ctr --help`` is fast and never
touches a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from srp4ctr.errors import SRP4CTRError


class _ModelKinds(Sequence):
    """The registered model kinds of ``role`` (:mod:`srp4ctr.models.registry`) as argparse
    ``choices``, looked up the first time argparse checks or shows them: the registry loads torch,
    which the parser is built without. Arguments using it need a ``metavar`` (argparse lists the
    choices of the others while building the parser)."""

    def __init__(self, role: str):
        self.role = role
        self._kinds: tuple[str, ...] | None = None

    def _get(self) -> tuple[str, ...]:
        if self._kinds is None:
            from srp4ctr.models import model_kinds

            self._kinds = model_kinds(self.role)
        return self._kinds

    def __getitem__(self, i):
        return self._get()[i]

    def __len__(self) -> int:
        return len(self._get())


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default=None,
        help="dataset name: ml-100k (downloaded through pip), ml-1m, ml-10m, ml-20m, ml-25m, "
        "taobao, csv, parquet (the last six read --path); default: the --config file's, else "
        "the one the run named by --run / --pretrained was trained on, else ml-100k",
    )
    p.add_argument("--path", default=None, help="file or folder of a dataset you bring")
    p.add_argument(
        "--data-dir",
        default=None,
        help="where prepared datasets are cached (default: $SRP4CTR_DATA_DIR, else the user's "
        "cache dir)",
    )
    p.add_argument(
        "--columns",
        default=None,
        help="generic tables only: column mapping as JSON or key=value pairs separated by commas, "
        "e.g. user=uid,item=iid,timestamp=ts,rating=score,category=cat",
    )


log = logging.getLogger("srp4ctr.cli")


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from srp4ctr import data

    ds = data.prepare(
        args.dataset or "ml-100k",
        path=args.path,
        data_dir=args.data_dir,
        columns=args.columns,
        force=args.force,
        progress=not args.quiet,
    )
    summary = ds.summary()
    print(json.dumps(summary, indent=2))
    for w in summary["warnings"]:
        log.warning(w)
    log.info(f"prepared dataset {ds.name!r} in {ds.path}")
    return 0


def _file_config(args: argparse.Namespace) -> dict:
    """The sections of ``--config FILE`` (all empty without one)."""
    from srp4ctr.runconfig import SECTIONS, load_run_config

    path = getattr(args, "config", None)
    return load_run_config(path) if path else {s: {} for s in SECTIONS}


def _load_dataset(args: argparse.Namespace, run: str | None = None):
    """The dataset of a command: its flags, over the ``--config`` file's ``dataset`` section;
    where neither names one, the dataset the run ``run`` recorded; else MovieLens-100k."""
    from srp4ctr import data

    spec = dict(_file_config(args)["dataset"])
    for key, flag in (("name", "dataset"), ("path", "path"), ("columns", "columns"),
                      ("data_dir", "data_dir")):
        if getattr(args, flag, None) is not None:
            spec[key] = getattr(args, flag)
    if spec.get("name") is None and spec.get("path") is None and run is not None:
        from srp4ctr.data.recorded import dataset_of_run
        from srp4ctr.models import read_config

        info = read_config(run).get("dataset")
        ds = dataset_of_run(run, info if isinstance(info, dict) else {},
                            data_dir=spec.get("data_dir"), progress=not args.quiet)
        log.info(f"dataset {ds.name!r} from {ds.path} (recorded by {run})")
        return ds
    return data.prepare(spec.get("name") or "ml-100k", path=spec.get("path"),
                        data_dir=spec.get("data_dir"), columns=spec.get("columns"),
                        progress=not args.quiet)


_MODEL_FLAGS = ("d_model", "n_layers", "n_heads", "max_len", "n_queries", "dropout", "mask_rate",
                "softmax", "sampled_softmax_above", "sampler", "n_sampled")
_TRAIN_FLAGS = ("epochs", "batch_size", "lr", "weight_decay", "patience", "seed",
                "max_steps_per_epoch", "device", "num_threads", "negatives")


def _model_config(args: argparse.Namespace, *, pretraining: bool = False, **extra):
    """ModelConfig: defaults, then the file's ``model`` (and, pre-training, ``pretrain_model``)
    section, then the flags, then ``extra``."""
    from srp4ctr.models import ModelConfig

    cfg = _file_config(args)
    base = ModelConfig().to_dict()
    pretrained = getattr(args, "pretrained", None)
    if pretrained:  # the encoder's architecture is the pre-trained one's unless set
        from srp4ctr.models import read_config
        from srp4ctr.train.loop import ENCODER_FIELDS

        pre = read_config(pretrained).get("model_config") or {}
        base.update({k: pre[k] for k in ENCODER_FIELDS if k in pre})
    base.update(cfg["model"])
    if pretraining:
        base.update(cfg["pretrain_model"])
    for name in _MODEL_FLAGS:
        v = getattr(args, name, None)
        if v is not None:
            base[name] = v
    base.update(extra)
    return ModelConfig.from_dict(base)


def _train_config(args: argparse.Namespace, section: str = "finetune", base=None):
    """TrainConfig: ``base`` (default the defaults), then the file's ``section``, then the
    flags."""
    from srp4ctr.train import TrainConfig

    d = {**(base or TrainConfig()).to_dict(), **_file_config(args)[section]}
    for name in _TRAIN_FLAGS:
        v = getattr(args, name, None)
        if v is not None:
            d[name] = v
    if args.quiet:
        d["progress"] = False
    return TrainConfig.from_dict(d)


def _result_table(res: dict, run: str | None) -> str:
    """The outcome of a training run: which epoch was kept, its validation metrics and the test
    metrics of that epoch, labelled."""
    keys = [k for k in (res.get("test") or {}) if k != "n"]
    rows = [("split", *keys)]
    for split, label in (("valid", "validation"), ("test", "test")):
        m = res.get(split) or {}
        rows.append((label, *(f"{m[k]:.4f}" if isinstance(m.get(k), float) else "-"
                              for k in keys)))
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in rows]
    speed = res.get("samples_per_s") or res.get("sequences_per_s")
    head = (f"{res['kind']} on {res['dataset']['name']}: best epoch {res['best_epoch']} of "
            f"{len(res.get('history') or [])} run (chosen on validation), "
            f"{res.get('train_seconds', 0):.0f} s, {speed or 0:.0f} samples/s")
    tail = [f"written to {run}"] if run else []
    return "\n".join([head, *lines, *tail])


def _print_result(args: argparse.Namespace, res: dict, keys: tuple[str, ...]) -> None:
    if args.json:
        print(json.dumps({k: res[k] for k in keys}, indent=2))
    else:
        print(_result_table(res, args.out))


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--d-model", dest="d_model", type=int, help="hidden size (default 64)")
    g.add_argument("--layers", dest="n_layers", type=int, help="Transformer layers (default 2)")
    g.add_argument("--heads", dest="n_heads", type=int, help="attention heads (default 2)")
    g.add_argument("--max-len", dest="max_len", type=int, help="history length L (default 200)")
    g.add_argument("--queries", dest="n_queries", type=int, help="Q-Former queries M (default 4)")
    g.add_argument("--dropout", type=float, help="dropout (default 0.1)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="maximum epochs (default 20)")
    g.add_argument("--batch-size", dest="batch_size", type=int, help="batch size (default 256)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, help="AdamW weight decay")
    g.add_argument("--patience", type=int, help="early-stopping patience in epochs (default 2)")
    g.add_argument("--seed", type=int, help="random seed (default 0)")
    g.add_argument("--max-steps-per-epoch", dest="max_steps_per_epoch", type=int,
                   help="cap on steps per epoch (quick runs)")
    g.add_argument("--device", help="cpu or cuda (default cpu)")
    g.add_argument("--threads", dest="num_threads", type=int, help="torch CPU threads")
    p.add_argument("--config", metavar="FILE.yaml",
                   help="settings file (sections dataset, model, pretrain_model, finetune, "
                   "pretrain, experiment; srp4ctr.runconfig); flags override it. The settings "
                   "of the reported results: configs/ml-100k.yaml")


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from srp4ctr.train import pretrain

    tcfg = _train_config(args, "pretrain")
    mcfg = _model_config(args, pretraining=True)
    ds = _load_dataset(args)
    log.info(f"pre-training {args.kind} on {ds.name!r} ({ds.n_users} users, {ds.n_items} "
             f"items) into {args.out}")
    res = pretrain(ds, args.out, model_config=mcfg, train_config=tcfg, kind=args.kind)
    _print_result(args, res, ("kind", "valid", "test", "best_epoch", "sequences_per_s"))
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from srp4ctr.train import finetune

    tcfg = _train_config(args)
    ds = _load_dataset(args, run=args.pretrained)
    extra = {}
    if args.freeze_encoder:
        extra["freeze_encoder"] = True
    if args.no_xattn:
        extra["use_xattn"] = False
    if args.no_qformer:
        extra["use_qformer"] = False
    mcfg = _model_config(args, **extra)
    log.info(f"fine-tuning {args.model} on {ds.name!r} ({ds.n_users} users, {ds.n_items} "
             f"items)" + (f" from {args.pretrained}" if args.pretrained else "")
             + f" into {args.out}")
    res = finetune(ds, args.out, kind=args.model, model_config=mcfg, train_config=tcfg,
                   pretrained=args.pretrained)
    _print_result(args, res, ("kind", "valid", "test", "best_epoch", "samples_per_s"))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from srp4ctr.train import evaluate

    ds = _load_dataset(args, run=args.run)
    log.info(f"evaluating {args.run} on the {args.split} split of {ds.name!r}")
    res = evaluate(args.run, ds, split=args.split, device=args.device or "cpu")
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        label = {"valid": "validation", "test": "test"}[args.split]
        from srp4ctr.train.loop import metrics_text

        n = f" ({res['n']} samples)" if "n" in res else ""
        print(f"{res['kind']} {args.run} on {ds.name!r}, {label} split{n}: {metrics_text(res)}")
    return 0


def experiment_settings(args: argparse.Namespace) -> dict:
    """What ``srp4ctr experiment`` runs with: the defaults, then the ``--config`` file, then the
    flags (``model_config``, ``pretrain_model_config``, ``train_config``, ``pretrain_config``,
    ``seeds``, ``models``, ``jobs``, ``strict_time``, ``pretrain_overrides``)."""
    from srp4ctr.train import TrainConfig
    from srp4ctr.train.experiment import default_pretrain_config

    file_cfg = _file_config(args)
    exp = file_cfg["experiment"]
    models = args.models.split(",") if args.models else exp.get("models")
    seeds = args.seeds if args.seeds is not None else exp.get("seeds", 5)
    jobs = args.jobs if args.jobs is not None else exp.get("jobs", 1)
    strict_time = (args.strict_time if args.strict_time is not None
                   else bool(exp.get("strict_time", False)))
    tcfg = _train_config(args)
    # pre-training: small batches and more epochs by default, then the file's section, then
    # the --pretrain-* flags; device, threads and seed follow the fine-tuning settings
    pcfg = {**default_pretrain_config(tcfg).to_dict(), **file_cfg["pretrain"]}
    for name in ("epochs", "batch_size", "lr"):
        v = getattr(args, f"pretrain_{name}")
        if v is not None:
            pcfg[name] = v
    for name in ("device", "num_threads"):
        if getattr(args, name, None) is not None:
            pcfg[name] = getattr(args, name)
    pcfg["progress"] = tcfg.progress
    mcfg = _model_config(args)
    pmcfg = _model_config(args, pretraining=True)
    if args.pretrain_dropout is not None:
        pmcfg = pmcfg.replace(dropout=args.pretrain_dropout)
    return {"model_config": mcfg, "pretrain_model_config": pmcfg, "train_config": tcfg,
            "pretrain_config": TrainConfig.from_dict(pcfg), "seeds": seeds, "models": models,
            "jobs": jobs, "strict_time": strict_time,
            "pretrain_overrides": exp.get("pretrain_overrides") or {}}


def _cmd_experiment(args: argparse.Namespace) -> int:
    from srp4ctr.train.experiment import run_experiment

    settings = experiment_settings(args)
    ds = _load_dataset(args)
    log.info(f"experiment on {ds.name!r} into {args.out}: seeds {settings['seeds']}, jobs "
             f"{settings['jobs']}")
    run_experiment(ds, args.out, **settings, resume=not args.no_resume,
                   progress=not args.quiet)
    print((Path(args.out) / "results.md").read_text())
    log.info(f"wrote {args.out}: results.json, results.md, results.png, config.yaml (the "
             "settings resolved) and one folder per run")
    return 0


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from srp4ctr.engine.onnx_export import cli_export_onnx

    return cli_export_onnx(args)


def _cmd_export_triton(args: argparse.Namespace) -> int:
    from srp4ctr.engine.triton_export import cli_export_triton

    return cli_export_triton(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from srp4ctr.server.cli import serve

    return serve(args)


def _cmd_bundle(args: argparse.Namespace) -> int:
    from srp4ctr.bundle import make_bundle

    doc = make_bundle(args.run, args.out, dataset=args.dataset_dir, data_dir=args.data_dir)
    files = {name: rec["bytes"] for name, rec in doc["files"].items()}
    print(json.dumps({"out": str(args.out), "model_fingerprint": doc["model_fingerprint"],
                      "dataset": doc["dataset"], "files": files,
                      "bytes": sum(files.values())}, indent=2))
    log.info(f"wrote the bundle {args.out} ({len(files)} files, {sum(files.values())} bytes)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from srp4ctr.demo import run_demo

    run_demo(out=args.out, quick=args.quick, data_dir=args.data_dir, progress=not args.quiet)
    return 0


# srp4ctr bench: the suites and the report module (bench/report.py, bench/goals.toml) live in the
# bench/ folder of a source checkout, which is not installed with the package.
_BENCH_FILES = ("report.py", "conftest.py", "bench_engine_cpu.py")
_BENCH_MODULE = "srp4ctr_bench_report"


def _source_root() -> Path:
    """The folder above the package's source: the checkout's root in an editable install."""
    return Path(__file__).resolve().parents[1]


def find_bench_dir(given: str | None = None) -> Path:
    """The ``bench/`` folder of a source checkout: ``given``, else ``bench/`` in the current
    folder or one above it, else the one beside the package's source (an editable install)."""
    from srp4ctr.errors import BenchError

    def ok(path: Path) -> bool:
        return all((path / name).is_file() for name in _BENCH_FILES)

    if given:
        if ok(Path(given)):
            return Path(given).resolve()
        raise BenchError(f"--bench-dir {given} is not the bench/ folder of a source checkout "
                         f"(it has no {', '.join(_BENCH_FILES)})")
    cwd = Path.cwd().resolve()
    for root in (cwd, *cwd.parents, _source_root()):
        if ok(root / "bench"):
            return (root / "bench").resolve()
    raise BenchError("srp4ctr bench runs the benchmark suites of a source checkout, and there is "
                     "none here (bench/ is not installed with the package): clone the project's "
                     "repository, run `pip install -e \".[bench,onnx]\"` in it and `srp4ctr bench` "
                     "from its root, or pass --bench-dir")


def load_bench_report(bench_dir: Path):
    """``bench_dir/report.py`` as a module (loaded once per file)."""
    import importlib.util

    path = Path(bench_dir) / "report.py"
    loaded = sys.modules.get(_BENCH_MODULE)
    if loaded is not None and Path(loaded.__file__) == path:
        return loaded
    spec = importlib.util.spec_from_file_location(_BENCH_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_BENCH_MODULE] = module  # dataclasses look their module up while it loads
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_BENCH_MODULE]
        raise
    return module


def _cmd_bench(args: argparse.Namespace) -> int:
    bench_dir = find_bench_dir(args.bench_dir)
    return load_bench_report(bench_dir).cli_bench(args, bench_dir)


LOG_LEVELS = ("debug", "info", "warning", "error")


def _add_output_args(p: argparse.ArgumentParser, top: bool = False) -> None:
    """``--log-level`` and ``--quiet``, before or after the subcommand (the subcommand's copies
    leave the value alone unless given)."""
    default = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    p.add_argument("--log-level", choices=LOG_LEVELS, default=default("info"),
                   help="what is logged to stderr (default info: each step, epoch and output)")
    p.add_argument("--quiet", action="store_true", default=default(False),
                   help="warnings and errors only, no progress bars")


class _Subcommands:
    """The subparsers action, giving every subcommand the output options."""

    def __init__(self, action):
        self.action = action

    def add_parser(self, *args, **kwargs) -> argparse.ArgumentParser:
        p = self.action.add_parser(*args, **kwargs)
        _add_output_args(p)
        return p


def setup_logging(level: str = "info", quiet: bool = False) -> None:
    """Log the ``srp4ctr`` loggers to stderr: ``srp4ctr: message`` (``srp4ctr: warning: …``
    from warnings up). Idempotent; the library itself configures no handler."""
    root = logging.getLogger("srp4ctr")
    root.setLevel(logging.WARNING if quiet else getattr(logging, level.upper()))
    for h in list(root.handlers):
        if getattr(h, "_srp4ctr_cli", False):
            root.removeHandler(h)

    class _Format(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            msg = record.getMessage()
            if record.levelno >= logging.WARNING:
                return f"srp4ctr: {record.levelname.lower()}: {msg}"
            return f"srp4ctr: {msg}"

    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(_Format())
    h._srp4ctr_cli = True
    root.addHandler(h)
    root.propagate = False


#: the model keys of ``srp4ctr experiment`` (srp4ctr.train.experiment.VARIANTS, not imported
#: here so that --help stays fast; tests/test_gbdt.py checks the two agree)
EXPERIMENT_MODELS = ("din", "bst", "user_vector", "srp4ctr_nopretrain", "srp4ctr_bert",
                     "srp4ctr_fgbert", "srp4ctr_no_xattn", "srp4ctr_no_qformer", "gbdt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="srp4ctr",
        description="SRP4CTR: pre-train FG-BERT on behaviour sequences, fine-tune a CTR model "
        "with uni cross-attention and a Q-Former, and serve it with folded inference.",
    )
    from srp4ctr import __version__

    parser.add_argument("--version", action="version", version=f"srp4ctr {__version__}")
    _add_output_args(parser, top=True)
    sub = _Subcommands(parser.add_subparsers(dest="command", metavar="COMMAND"))

    p_data = sub.add_parser("data", help="prepare datasets (download, sequences, splits)")
    data_sub = _Subcommands(p_data.add_subparsers(dest="data_command", metavar="DATA_COMMAND"))
    p_prep = data_sub.add_parser(
        "prepare",
        help="build the prepared dataset into the cache and print its statistics as JSON",
        description="Build the prepared dataset (id maps, time-ordered sequences with side "
        "information, the per-user 80/10/10 time split) into the cache directory and print one "
        "JSON object with its statistics. A second run reuses the cache.",
    )
    _add_data_args(p_prep)
    p_prep.add_argument("--force", action="store_true", help="rebuild even if cached")
    p_prep.set_defaults(func=_cmd_data_prepare)

    p_pre = sub.add_parser(
        "pretrain",
        help="pre-train FG-BERT (or the item-id-only BERT) on the training part",
        description="Pre-train FG-BERT with the multi-attribute masked objective on each user's "
        "training interactions; early stopping on validation next-item NDCG@10; writes a "
        "checkpoint directory (config.json + model.safetensors), metrics.json and curves.png.",
    )
    _add_data_args(p_pre)
    p_pre.add_argument("--out", required=True, help="checkpoint directory to write")
    p_pre.add_argument("--kind", choices=_ModelKinds("pretrain"), default="fgbert",
                       metavar="KIND",
                       help="what to pre-train, one of %(choices)s: FG-BERT (side information, "
                       "two masking strategies) or BERT (item ids only); default %(default)s")
    p_pre.add_argument("--mask-rate", dest="mask_rate", type=float, help="default 0.2")
    p_pre.add_argument("--softmax", choices=("auto", "full", "sampled"),
                       help="the heads' softmax: full, sampled (negatives with the logQ "
                       "correction, sparse embedding gradients), or auto: sampled for a "
                       "vocabulary above --sampled-softmax-above (default auto)")
    p_pre.add_argument("--sampled-softmax-above", dest="sampled_softmax_above", type=int,
                       metavar="N", help="vocabulary size above which auto samples "
                       "(default 100000)")
    p_pre.add_argument("--sampler", choices=("log_uniform", "uniform", "in_batch"),
                       help="negatives of a sampled softmax: log-uniform over training-frequency "
                       "ranks (default), uniform, or the batch's own targets")
    p_pre.add_argument("--n-sampled", dest="n_sampled", type=int, metavar="K",
                       help="negatives per step of a sampled softmax (default 1024)")
    _add_train_args(p_pre)
    p_pre.add_argument("--json", action="store_true",
                       help="print the result as JSON instead of a table")
    p_pre.set_defaults(func=_cmd_pretrain)

    p_ft = sub.add_parser(
        "finetune",
        help="train a CTR model (SRP4CTR or a baseline)",
        description="Train a CTR model with BCE on the training split; early stopping on "
        "validation AUC; writes a checkpoint directory, metrics.json and curves.png. An "
        "SRP4CTR run folder is also a serving bundle (the dataset's serving tables and "
        "bundle.json beside the weights): Engine.load(OUT) needs no data directory.",
    )
    _add_data_args(p_ft)
    p_ft.add_argument("--out", required=True, help="checkpoint directory to write")
    p_ft.add_argument("--model", choices=_ModelKinds("ctr"), default="srp4ctr", metavar="MODEL",
                      help="which CTR model, one of %(choices)s (default %(default)s)")
    p_ft.add_argument("--pretrained", help="pre-training checkpoint to start the encoder from")
    p_ft.add_argument("--freeze-encoder", action="store_true",
                      help="keep the pre-trained encoder fixed")
    p_ft.add_argument("--no-xattn", action="store_true", help="ablation: no uni cross-attention")
    p_ft.add_argument("--no-qformer", action="store_true", help="ablation: no Q-Former")
    p_ft.add_argument("--negatives", choices=["uni100"], default=None,
                      help="sampled-negatives variant of the CTR samples")
    _add_train_args(p_ft)
    p_ft.add_argument("--json", action="store_true",
                       help="print the result as JSON instead of a table")
    p_ft.set_defaults(func=_cmd_finetune)

    p_ev = sub.add_parser("evaluate", help="metrics of a checkpoint on a split",
                          description="Evaluate a checkpoint (CTR: AUC, gAUC, logloss; "
                          "pre-training: HR@10, NDCG@10) on the validation or test split.")
    _add_data_args(p_ev)
    p_ev.add_argument("--run", required=True, help="checkpoint directory")
    p_ev.add_argument("--split", choices=["valid", "test"], default="test")
    p_ev.add_argument("--device", default=None, help="cpu or cuda")
    p_ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p_ev.set_defaults(func=_cmd_evaluate)

    p_ex = sub.add_parser(
        "experiment",
        help="train every model over several seeds and write results.json/.md and a plot",
        description="Pre-train FG-BERT and BERT, train DIN, BST, the user-vector baseline, "
        "SRP4CTR and its ablations, and the GBDT baseline (LightGBM on history statistics; "
        "pip install 'srp4ctr[gbdt]') for each seed; write OUT/results.json, OUT/results.md "
        "(mean ± std, protocol, cost analysis) and OUT/results.png. Finished runs are kept and "
        "skipped when the command is run again.",
    )
    _add_data_args(p_ex)
    p_ex.add_argument("--seeds", type=int, default=None,
                      help="number of seeds (default: the --config file's, else 5)")
    p_ex.add_argument("--out", required=True, help="output directory")
    p_ex.add_argument("--models", help="comma-separated subset of the model keys "
                      f"({', '.join(EXPERIMENT_MODELS)}; default: all; gbdt needs LightGBM: "
                      "pip install 'srp4ctr[gbdt]')")
    p_ex.add_argument("--no-resume", action="store_true", help="ignore finished runs in OUT")
    p_ex.add_argument("--pretrain-epochs", type=int, help="pre-training epochs (default 30)")
    p_ex.add_argument("--pretrain-batch-size", type=int, help="pre-training batch (default 64)")
    p_ex.add_argument("--pretrain-lr", type=float, help="pre-training learning rate")
    p_ex.add_argument("--pretrain-dropout", type=float,
                      help="dropout while pre-training (default: --dropout)")
    p_ex.add_argument("--jobs", type=int, default=None,
                      help="trainings run at once in worker processes, each with threads/jobs "
                      "torch threads (default: the --config file's, else 1; 2 on a 2-core "
                      "machine is ~1.7x faster)")
    p_ex.add_argument("--strict-time", dest="strict_time",
                      action=argparse.BooleanOptionalAction, default=None,
                      help="strict-time protocol: a CTR sample's history holds only interactions "
                      "strictly earlier than the candidate (default: also those of the same "
                      "second that sort before it); pre-training is unchanged. An OUT folder "
                      "holds one protocol (default: the --config file's experiment.strict_time, "
                      "else off; --no-strict-time overrides a file's true)")
    _add_train_args(p_ex)
    p_ex.set_defaults(func=_cmd_experiment)

    p_onnx = sub.add_parser(
        "export-onnx",
        help="export a fine-tuned SRP4CTR checkpoint to ONNX (user encoder + scorer)",
        description="Export a fine-tuning checkpoint or bundle to OUT: user_encoder.onnx "
        "(history -> per-layer K/V, Q-Former tokens, head user block), scorer.onnx (cache + "
        "candidate ids -> click probabilities), scorer_multi.onnx (several users per call, "
        "jagged offsets), manifest.json and the dataset's serving tables, all that "
        "srp4ctr.serving (numpy + ONNX Runtime or OpenVINO, no torch) needs. The graphs are "
        "checked against the engine in ONNX Runtime unless --no-verify. Prints the manifest's "
        "summary as JSON.",
    )
    p_onnx.add_argument("--run", dest="checkpoint", required=True,
                        help="fine-tuning run, checkpoint or bundle (kind srp4ctr)")
    p_onnx.add_argument("--out", required=True, help="output folder (replaces an earlier export)")
    p_onnx.add_argument("--dataset-dir", default=None,
                        help="the prepared dataset's folder (default: found under --data-dir by "
                        "the checkpoint's dataset fingerprint)")
    p_onnx.add_argument("--data-dir", default=None, help="where prepared datasets are cached")
    # defaults mirror srp4ctr.engine.onnx_export.DEFAULT_OPSET / ATTENTION_VARIANTS (importing
    # that module here would load torch for every command)
    p_onnx.add_argument("--opset", type=int, default=20, help="ONNX opset (default %(default)s)")
    p_onnx.add_argument("--attention", choices=["auto", "attention", "matmul"], default="auto",
                        help="scorer attention: MatMul/Softmax or the ONNX Attention op (needs "
                        "--opset 23); default %(default)s = matmul, measured as fast")
    p_onnx.add_argument("--external-data", action="store_true",
                        help="keep weights in <graph>.onnx.data files (automatic above 1 GiB)")
    p_onnx.add_argument("--int8", action="store_true",
                        help="also write ONNX Runtime's dynamic int8 quantisation of the "
                        "scorers (srp4ctr.serving: precision='int8'); not equal to fp32: check "
                        "it on your validation split (bench/serving_variants.py)")
    p_onnx.add_argument("--no-verify", action="store_true",
                        help="skip the ONNX Runtime check against the engine")
    p_onnx.set_defaults(func=_cmd_export_onnx)

    p_triton = sub.add_parser(
        "export-triton",
        help="export a fine-tuned SRP4CTR run as an NVIDIA Triton Inference Server repository",
        description="Write OUT, a Triton model repository: NAME_user_encoder, NAME_scorer and "
        "NAME_scorer_multi (ONNX Runtime backend, config.pbtxt with dynamic axes and instance "
        "groups) and the ensemble NAME (encoder, then scorer; its 1/ folder also holds the "
        "manifest and serving tables clients encode raw histories with). The graphs are "
        "checked against the engine in ONNX Runtime and every config.pbtxt is parsed with "
        "Triton's model-config schema (tritonclient). Prints a summary as JSON.",
    )
    p_triton.add_argument("--run", dest="checkpoint", required=True,
                          help="fine-tuning run or bundle (kind srp4ctr)")
    p_triton.add_argument("--out", required=True,
                          help="repository folder (replaces an earlier one of this command)")
    p_triton.add_argument("--name", default="srp4ctr",
                          help="the ensemble's name, prefix of the other models' (default "
                          "%(default)s)")
    p_triton.add_argument("--instances", type=int, default=1,
                          help="instances of each model (default %(default)s)")
    p_triton.add_argument("--kind", choices=["cpu", "gpu"], default="cpu",
                          help="instance kind (default %(default)s)")
    p_triton.add_argument("--threads", type=int, default=None,
                          help="ONNX Runtime intra-op threads per instance (default: Triton's)")
    p_triton.add_argument("--dataset-dir", default=None,
                          help="the prepared dataset's folder (runs that are not bundles)")
    p_triton.add_argument("--data-dir", default=None, help="where prepared datasets are cached")
    p_triton.set_defaults(func=_cmd_export_triton)

    p_serve = sub.add_parser(
        "serve",
        help="serve a bundle over HTTP (FastAPI/uvicorn) with request batching",
        description="An HTTP server for one model: POST /v1/score and /v1/score_many, GET "
        "/healthz, /readyz, /metrics (Prometheus) and /docs (OpenAPI). Concurrent requests are "
        "gathered for at most --batch-window-ms and scored in one engine call; encoded users "
        "are kept in a state store (in-process LRU with a TTL, or Redis shared by every "
        "worker), keyed by model, user and history. Needs the serve extra.",
    )
    p_serve.add_argument("--model", required=True, help="bundle (or fine-tuning run) to serve")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=8000)
    p_serve.add_argument("--workers", type=int, default=1,
                         help="worker processes, each with its own engine (default 1)")
    p_serve.add_argument("--backend", default="auto", help="engine backend (default auto)")
    p_serve.add_argument("--threads", type=int, default=None, help="engine threads per worker")
    p_serve.add_argument("--no-batching", action="store_true",
                         help="score every request alone (one engine call each)")
    p_serve.add_argument("--batch-window-ms", type=float, default=2.0,
                         help="how long a request waits for others to batch with (default "
                         "%(default)s)")
    p_serve.add_argument("--max-batch-requests", type=int, default=64)
    p_serve.add_argument("--max-batch-candidates", type=int, default=32768)
    p_serve.add_argument("--max-candidates", type=int, default=10000,
                         help="candidates per user; more: 413 (default %(default)s)")
    p_serve.add_argument("--max-history", type=int, default=5000,
                         help="history interactions per user; more: 413 (default %(default)s)")
    p_serve.add_argument("--max-users", type=int, default=64,
                         help="users per /v1/score_many request (default %(default)s)")
    p_serve.add_argument("--max-body-bytes", type=int, default=4 << 20,
                         help="request body bytes; more: 413 (default %(default)s)")
    p_serve.add_argument("--store", choices=["memory", "redis", "none"], default="memory",
                         help="where encoded users are kept (default %(default)s)")
    p_serve.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p_serve.add_argument("--store-ttl-s", type=float, default=3600.0,
                         help="how long a stored user state lives (default %(default)s)")
    p_serve.add_argument("--store-bytes", type=int, default=256 << 20,
                         help="memory store budget in bytes (default %(default)s)")
    p_serve.set_defaults(func=_cmd_serve)

    p_bundle = sub.add_parser(
        "bundle",
        help="write a self-contained serving bundle of a fine-tuned SRP4CTR run",
        description="Write OUT: the run's checkpoint and the dataset's serving tables (id maps, "
        "item and user feature tables, behaviour-value rules, vocabularies; no interactions) "
        "with bundle.json listing every file's size and sha256. Engine.load(OUT) then needs no "
        "data directory and no download. Runs written by finetune are bundles already (this "
        "copies the bundle's files only); for older runs the prepared dataset is found by the "
        "checkpoint's dataset fingerprint under --data-dir, or given with --dataset-dir.",
    )
    p_bundle.add_argument("--run", required=True, help="fine-tuning run folder (kind srp4ctr)")
    p_bundle.add_argument("--out", required=True,
                          help="bundle folder to write (replaces an earlier bundle only)")
    p_bundle.add_argument("--dataset-dir", default=None,
                          help="the prepared dataset's folder (older runs only)")
    p_bundle.add_argument("--data-dir", default=None, help="where prepared datasets are cached")
    p_bundle.set_defaults(func=_cmd_bundle)

    p_demo = sub.add_parser(
        "demo",
        help="the end-to-end demo on MovieLens-100k",
        description="Prepare MovieLens-100k and run the end-to-end demo.",
    )
    p_demo.add_argument("--quick", action="store_true", help="a smaller, faster run")
    p_demo.add_argument("--out", default="srp4ctr-demo", help="output folder (default: %(default)s)")
    p_demo.add_argument("--data-dir", default=None, help="dataset cache folder")
    p_demo.set_defaults(func=_cmd_demo)

    # srp4ctr bench: the benchmark suites of bench/ and bench/report.md (bench/report.py of the
    # checkout, loaded only when the command runs: pytest, torch and matplotlib load in its own
    # process)
    p_bench = sub.add_parser(
        "bench",
        help="run the CPU benchmark suites and write bench/report.md with tables and plots",
        description="Run the pytest-benchmark suites of the repository's bench/ folder (machine "
        "ceilings, engine CPU scoring, end-to-end request, ONNX Runtime, kernel ops, training "
        "throughput; CUDA cases skip without a GPU) in one process with --benchmark-json, keep "
        "one JSON per suite under OUT/results/, then write OUT/report.md (medians, speed-ups "
        "against eager torch, fractions of the GEMM rate measured in the same run, the issues' "
        "performance goals met or not) and OUT/plots/*.png. Needs a clone (bench/ is not "
        "installed) and the bench and onnx extras. The full run takes several minutes.",
    )
    p_bench.add_argument("--suites", default=None,
                         help="comma-separated subset of engine_cpu, request, onnx_cpu, kernels, "
                         "training (default: all; the ceilings always run)")
    p_bench.add_argument("--smoke", action="store_true",
                         help="one round per case and the smallest shapes: checks that the "
                         "suites run, measures nothing (default --out: a new temporary folder)")
    p_bench.add_argument("--out", default=None,
                         help="folder of report.md, plots/ and results/ (default: bench/)")
    p_bench.add_argument("--results", default=None,
                         help="folder of the per-suite JSON (default: OUT/results)")
    p_bench.add_argument("--report-only", action="store_true",
                         help="rebuild the report from the JSON already in the results folder")
    p_bench.add_argument("--bench-dir", default=None,
                         help="the bench/ folder with the suites (default: bench/ of the "
                         "current folder or one above it, else of the checkout of an editable "
                         "install)")
    p_bench.add_argument("--timeout-s", type=float, default=None,
                         help="stop the suites after this many seconds (default: no limit)")
    p_bench.set_defaults(func=_cmd_bench)

    return parser


def main(argv: list[str] | None = None) -> int:
    # On a shared or oversubscribed CPU, spinning OpenMP workers turn each small parallel op into
    # milliseconds of waiting (measured: a 1 ms scoring call took 150 ms). Passive waiting unless
    # the user chose; it must be set before torch loads its OpenMP runtime.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.quiet)
    if not getattr(args, "func", None):
        # a group without its subcommand: show that group's help
        if args.command == "data":
            parser.parse_args(["data", "--help"])
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SRP4CTRError as e:
        print(f"srp4ctr: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
