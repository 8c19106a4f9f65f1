"""ONNX export (``srp4ctr.engine.onnx_export``), the torch-free runtime that serves it
(``srp4ctr.serving``) and its example script (``examples/serve_onnx.py``) on a real tiny pipeline: a MovieLens-1M-format folder, ``prepare``,
a model fine-tuned one step by ``finetune`` (max_len 200, small d), exported through the CLI.

Tolerance: ONNX Runtime's probabilities must equal the engine's (and the training forward's)
within 1e-5 in fp32. Both sides compute the same functions with the same fp32 weights; they
differ only in the order of floating-point operations (ORT's GEMM/softmax kernels and fused
LayerNorm/GELU, the attention scale folded into W_Q, the head's first layer summed in another
order), which moves the probabilities by a few 1e-8 here: 1e-5 leaves room for other BLAS
kernels and still fails on any real mistake (a wrong mask, feature, table row or layer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_fixtures import model_probs, perturbed, prepare_tiny

from srp4ctr import data
from srp4ctr.engine import Engine
from srp4ctr.engine.onnx_export import (
    ScorerGraph,
    _to_onnx,
    export_engine,
    export_onnx,
    read_manifest,
)
from srp4ctr.errors import CheckpointError, InputError, UnknownItemError
from srp4ctr.models import FGBERT, SRP4CTR, ModelConfig, ModelSpec
from srp4ctr.models.checkpoint import model_identity
from srp4ctr.serving import Scorer, UserCache
from srp4ctr.train import TrainConfig, finetune, load_model
from srp4ctr.train.checkpoint import read_config, save_checkpoint

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

torch.set_num_threads(1)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "serve_onnx.py"


ATOL = 1e-5
CONFIG = {"d_model": 16, "n_layers": 2, "n_heads": 2, "max_len": 200, "n_queries": 2,
          "head_hidden": (16, 8)}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def tiny(root):
    # 300 items so that users reach (and pass) histories of max_len = 200
    return prepare_tiny(root, n_items=300, per_user=(12, 260))


@pytest.fixture(scope="module")
def ckpt(root, tiny):
    """``finetune`` for one step, then its weights spread (one step leaves every probability
    near 0.5, where an equality check means little), saved in the trainer's layout."""
    tc = TrainConfig(epochs=1, max_steps_per_epoch=1, batch_size=64, progress=False)
    finetune(tiny, root / "ft", model_config=ModelConfig(**CONFIG), train_config=tc)
    model, cfg = load_model(root / "ft", dataset_fingerprint=tiny.fingerprint)
    perturbed(model, seed=1, scale=0.2)
    cfg = {k: v for k, v in cfg.items() if k not in ("format", "format_version",
                                                      "weights_sha256")}
    return save_checkpoint(root / "ckpt", model, cfg)


@pytest.fixture(scope="module")
def engine(ckpt, root):
    return Engine.load(ckpt, data_dir=root / "cache")


@pytest.fixture(scope="module")
def cli_run(ckpt, root):
    """The export, made through the ``srp4ctr export-onnx`` handler: (status, printed JSON,
    folder)."""
    import contextlib
    import io

    from srp4ctr.cli import build_parser

    args = build_parser().parse_args(["export-onnx", "--run", str(ckpt), "--out",
                                      str(root / "onnx"), "--data-dir", str(root / "cache")])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        status = args.func(args)
    return status, json.loads(buf.getvalue()), root / "onnx"


@pytest.fixture(scope="module")
def exported(cli_run):
    return cli_run[2]


@pytest.fixture(scope="module")
def server(exported):
    return Scorer.load(exported, threads=1)


def random_history(ds, n: int, rng, *, user_id=None, unknown: bool = False) -> dict:
    """n raw interactions of random known items (plus an unknown one), random ratings, random
    timestamps with ties, in shuffled order."""
    items = rng.choice(ds.item_raw[1:], size=n).tolist()
    if unknown and n > 2:
        items[1] = 10**7
    ts = 978300000 + np.sort(rng.integers(0, 3 * 10**6, size=n))
    if n > 4:
        ts[3] = ts[2]  # a tie: ordered by raw item id
    perm = rng.permutation(n)
    h = {"item_id": [items[i] for i in perm],
         "rating": [int(x) for x in rng.integers(1, 6, size=n)],
         "timestamp": [int(ts[i]) for i in perm]}
    if user_id is not None:
        h["user_id"] = user_id
    return h


