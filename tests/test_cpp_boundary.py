"""The C++ boundary cannot be handed garbage: ``_C.Tower.score`` takes typed numpy arrays, and a
wrong dtype, rank, shape, non-contiguous view, overstated or negative count, out-of-range id,
read-only output or non-finite cache is a ``ValueError`` / ``IndexError`` before any kernel
runs; the buffers it accepts give the engine's own scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_fixtures import TINY, prepare_tiny, raw_history, spread_bundle

from srp4ctr.engine import Engine

pytestmark = pytest.mark.cpp  # skipped without the extension, failed under SRP4CTR_REQUIRE_CPP


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("cppb")
    ds = prepare_tiny(root, cache="c", n_users=12)
    bundle = spread_bundle(root, ds, TINY, seed=4)
    engine = Engine.load(bundle, backend="cpp", dtype=request.param, threads=1)
    cache = engine.encode_user(raw_history(ds, 2))
    return engine, cache


def _bits(t: torch.Tensor) -> np.ndarray:
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).contiguous().numpy()


def _args(engine, cache, n=7):
    fm = engine.folded
    ids = np.arange(1, n + 1, dtype=np.int64)
    tables = (_bits(fm.z0), _bits(fm.q0), _bits(fm.hz0))
    users = [(_bits(cache.k), _bits(cache.v), _bits(cache.head_user))]
    return dict(ids=ids, tables=tables, users=users, counts=np.array([n], np.int64),
                out=np.empty(n, np.float32), threads=1, tile=48)


def _call(engine, **a):
    engine._backend._tower.score(a["ids"], a["tables"], a["users"], a["counts"], a["out"],
                                 a["threads"], a["tile"])
    return a["out"]


def test_typed_call_equals_the_engine(setup):
    engine, cache = setup
    a = _args(engine, cache)
    got = _call(engine, **a)
    want = engine.score(cache, engine.dataset.item_raw[1:8].tolist(), logits=True)
    assert np.allclose(got, want.float().numpy(), atol=1e-6 if engine.dtype == torch.float32
                       else 2e-2)


def _mutations(engine, cache):
    fm = engine.folded
    other = torch.float32 if fm.dtype == torch.bfloat16 else torch.bfloat16
    k = _bits(cache.k)
    yield "kv of another dtype than its tables claim", lambda a: a.update(
        users=[(_bits(cache.k.to(other)), _bits(cache.v), _bits(cache.head_user))]), "dtype"
    yield "tables as float64", lambda a: a.update(
        tables=(fm.z0.double().numpy(), a["tables"][1], a["tables"][2])), "dtype"
    yield "ids as int32", lambda a: a.update(ids=a["ids"].astype(np.int32)), "dtype"
    yield "ids a strided view", lambda a: a.update(
        ids=np.arange(1, 15, dtype=np.int64)[::2]), "C-contiguous"
    yield "k a transposed view", lambda a: a.update(
        users=[(np.swapaxes(k, 2, 3), _bits(cache.v), _bits(cache.head_user))]), "C-contig|dim"
    yield "overstated count", lambda a: a.update(counts=np.array([9], np.int64)), "add up"
    yield "negative count", lambda a: a.update(counts=np.array([-1], np.int64)), "negative"
    yield "more counts than users", lambda a: a.update(counts=np.array([3, 4], np.int64)), \
        "caches but"
    yield "id beyond the tables", lambda a: a["ids"].__setitem__(3, fm.z0.shape[0]), "outside"
    yield "negative id", lambda a: a["ids"].__setitem__(0, -1), "outside"
    yield "out too short", lambda a: a.update(out=np.empty(3, np.float32)), "dimension 0"
    yield "out read-only", lambda a: a["out"].setflags(write=False), "writable"
    yield "out as float64", lambda a: a.update(out=np.empty(7, np.float64)), "dtype"
    yield "k of another head count", lambda a: a.update(
        users=[(k.reshape(k.shape[0], k.shape[1], 1, -1), _bits(cache.v),
                _bits(cache.head_user))]), "dimension 2"
    yield "k and v of other lengths", lambda a: a.update(
        users=[(k, _bits(cache.v)[:, :1].copy(), _bits(cache.head_user))]), "dimension 1"
    yield "head_user too short", lambda a: a.update(
        users=[(k, _bits(cache.v), _bits(cache.head_user)[:-1].copy())]), "dimension 0"
    yield "q0 missing", lambda a: a.update(tables=(a["tables"][0], None, a["tables"][2])), "q0"
    yield "hz0 of fewer rows", lambda a: a.update(
        tables=(a["tables"][0], a["tables"][1], a["tables"][2][:5].copy())), "dimension 0"
    yield "a raw address", lambda a: a.update(ids=a["ids"].ctypes.data), "incompatible function"
    yield "a list instead of a cache tuple", lambda a: a.update(users=[k]), "."
    nan_k = k.copy()
    nan_k.reshape(-1)[5] = 0x7FC0 if nan_k.dtype == np.uint16 else np.nan
    yield "NaN in k", lambda a: a.update(
        users=[(nan_k, _bits(cache.v), _bits(cache.head_user))]), "NaN or inf"
    inf_hu = _bits(cache.head_user).copy()
    inf_hu[0] = 0x7F80 if inf_hu.dtype == np.uint16 else np.inf
    yield "inf in head_user", lambda a: a.update(
        users=[(k, _bits(cache.v), inf_hu)]), "NaN or inf"
    yield "tile 0", lambda a: a.update(tile=0), "tile"


def test_every_bad_buffer_is_refused_before_work(setup):
    engine, cache = setup
    seen = 0
    for what, mutate, message in _mutations(engine, cache):
        a = _args(engine, cache)
        sentinel = np.float32(12345.0)
        mutate(a)
        if isinstance(a["out"], np.ndarray) and a["out"].flags.writeable:
            a["out"][:] = sentinel
        with pytest.raises((ValueError, IndexError, TypeError, RuntimeError),
                           match=message) as e:
            _call(engine, **a)
        assert not isinstance(e.value, RuntimeError) or isinstance(e.value, IndexError), what
        if isinstance(a["out"], np.ndarray) and a["out"].flags.writeable:
            assert (a["out"] == sentinel).all(), f"{what}: output written before the checks"
        seen += 1
    assert seen >= 20
