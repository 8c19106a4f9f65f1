"""Quantised and reduced-precision variants of the exported scorer on a trained model: latency,
size and test AUC against fp32 (a measurement script, not a pytest suite: it needs a trained
run and the real dataset).

For a fine-tuned SRP4CTR run on MovieLens-100k it exports the ONNX folder (``int8=True``), then
scores every validation- and test-split CTR sample (history = the user's earlier interactions, as in training; candidate =
the interaction's item; label = rating >= 4; one request per sample, the user side encoded once
by the fp32 ``user_encoder.onnx``) with each variant of ``scorer.onnx``:

- ``ort_fp32``: the exported graph in ONNX Runtime (the reference);
- ``ort_int8_matmul``: ONNX Runtime dynamic quantisation (``quantize_dynamic``, int8 weights of
  the MatMul/Gemm nodes, activations quantised per call);
- ``ort_int8``: the same plus the per-item tables (Gather) in int8: what ``srp4ctr export-onnx
  --int8`` writes and ``srp4ctr.serving`` serves with ``precision="int8"``;
- ``ov_fp32``, ``ov_bf16``: OpenVINO with inference precision f32 / bf16 (bf16 runs only where
  the CPU has bf16 instructions: OpenVINO keeps f32 elsewhere, which the output records).

Latency: one user with a full history (``max_len`` rows), C candidates drawn from the catalogue,
interleaved medians of ``--rounds`` rounds, ``--threads`` intra-op threads each.

Usage::

    python bench/serving_variants.py --run RUN_DIR [--out bench/results/serving_variants.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from benchlib import cpu_isa, cpu_model, interleave, raw_history


def _ort(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda feed: s.run(["probs"], feed)[0]


def _openvino(path: Path, threads: int, precision: str):
    import openvino as ov

    core = ov.Core()
    c = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                              "PERFORMANCE_HINT": "LATENCY",
                                              "INFERENCE_PRECISION_HINT": precision})
    request, out = c.create_infer_request(), c.output("probs")
    run = lambda feed: request.infer(feed)[out]  # noqa: E731
    got = c.get_property("INFERENCE_PRECISION_HINT")  # what OpenVINO runs, after its checks
    return run, {"f32": "fp32", "bf16": "bf16"}.get(got.to_string(), got.to_string())


def main(argv=None) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from srp4ctr import data
    from srp4ctr.engine.onnx_export import export_onnx
    from srp4ctr.metrics import auc, logloss
    from srp4ctr.serving import Scorer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="fine-tuning run or bundle (SRP4CTR)")
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--out", default="bench/results/serving_variants.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)
    ds = data.prepare(args.dataset, progress=False)
    work = Path(tempfile.mkdtemp(prefix="srp4ctr-variants-"))
    export_onnx(args.run, work / "onnx", dataset=ds, int8=True)
    fp32 = work / "onnx" / "scorer.onnx"
    files = {"ort_fp32": fp32, "ort_int8_matmul": work / "scorer.int8_matmul.onnx",
             "ort_int8": work / "onnx" / "scorer.int8.onnx", "ov_fp32": fp32, "ov_bf16": fp32}
    quantize_dynamic(str(fp32), str(files["ort_int8_matmul"]), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gemm"])
    runs, effective = {}, {}
    for name in ("ort_fp32", "ort_int8_matmul", "ort_int8"):
        runs[name] = _ort(files[name], args.threads)
        effective[name] = "fp32" if name == "ort_fp32" else "int8"
    for name, prec in (("ov_fp32", "f32"), ("ov_bf16", "bf16")):
        runs[name], effective[name] = _openvino(fp32, args.threads, prec)
    scorer = Scorer.load(work / "onnx", threads=args.threads)

    def feed(cache, ids):
        k, v = scorer._kv(cache)
        return {"k": k, "v": v, "head_user": cache.head_user, "cand_item": ids}

    # accuracy: every validation and test sample, its own history
    probs, labels = {}, {}
    t0 = time.perf_counter()
    for split, code in (("valid", 1), ("test", 2)):
        rows = np.flatnonzero(ds.split == code)
        labels[split] = ds.label[rows].astype(np.float64)
        probs[split] = {name: np.empty(len(rows)) for name in runs}
        for i, r in enumerate(rows):
            u = int(ds.user[r])
            cache = scorer.encode_user(raw_history(ds, u, int(r)))
            f = feed(cache, np.asarray([ds.item[r]], np.int64))
            for name, run in runs.items():
                probs[split][name][i] = float(run(f)[0])
    accuracy_s = time.perf_counter() - t0
    # latency: the user with the longest history, C candidates
    u = int(np.argmax(np.diff(ds.user_offsets))) + 1
    cache = scorer.encode_user(raw_history(ds, u, ds.user_rows(u).stop))
    rng = np.random.default_rng(0)
    latency = {}
    for C in (100, 1000, 4096):
        f = feed(cache, rng.integers(1, ds.n_items + 1, size=C).astype(np.int64))
        med, n = interleave({name: (lambda run=run: run(f)) for name, run in runs.items()},
                            args.rounds)
        latency[C] = {"median_ms": med, "rounds": n}
    out = {
        "run": str(args.run), "dataset": args.dataset, "splits": ["valid", "test"],
        "label_rule": ds.meta.get("label_rule"),
        "n_samples": {k: int(len(v)) for k, v in labels.items()},
        "history_rows_latency": cache.length,
        "protocol": "one request per validation / test sample (history = the user's earlier "
                    "interactions); AUC/logloss from srp4ctr.metrics; the variant is chosen on "
                    "validation AUC, test AUC reported; latency: interleaved medians",
        "machine": {"cpu": cpu_model(), "isa": cpu_isa(), "platform": platform.platform(),
                    "threads": args.threads},
        "accuracy_seconds": accuracy_s,
        "variants": {},
    }
    for name in runs:
        rec = {"effective_precision": effective[name],
               "scorer_bytes": files[name].stat().st_size}
        for split in ("valid", "test"):
            p, ref, y = probs[split][name], probs[split]["ort_fp32"], labels[split]
            rec[f"{split}_auc"] = float(auc(y, p))
            rec[f"{split}_logloss"] = float(logloss(y, p))
            rec[f"{split}_auc_minus_fp32"] = float(auc(y, p) - auc(y, ref))
            rec[f"{split}_max_abs_diff_vs_fp32"] = float(np.abs(p - ref).max())
        rec["latency_ms"] = {str(C): latency[C]["median_ms"][name] for C in latency}
        out["variants"][name] = rec
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{out['machine']['cpu']} ({out['machine']['isa']}), {args.threads} threads; "
          f"history {cache.length}; AUC over {out['n_samples']} samples")
    print(f"{'variant':16s} {'runs as':8s} {'size MB':>8s} {'valid AUC':>10s} {'dAUC':>9s} "
          f"{'test AUC':>9s} {'dAUC':>9s} {'max|dp|':>9s} "
          + " ".join(f"{'C=' + str(C) + ' ms':>10s}" for C in latency))
    for name, v in out["variants"].items():
        print(f"{name:16s} {v['effective_precision']:8s} {v['scorer_bytes'] / 1e6:8.2f} "
              f"{v['valid_auc']:10.6f} {v['valid_auc_minus_fp32']:+9.6f} {v['test_auc']:9.6f} "
              f"{v['test_auc_minus_fp32']:+9.6f} {v['test_max_abs_diff_vs_fp32']:9.2e} "
              + " ".join(f"{v['latency_ms'][str(C)]:10.3f}" for C in latency))
    return out


if __name__ == "__main__":
    main()
