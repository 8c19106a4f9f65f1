"""The C++ CPU path (``srp4ctr._C``, engine backend ``cpp``) against the torch reference.

fp32: the probabilities equal the torch backend's (the folded reference the engine tests tie to
the training forward) to 1e-5, on random models and inputs of many shapes, for the AVX-512 path
and the portable one. bf16: products in bf16 with fp32 sums, checked against fp32 with the
tolerance documented in csrc/README.md.

Random weights are drawn at a scale that keeps logits in the range a trained CTR model produces
(|logit| up to ~10): at larger scales fp32 itself stops agreeing with float64 to 1e-5 in
probability, for the torch path as much as for this one.

The tests skip when the extension is not built, except under ``SRP4CTR_REQUIRE_CPP=1`` (the
project's test run sets it), where a missing extension fails them.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from srp4ctr import _ext
from srp4ctr.engine.backends import BackendOptions, CppBackend, TorchBackend
from srp4ctr.engine.cache import UserCache
from srp4ctr.engine.folded import FoldedModel
from srp4ctr.models import SRP4CTR, ModelConfig
from srp4ctr.models.synthetic import synthetic_spec

torch.set_num_threads(1)

if _ext.extension() is None:
    if os.environ.get("SRP4CTR_REQUIRE_CPP", "0") not in ("", "0"):
        raise RuntimeError(f"SRP4CTR_REQUIRE_CPP=1 but {_ext.unavailable_reason()}")
    pytest.skip(f"C++ extension not available: {_ext.unavailable_reason()}",
                allow_module_level=True)

FEATURES = _ext.extension().cpu_features()
ISAS = (["generic"] + (["avx2"] if FEATURES.get("avx2") else [])
        + (["avx512"] if FEATURES["avx512"] else [])
        + (["neon"] if FEATURES.get("neon") else []))
BF16_ISAS = (["generic"] + (["avx2"] if FEATURES.get("avx2") else [])
             + (["neon"] if FEATURES.get("neon") else [])
             + (["avx512"] if FEATURES["avx512_bf16"] else [])
             + (["amx"] if FEATURES["amx_bf16"] else []))
ATOL = 1e-5
BF16_ATOL = 2e-2  # probabilities; measured worst on these shapes ~7e-3 (csrc/README.md)


def make_model(d=32, layers=2, heads=2, head=(24, 8), n_items=60, xattn=True, seed=0,
               scale=0.1):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=d, n_layers=layers, n_heads=heads, max_len=64, head_hidden=head,
                      use_xattn=xattn, n_queries=2)
    m = SRP4CTR(synthetic_spec(n_items=n_items), cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m


def make_cache(fm: FoldedModel, n: int, seed: int, dtype=torch.float32) -> UserCache:
    g = torch.Generator().manual_seed(seed)
    shape = (fm.n_layers, n, fm.n_heads, fm.head_dim)
    return UserCache(torch.randn(shape, generator=g).to(dtype),
                     torch.randn(shape, generator=g).to(dtype),
                     torch.randn(fm.h1, generator=g).to(dtype), fingerprint="test")


def backend(fm: FoldedModel, isa: str, threads: int | None = None, tile: int = 48):
    b = CppBackend(fm, BackendOptions(isa=isa, threads=threads, tile=tile))
    assert b.describe()["isa"] == isa
    return b


def probs(t: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(t.float())


def assert_close(got, want, atol, what=""):
    diff = (got - want).abs()
    bad = torch.nonzero(diff > atol).flatten()[:5].tolist()
    assert not bad, (f"{what}: {len(torch.nonzero(diff > atol))} of {got.numel()} differ by more "
                     f"than {atol} (max {diff.max().item():.3g}); first at {bad}")


SHAPES = st.fixed_dictionaries({
    "d_heads": st.sampled_from([(16, 1), (16, 2), (32, 2), (24, 3), (64, 2), (64, 4), (48, 1)]),
    "layers": st.integers(1, 3),
    "head": st.sampled_from([(24, 8), (200, 80), (7,), (33, 17, 5)]),
    "xattn": st.booleans(),
    "lengths": st.lists(st.integers(0, 70), min_size=1, max_size=4),
    "counts": st.lists(st.integers(1, 90), min_size=4, max_size=4),
    "threads": st.integers(1, 3),
    "seed": st.integers(0, 1000),
})


@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=SHAPES)
def test_fp32_equals_torch_backend(isa, shape):
    d, heads = shape["d_heads"]
    m = make_model(d, shape["layers"], heads, shape["head"], xattn=shape["xattn"],
                   seed=shape["seed"])
    fm = FoldedModel(m, torch.float32, torch.device("cpu"))
    ref, cpp = TorchBackend(fm), backend(fm, isa, threads=shape["threads"])
    caches = [make_cache(fm, n, shape["seed"] + i) for i, n in enumerate(shape["lengths"])]
    counts = shape["counts"][: len(caches)]
    g = torch.Generator().manual_seed(shape["seed"])
    ids = torch.randint(0, fm.n_item_ids, (sum(counts),), generator=g)
    with torch.no_grad():
        for c, (s, n) in zip(caches, zip(np.cumsum([0, *counts[:-1]]), counts)):
            part = ids[s : s + n]
            assert_close(probs(cpp.score_one(c, part)), probs(ref.score_one(c, part)), ATOL,
                         f"score_one n={c.length} C={n}")
        assert_close(probs(cpp.score_many(caches, ids, counts)),
                     probs(ref.score_many(caches, ids, counts)), ATOL, "score_many")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,C", [(1, 1), (0, 1), (0, 5), (1, 17), (200, 1), (200, 4096),
                                 (17, 33), (16, 48), (15, 49)])
def test_fp32_edge_shapes(isa, n, C):
    """History 1 and 0 (empty: zero attention), 1 candidate, tile +- 1, the issue's shape."""
    m = make_model(64, 2, 2, (200, 80), n_items=500)
    fm = FoldedModel(m, torch.float32, torch.device("cpu"))
    c = make_cache(fm, n, seed=n)
    ids = torch.randint(0, fm.n_item_ids, (C,), generator=torch.Generator().manual_seed(C))
    with torch.no_grad():
        got = probs(backend(fm, isa, threads=2).score_one(c, ids))
        want = probs(TorchBackend(fm).score_one(c, ids))
    assert got.shape == (C,) and torch.isfinite(got).all()
    assert_close(got, want, ATOL, f"n={n} C={C}")


