"""The torch-free runtime (``srp4ctr.serving``) against the engine, in a process where torch
cannot be imported: ONNX Runtime and OpenVINO, histories 1..200 (and empty, and longer than
max_len), 1..5000 candidates, one user at a time and several in one ``scorer_multi`` call.

Tolerance 1e-5 on probabilities, as in ``tests/test_onnx.py`` (same fp32 functions; only the
order of floating-point operations differs between the runtimes' kernels and torch's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from train_fixtures import perturbed, prepare_tiny

from srp4ctr.engine import Engine
from srp4ctr.engine.onnx_export import export_engine
from srp4ctr.errors import CacheError, InputError, UnknownItemError
from srp4ctr.models import SRP4CTR, ModelConfig, ModelSpec

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

ATOL = 1e-5
CONFIG = {"d_model": 16, "n_layers": 2, "n_heads": 2, "max_len": 200, "n_queries": 2,
          "head_hidden": (16, 8)}
LENGTHS = [0, 1, 2, 5, 17, 64, 128, 199, 200, 250]
COUNTS = [1, 7, 100, 1000, 5000, 3, 0, 64, 2500, 12]
RUNTIMES = ["onnxruntime"] + (["openvino"] if __import__("importlib").util.find_spec("openvino")
                              else [])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    ds = prepare_tiny(root, n_items=300, per_user=(12, 260))
    torch.manual_seed(0)
    model = perturbed(SRP4CTR(ModelSpec.from_dataset(ds), ModelConfig(**CONFIG)), seed=2,
                      scale=0.2)
    engine = Engine.from_model(model, ds, backend="torch", threads=1)
    export_engine(engine, root / "onnx")
    rng = np.random.default_rng(0)
    histories, cands = [], []
    for i, n in enumerate(LENGTHS):
        items = rng.choice(ds.item_raw[1:], size=n).tolist()
        ts = (978300000 + np.sort(rng.integers(0, 3 * 10**6, size=n))).tolist()
        h = {"item_id": [int(x) for x in items], "timestamp": [int(t) for t in ts],
             "rating": [int(r) for r in rng.integers(1, 6, size=n)]}
        if i % 2:
            h["user_id"] = int(ds.user_raw[1 + i])
        histories.append(h)
        c = rng.choice(ds.item_raw[1:], size=COUNTS[i]).tolist()
        cands.append([int(x) for x in c] + ([10**8] if COUNTS[i] > 50 else []))  # an unknown
    return root, ds, engine, histories, cands


_GUARDED = textwrap.dedent('''
    import importlib.abc, json, sys
    import numpy as np
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torch":
                raise ImportError("torch is blocked in this test: " + name)
    sys.meta_path.insert(0, Block())
    from srp4ctr.serving import Scorer
    folder, runtime, inputs, out = sys.argv[1:5]
    spec = json.load(open(inputs))
    scorer = Scorer.load(folder, runtime=runtime, threads=1)
    caches = scorer.encode_users(spec["histories"])
    single = [scorer.score(c, ids) for c, ids in zip(caches, spec["candidates"])]
    many = scorer.score_many(caches, spec["candidates"])
    arrays = {}
    for i, (c, a, b) in enumerate(zip(caches, single, many)):
        arrays[f"single{i}"], arrays[f"many{i}"] = a, b
        arrays[f"head_user{i}"] = c.head_user
        arrays[f"length{i}"] = np.asarray(c.length)
    np.savez(out, **arrays)
    bad = sorted(m for m in sys.modules if m.split(".")[0] == "torch")
    assert not bad, bad
    print("NO-TORCH-OK")
''')


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_torch_free_runtime_equals_the_engine(setup, runtime, tmp_path):
    root, ds, engine, histories, cands = setup
    (tmp_path / "in.json").write_text(json.dumps({"histories": histories, "candidates": cands}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", _GUARDED, str(root / "onnx"), runtime, str(tmp_path / "in.json"),
         str(tmp_path / "out.npz")], capture_output=True, text=True, env=env, timeout=600,
        check=False, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NO-TORCH-OK" in proc.stdout
    got = np.load(tmp_path / "out.npz")
    caches = engine.encode_users(histories)
    want_many = engine.score_many(caches, cands)
    worst = 0.0
    for i, (c, ids) in enumerate(zip(caches, cands)):
        want = engine.score(c, ids).numpy()
        assert int(got[f"length{i}"]) == c.length == min(LENGTHS[i], 200)
        assert got[f"single{i}"].shape == got[f"many{i}"].shape == want.shape == (len(ids),)
        assert np.abs(got[f"head_user{i}"] - c.head_user.numpy()).max() <= ATOL
        for key, ref in ((f"single{i}", want), (f"many{i}", want_many[i].numpy())):
            if ref.size:
                worst = max(worst, float(np.abs(got[key] - ref).max()))
    assert worst <= ATOL, worst
    assert max(len(c) for c in cands) > 5000 and min(len(c) for c in cands) == 0


def test_the_same_bad_input_gets_the_same_error(setup):
    """The engine and the scorer share their input rules: the same exception class and
    message for the same bad input."""
    from srp4ctr.serving import Scorer

    root, ds, engine, histories, _ = setup
    scorer = Scorer.load(root / "onnx", threads=1)
    good = histories[3]
    bad_histories = [
        {"item_id": [1, 2], "rating": [4], "timestamp": [1, 2]},
        {"item_id": [1], "rating": [4.5], "timestamp": [1]},
        {"item_id": [1], "timestamp": [1]},
        {"item_id": [1], "rating": [4], "timestamp": [float("nan")]},
        {"item_id": "12", "rating": [4], "timestamp": [1]},
        {"item_id": [[1, 2]], "rating": [4], "timestamp": [1]},
        {"item_id": [-1], "rating": [4], "timestamp": [1]},
        [1, 2, 3],
    ]
    for h in bad_histories:
        with pytest.raises(InputError) as a:
            engine.encode_user(h)
        with pytest.raises(InputError) as b:
            scorer.encode_user(h)
        assert type(a.value) is type(b.value) and str(a.value) == str(b.value), h
    ce, cs = engine.encode_user(good), scorer.encode_user(good)
    for cands, strict in (([1, -3], False), ([1.5], False), ([True, 2], False),
                          (["a"], False), ([[1, 2]], False), ([10**9], True),
                          ({1: 0.5, 2: 0.5}, False), ({1, 2}, False),
                          (np.array([2**63], dtype=np.uint64), False)):
        with pytest.raises(InputError) as a:
            engine.score(ce, cands, strict)
        with pytest.raises(InputError) as b:
            scorer.score(cs, cands, strict)
        assert type(a.value) is type(b.value) and str(a.value) == str(b.value), cands
    for uid in (1.5, float("nan"), True, [1]):
        with pytest.raises(InputError) as a:
            engine.encode_user(good, user_id=uid)
        with pytest.raises(InputError) as b:
            scorer.encode_user(good, user_id=uid)
        assert type(a.value) is type(b.value) and str(a.value) == str(b.value), uid
    with pytest.raises(UnknownItemError):
        scorer.score(cs, [10**9], strict=True)
    with pytest.raises(CacheError):
        scorer.score(ce, [1])  # an engine cache (torch tensors) is not this runtime's
    with pytest.raises(InputError, match="sequence of caches"):
        scorer.score_many(cs, [[1]])
    with pytest.raises(InputError, match="2 caches but 1"):
        scorer.score_many([cs, cs], [[1]])
    with pytest.raises(InputError, match="runtime"):
        Scorer.load(root / "onnx", runtime="tensorrt")
    with pytest.raises(InputError, match="bf16"):
        Scorer.load(root / "onnx", runtime="onnxruntime", precision="bf16")


@pytest.mark.skipif("openvino" not in RUNTIMES, reason="openvino is not installed")
def test_openvino_first_call_with_one_row(setup):
    """OpenVINO 2026.4's CPU plugin returns wrong results for longer histories when a compiled
    scorer's first inference has a single K/V row; the scorer's warm-up (n = 2 first) is what
    keeps a one-interaction first request from spoiling the rest."""
    from srp4ctr.serving import Scorer

    root, ds, engine, histories, _ = setup
    scorer = Scorer.load(root / "onnx", runtime="openvino", threads=1)
    cands = list(range(1, 120))
    for h in (histories[1], histories[7], histories[0], histories[8]):  # 1, 199, 0, 200 rows
        got = scorer.score(scorer.encode_user(h), cands)
        want = engine.score(engine.encode_user(h), cands).numpy()
        assert np.abs(got - want).max() <= ATOL


def test_bf16_precision_runs_and_stays_close(setup):
    """OpenVINO bf16 inference precision (fp32 where the CPU has no bf16 instructions): runs,
    and stays within bf16's rounding of the fp32 probabilities."""
    pytest.importorskip("openvino")
    from srp4ctr.serving import Scorer

    root, ds, engine, histories, cands = setup
    scorer = Scorer.load(root / "onnx", runtime="openvino", precision="bf16", threads=1)
    assert scorer.describe()["precision"] == "bf16"
    h = histories[4]  # 17 interactions, 1000 candidates and an unknown one
    got = scorer.score(scorer.encode_user(h), cands[4])
    want = engine.score(engine.encode_user(h), cands[4]).numpy()
    assert np.abs(got - want).max() <= 0.05


