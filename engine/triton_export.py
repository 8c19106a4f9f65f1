"""Export for NVIDIA Triton Inference Server: a model repository of the ONNX graphs.

::

    srp4ctr export-triton --run runs/srp4ctr --out model_repository [--instances 2 --kind cpu]

writes (``NAME`` = ``--name``, default ``srp4ctr``)::

    model_repository/
      NAME_user_encoder/config.pbtxt  1/model.onnx   one user's encoded history -> K/V, head_user
      NAME_scorer/config.pbtxt        1/model.onnx   a cache + candidate ids -> probs, logits
      NAME_scorer_multi/config.pbtxt  1/model.onnx   several users at once (jagged offsets)
      NAME/config.pbtxt               1/             the ensemble: encoder, then scorer
                                                     (1/ also holds manifest.json and the
                                                     serving tables clients encode raw
                                                     histories with, see below)

Every model runs on Triton's ONNX Runtime backend (``platform: "onnxruntime_onnx"``) with
``max_batch_size: 0`` (the leading axes are the graphs' own: history positions ``n``, candidates
``C``; batching several users is the multi-user scorer's jagged layout, not Triton's batch axis),
every dynamic axis ``-1``, the scalar inputs (``hist_len``, ``user_<f>``) as ``dims: [1]``
reshaped to ``[]``, and ``instance_group`` / ``intra_op_thread_count`` from the arguments. The
item tables (folded ``z0``, ``q0``, head block) are initializers inside the scorers.

The ensemble ``NAME`` takes the encoder's inputs plus ``cand_item`` and returns ``probs`` and
``logits``: one request per user, the K/V never leave the server. Its histories must be unpadded
(``n == hist_len``), except an empty history: one padding position with ``hist_len = 0``, whose
K/V row the encoder zeroes, which the scorer then reads as the engine's empty-history zero.
Raw histories become these inputs on the client with :mod:`srp4ctr.serving`'s encoding
(``Scorer.encode_history`` over the tables in ``NAME/1/``), or any code that follows
``manifest.json``.

What was and was not run: no Triton server runs on the build machines. Each ``config.pbtxt`` is
parsed with the model-configuration protobuf schema that ``tritonclient`` ships
(``tritonclient.grpc.model_config_pb2.ModelConfig``) and checked against its ONNX file (names,
dtypes, ranks) and the ensemble's wiring (:func:`validate_repository`); the test runs the very
ONNX files of the repository through ONNX Runtime, step by step as the ensemble would, against
the engine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from srp4ctr._files import atomic_write_dir, shareable
from srp4ctr.errors import InputError

__all__ = ["INSTANCE_KINDS", "cli_export_triton", "export_triton", "model_config_text",
           "validate_repository"]

INSTANCE_KINDS = ("cpu", "gpu")
_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}
_ROLES = ("user_encoder", "scorer", "scorer_multi")
MODEL_FILE = "model.onnx"


def _dims(shape: list) -> tuple[list[int], bool]:
    """A manifest shape -> Triton dims (-1 for named axes) and whether it is a scalar (which
    Triton carries as [1], reshaped to [])."""
    if not shape:
        return [1], True
    return [d if isinstance(d, int) else -1 for d in shape], False


def _tensor(spec: dict, reshape: bool = True) -> str:
    dims, scalar = _dims(spec["shape"])
    out = (f'    name: "{spec["name"]}"\n    data_type: {_TYPES[spec["dtype"]]}\n'
           f'    dims: [ {", ".join(map(str, dims))} ]\n')
    if scalar and reshape:
        out += "    reshape: { shape: [ ] }\n"
    return "  {\n" + out + "  }"


def _tensors(key: str, specs: list[dict], reshape: bool = True) -> str:
    return f"{key} [\n" + ",\n".join(_tensor(s, reshape) for s in specs) + "\n]\n"


def model_config_text(name: str, graph: dict, *, instances: int, kind: str,
                      threads: int | None) -> str:
    """``config.pbtxt`` of one ONNX model of the repository (``graph``: its manifest entry)."""
    text = (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
            f'default_model_filename: "{MODEL_FILE}"\n')
    text += _tensors("input", graph["inputs"]) + _tensors("output", graph["outputs"])
    text += (f"instance_group [\n  {{\n    count: {instances}\n"
             f"    kind: {'KIND_GPU' if kind == 'gpu' else 'KIND_CPU'}\n  }}\n]\n")
    if threads is not None:
        text += ('parameters {\n  key: "intra_op_thread_count"\n'
                 f'  value: {{ string_value: "{threads}" }}\n}}\n')
    return text


def _ensemble_text(name: str, m: dict) -> str:
    enc, sc = m["graphs"]["user_encoder"], m["graphs"]["scorer"]
    cand = next(s for s in sc["inputs"] if s["name"] == "cand_item")
    text = f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: 0\n'
    # the ensemble's tensors are the models' config dims ([1] for a scalar); the models reshape
    text += (_tensors("input", enc["inputs"] + [cand], reshape=False)
             + _tensors("output", sc["outputs"], reshape=False))

    def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
        lines = [f'      model_name: "{model}"', "      model_version: -1"]
        lines += [f'      input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items()]
        lines += [f'      output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items()]
        return "    {\n" + "\n".join(lines) + "\n    }"

    passed = [o["name"] for o in enc["outputs"] if o["name"] in {i["name"] for i in sc["inputs"]}]
    steps = [
        step(f"{name}_user_encoder", {i["name"]: i["name"] for i in enc["inputs"]},
             {o: f"_{o}" for o in passed}),
        step(f"{name}_scorer", {**{o: f"_{o}" for o in passed}, "cand_item": "cand_item"},
             {o["name"]: o["name"] for o in sc["outputs"]}),
    ]
    return text + "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n"


def export_triton(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                  dataset: Any = None, data_dir: str | os.PathLike | None = None,
                  name: str = "srp4ctr", instances: int = 1, kind: str = "cpu",
                  threads: int | None = None, opset: int | None = None,
                  validate: bool = True) -> dict[str, Any]:
    """Write the Triton model repository of the fine-tuning checkpoint or bundle
    ``checkpoint_dir`` to ``out_dir`` (atomically; an existing ``out_dir`` is replaced only if
    empty or an earlier repository of this exporter).

    The graphs are :func:`~srp4ctr.engine.onnx_export.export_onnx`'s, verified in ONNX Runtime
    against the engine. ``instances`` / ``kind`` (``"cpu"`` or ``"gpu"``) fill every model's
    ``instance_group``; ``threads`` its ONNX Runtime ``intra_op_thread_count``. With
    ``validate`` (and ``tritonclient`` installed) the repository is checked by
    :func:`validate_repository` before it is moved into place. Returns a summary.
    """
    from .engine import Engine
    from .onnx_export import DEFAULT_OPSET, export_engine

    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise InputError(f"name must be letters, digits, '_' or '-', got {name!r}")
    if kind not in INSTANCE_KINDS:
        raise InputError(f"kind must be one of {INSTANCE_KINDS}, got {kind!r}")
    for what, v in (("instances", instances), ("threads", threads)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise InputError(f"{what} must be a positive integer, got {v!r}")
    out = Path(out_dir)
    _check_out_dir(out)
    engine = Engine.load(checkpoint_dir, dataset=dataset, data_dir=data_dir)
    work = Path(tempfile.mkdtemp(prefix=".srp4ctr-triton-"))
    try:
        onnx_dir = work / "onnx"
        m = export_engine(engine, onnx_dir, opset=DEFAULT_OPSET if opset is None else opset)
        models = {"user_encoder": f"{name}_user_encoder", "scorer": f"{name}_scorer",
                  "scorer_multi": f"{name}_scorer_multi"}

        def write(tmp: Path) -> None:
            for role, model in models.items():
                g = m["graphs"][role]
                (tmp / model / "1").mkdir(parents=True)
                shutil.copy2(onnx_dir / g["file"], tmp / model / "1" / MODEL_FILE)
                if g.get("external_data"):  # referenced by its own name from the graph
                    shutil.copy2(onnx_dir / g["external_data"]["file"],
                                 tmp / model / "1" / g["external_data"]["file"])
                (tmp / model / "config.pbtxt").write_text(
                    model_config_text(model, g, instances=instances, kind=kind,
                                      threads=threads), encoding="utf-8")
            (tmp / name / "1").mkdir(parents=True)
            (tmp / name / "config.pbtxt").write_text(_ensemble_text(name, m), encoding="utf-8")
            for f in ["manifest.json", *m["tables"]["files"]]:
                shutil.copy2(onnx_dir / f, tmp / name / "1" / f)
            (tmp / _MARKER).write_text(json.dumps(
                {"format": "srp4ctr-triton", "ensemble": name, "models": models,
                 "model_fingerprint": m["model_fingerprint"]}, indent=1) + "\n",
                encoding="utf-8")
            if validate:
                validate_repository(tmp)
            for p in [tmp, *(q for q in tmp.rglob("*") if q.is_dir())]:
                shareable(p)

        atomic_write_dir(out, write)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"out": str(out), "ensemble": name, "models": sorted([*models.values(), name]),
            "model_fingerprint": m["model_fingerprint"], "instances": instances, "kind": kind,
            "threads": threads, "verification": m.get("verification"),
            "validated": bool(validate)}


#: a file at the repository's top level (Triton reads only folders) that marks it as ours
_MARKER = "srp4ctr-triton.json"


def _check_out_dir(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if any(out.iterdir()) and not (out / _MARKER).is_file():
        raise InputError(f"{out}: not empty and not an earlier srp4ctr Triton repository; "
                         "refusing to replace it")


def _parse_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise InputError(f"{path}: not a valid Triton model configuration ({e})") from None


def validate_repository(repo: str | os.PathLike) -> dict[str, Any]:
    """Check a Triton model repository written by :func:`export_triton` without a server.

    Every ``config.pbtxt`` is parsed with Triton's own schema (``tritonclient``'s
    ``model_config_pb2.ModelConfig``); each model's folder name must be its config's name, an
    ONNX model's ``1/model.onnx`` must have exactly the config's inputs and outputs (names,
    element types, ranks, fixed sizes; a ``reshape`` to a scalar for a rank-0 tensor), and every
    ensemble step must name a model of the repository and map only tensors that exist.
    Returns ``{model name: parsed config}``.

    Raises:
        InputError: the first problem found.
    """
    import onnx
    from tritonclient.grpc import model_config_pb2 as mc

    repo = Path(repo)
    configs = {}
    for folder in sorted(p for p in repo.iterdir() if p.is_dir()):
        path = folder / "config.pbtxt"
        if not path.is_file():
            raise InputError(f"{folder}: a model folder without config.pbtxt")
        cfg = _parse_config(path)
        if cfg.name != folder.name:
            raise InputError(f"{path}: name {cfg.name!r} is not its folder's {folder.name!r}")
        if not (folder / "1").is_dir():
            raise InputError(f"{folder}: no version folder 1/")
        configs[cfg.name] = cfg
    elem = {1: "TYPE_FP32", 7: "TYPE_INT64"}  # onnx.TensorProto FLOAT, INT64
    for name, cfg in configs.items():
        if cfg.platform == "ensemble":
            continue
        if cfg.platform != "onnxruntime_onnx":
            raise InputError(f"{name}: platform {cfg.platform!r}, expected onnxruntime_onnx")
        model = onnx.load(str(repo / name / "1" / MODEL_FILE), load_external_data=False)
        for what, declared, actual in (("input", cfg.input, model.graph.input),
                                       ("output", cfg.output, model.graph.output)):
            got = {v.name: v for v in actual}
            if {t.name for t in declared} != set(got):
                raise InputError(f"{name}: config {what}s {sorted(t.name for t in declared)} "
                                 f"!= the ONNX model's {sorted(got)}")
            for t in declared:
                v = got[t.name].type.tensor_type
                if elem.get(v.elem_type) != mc.DataType.Name(t.data_type):
                    raise InputError(f"{name}: {what} {t.name} is "
                                     f"{mc.DataType.Name(t.data_type)} in the config, element "
                                     f"type {v.elem_type} in the model")
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.shape.dim]
                shown = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
                if len(shown) != len(dims) or any(a != b for a, b in zip(shown, dims)
                                                  if a != -1 and b != -1):
                    raise InputError(f"{name}: {what} {t.name} has dims {shown} in the config, "
                                     f"{dims} in the model")
    for name, cfg in configs.items():
        if cfg.platform != "ensemble":
            continue
        known = {t.name for t in cfg.input}
        for st in cfg.ensemble_scheduling.step:
            if st.model_name not in configs:
                raise InputError(f"{name}: a step runs {st.model_name!r}, not in the repository")
            target = configs[st.model_name]
            ins = {t.name for t in target.input}
            outs = {t.name for t in target.output}
            for key, value in st.input_map.items():
                if key not in ins or value not in known:
                    raise InputError(f"{name}: step {st.model_name}: input {key} <- {value} "
                                     "is not wired")
            if ins - set(st.input_map):
                raise InputError(f"{name}: step {st.model_name} leaves inputs "
                                 f"{sorted(ins - set(st.input_map))} unfed")
            for key, value in st.output_map.items():
                if key not in outs:
                    raise InputError(f"{name}: step {st.model_name} has no output {key}")
                known.add(value)
        missing = {t.name for t in cfg.output} - known
        if missing:
            raise InputError(f"{name}: ensemble outputs {sorted(missing)} are never produced")
    return configs


def cli_export_triton(args: argparse.Namespace) -> int:
    """Handler of ``srp4ctr export-triton``."""
    summary = export_triton(args.checkpoint, args.out, dataset=args.dataset_dir,
                            data_dir=args.data_dir, name=args.name, instances=args.instances,
                            kind=args.kind, threads=args.threads)
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