def test_without_item_tables():
    """A catalogue too large to fold: the rows are computed per request, same results."""
    m = make_model(32, 2, 2)
    fm = FoldedModel(m, torch.float32, torch.device("cpu"), fold_items=False)
    assert not fm.tables
    c = make_cache(fm, 9, seed=3)
    ids = torch.tensor([0, 5, 61, 5, 2])
    with torch.no_grad():
        assert_close(probs(CppBackend(fm).score_one(c, ids)),
                     probs(TorchBackend(fm).score_one(c, ids)), ATOL, "no tables")


@pytest.mark.parametrize("isa", BF16_ISAS)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=SHAPES)
def test_bf16_shapes_close_to_fp32(isa, shape):
    """Every bf16 instruction set over the shapes of the fp32 test: K of every product from 8
    (head dim) to 200 (history), odd row and column counts, several users per call (the AMX
    path pads K to whole tiles of 32 and rows to 16)."""
    d, heads = shape["d_heads"]
    m = make_model(d, shape["layers"], heads, shape["head"], xattn=shape["xattn"],
                   seed=shape["seed"])
    f32 = FoldedModel(m, torch.float32, torch.device("cpu"))
    b16 = FoldedModel(m, torch.bfloat16, torch.device("cpu"))
    caches = [make_cache(f32, n, shape["seed"] + i) for i, n in enumerate(shape["lengths"])]
    c16 = [UserCache(c.k.bfloat16(), c.v.bfloat16(), c.head_user.bfloat16(), fingerprint="test")
           for c in caches]
    counts = shape["counts"][: len(caches)]
    ids = torch.randint(0, f32.n_item_ids, (sum(counts),),
                        generator=torch.Generator().manual_seed(shape["seed"]))
    with torch.no_grad():
        want = probs(TorchBackend(f32).score_many(caches, ids, counts))
        got = backend(b16, isa, threads=shape["threads"]).score_many(c16, ids, counts)
    assert got.dtype == torch.bfloat16
    assert_close(probs(got), want, BF16_ATOL, f"bf16 {isa} {shape}")