def maxdiff(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max()) if a.size else 0.0


def session(path: Path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- the export
def test_export_folder_manifest_and_graphs(cli_run, exported, ckpt, tiny):
    status, summary, _ = cli_run
    assert status == 0 and summary["attention"] == "matmul" and summary["opset"] == 20
    files = sorted(p.name for p in exported.iterdir())
    assert files == ["manifest.json", "scorer.onnx", "scorer_multi.onnx", "serving.json",
                     "serving.npz", "user_encoder.onnx"]
    m = read_manifest(exported)
    assert m["model_fingerprint"] == model_identity(read_config(ckpt))
    assert m["dataset"]["fingerprint"] == tiny.fingerprint
    assert m["opset"] == 20 and m["attention"] == "matmul"
    assert m["verification"]["max_abs_diff"]["probs"] <= ATOL
    NL, H, Dh = 2, 2, 8
    enc, sc = m["graphs"]["user_encoder"], m["graphs"]["scorer"]
    assert [i["name"] for i in enc["inputs"]] == [
        "hist_item", "hist_len", "hist_rating", "hist_gap", "hist_hour", "hist_weekday",
        "user_age", "user_gender", "user_occupation"]
    assert [o["name"] for o in enc["outputs"]] == ["k", "v", "head_user", "qtokens"]
    assert [i["name"] for i in sc["inputs"]] == ["k", "v", "head_user", "cand_item"]
    spec = {i["name"]: i for i in sc["inputs"]}
    assert spec["k"]["shape"] == [NL, "n", H, Dh] and spec["k"]["dtype"] == "float32"
    assert spec["cand_item"] == {**spec["cand_item"], "shape": ["C"], "dtype": "int64",
                                 "range": [1, tiny.n_items + 1]}
    assert m["dims"]["n"] == {**m["dims"]["n"], "min": 1, "max": 200}
    assert any("dtype" in r for r in m["input_rules"])
    assert any("k and v have the same shape" in r for r in m["input_rules"])
    # nothing of this machine in the folder
    text = (exported / "manifest.json").read_text()
    assert str(exported.parent) not in text and m["checkpoint"] == "ckpt"
    # the graphs themselves: checked, with symbolic axes, fingerprinted, opset 23
    for name, graph in (("user_encoder.onnx", enc), ("scorer.onnx", sc)):
        proto = onnx.load(str(exported / name))
        onnx.checker.check_model(proto, full_check=True)
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["srp4ctr.model_fingerprint"] == m["model_fingerprint"]
        assert {o.domain: o.version for o in proto.opset_import}[""] == 20
        assert proto.ir_version == graph["ir_version"] == 9  # the lowest opset 20 allows
        for vi, io_spec in zip(proto.graph.input, graph["inputs"]):
            assert vi.name == io_spec["name"]
            dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            assert dims == io_spec["shape"]
    ops = {n.op_type for n in onnx.load(str(exported / "scorer.onnx")).graph.node}
    assert "Softmax" in ops and "GatherND" not in ops and "Loop" not in ops
    # the item side lives in the scorer: the folded tables are initializers
    inits = [tuple(t.dims) for t in onnx.load(str(exported / "scorer.onnx")).graph.initializer]
    assert inits.count((tiny.n_items + 2, 16)) == 3  # z0, q0, hz0 (d = h1 = 16 here)


def test_encoder_and_scorer_equal_the_engine(exported, engine, tiny):
    """Random users of history lengths 1..200 (and one longer, cut to 200), 1..5000
    candidates: every cache tensor and every probability within 1e-5 of the engine's."""
    enc, sc = session(exported / "user_encoder.onnx"), session(exported / "scorer.onnx")
    enc_names = [i.name for i in enc.get_inputs()]
    rng = np.random.default_rng(0)
    lengths = [1, 2, 3, 16, 63, 127, 199, 200, 260] + rng.integers(4, 200, size=3).tolist()
    counts = [1, 2, 17, 1000, 5000]
    worst = {"cache": 0.0, "probs": 0.0}
    for i, n in enumerate(lengths):
        h = random_history(tiny, n, rng, user_id=int(tiny.user_raw[1 + i % 30]), unknown=True)
        arrays = tiny.encode_user_history(h, max_len=200)
        out = dict(zip([o.name for o in enc.get_outputs()],
                       enc.run(None, {k: np.asarray(arrays[k]) for k in enc_names})))
        cache = engine.encode_user(h)
        assert out["k"].shape == tuple(cache.k.shape) == (2, min(n, 200), 2, 8)
        for name, t in cache.tensors().items():
            worst["cache"] = max(worst["cache"], maxdiff(out[name], t.numpy()))
        C = counts[i % len(counts)]
        raw = rng.choice(tiny.item_raw[1:], size=C)
        ids = tiny.encode_items(raw)
        probs = sc.run(["probs"], {"k": out["k"], "v": out["v"], "head_user": out["head_user"],
                                   "cand_item": ids})[0]
        want = engine.score(cache, raw).numpy()
        assert probs.dtype == np.float32 and probs.shape == (C,)
        worst["probs"] = max(worst["probs"], maxdiff(probs, want))
    assert worst["cache"] <= ATOL and worst["probs"] <= ATOL, worst


def test_onnx_equals_the_training_forward(exported, engine, tiny):
    model, _ = load_model(engine.checkpoint, dataset_fingerprint=tiny.fingerprint)
    server = Scorer.load(exported, threads=1)
    rng = np.random.default_rng(1)
    for n, user in ((1, 2), (200, 5), (37, None)):
        h = random_history(tiny, n, rng, user_id=None if user is None else int(tiny.user_raw[user]))
        cands = list(tiny.item_raw[1:]) + [10**8]  # every item and an unknown one (OOV)
        want = model_probs(model, tiny, h, cands).numpy()
        assert want.std() > 0.03  # the weights discriminate: the comparison means something
        got = server.score(server.encode_user(h), cands, strict=False)
        assert maxdiff(got, want) <= ATOL


def test_attention_op_variant_equals_matmul(exported, engine, root):
    """The scorer with the ONNX Attention op (opset 23) gives the MatMul/Softmax graph's and the
    engine's probabilities."""
    fm = engine.folded
    scorer = ScorerGraph(fm, "attention").eval()
    cache = engine.encode_user({"item_id": [1, 2, 3], "rating": [4, 5, 1],
                                "timestamp": [10, 20, 30]})
    ids = torch.arange(1, 6)
    kdim = torch.export.Dim("n", min=1, max=200)
    proto = _to_onnx(scorer, (cache.k, cache.v, cache.head_user, ids), scorer.input_names,
                     scorer.output_names, (({1: kdim}, {1: kdim}, None,
                                            {0: torch.export.Dim("C", min=1)}),), 23)
    onnx.checker.check_model(proto, full_check=True)
    ops = {n.op_type for n in proto.graph.node}
    assert "Attention" in ops and "Softmax" not in ops
    onnx.save_model(proto, str(root / "scorer_attention.onnx"))
    a, b = session(root / "scorer_attention.onnx"), session(exported / "scorer.onnx")
    rng = np.random.default_rng(2)
    for n in (1, 200):
        c = engine.encode_user(random_history(engine.dataset, n, rng))
        ids = rng.integers(1, fm.n_item_ids, size=999)
        feed = {"k": c.k.numpy(), "v": c.v.numpy(), "head_user": c.head_user.numpy(),
                "cand_item": ids}
        pa, pb = a.run(["probs"], feed)[0], b.run(["probs"], feed)[0]
        assert maxdiff(pa, pb) <= ATOL
        n_items = engine.dataset.n_items
        raw = np.where(ids <= n_items, engine.dataset.item_raw[np.minimum(ids, n_items)],
                       10**9)  # the OOV id: an unknown raw id
        assert maxdiff(pa, engine.score(c, raw).numpy()) <= ATOL


def test_export_refusals(ckpt, root, tiny, exported):
    with pytest.raises(InputError, match="attention"):
        export_onnx(ckpt, root / "x", dataset=tiny, attention="flash")
    with pytest.raises(InputError, match="opset >= 23"):
        export_onnx(ckpt, root / "x", dataset=tiny, attention="attention")  # default opset 20
    with pytest.raises(InputError, match="opset"):
        export_onnx(ckpt, root / "x", dataset=tiny, opset=7)
    busy = root / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="refusing"):
        export_onnx(ckpt, busy, dataset=tiny)
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(CheckpointError):
        export_onnx(root / "nowhere", root / "x", dataset=tiny)
    cfg = {k: v for k, v in read_config(ckpt).items()
           if k not in ("format", "format_version", "weights_sha256")}
    pre = save_checkpoint(root / "pre", FGBERT(ModelSpec.from_dataset(tiny),
                                               ModelConfig(**CONFIG)), {**cfg, "kind": "fgbert"})
    with pytest.raises(CheckpointError, match="pre-training"):
        export_onnx(pre, root / "x", dataset=tiny)
    assert not (root / "x").exists()


