"""Hostile input gets a typed error, never a silently different number: checkpoint identity
covers the computation config, malformed config.json is a CheckpointError naming the field,
non-finite weights are refused at load, a cache written through a numpy view after a first score
is checked again, cache files cover their metadata, the cache store accounts what it stored, the
torch-free runtime stays inside its folder, and ids / user ids / tensors that are not what they
seem are refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from train_fixtures import TINY, cpu_backends, prepare_tiny, raw_history, spread_bundle

from srp4ctr import _ext
from srp4ctr.engine import Engine, UserCache, UserCacheStore
from srp4ctr.errors import CacheError, CheckpointError, InputError
from srp4ctr.models import load_model

torch.set_num_threads(1)

BACKENDS = cpu_backends()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return prepare_tiny(tmp_path_factory.mktemp("rel"), cache="c", n_users=12)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny):
    return spread_bundle(tmp_path_factory.mktemp("relb"), tiny, TINY, seed=3)


def _copy(bundle, tmp_path, name="b"):
    out = tmp_path / name
    shutil.copytree(bundle, out)
    return out


def _edit_config(folder, fn) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg = fn(cfg)
    path.write_text(json.dumps(cfg))
    # keep the bundle's own listing consistent, so only the checkpoint's checks are exercised
    doc = json.loads((folder / "bundle.json").read_text())
    from srp4ctr._files import sha256_file

    doc["files"]["config.json"] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    (folder / "bundle.json").write_text(json.dumps(doc))


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("change", [{"n_heads": 1}, {"n_heads": 4}, {"dropout": 0.3},
                                    {"use_qformer": False}])
def test_editing_the_computation_config_is_refused(bundle, tmp_path, change):
    """Same weight shapes, another computation (n_heads 2 -> 1 or 4): never loaded as the
    trained model."""
    b = _copy(bundle, tmp_path)

    def edit(cfg):
        cfg["model_config"].update(change)
        return cfg

    _edit_config(b, edit)
    with pytest.raises(CheckpointError, match="not the bundle's model"):  # the bundle's check
        Engine.load(b, backend="torch")
    (b / "bundle.json").unlink()  # the checkpoint's own
    with pytest.raises(CheckpointError, match="config.json was edited"):
        Engine.load(b, backend="torch")
    with pytest.raises(CheckpointError, match="config.json was edited"):
        load_model(b)


def test_identity_covers_weights_and_config(bundle, tiny, tmp_path):
    """A legacy checkpoint (no config_sha256) edited the same way loads, but under another
    fingerprint, so caches and exports of the original are refused."""
    from srp4ctr.models.checkpoint import model_identity

    cfg = json.loads((bundle / "config.json").read_text())
    other = json.loads(json.dumps(cfg))
    other["model_config"]["n_heads"] = 1
    assert model_identity(cfg) != model_identity(other)
    engine = Engine.load(bundle, backend="torch")
    assert engine.fingerprint == model_identity(cfg)
    b = _copy(bundle, tmp_path)

    def legacy_edit(c):
        c.pop("config_sha256")
        c["model_config"]["n_heads"] = 1
        return c

    _edit_config(b, legacy_edit)
    with pytest.raises(CheckpointError, match="not the bundle's model"):  # a bundle: refused
        Engine.load(b, backend="torch")
    (b / "bundle.json").unlink()  # a plain checkpoint: loads, as another model
    edited = Engine.load(b, backend="torch", dataset=tiny)
    assert edited.fingerprint != engine.fingerprint
    cache = engine.encode_user(raw_history(tiny, 2))
    with pytest.raises(CacheError, match="built by model"):
        edited.score(cache, [1, 2, 3])


@pytest.mark.parametrize("doc,message", [
    ([], "not an object"), (None, "not an object"), (42, "not an object"), ("x", "not an object"),
])
def test_config_json_of_another_type(bundle, tmp_path, doc, message):
    b = _copy(bundle, tmp_path)
    (b / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=message):
        load_model(b)


@pytest.mark.parametrize("field", ["spec", "model_config", "kind", "weights_sha256"])
def test_config_json_missing_a_field(bundle, tmp_path, field):
    b = _copy(bundle, tmp_path)

    def drop(cfg):
        cfg.pop(field)
        cfg.pop("config_sha256", None)
        return cfg

    _edit_config(b, drop)
    with pytest.raises(CheckpointError, match=f"field '{field}' is missing"):
        load_model(b)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["model_config"].update(d_model=32), "weights do not fit"),
    (lambda c: c["model_config"].update(n_heads=3), "field 'model_config' is not valid"),
    (lambda c: c["model_config"].update(d_model="64"), "field 'model_config' is not valid"),
    (lambda c: c["spec"].update(n_items=-1), "is not valid|cannot be built|do not fit"),
    (lambda c: c.update(spec=[]), "field 'spec' is a list"),
    (lambda c: c["model_config"].update(unknown_key=1), "field 'model_config' is not valid"),
])
def test_config_json_with_changed_or_bad_values(bundle, tmp_path, edit, message):
    """A legacy config (no config_sha256, so the edit is not caught by the hash) with values
    that do not describe the weights: a CheckpointError naming the file, never a RuntimeError
    or KeyError."""
    b = _copy(bundle, tmp_path)

    def change(cfg):
        cfg.pop("config_sha256")
        edit(cfg)
        return cfg

    _edit_config(b, change)
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(b)
    assert "config.json" in str(e.value) or str(b) in str(e.value)


def test_non_finite_weights_are_refused(tiny, tmp_path):
    from srp4ctr.bundle import write_bundle_files
    from srp4ctr.models.checkpoint import save_checkpoint

    model, cfg = load_model(spread_bundle(tmp_path, tiny, TINY, seed=1, name="src"))
    with torch.no_grad():
        emb = next(p for n, p in model.named_parameters() if "item" in n and p.dim() == 2)
        emb[5, 3] = float("nan")
    cfg = {k: v for k, v in cfg.items() if k not in ("format", "format_version")}
    bad = save_checkpoint(tmp_path / "nan", model, cfg,
                          extra=lambda d: write_bundle_files(d, tiny))
    with pytest.raises(CheckpointError, match="NaN or inf"):
        load_model(bad)
    with pytest.raises(CheckpointError, match="NaN or inf"):
        Engine.load(bad, backend="torch")
    with pytest.raises(CheckpointError, match="NaN or inf"):  # an in-memory model too
        Engine.from_model(model, tiny, backend="torch")


# ----------------------------------------------------------------------------- caches
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tensor", ["k", "v", "head_user"])
def test_cache_written_through_numpy_after_a_score_is_checked_again(bundle, tiny, backend, tensor):
    engine = Engine.load(bundle, backend=backend, threads=1)
    cache = engine.encode_user(raw_history(tiny, 3))
    assert np.isfinite(engine.score(cache, [1, 2, 3]).numpy()).all()
    view = getattr(cache, tensor).numpy()  # shares memory; no version counter sees this write
    view.reshape(-1)[0] = np.nan
    with pytest.raises(CacheError, match=f"UserCache.{tensor} holds NaN"):
        engine.score(cache, [1, 2, 3])
    view.reshape(-1)[0] = np.inf
    with pytest.raises(CacheError, match="NaN or inf"):
        engine.score_many([cache], [[1, 2]])


def test_cache_file_metadata_is_covered_by_its_sha256(bundle, tiny, tmp_path):
    from safetensors.torch import load, save

    engine = Engine.load(bundle, backend="torch")
    cache = engine.encode_user(raw_history(tiny, 2), user_id=2)
    data = cache.to_bytes()
    assert UserCache.from_bytes(data).user_id == 2
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    meta = header["__metadata__"]
    for key, value in (("user_id", "7"), ("model_fingerprint", "0" * 64), ("length", "1"),
                       ("n_heads", "1")):
        forged = save(load(data), metadata={**meta, key: value})
        with pytest.raises(CacheError, match="do not match|length|metadata"):
            UserCache.from_bytes(forged)
    forged = save(load(data), metadata={**meta, "extra": "1"})
    with pytest.raises(CacheError):
        UserCache.from_bytes(forged)
    path = cache.save(tmp_path / "u.safetensors")
    assert engine.load_cache(path).user_id == 2
    with pytest.raises(CacheError, match="is a directory"):
        cache.save(tmp_path)
    with pytest.raises(CacheError, match="is a directory"):
        UserCache.load(tmp_path)
    with pytest.raises(InputError):
        UserCache.load(None)


def test_store_accounts_what_it_stored(bundle, tiny):
    engine = Engine.load(bundle, backend="torch")
    cache = engine.encode_user(raw_history(tiny, 2))
    store = UserCacheStore(max_bytes=1 << 20)
    store.put("a", cache)
    stored = store.nbytes
    assert stored == cache.nbytes > 0
    cache.k = cache.k[:, :1].clone()  # the caller rebinds a tensor of the stored object
    cache.v = cache.v[:, :1].clone()
    assert store.nbytes == stored
    store.put("a", cache)  # replacing it removes what was accounted, not what it holds now
    assert store.nbytes == cache.nbytes
    store.pop("a")
    assert store.nbytes == 0 and len(store) == 0


# ----------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("candidates", [{1: 0.5, 2: 0.1}, {1, 2, 3}, frozenset({4})])
def test_unordered_candidates_are_refused(bundle, tiny, candidates):
    engine = Engine.load(bundle, backend="torch")
    cache = engine.encode_user(raw_history(tiny, 2))
    with pytest.raises(InputError, match="ordered sequence"):
        engine.score(cache, candidates)


@pytest.mark.parametrize("uid", [1.5, float("nan"), float("inf"), True, [1], {"id": 1}])
def test_user_ids_that_are_not_ids_are_refused(bundle, tiny, uid):
    engine = Engine.load(bundle, backend="torch")
    h = raw_history(tiny, 2, user_id=False)
    with pytest.raises(InputError, match="user_id"):
        engine.encode_user(h, user_id=uid)


def test_integral_float_user_id_is_that_user(bundle, tiny):
    engine = Engine.load(bundle, backend="torch")
    h = raw_history(tiny, 2, user_id=False)
    a = engine.score(engine.encode_user(h, user_id=3), [1, 2, 5])
    b = engine.score(engine.encode_user(h, user_id=3.0), [1, 2, 5])
    assert torch.equal(a, b)


@pytest.mark.parametrize("ids", [np.array([2**63, 5], dtype=np.uint64),
                                 np.array([2.0**63]), np.array([1e30])])
def test_ids_beyond_int64_are_refused(tiny, ids):
    with pytest.raises(InputError, match="int64 range"):
        tiny.encode_items(ids)
    with pytest.raises(InputError, match="int64 range"):
        tiny.encode_users(ids)


@pytest.mark.parametrize("make", [
    lambda: torch.tensor([1, 2, 3]).to_sparse(),
    lambda: torch.empty(3, dtype=torch.int64, device="meta"),
])
def test_sparse_and_meta_tensors_are_refused(bundle, tiny, make):
    engine = Engine.load(bundle, backend="torch")
    cache = engine.encode_user(raw_history(tiny, 2))
    with pytest.raises(InputError, match="dense|meta"):
        engine.score(cache, make())
    h = raw_history(tiny, 2)
    h["item_id"] = make()
    with pytest.raises(InputError, match="dense|meta"):
        engine.encode_user(h)


def test_load_of_nothing_is_an_input_error():
    with pytest.raises(InputError):
        Engine.load(None)


@pytest.mark.cpp
def test_an_instruction_set_this_cpu_lacks_is_a_typed_error(bundle, monkeypatch):
    from srp4ctr.kernels import BackendUnavailableError

    feats = _ext.extension().cpu_features()
    missing = [isa for isa, have in (("avx512", feats.get("avx512")), ("amx", feats.get("amx_bf16")),
                                     ("neon", feats.get("neon")), ("avx2", feats.get("avx2")))
               if not have]
    assert missing
    for isa in missing:
        with pytest.raises(BackendUnavailableError, match=f"isa={isa!r}"):
            Engine.load(bundle, backend="cpp", isa=isa)
        monkeypatch.setenv("SRP4CTR_CPP_ISA", isa)
        with pytest.raises(BackendUnavailableError, match=f"isa={isa!r}"):
            Engine.load(bundle, backend="cpp")
        monkeypatch.delenv("SRP4CTR_CPP_ISA")
    for name, value in (("SRP4CTR_CPP_TILE", "abc"), ("SRP4CTR_CPP_TILE", "0"),
                        ("SRP4CTR_THREADS", "-2"), ("SRP4CTR_CPP_ISA", "sse9")):
        monkeypatch.setenv(name, value)
        with pytest.raises(InputError, match=name):
            Engine.load(bundle, backend="cpp")
        monkeypatch.delenv(name)
