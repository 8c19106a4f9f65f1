"""The ``srp4ctr`` command line.

Every subcommand imports what it needs when it runs, so ``srp4ctr --help`` is fast and never
touches a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys

from srp4ctr.errors import SRP4CTRError


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default="ml-100k",
        help="dataset name: ml-100k (downloaded through pip), ml-1m, ml-10m, ml-20m, ml-25m, "
        "taobao, csv, parquet (the last six read --path)",
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


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from srp4ctr import data

    ds = data.prepare(
        args.dataset,
        path=args.path,
        data_dir=args.data_dir,
        columns=args.columns,
        force=args.force,
        progress=not args.quiet,
    )
    print(json.dumps(ds.summary(), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from srp4ctr.demo import run_demo

    run_demo(out=args.out, quick=args.quick, data_dir=args.data_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="srp4ctr",
        description="SRP4CTR: pre-train FG-BERT on behaviour sequences, fine-tune a CTR model "
        "with uni cross-attention and a Q-Former, and serve it with folded inference.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_data = sub.add_parser("data", help="prepare datasets (download, sequences, splits)")
    data_sub = p_data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    p_prep = data_sub.add_parser(
        "prepare",
        help="build the prepared dataset into the cache and print its statistics as JSON",
        description="Build the prepared dataset (id maps, time-ordered sequences with side "
        "information, the per-user 80/10/10 time split) into the cache directory and print one "
        "JSON object with its statistics. A second run reuses the cache.",
    )
    _add_data_args(p_prep)
    p_prep.add_argument("--force", action="store_true", help="rebuild even if cached")
    p_prep.add_argument("--quiet", action="store_true", help="no progress bars on stderr")
    p_prep.set_defaults(func=_cmd_data_prepare)

    p_demo = sub.add_parser(
        "demo",
        help="the end-to-end demo on MovieLens-100k",
        description="Prepare MovieLens-100k and run the end-to-end demo.",
    )
    p_demo.add_argument("--quick", action="store_true", help="a smaller, faster run")
    p_demo.add_argument("--out", default="srp4ctr-demo", help="output folder (default: %(default)s)")
    p_demo.add_argument("--data-dir", default=None, help="dataset cache folder")
    p_demo.set_defaults(func=_cmd_demo)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