@pytest.mark.parametrize("config", [
    {"use_xattn": False}, {"use_qformer": False},
    {"use_qformer": False, "head_user_features": True, "item_bias": True, "item_stats": True},
], ids=["no-xattn", "no-qformer", "no-qformer-user-features-item-bias-stats"])
def test_ablations_export_and_serve(tiny, root, config):
    """Without the tower (no k/v, a pooled output; weights in external data files) and without
    the Q-Former (no qtokens, no user inputs unless the head takes the user features; the
    per-item bias inside the scorer graph): exported, verified and served like the full
    model."""
    torch.manual_seed(3)
    cfg = ModelConfig(**{**CONFIG, "max_len": 32, **config})
    model = perturbed(SRP4CTR(ModelSpec.from_dataset(tiny), cfg), seed=4)
    if model.item_statistics is not None:
        with torch.no_grad():
            model.item_statistics.table.normal_(generator=torch.Generator().manual_seed(5))
    eng = Engine.from_model(model, tiny)
    out = root / f"abl-{'-'.join(config)}"
    external = not cfg.use_xattn  # one of them keeps its weights in side files
    m = export_engine(eng, out, attention="matmul", external_data=external)
    names = [o["name"] for o in m["graphs"]["user_encoder"]["outputs"]]
    data_files = sorted(p.name for p in out.glob("*.onnx.data"))
    assert data_files == (["scorer.onnx.data", "scorer_multi.onnx.data",
                           "user_encoder.onnx.data"] if external else [])
    if not cfg.use_xattn:
        assert names == ["head_user", "qtokens", "pooled"] and m["dims"]["NL"] == 0
    else:
        assert names == ["k", "v", "head_user"]
        assert m["tables"]["user_fields"] == (list(tiny.user_fields)
                                              if cfg.head_user_features else [])
    srv = Scorer.load(out, threads=1)
    rng = np.random.default_rng(5)
    for n in (0, 1, 40):
        h = random_history(tiny, n, rng, user_id=int(tiny.user_raw[3]))
        cands = rng.choice(tiny.item_raw[1:], size=50)
        assert maxdiff(srv.score(srv.encode_user(h), cands),
                       eng.score(eng.encode_user(h), cands).numpy()) <= ATOL


