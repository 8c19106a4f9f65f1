"""Score candidates for one user with an exported SRP4CTR model, without torch.

A thin command line over :mod:`srp4ctr.serving` (numpy + ONNX Runtime, or OpenVINO): everything
a serving process needs is the package and the folder written by ``srp4ctr export-onnx``.

::

    python examples/serve_onnx.py --model-dir runs/srp4ctr-onnx \\
        --history history.json --candidates 1193,661,914 [--top 2] [--threads 2] \\
        [--runtime openvino] [--strict]

``history.json`` is one user's raw interactions, as the engine takes them::

    {"item_id": [1193, 661], "timestamp": [978300760, 978302109], "rating": [5, 3],
     "user_id": 1}

(``rating`` for MovieLens; ``behavior`` — ``"pv"``, ``"cart"``... — for Taobao-style data;
``user_id`` optional.) It prints one JSON object with the probabilities in candidate order.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from srp4ctr.errors import SRP4CTRError
from srp4ctr.serving import RUNTIMES, Scorer


def _parse_candidates(text: str, string_ids: bool) -> list:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if string_ids:
        return parts
    try:
        return [int(p) for p in parts]
    except ValueError as e:
        raise SystemExit(f"serve_onnx: error: --candidates: {e}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Score candidates for one user with an exported "
                                 "SRP4CTR model (srp4ctr.serving: numpy + ONNX Runtime or "
                                 "OpenVINO; no torch).")
    ap.add_argument("--model-dir", required=True, help="folder written by srp4ctr export-onnx")
    ap.add_argument("--history", required=True,
                    help="JSON file of the user's raw history (item_id, timestamp, rating or "
                    "behavior, optional user_id)")
    ap.add_argument("--candidates", required=True, help="raw item ids, comma-separated")
    ap.add_argument("--top", type=int, default=None, help="also list the top K candidates")
    ap.add_argument("--threads", type=int, default=None, help="runtime intra-op threads")
    ap.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime")
    ap.add_argument("--strict", action="store_true",
                    help="fail on unknown candidate ids instead of scoring them as the "
                    "out-of-vocabulary item")
    args = ap.parse_args(argv)
    try:
        scorer = Scorer.load(args.model_dir, runtime=args.runtime, threads=args.threads)
        with open(args.history, encoding="utf-8") as f:
            history = json.load(f)
        cands = _parse_candidates(args.candidates, scorer.dataset.item_raw.dtype.kind not in "iu")
        t0 = time.perf_counter()
        cache = scorer.encode_user(history)
        t1 = time.perf_counter()
        probs = scorer.score(cache, cands, strict=args.strict)
        t2 = time.perf_counter()
    except (SRP4CTRError, OSError, json.JSONDecodeError) as e:
        print(f"serve_onnx: error: {e}", file=sys.stderr)
        return 2
    result: dict[str, Any] = {
        "model_fingerprint": scorer.fingerprint,
        "runtime": scorer.runtime,
        "history_length": cache.length,
        "candidates": cands,
        "probs": [float(p) for p in probs],
        "ms": {"encode_user": 1e3 * (t1 - t0), "score": 1e3 * (t2 - t1)},
    }
    if args.top:
        order = np.argsort(-probs, kind="stable")[: args.top]
        result["top"] = [{"item_id": cands[i], "prob": float(probs[i])} for i in order]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