def test_int8_scorers_are_offered_not_equal(setup, tmp_path):
    """``int8=True``: ONNX Runtime's dynamically quantised scorers beside the fp32 ones,
    recorded in the manifest, served with ``precision="int8"`` (the encoder stays fp32). A
    quantised model is not the engine's: held to a loose bound here, its AUC measured by
    bench/serving_variants.py."""
    import onnx

    from srp4ctr.serving import Scorer

    root, ds, engine, histories, cands = setup
    m = export_engine(engine, tmp_path / "onnx", int8=True)
    files = {g["file"] for g in m["variants"]["int8"]["graphs"].values()}
    assert files == {"scorer.int8.onnx", "scorer_multi.int8.onnx"}
    ops = {n.op_type for n in onnx.load(str(tmp_path / "onnx" / "scorer.int8.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}
    assert 0 < m["verification"]["int8_max_abs_diff_vs_fp32"] < 0.1
    q = Scorer.load(tmp_path / "onnx", precision="int8", threads=1)
    f = Scorer.load(tmp_path / "onnx", threads=1)
    h = histories[5]
    c = f.encode_user(h)
    got, want = q.score(c, cands[4]), f.score(c, cands[4])
    assert 0 < np.abs(got - want).max() < 0.1
    assert np.corrcoef(got, want)[0, 1] > 0.99
    many = q.score_many([c, c], [cands[4][:10], cands[1]])
    assert [len(x) for x in many] == [10, len(cands[1])]
    with pytest.raises(InputError, match="export with --int8"):
        Scorer.load(root / "onnx", precision="int8")
    if "openvino" in RUNTIMES:
        with pytest.raises(InputError, match="onnxruntime"):
            Scorer.load(tmp_path / "onnx", runtime="openvino", precision="int8")
    (tmp_path / "onnx" / "scorer.int8.onnx").write_bytes(b"garbage")
    with pytest.raises(Exception, match="sha256"):
        Scorer.load(tmp_path / "onnx", precision="int8")


@pytest.mark.parametrize("entry", ["../outside.onnx", "/etc/passwd", "sub/x.onnx", "..", "",
                                   "link.onnx"])
def test_manifest_entries_stay_inside_the_folder(setup, tmp_path, entry):
    """A manifest naming a file outside the export folder (path traversal, an absolute path,
    a link pointing away) is refused before anything is opened."""
    import shutil

    from srp4ctr.errors import CheckpointError
    from srp4ctr.serving import Scorer

    root = setup[0]
    folder = tmp_path / "export"
    shutil.copytree(root / "onnx", folder)
    shutil.copy(folder / "scorer.onnx", tmp_path / "outside.onnx")
    (folder / "link.onnx").symlink_to(tmp_path / "outside.onnx")
    m = json.loads((folder / "manifest.json").read_text())
    m["graphs"]["scorer"]["file"] = entry
    (folder / "manifest.json").write_text(json.dumps(m))
    for verify in (True, False):
        with pytest.raises(CheckpointError, match="not a file of the export folder"):
            Scorer.load(folder, threads=1, verify_files=verify)