def test_string_ids_and_behaviour_types(tmp_path):
    """A generic csv dataset (string item and user ids, Taobao-style behaviour types, a
    category field): exported, encoded by the example as by the pipeline, served equal."""
    rng = np.random.default_rng(0)
    lines = ["uid,iid,ts,act,cat"]
    for u in range(1, 9):
        t = 1_600_000_000
        for i in rng.choice(30, size=20, replace=False):
            t += int(rng.integers(0, 9000))
            act = ["pv", "pv", "cart", "fav", "buy"][int(rng.integers(0, 5))]
            lines.append(f"u{u},item-{i},{t},{act},c{i % 4}")
    (tmp_path / "log.csv").write_text("\n".join(lines) + "\n")
    ds = data.prepare("csv", path=str(tmp_path / "log.csv"), data_dir=str(tmp_path / "c"),
                      columns="user=uid,item=iid,timestamp=ts,behavior=act,category=cat",
                      progress=False)
    torch.manual_seed(5)
    model = SRP4CTR(ModelSpec.from_dataset(ds), ModelConfig(**{**CONFIG, "max_len": 8})).eval()
    eng = Engine.from_model(model, ds)
    m = export_engine(eng, tmp_path / "onnx")
    assert m["tables"]["raw_id_kind"] == "str" and m["history"]["behaviour_kind"] == "behavior"
    srv = Scorer.load(tmp_path / "onnx", threads=1)
    h = {"item_id": ["item-3", "item-7", "item-99", "item-1", "item-0"] * 2,
         "timestamp": [1, 50, 50, 900, 901, 902, 903, 904, 905, 2000],
         "behavior": ["pv", "buy", "cart", "pv", "fav"] * 2, "user_id": "u2"}
    got, want = srv.encode_history(h), ds.encode_user_history(h, max_len=8)
    for key in [k for k in want if k != "user"]:
        assert np.array_equal(got[key], want[key]), key
    cands = ["item-1", "item-3", "item-12"]
    assert maxdiff(srv.score(srv.encode_user(h), cands),
                   eng.score(eng.encode_user(h), cands).numpy()) <= ATOL
    with pytest.raises(UnknownItemError):
        srv.score(srv.encode_user(h), ["nope"], strict=True)
    with pytest.raises(InputError, match="unknown behaviour"):
        srv.encode_user({**h, "behavior": ["teleport"] * 10})


