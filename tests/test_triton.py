"""``srp4ctr export-triton``: the Triton Inference Server model repository.

No Triton server runs here. What is checked instead: every ``config.pbtxt`` parses with the
model-configuration schema ``tritonclient`` ships, and fits its ONNX file; the repository's own
ONNX files, run in ONNX Runtime step by step as the ensemble's ``ensemble_scheduling`` wires
them (and the multi-user scorer with jagged offsets), give the engine's probabilities.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
from google.protobuf import text_format
from train_fixtures import raw_history
from tritonclient.grpc import model_config_pb2

from srp4ctr.engine import Engine
from srp4ctr.engine.triton_export import export_triton, validate_repository
from srp4ctr.errors import InputError

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

ATOL = 1e-5
CONFIG = {"d_model": 16, "n_layers": 2, "n_heads": 2, "max_len": 32, "n_queries": 2,
          "head_hidden": (16, 8)}
_NP = {model_config_pb2.TYPE_FP32: np.float32, model_config_pb2.TYPE_INT64: np.int64}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from train_fixtures import prepare_tiny, spread_bundle

    root = tmp_path_factory.mktemp("triton")
    ds = prepare_tiny(root, n_items=80, per_user=(12, 60))
    spread_bundle(root, ds, CONFIG, seed=7, name="run")
    from srp4ctr.cli import build_parser

    args = build_parser().parse_args([
        "export-triton", "--run", str(root / "run"), "--out", str(root / "repo"),
        "--instances", "2", "--threads", "1"])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert args.func(args) == 0
    return root, ds, Engine.load(root / "run", backend="torch", threads=1), json.loads(
        buf.getvalue())


def _configs(folder):
    out = {}
    for path in sorted(folder.glob("*/config.pbtxt")):
        out[path.parent.name] = text_format.Parse(path.read_text(),
                                                  model_config_pb2.ModelConfig())
    return out


def test_the_repository_layout_and_configs_parse_with_tritons_schema(repo):
    root, _, _, summary = repo
    folder = root / "repo"
    cfgs = _configs(folder)
    assert sorted(cfgs) == ["srp4ctr", "srp4ctr_scorer", "srp4ctr_scorer_multi",
                            "srp4ctr_user_encoder"] == summary["models"]
    assert summary["validated"] and summary["verification"]["max_abs_diff"]["probs"] <= ATOL
    for name, cfg in cfgs.items():
        assert cfg.name == name and cfg.max_batch_size == 0
        if name == "srp4ctr":
            assert cfg.platform == "ensemble"
            assert [s.model_name for s in cfg.ensemble_scheduling.step] == [
                "srp4ctr_user_encoder", "srp4ctr_scorer"]
            assert (folder / name / "1" / "manifest.json").is_file()
            continue
        assert cfg.platform == "onnxruntime_onnx"
        assert (folder / name / "1" / "model.onnx").is_file()
        assert [(g.count, g.kind) for g in cfg.instance_group] == [
            (2, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
        assert cfg.parameters["intra_op_thread_count"].string_value == "1"
        # dynamic axes are -1; scalars travel as [1] and are reshaped to []
        dims = {t.name: (list(t.dims), t.HasField("reshape")) for t in cfg.input}
        if name == "srp4ctr_user_encoder":
            assert dims["hist_item"] == ([-1], False) and dims["hist_len"] == ([1], True)
        if name == "srp4ctr_scorer":
            assert dims["k"] == ([2, -1, 2, 8], False) and dims["cand_item"] == ([-1], False)
    assert validate_repository(folder).keys() == cfgs.keys()


def _run(sess_cache, folder, name, cfg, feed):
    if name not in sess_cache:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess_cache[name] = ort.InferenceSession(str(folder / name / "1" / "model.onnx"), opts,
                                                providers=["CPUExecutionProvider"])
    model_in = {}
    for t in cfg.input:
        a = np.asarray(feed[t.name], dtype=_NP[t.data_type])
        assert a.ndim == len(t.dims) and all(d in (-1, n) for d, n in zip(t.dims, a.shape))
        model_in[t.name] = a.reshape(list(t.reshape.shape)) if t.HasField("reshape") else a
    outs = sess_cache[name].run([t.name for t in cfg.output], model_in)
    return dict(zip([t.name for t in cfg.output], outs))


def test_the_ensemble_run_step_by_step_equals_the_engine(repo):
    """The ensemble's steps, in ONNX Runtime with the repository's files: the client sends the
    encoded history (unpadded; an empty one as one padding position with hist_len 0) and the
    candidates, as ``Scorer.encode_history`` over the tables in ``srp4ctr/1/`` builds them."""
    root, ds, engine, _ = repo
    folder = root / "repo"
    cfgs = _configs(folder)
    from srp4ctr.data.dataset import load_serving_tables

    tables = load_serving_tables(folder / "srp4ctr" / "1")
    sessions: dict = {}
    ens = cfgs["srp4ctr"]
    rng = np.random.default_rng(0)
    histories = [raw_history(ds, u) for u in (1, 2, 7, 12)]
    histories.append({"item_id": [], "timestamp": [], "rating": [], "user_id": 3})
    for h in histories:
        arrays = tables.encode_user_history(h, max_len=CONFIG["max_len"])
        request = {t.name: arrays.get(t.name) for t in ens.input}
        for f in ("age", "gender", "occupation"):
            request[f"user_{f}"] = np.asarray([arrays.get(f"user_{f}", 0)], np.int64)
        request["hist_len"] = np.asarray([arrays["hist_len"]], np.int64)
        if int(arrays["hist_len"]) == 0:
            for t in ens.input:
                if t.name.startswith("hist_") and t.name != "hist_len":
                    request[t.name] = np.zeros(1, np.int64)
        raw = rng.choice(ds.item_raw[1:], size=int(rng.integers(1, 200))).tolist() + [10**7]
        request["cand_item"] = ds.encode_items(np.asarray(raw))
        tensors = dict(request)
        for step in ens.ensemble_scheduling.step:
            feed = {key: tensors[value] for key, value in step.input_map.items()}
            out = _run(sessions, folder, step.model_name, cfgs[step.model_name], feed)
            for key, value in step.output_map.items():
                tensors[value] = out[key]
        want = engine.score(engine.encode_user(h), raw).numpy()
        assert np.abs(tensors["probs"] - want).max() <= ATOL
        assert want.std() > 0.02  # discriminating weights: the equality means something


def test_the_multi_user_scorer_model_equals_score_many(repo):
    root, ds, engine, _ = repo
    folder = root / "repo"
    cfg = _configs(folder)["srp4ctr_scorer_multi"]
    rng = np.random.default_rng(1)
    caches = [engine.encode_user(raw_history(ds, u)) for u in (2, 4, 6)]
    lists = [rng.choice(ds.item_raw[1:], size=n).tolist() for n in (5, 0, 40)]
    want = engine.score_many(caches, lists)
    ids = [ds.encode_items(np.asarray(c, dtype=np.int64)) for c in lists]
    feed = {"k": np.concatenate([c.k.numpy() for c in caches], 1),
            "v": np.concatenate([c.v.numpy() for c in caches], 1),
            "kv_offsets": np.cumsum([0] + [c.length for c in caches]),
            "head_user": np.stack([c.head_user.numpy() for c in caches]),
            "cand_item": np.concatenate(ids),
            "cand_offsets": np.cumsum([0] + [len(i) for i in ids])}
    got = _run({}, folder, "srp4ctr_scorer_multi", cfg, feed)["probs"]
    assert np.abs(got - np.concatenate([w.numpy() for w in want])).max() <= ATOL


@pytest.mark.parametrize("damage,message", [
    (lambda t: t.replace("TYPE_INT64", "TYPE_INT32", 1), "TYPE_INT32"),
    (lambda t: t.replace('name: "cand_item"', 'name: "candidates"'), "inputs"),
    (lambda t: t.replace("dims: [ -1 ]", "dims: [ -1, 4 ]", 1), "dims"),
    (lambda t: t.replace("platform", "platfrom", 1), "not a valid Triton model"),
])
def test_validation_catches_a_broken_config(repo, tmp_path, damage, message):
    root = repo[0]
    bad = tmp_path / "repo"
    shutil.copytree(root / "repo", bad)
    p = bad / "srp4ctr_scorer" / "config.pbtxt"
    p.write_text(damage(p.read_text()))
    with pytest.raises(InputError, match=message):
        validate_repository(bad)


def test_validation_catches_broken_ensemble_wiring(repo, tmp_path):
    root = repo[0]
    bad = tmp_path / "repo"
    shutil.copytree(root / "repo", bad)
    p = bad / "srp4ctr" / "config.pbtxt"
    p.write_text(p.read_text().replace('value: "_head_user" }\n    },', 'value: "_hu" }\n    },'))
    with pytest.raises(InputError, match="wired"):
        validate_repository(bad)


def test_export_triton_refusals(repo, tmp_path):
    root = repo[0]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="refusing"):
        export_triton(root / "run", busy)
    with pytest.raises(InputError, match="kind"):
        export_triton(root / "run", tmp_path / "x", kind="tpu")
    with pytest.raises(InputError, match="instances"):
        export_triton(root / "run", tmp_path / "x", instances=0)
    with pytest.raises(InputError, match="name"):
        export_triton(root / "run", tmp_path / "x", name="a b")
    assert (busy / "notes.txt").read_text() == "mine" and not (tmp_path / "x").exists()
