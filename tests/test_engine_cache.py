"""User caches: layout, files (round trip, refusals) and the byte-bounded LRU store."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors.torch import save_file
from train_fixtures import TINY, prepare_tiny, raw_history

from srp4ctr.engine import CACHE_FORMAT, Engine, UserCache, UserCacheStore
from srp4ctr.errors import CacheError, InputError
from srp4ctr.models import SRP4CTR, ModelConfig, ModelSpec

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return prepare_tiny(tmp_path_factory.mktemp("cache"), cache="c", n_users=12)


def _engine(ds, seed: int, **kw) -> Engine:
    torch.manual_seed(seed)
    return Engine.from_model(SRP4CTR(ModelSpec.from_dataset(ds), ModelConfig(**TINY)), ds, **kw)


@pytest.fixture(scope="module")
def engine(tiny):
    return _engine(tiny, 0)


@pytest.fixture(scope="module")
def cache(engine, tiny):
    return engine.encode_user(raw_history(tiny, 2, lists=False))


# ----------------------------------------------------------------------------- layout
def test_layout(engine, cache):
    cfg = engine.model_config
    assert cache.k.shape == (cfg.n_layers, cache.length, cfg.n_heads, cfg.d_model // cfg.n_heads)
    assert cache.v.shape == cache.k.shape
    assert cache.head_user.shape == (cfg.head_hidden[0],)
    assert cache.qtokens.shape == (cfg.n_queries, cfg.d_model)
    assert cache.pooled is None
    assert set(cache.tensors()) == {"k", "v", "head_user", "qtokens"}
    assert cache.nbytes == sum(t.numel() * 4 for t in cache.tensors().values())
    assert cache.fingerprint == engine.fingerprint and cache.dtype == torch.float32
    k0, v0 = cache.layer_kv(0)
    assert k0.data_ptr() == cache.k.data_ptr() and v0.shape == (cache.length, 2, 8)
    assert "UserCache(" in repr(cache)
    assert cache.to("cpu") is cache


@pytest.mark.parametrize("side", ["torch", pytest.param("cpp", marks=pytest.mark.cpp)])
def test_cache_k_v_are_the_models(engine, tiny, side):
    """The cached K/V are the encoder's own, valid positions only: bit for bit when the model
    itself runs the user side, to fp32 rounding when the C++ encoder does."""
    eng = Engine.from_model(engine.model, tiny, user_side=side, fingerprint=engine.fingerprint)
    cache = eng.encode_user(raw_history(tiny, 2, lists=False))
    arr = tiny.encode_user_history(raw_history(tiny, 2, lists=False), max_len=engine.max_len)
    n = int(arr["hist_len"])
    batch = {k: torch.as_tensor(v)[None] for k, v in arr.items()
             if k.startswith("hist_") and k != "hist_len"}
    batch["hist_len"] = torch.tensor([n])
    for f in tiny.user_fields:
        batch[f"user_{f}"] = torch.as_tensor(arr[f"user_{f}"]).reshape(1)
    with torch.no_grad():
        state = engine.model.encode_users(batch)
    def same(a, b):
        return torch.equal(a, b) if side == "torch" else torch.allclose(a, b, rtol=0, atol=1e-5)

    for layer in range(engine.model_config.n_layers):
        assert same(cache.k[layer], state.k[layer][0, :n])
        assert same(cache.v[layer], state.v[layer][0, :n])
    assert same(cache.head_user, state.head_user[0])
    assert same(cache.qtokens, state.qtokens[0])


def test_constructor_checks():
    k = torch.zeros(2, 3, 2, 8)
    with pytest.raises(CacheError, match="fingerprint"):
        UserCache(k, k, torch.zeros(4), fingerprint="")
    with pytest.raises(CacheError, match="dims"):
        UserCache(k[0], k[0], torch.zeros(4), fingerprint="x")
    with pytest.raises(CacheError, match="differ"):
        UserCache(k, k[:, :2], torch.zeros(4), fingerprint="x")
    with pytest.raises(CacheError, match="dtype"):
        UserCache(k, k, torch.zeros(4, dtype=torch.float64), fingerprint="x")


# ----------------------------------------------------------------------------- files
def test_save_load_round_trip(engine, cache, tmp_path):
    path = cache.save(tmp_path / "u2.safetensors")
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed into place
    back = engine.load_cache(path)
    for name, t in cache.tensors().items():
        assert torch.equal(back.tensors()[name], t)
    assert back.fingerprint == cache.fingerprint and back.user_id == cache.user_id
    cands = list(range(1, 61))
    assert torch.equal(engine.score(back, cands), engine.score(cache, cands))
    plain = UserCache.load(path)  # without an engine: no model check
    assert plain.device == torch.device("cpu")
    meta = json.loads(json.dumps(cache.metadata()))
    assert meta["format"] == CACHE_FORMAT and meta["length"] == str(cache.length)


def test_empty_history_round_trip(engine, tmp_path):
    c = engine.encode_user({"item_id": [], "rating": [], "timestamp": []})
    back = engine.load_cache(c.save(tmp_path / "empty.safetensors"))
    assert back.length == 0
    assert torch.equal(engine.score(back, [1, 2]), engine.score(c, [1, 2]))


def test_load_refuses_another_model(tiny, cache, tmp_path):
    other = _engine(tiny, 1)
    path = cache.save(tmp_path / "c.safetensors")
    with pytest.raises(CacheError, match="another|encode the user again"):
        other.load_cache(path)
    bf = _engine(tiny, 0, dtype=torch.bfloat16)
    with pytest.raises(CacheError, match="dtype"):
        bf.load_cache(path)


@pytest.mark.parametrize("cut", [8, 100, -4])
def test_load_refuses_truncated_files(engine, cache, tmp_path, cut):
    path = cache.save(tmp_path / "c.safetensors")
    blob = path.read_bytes()
    path.write_bytes(blob[:cut])
    with pytest.raises(CacheError):
        engine.load_cache(path)


def test_load_refuses_altered_bytes(engine, cache, tmp_path):
    path = cache.save(tmp_path / "c.safetensors")
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x40  # a bit of the last tensor's data
    path.write_bytes(bytes(blob))
    with pytest.raises(CacheError, match="sha256|corrupt"):
        engine.load_cache(path)


def test_load_refuses_nan_and_foreign_files(engine, cache, tmp_path):
    # a well-formed file (right digest) whose tensors hold NaN
    bad = UserCache(cache.k.clone(), cache.v.clone(), cache.head_user.clone(),
                    cache.qtokens.clone(), fingerprint=cache.fingerprint)
    bad.k[0, 0, 0, 0] = float("nan")
    with pytest.raises(CacheError, match="NaN"):
        bad.save(tmp_path / "nan.safetensors")  # refused when writing ...
    meta = bad.metadata()
    save_file({n: t.contiguous() for n, t in bad.tensors().items()},
              str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(CacheError, match="NaN"):
        engine.load_cache(tmp_path / "nan.safetensors")  # ... and when reading
    save_file({"x": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CacheError, match="not a srp4ctr user cache"):
        UserCache.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CacheError):
        UserCache.load(tmp_path / "junk.safetensors")
    with pytest.raises(CacheError, match="no such"):
        UserCache.load(tmp_path / "missing.safetensors")
    # a file whose metadata disagrees with its tensors
    meta2 = dict(cache.metadata(), length="99")
    save_file({n: t.contiguous() for n, t in cache.tensors().items()},
              str(tmp_path / "len.safetensors"), metadata=meta2)
    with pytest.raises(CacheError, match="length"):
        UserCache.load(tmp_path / "len.safetensors")


def test_save_failure_leaves_no_file(cache, tmp_path):
    c = UserCache(cache.k, cache.v, cache.head_user, fingerprint=cache.fingerprint,
                  user_id=object())
    with pytest.raises(CacheError, match="JSON"):
        c.save(tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- store
def _fake(n: int, fp: str = "m") -> UserCache:
    """A cache of exactly ``(2*n*16 + 8) * 4`` bytes."""
    k = torch.zeros(1, n, 2, 8)
    return UserCache(k, k.clone(), torch.zeros(8), fingerprint=fp)


def test_store_evicts_least_recently_used_by_bytes():
    size = _fake(4).nbytes
    store = UserCacheStore(max_bytes=3 * size)
    for uid in ("a", "b", "c"):
        assert store.put(uid, _fake(4))
    assert len(store) == 3 and store.nbytes == 3 * size
    assert store.get("a") is not None  # a is now the most recent: b is the oldest
    store.put("d", _fake(4))
    assert store.keys() == ["c", "a", "d"]
    assert "b" not in store and store.nbytes == 3 * size
    # a big cache evicts as many as needed
    big = _fake(8)
    assert size < big.nbytes <= 2 * size
    store.put("e", big)
    assert store.keys() == ["d", "e"] and store.nbytes == size + big.nbytes
    assert store.evictions == 3
    # too big to ever fit: not stored, and an older entry of that id is dropped
    assert not store.put("d", _fake(40))
    assert store.keys() == ["e"] and store.nbytes == big.nbytes
    # replacing an entry re-counts its bytes
    store.put("e", _fake(1))
    assert store.nbytes == _fake(1).nbytes
    assert store.pop("e") is not None and store.nbytes == 0 and len(store) == 0
    assert store.pop("e") is None


def test_store_get_and_contains_and_stats():
    store = UserCacheStore(max_bytes=1 << 20)
    c = _fake(2)
    store.put(7, c)
    assert 7 in store and 8 not in store
    assert store.get(7) is c and store.get(8) is None
    s = store.stats()
    assert s["hits"] == 1 and s["misses"] == 1 and s["entries"] == 1
    store.clear()
    assert len(store) == 0 and store.nbytes == 0
    assert "UserCacheStore(" in repr(store)
    with pytest.raises(InputError):
        store.put(1, "not a cache")
    with pytest.raises(InputError):
        store.get([1, 2])  # unhashable
    with pytest.raises(InputError):
        UserCacheStore(max_bytes=-1)


def test_store_get_or_encode(engine, tiny):
    store = UserCacheStore(max_bytes=1 << 20)
    calls = []

    def encode():
        calls.append(1)
        return engine.encode_user(raw_history(tiny, 3, lists=False))

    a = store.get_or_encode(3, encode)
    b = store.get_or_encode(3, encode)
    assert a is b and len(calls) == 1
    with pytest.raises(InputError):
        store.get_or_encode(4, lambda: None)
    assert 4 not in store


def test_store_is_thread_safe():
    store = UserCacheStore(max_bytes=10 * _fake(3).nbytes)

    def work(t: int) -> None:
        for i in range(300):
            uid = (t * 7 + i) % 25
            if i % 3:
                store.put(uid, _fake(3))
            else:
                store.get(uid)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(store) <= 10
    assert store.nbytes == sum(store.get(k).nbytes for k in store)
    assert store.nbytes <= store.max_bytes