# ----------------------------------------------------------------------------- serving example
def test_scorer_history_encoding_equals_the_pipeline(server, tiny):
    """The scorer encodes histories with the pipeline's own code over the folder's serving
    tables (id maps, user table, behaviour rules): the arrays of the full prepared dataset."""
    rng = np.random.default_rng(3)
    cases = [random_history(tiny, n, rng, user_id=u, unknown=True)
             for n, u in ((0, None), (1, 7), (2, 10**6), (50, 3), (200, 4), (260, None))]
    # float and string timestamps, numpy inputs, huge and zero gaps
    cases.append({"item_id": np.array([5, 3, 5]), "rating": np.array([1.0, 5.0, 3.0]),
                  "timestamp": [1.9e9, 12.7, 12.2], "user_id": 2})
    cases.append({"item_id": [9, 8, 7, 6], "rating": ["4", "4", "2", "1"],
                  "timestamp": ["100", "100", "4000000", "4000001"]})
    for h in cases:
        got = server.encode_history(h)
        want = tiny.encode_user_history(h, max_len=200)
        for key in [k for k in want if k != "user"]:
            assert np.array_equal(got[key], want[key]), key
            assert np.asarray(got[key]).dtype == np.int64


def _run_example(args: list[str]) -> subprocess.CompletedProcess:
    """The example as a script, in a process where importing torch fails and sys.modules is
    checked for it at exit."""
    guard = (
        "import sys, runpy, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('blocked in this test: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.argv = [{str(EXAMPLE)!r}] + {args!r}\n"
        "code = 0\n"
        "try:\n"
        f"    runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch')\n"
        "assert not bad, bad\n"
        "print('MODULES-OK', file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", guard], capture_output=True, text=True,
                          env=env, cwd=str(EXAMPLE.parent), timeout=120, check=False)