@pytest.mark.parametrize("isa", BF16_ISAS)
@pytest.mark.parametrize("n,C", [(0, 3), (1, 1), (37, 100), (200, 1000)])
def test_bf16_close_to_fp32(isa, n, C):
    m = make_model(64, 2, 2, (200, 80), n_items=500)
    f32 = FoldedModel(m, torch.float32, torch.device("cpu"))
    b16 = FoldedModel(m, torch.bfloat16, torch.device("cpu"))
    c = make_cache(f32, n, seed=5)
    c16 = UserCache(c.k.bfloat16(), c.v.bfloat16(), c.head_user.bfloat16(), fingerprint="test")
    ids = torch.randint(0, f32.n_item_ids, (C,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = probs(TorchBackend(f32).score_one(c, ids))
        got = backend(b16, isa).score_one(c16, ids)
    assert got.dtype == torch.bfloat16 and backend(b16, isa).describe()["precision"] == "bf16"
    assert_close(probs(got), want, BF16_ATOL, f"bf16 {isa} n={n} C={C}")


@pytest.mark.parametrize("tile", [1, 7, 16, 50, 130])
def test_tile_sizes(tile):
    """Candidates per work item other than the default 48 (SRP4CTR_CPP_TILE): 1, sizes that are
    not multiples of 16 (the AMX path pads rows to 16) and tiles larger than the default."""
    m = make_model(64, 2, 2, (200, 80), n_items=400)
    f32 = FoldedModel(m, torch.float32, torch.device("cpu"))
    b16 = FoldedModel(m, torch.bfloat16, torch.device("cpu"))
    c = make_cache(f32, 37, seed=tile)
    c16 = UserCache(c.k.bfloat16(), c.v.bfloat16(), c.head_user.bfloat16(), fingerprint="test")
    ids = torch.randint(0, f32.n_item_ids, (301,), generator=torch.Generator().manual_seed(tile))
    with torch.no_grad():
        want = probs(TorchBackend(f32).score_one(c, ids))
    for isa in ISAS:
        b = backend(f32, isa, threads=2, tile=tile)
        assert_close(probs(b.score_one(c, ids)), want, ATOL, f"fp32 {isa} tile={tile}")
    for isa in BF16_ISAS:
        b = backend(b16, isa, threads=2, tile=tile)
        assert_close(probs(b.score_one(c16, ids)), want, BF16_ATOL, f"bf16 {isa} tile={tile}")


def test_threads_do_not_change_results_and_calls_are_thread_safe():
    m = make_model(64, 2, 2, (200, 80), n_items=300)
    fm = FoldedModel(m, torch.float32, torch.device("cpu"))
    caches = [make_cache(fm, n, seed=n) for n in (5, 120, 0, 64)]
    ids = [torch.randint(0, fm.n_item_ids, (C,), generator=torch.Generator().manual_seed(C))
           for C in (300, 77, 5, 1000)]
    one = backend(fm, ISAS[-1], threads=1)
    want = [one.score_one(c, i) for c, i in zip(caches, ids)]
    for t in (2, 3, 8):  # tiles are independent: bit-identical whatever the thread count
        b = backend(fm, ISAS[-1], threads=t)
        for c, i, w in zip(caches, ids, want):
            assert torch.equal(b.score_one(c, i), w)
    shared = backend(fm, ISAS[-1], threads=2)
    errors = []

    def worker(k):
        try:
            for _ in range(5):
                j = k % len(caches)
                if not torch.equal(shared.score_one(caches[j], ids[j]), want[j]):
                    errors.append(f"thread {k}: different result")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_extension_checks_its_inputs():
    ext = _ext.extension()
    m = make_model(16, 1, 2, (8,))
    fm = FoldedModel(m, torch.float32, torch.device("cpu"))
    b = CppBackend(fm)
    c = make_cache(fm, 3, seed=0)
    with pytest.raises((IndexError, ValueError), match="outside the tables"):
        b.score_one(c, torch.tensor([0, fm.n_item_ids]))
    with pytest.raises(ValueError, match="d_model"):
        ext.Tower(10, 3, [], None, [], 8, "fp32", "auto", 1e-5)
    with pytest.raises(ValueError, match="precision"):
        ext.Tower(16, 2, [], None, [], 8, "fp16", "auto", 1e-5)
    with pytest.raises(ValueError, match="one output"):
        ext.Tower(16, 2, [], None, [], 8, "fp32", "auto", 1e-5)  # head without a final 1-wide layer
    layer = {k: v.detach().float().numpy() for k, v in zip(fm.layers[0]._fields, fm.layers[0])}
    layer["w1"] = layer["w1"][:, :5]
    with pytest.raises(ValueError, match="w1"):
        ext.Tower(16, 2, [layer], fm.head_zn.numpy(), [(w.numpy(), bb.numpy()) for w, bb in fm.rest],
                  fm.h1, "fp32", "auto", 1e-5)
    with pytest.raises(ValueError, match="isa must be"):
        ext.Tower(16, 2, [], None, [], 8, "fp32", "sse", 1e-5)
    for eps in (0.0, -1e-5, float("nan")):
        with pytest.raises(ValueError, match="ln_eps"):
            ext.Tower(16, 2, [], None, [], 8, "fp32", "auto", eps)
    with pytest.raises(ValueError, match="bf16"):
        ext.Tower(16, 2, [], None, [], 8, "fp32", "amx", 1e-5)  # AMX here is a bf16 path only
    if not FEATURES["amx_bf16"]:
        with pytest.raises(RuntimeError, match="AMX"):
            ext.Tower(16, 2, [], None, [], 8, "bf16", "amx", 1e-5)
    f16 = FoldedModel(m, torch.float16, torch.device("cpu"))
    from srp4ctr.kernels import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="float16"):
        CppBackend(f16)


@pytest.mark.parametrize("isa", ISAS)
def test_layer_norm_epsilon_comes_from_the_model(isa):
    """A model whose LayerNorms use another epsilon: the C++ tower and user side use it too
    (nothing of the model is spelled in C++)."""
    from srp4ctr.engine.backends import CppUserSide
    from srp4ctr.models.synthetic import random_batch

    m = make_model(32, 2, 2, (24, 8), n_items=80, seed=4)
    for mod in m.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.eps = 0.5  # large enough to move every probability
    fm = FoldedModel(m, torch.float32, torch.device("cpu"))
    assert fm.eps == 0.5
    c = make_cache(fm, 23, seed=1)
    ids = torch.arange(fm.n_item_ids)
    with torch.no_grad():
        want = probs(TorchBackend(fm).score_one(c, ids))
    assert_close(probs(backend(fm, isa).score_one(c, ids)), want, ATOL, f"eps {isa}")
    batch = random_batch(m.spec, 1, 17, seed=2, lengths=[17])
    with torch.no_grad():
        state = m.encode_users(batch)
    k, v, qt, hu = CppUserSide(m, BackendOptions(isa=isa)).encode_one(batch, 1)
    for layer in range(len(state.k)):
        assert_close(k[layer].flatten(), state.k[layer][0].flatten(), ATOL, f"k{layer}")
    assert_close(hu, state.head_user[0], ATOL, "head_user")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_scoring_works_in_a_forked_child():
    # A pre-forking server loads (and warms) the engine once, then forks workers: the child
    # inherits the pool's state but none of its threads, and must still score, multi-threaded.
    m = make_model(32, 2, 2, (24, 8), n_items=200)
    fm = FoldedModel(m, torch.float32, torch.device("cpu"))
    b = backend(fm, ISAS[-1], threads=2)
    cache = make_cache(fm, 40, seed=3)
    ids = torch.arange(200)
    want = b.score_one(cache, ids)  # the parent's pool now has a worker thread
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: score, send the bytes, leave without running pytest's teardown
        code = 1
        try:
            got = b.score_one(cache, ids).numpy().tobytes()
            os.write(write, got)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    deadline = 30.0
    import select
    import time

    chunks, start = [], time.monotonic()
    while True:
        left = deadline - (time.monotonic() - start)
        ready, _, _ = select.select([read], [], [], max(left, 0))
        if not ready:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked child did not finish scoring within {deadline:.0f} s")
        chunk = os.read(read, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    got = np.frombuffer(b"".join(chunks), dtype=np.float32)
    assert np.array_equal(got, want.numpy())
    assert torch.equal(b.score_one(cache, ids), want)  # and the parent's pool still works


def test_type_stub_matches_the_extension():
    """srp4ctr/_C.pyi names every class, method and parameter the built extension has."""
    import ast
    import re
    from pathlib import Path

    ext = _ext.extension()
    stub = ast.parse((Path(__file__).resolve().parents[1] / "srp4ctr" / "_C.pyi").read_text())
    seen = set()
    for node in stub.body:
        if isinstance(node, ast.ClassDef):
            cls = getattr(ext, node.name)
            for fn in node.body:
                if not isinstance(fn, ast.FunctionDef):
                    continue
                seen.add(f"{node.name}.{fn.name}")
                doc = getattr(cls, fn.name).__doc__ or ""
                if any(isinstance(d, ast.Name) and d.id == "property" for d in fn.decorator_list):
                    continue
                want = [a.arg for a in fn.args.args[1:]]
                sig = doc.splitlines()[0]
                got = re.findall(r"(\w+): ", sig.split("(", 1)[1])[1:]  # after self
                assert got == want, f"{node.name}.{fn.name}: extension {got}, stub {want}"
        elif isinstance(node, ast.FunctionDef):
            seen.add(node.name)
            assert callable(getattr(ext, node.name))
    public = {f"{c}.{m}" for c in ("Tower", "UserEncoder")
              for m in dir(getattr(ext, c)) if not m.startswith("_")}
    public |= {"Tower.__init__", "UserEncoder.__init__", "cpu_features"}
    assert public <= seen, f"missing from the stub: {sorted(public - seen)}"