def test_example_script_without_torch_equals_the_engine(exported, engine, tiny, tmp_path):
    rng = np.random.default_rng(4)
    h = random_history(tiny, 150, rng, user_id=int(tiny.user_raw[6]))
    (tmp_path / "history.json").write_text(json.dumps(h))
    cands = [int(x) for x in rng.choice(tiny.item_raw[1:], size=300)]
    proc = _run_example(["--model-dir", str(exported), "--history",
                         str(tmp_path / "history.json"), "--candidates",
                         ",".join(map(str, cands)), "--top", "3", "--threads", "1"])
    assert proc.returncode == 0, proc.stderr
    assert "MODULES-OK" in proc.stderr
    out = json.loads(proc.stdout)
    want = engine.score(engine.encode_user(h), cands).numpy()
    assert out["candidates"] == cands and out["history_length"] == 150
    assert maxdiff(np.asarray(out["probs"], np.float32), want) <= ATOL
    assert out["top"][0]["prob"] == pytest.approx(float(want.max()), abs=ATOL)
    # bad input: a clear message, exit status 2, still no torch
    proc = _run_example(["--model-dir", str(exported), "--history",
                         str(tmp_path / "history.json"), "--candidates", "1,-4"])
    assert proc.returncode == 2 and "non-negative" in proc.stderr
    assert "MODULES-OK" in proc.stderr


def test_scorer_function_empty_and_long_histories(server, engine, tiny):
    empty = {"item_id": [], "rating": [], "timestamp": []}
    c = server.encode_user(empty)
    assert c.length == 0 and c.k.shape == (2, 0, 2, 8)
    ce = engine.encode_user(empty)
    assert maxdiff(c.head_user, ce.head_user.numpy()) <= ATOL
    cands = list(tiny.item_raw[1:40])
    assert maxdiff(server.score(c, cands), engine.score(ce, cands).numpy()) <= ATOL
    assert server.score(c, []).shape == (0,)
    long = random_history(tiny, 260, np.random.default_rng(9), user_id=1)
    assert server.encode_user(long).length == 200
    # unknown ids: the OOV item by default, refused with strict=True (as the engine)
    with pytest.raises(UnknownItemError, match="unknown"):
        server.score(c, [1, 10**9], strict=True)
    assert maxdiff(server.score(c, [1, 10**9], strict=False),
                   engine.score(ce, [1, 10**9]).numpy()) <= ATOL


class _NoRuntime:
    """Stands in for an ONNX Runtime session: any call is a test failure."""

    def run(self, *a, **k):
        raise AssertionError("ONNX Runtime was called with invalid input")


@pytest.fixture
def guarded(exported):
    srv = Scorer.load(exported, threads=1)
    good = srv.encode_user({"item_id": [1, 2, 3], "rating": [4, 5, 1],
                            "timestamp": [10, 20, 30]})
    srv.encoder = srv.scorer = srv.multi = _NoRuntime()
    return srv, good


def _cache(good, **changes):
    fields = {k: getattr(good, k) for k in ("k", "v", "head_user", "qtokens", "pooled",
                                             "fingerprint")}
    return UserCache(**{**fields, **changes})


BAD_CACHES = {  # name: (changed fields from the good cache, expected message)
    "k float64": (lambda c: {"k": c.k.astype(np.float64)}, "dtype float64"),
    "v float16": (lambda c: {"v": c.v.astype(np.float16)}, "dtype float16"),
    "k/v shapes differ": (lambda c: {"v": c.v[:, :2]}, "differ"),
    "wrong heads": (lambda c: {"k": np.zeros((2, 3, 4, 4), np.float32),
                               "v": np.zeros((2, 3, 4, 4), np.float32)}, r"\[2, n, 2, 8\]"),
    "too long": (lambda c: {"k": np.zeros((2, 201, 2, 8), np.float32),
                            "v": np.zeros((2, 201, 2, 8), np.float32)}, "exceeds max_len"),
    "head_user shape": (lambda c: {"head_user": c.head_user[None]}, "shape"),
    "NaN": (lambda c: {"k": np.where(c.k == c.k.flat[0], np.nan, c.k).astype(np.float32)},
            "NaN"),
    "list not array": (lambda c: {"head_user": c.head_user.tolist()}, "numpy array"),
    "another model": (lambda c: {"fingerprint": "0" * 64}, "built by model"),
}


@pytest.mark.parametrize("name", list(BAD_CACHES))
def test_scorer_refuses_bad_caches_before_onnx_runtime(guarded, name):
    srv, good = guarded
    change, message = BAD_CACHES[name]
    with pytest.raises(InputError, match=message):
        srv.score(_cache(good, **change(good)), [1, 2])


@pytest.mark.parametrize("cands,message", [
    (np.array([1, 2], np.int32), "int64"),
    (np.array([1.0, 2.0]), "int64"),
    (np.array([0, 1]), r"\[1, 301\]"),
    (np.array([1, 302]), r"\[1, 301\]"),
    (np.array([[1, 2]]), "one-dimensional"),
    ([1, 2], "numpy array"),
])
def test_scorer_refuses_bad_internal_ids_before_onnx_runtime(guarded, cands, message):
    srv, good = guarded
    with pytest.raises(InputError, match=message):
        srv.score_ids(good, cands)


@pytest.mark.parametrize("cands,message", [
    ([1, -3], "non-negative"), ([1.5], "non-integer"), ([True, 2], "bool"),
    (["a", "b"], "integers"), ([[1, 2]], "one-dimensional"), ([10**9], "unknown"),
])
def test_scorer_refuses_bad_raw_ids_before_onnx_runtime(guarded, cands, message):
    srv, good = guarded
    with pytest.raises(InputError, match=message):
        srv.score(good, cands, strict=True)


def test_scorer_refuses_bad_encoder_input_before_onnx_runtime(guarded, tiny):
    srv, _ = guarded
    arrays = srv.encode_history(random_history(tiny, 5, np.random.default_rng(0), user_id=1))
    bad = [
        ({**arrays, "hist_item": arrays["hist_item"].astype(np.int32)}, "dtype int32"),
        ({**arrays, "hist_gap": arrays["hist_gap"][:4]}, "positions"),
        ({**arrays, "hist_item": arrays["hist_item"] + 10**6}, "outside"),
        ({**arrays, "hist_len": np.asarray(9, np.int64)}, "outside"),
        ({k: v for k, v in arrays.items() if k != "user_age"}, "missing"),
        ({k: np.zeros(201, np.int64) if k.startswith("hist_") and k != "hist_len" else v
          for k, v in arrays.items()}, "1..200"),
    ]
    for feed, message in bad:
        with pytest.raises(InputError, match=message):
            srv.run_encoder(feed)
    for h, message in [
        ({"item_id": [1, 2], "rating": [4], "timestamp": [1, 2]}, "rating"),
        ({"item_id": [1], "rating": [4.5], "timestamp": [1]}, "unknown value"),
        ({"item_id": [1], "timestamp": [1]}, "lacks 'rating'"),
        ({"item_id": [1], "rating": [4], "timestamp": [float("nan")]}, "NaN"),
        ({"item_id": "12", "rating": [4], "timestamp": [1]}, "string"),
    ]:
        with pytest.raises(InputError, match=message):
            srv.encode_user(h)


def test_onnx_runtime_itself_refuses_what_the_manifest_forbids(exported, engine):
    """The manifest's dtype/shape rules are the graph's: ONNX Runtime rejects a float64 cache
    and mismatched k/v (the example stops both earlier, with a clearer message)."""
    sc = session(exported / "scorer.onnx")
    c = engine.encode_user({"item_id": [1, 2, 3], "rating": [4, 5, 1], "timestamp": [1, 2, 3]})
    feed = {"k": c.k.numpy(), "v": c.v.numpy(), "head_user": c.head_user.numpy(),
            "cand_item": np.array([1, 2], np.int64)}
    errors = (ort.capi.onnxruntime_pybind11_state.InvalidArgument,
              ort.capi.onnxruntime_pybind11_state.Fail)
    with pytest.raises(errors, match="(?i)type"):
        sc.run(None, {**feed, "k": feed["k"].astype(np.float64)})
    with pytest.raises(errors, match="(?i)type"):
        sc.run(None, {**feed, "cand_item": feed["cand_item"].astype(np.int32)})
    with pytest.raises(errors):
        sc.run(None, {**feed, "v": feed["v"][:, :2]})


def test_scorer_refuses_a_damaged_folder(exported, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    (bad / "scorer.onnx").write_bytes((bad / "scorer.onnx").read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="sha256"):
        Scorer.load(bad)
    (bad / "manifest.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not an srp4ctr"):
        Scorer.load(bad)
