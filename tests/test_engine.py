"""The serving engine on a real (tiny) pipeline: a MovieLens-1M-format folder, ``prepare``, an
SRP4CTR checkpoint in the trainer's layout, ``Engine.load``.

The engine's probabilities must equal the training model's forward on the same users and
candidates (fp32, 1e-5), whatever the chunking, batching, ordering or threading.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch
from train_fixtures import (
    TINY,
    cpu_backends,
    model_probs,
    perturbed,
    prepare_tiny,
    raw_history,
    write_tiny_ml1m,
)

from srp4ctr import _ext, data
from srp4ctr.data.samples import CTRDataset
from srp4ctr.engine import BackendUnavailableError, Engine, History, UserCache
from srp4ctr.engine.inputs import model_batch
from srp4ctr.errors import CacheError, CheckpointError, InputError, UnknownItemError
from srp4ctr.models import FGBERT, SRP4CTR, ModelConfig, ModelSpec, build_model
from srp4ctr.train import TrainConfig, finetune, load_model
from srp4ctr.train.checkpoint import save_checkpoint

torch.set_num_threads(1)

ATOL = 1e-5
# Chunking, batching users together or scoring one by one change only the number of rows of each
# matrix product; BLAS may then pick another kernel (small row counts), so results agree to fp32
# rounding rather than bit for bit.
ROUNDING = 2e-6


# ----------------------------------------------------------------------------- fixtures
def _save(path, model, ds, kind="srp4ctr"):
    """A checkpoint in the layout the trainer writes (``_save_run``)."""
    save_checkpoint(path, model, {
        "kind": kind,
        "model_config": model.config.to_dict(),
        "spec": model.spec.to_dict(),
        "train_config": TrainConfig().to_dict(),
        "dataset": {"name": ds.name, "fingerprint": ds.fingerprint},
        "metrics": {},
    })
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("engine")


@pytest.fixture(scope="module")
def tiny(root):
    return prepare_tiny(root)


@pytest.fixture(scope="module")
def ckpt(root, tiny):
    torch.manual_seed(0)
    model = perturbed(SRP4CTR(ModelSpec.from_dataset(tiny), ModelConfig(**TINY)), seed=1)
    return _save(root / "ckpt", model, tiny)


@pytest.fixture(scope="module")
def engine(ckpt, root):
    return Engine.load(ckpt, data_dir=root / "cache")


@pytest.fixture(scope="module")
def model(ckpt, tiny):
    """The training model, rebuilt from the checkpoint by the trainer's loader."""
    m, _ = load_model(ckpt, dataset_fingerprint=tiny.fingerprint)
    return m.eval()


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> bool:
    return a.shape == b.shape and (a.numel() == 0 or (a - b).abs().max().item() <= atol)


# ----------------------------------------------------------------------------- loading
def test_load_describes_itself_and_prints_nothing(engine, tiny, capsys):
    info = engine.describe()
    want = "cpp" if _ext.extension() is not None else "torch"  # auto on CPU
    assert engine.backend == want and info["backend"] == want
    assert info["dataset"]["fingerprint"] == tiny.fingerprint
    assert info["model_fingerprint"] == engine.fingerprint and len(engine.fingerprint) == 64
    assert info["folded"]["item_tables"] is True
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    assert "Engine(" in repr(engine)
    assert capsys.readouterr() == ("", "")
    # only the serving parts of the dataset are kept
    assert engine.dataset.n_interactions == 0
    assert engine.dataset.fingerprint == tiny.fingerprint


def test_load_with_dataset_object_or_folder(ckpt, tiny):
    a = Engine.load(ckpt, dataset=tiny)
    b = Engine.load(ckpt, dataset=tiny.path)
    h = raw_history(tiny, 3)
    assert torch.equal(a.score(a.encode_user(h), [1, 2, 3]), b.score(b.encode_user(h), [1, 2, 3]))


def test_load_refuses_other_kinds(root, tiny):
    cfg = ModelConfig(**TINY)
    spec = ModelSpec.from_dataset(tiny)
    pre = _save(root / "pre", FGBERT(spec, cfg), tiny, kind="fgbert")
    with pytest.raises(CheckpointError, match="pre-training checkpoint"):
        Engine.load(pre, dataset=tiny)
    din = _save(root / "din", build_model("din", spec, cfg), tiny, kind="din")
    with pytest.raises(CheckpointError, match="'din'.*srp4ctr"):
        Engine.load(din, dataset=tiny)
    with pytest.raises(CheckpointError):
        Engine.load(root / "nowhere")


def test_load_refuses_another_dataset(ckpt, root, tmp_path):
    other_src = write_tiny_ml1m(tmp_path / "other", seed=5)
    other = data.prepare("ml-1m", path=str(other_src), data_dir=str(tmp_path / "c"),
                         progress=False)
    with pytest.raises(CheckpointError, match="fingerprint"):
        Engine.load(ckpt, dataset=other)
    with pytest.raises(CheckpointError, match="neither in its recorded folder nor under"):
        Engine.load(ckpt, data_dir=tmp_path / "empty")


def test_load_refuses_truncated_weights(ckpt, tiny, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        Engine.load(bad, dataset=tiny)


def test_backends(ckpt, tiny):
    if _ext.extension() is not None:
        assert Engine.load(ckpt, dataset=tiny, backend="cpp").backend == "cpp"
        assert Engine.load(ckpt, dataset=tiny, backend="cpp",
                           dtype=torch.bfloat16).describe()["backend"] == "cpp"
    with pytest.raises(BackendUnavailableError, match="float16"):
        Engine.load(ckpt, dataset=tiny, backend="cpp", dtype=torch.float16)
    # float16 on CPU: auto is torch (the C++ path scores in float32 or bfloat16)
    assert Engine.load(ckpt, dataset=tiny, dtype=torch.float16).backend == "torch"
    with pytest.raises(InputError, match="unknown engine backend"):
        Engine.load(ckpt, dataset=tiny, backend="tpu")
    with pytest.raises(InputError, match="dtype"):
        Engine.load(ckpt, dataset=tiny, dtype=torch.int32)
    assert Engine.load(ckpt, dataset=tiny, backend="torch").backend == "torch"
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            Engine.load(ckpt, dataset=tiny, device="cuda")


def test_missing_extension_falls_back_to_torch_with_one_warning(ckpt, tiny, monkeypatch):
    """Without the C++ extension (not built, or disabled) the package works: ``auto`` and
    ``cpp`` score with torch, and say so once per process."""
    monkeypatch.setattr(_ext, "_loaded", True)
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_error", "not built in this test")
    monkeypatch.setattr(_ext, "_warned", False)
    with pytest.warns(RuntimeWarning, match="not built in this test.*torch backend"):
        e = Engine.load(ckpt, dataset=tiny, backend="cpp")
    assert e.backend == "torch"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert Engine.load(ckpt, dataset=tiny).backend == "torch"
        assert Engine.load(ckpt, dataset=tiny, backend="cpp").backend == "torch"


def test_triton_backend_on_cpu_needs_the_interpreter(ckpt, tiny):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("under the interpreter Triton does run on CPU")
    with pytest.raises(BackendUnavailableError, match="triton"):
        Engine.load(ckpt, dataset=tiny, backend="triton")


# ----------------------------------------------------------------------------- parity
def test_score_equals_training_forward_on_ctr_samples(engine, model, tiny):
    """Histories rebuilt from the raw data give the training samples' probabilities."""
    samples = CTRDataset(tiny, "test", max_len=model.config.max_len)
    idx = np.arange(0, len(samples), max(1, len(samples) // 40))
    batch = samples.batch(idx)
    with torch.no_grad():
        want = torch.sigmoid(model(batch))
    assert want.std() > 0.03  # the weights discriminate: the comparison means something
    got = []
    for i in idx:
        u, end = int(samples.users[i]), int(samples.end[i])
        cache = engine.encode_user(raw_history(tiny, u, end))
        assert cache.length == int(samples.hist_lengths()[i])
        cand = tiny.item_raw[int(samples.extras["cand_item"][i])]
        got.append(engine.score(cache, [cand]))
    assert close(torch.cat(got), want)


@pytest.mark.parametrize("user", [1, 7, 23])
def test_score_equals_training_forward_many_candidates(engine, model, tiny, user):
    h = raw_history(tiny, user)
    cands = list(tiny.item_raw[1:]) + [10**6, 0]  # every item, an unknown id, id 0 (unknown)
    p = engine.score(engine.encode_user(h), cands)
    assert p.dtype == torch.float32 and p.shape == (len(cands),)
    assert close(p, model_probs(model, tiny, h, cands))


def test_user_features_change_the_score(engine, model, tiny):
    h = raw_history(tiny, 4, user_id=False)
    with_user = engine.encode_user(h, user_id=int(tiny.user_raw[4]))
    without = engine.encode_user(h)
    cands = [1, 2, 3]
    assert close(engine.score(with_user, cands), model_probs(model, tiny, {**h, "user_id":
                                                                            int(tiny.user_raw[4])},
                                                             cands))
    assert close(engine.score(without, cands), model_probs(model, tiny, h, cands))
    assert not close(engine.score(with_user, cands), engine.score(without, cands))
    # an unknown user id is the same as none
    assert torch.equal(engine.encode_user(h, user_id=99999).head_user, without.head_user)


def test_history_length_one_and_empty(engine, model, tiny):
    one = {"item_id": [5], "rating": [4], "timestamp": [978300000]}
    empty = {"item_id": [], "rating": [], "timestamp": []}
    cands = [1, 5, 9, 10**7]
    c1, c0 = engine.encode_user(one), engine.encode_user(empty)
    assert c1.length == 1 and c0.length == 0
    assert c0.k.shape == (2, 0, 2, 8)
    assert close(engine.score(c1, cands), model_probs(model, tiny, one, cands))
    assert close(engine.score(c0, cands), model_probs(model, tiny, empty, cands))
    assert engine.score_many([c0, c1], [cands, cands])[0].equal(engine.score(c0, cands))


def test_history_longer_than_max_len_uses_the_last(engine, model, tiny):
    L = engine.max_len
    h = raw_history(tiny, 2)
    n = len(h["item_id"])
    assert n > L + 1
    cache = engine.encode_user(h)
    assert cache.length == L
    assert close(engine.score(cache, [1, 2, 3]), model_probs(model, tiny, h, [1, 2, 3]))
    # only the last L interactions (and the one before them, for the first time gap) matter
    tail = {k: v[n - L - 1:] for k, v in h.items() if k != "user_id"}
    tail["user_id"] = h["user_id"]
    assert torch.equal(engine.encode_user(tail).k, cache.k)
    # order of the input does not matter: interactions are sorted by time as in training
    perm = np.random.default_rng(0).permutation(n)
    shuffled = {k: [v[i] for i in perm] for k, v in h.items() if k != "user_id"}
    assert torch.equal(engine.encode_user(History(**shuffled, user_id=h["user_id"])).k, cache.k)


def test_unknown_history_items_are_oov(engine, model, tiny):
    h = {"item_id": [1, 99999, 3], "rating": [5, 4, 1], "timestamp": [10, 20, 30]}
    cands = [2, 3]
    assert close(engine.score(engine.encode_user(h), cands), model_probs(model, tiny, h, cands))


def test_history_dataclass_and_mapping_agree(engine, tiny):
    h = raw_history(tiny, 5)
    a = engine.encode_user(h)
    b = engine.encode_user(History(item_id=h["item_id"], timestamp=h["timestamp"],
                                   rating=h["rating"], user_id=h["user_id"]))
    c = engine.encode_user({k: np.asarray(v) for k, v in h.items()})
    for x in (b, c):
        assert torch.equal(a.k, x.k) and torch.equal(a.head_user, x.head_user)
    assert a.user_id == h["user_id"]


def test_encode_users_batch_equals_one_by_one(engine, tiny):
    hs = [raw_history(tiny, u) for u in (1, 2, 3)] + [{"item_id": [], "rating": [],
                                                        "timestamp": []}]
    many = engine.encode_users(hs)
    for h, c in zip(hs, many):
        one = engine.encode_user(h)
        assert c.length == one.length
        assert close(c.k, one.k, 1e-5) and close(c.head_user, one.head_user, 1e-5)
    assert engine.encode_users([]) == []


def test_fold_tables_match_the_model(engine, model, tiny):
    fm = engine.folded
    ids = torch.arange(tiny.n_items + 2)
    with torch.no_grad():
        z0 = model.candidate_embedding(ids)
        assert torch.equal(fm.z0, z0)
        layer = model.cand_layers[0]
        assert close(fm.q0, layer.wq(layer.ln1(z0)), 1e-6)
        w = model.head.first.weight
        assert close(fm.hz0, z0 @ w[:, 16:32].T, 1e-6)
    unfolded = Engine.load(engine.checkpoint, dataset=tiny, fold_items=False)
    assert unfolded.describe()["folded"]["item_tables"] is False
    h = raw_history(tiny, 6)
    cands = list(range(1, 40))
    assert close(unfolded.score(unfolded.encode_user(h), cands),
                 engine.score(engine.encode_user(h), cands), 1e-6)


@pytest.mark.parametrize("config", [
    {"use_xattn": False},
    {"use_qformer": False},
    {"qformer_user_offset": False, "n_layers": 1, "head_hidden": (12,)},
], ids=["no-xattn", "no-qformer", "1-layer-1-hidden"])
def test_ablations_are_served_exactly(tiny, root, config):
    torch.manual_seed(3)
    cfg = ModelConfig(**{**TINY, **config})
    m = perturbed(SRP4CTR(ModelSpec.from_dataset(tiny), cfg), seed=4)
    path = _save(root / f"abl-{'-'.join(sorted(config))}", m, tiny)
    eng = Engine.load(path, dataset=tiny)
    for u in (1, 9):
        h = raw_history(tiny, u)
        cands = [1, 2, 3, 50, 10**6]
        assert close(eng.score(eng.encode_user(h), cands), model_probs(m, tiny, h, cands))
    empty = {"item_id": [], "rating": [], "timestamp": []}
    assert close(eng.score(eng.encode_user(empty), [4]), model_probs(m, tiny, empty, [4]))


_EXTRAS = {"head_user_features": True, "item_bias": True, "item_stats": True}


@pytest.mark.parametrize("config", [
    _EXTRAS, {"use_qformer": False, **_EXTRAS}, {"use_xattn": False, **_EXTRAS},
], ids=["full", "no-qformer", "no-xattn"])
@pytest.mark.parametrize("backend", cpu_backends())
def test_user_features_in_the_head_and_item_bias_are_served_exactly(tiny, root, config, backend):
    """ModelConfig.head_user_features (the user block of the head, folded per user), item_bias
    (added to every backend's logits) and item_stats (the head's block on the item's statistics,
    folded into the per-item head table) score as the model does, on every CPU backend, per user
    and several users at once, with and without the folded item tables."""
    torch.manual_seed(5)
    cfg = ModelConfig(**{**TINY, **config})
    m = perturbed(SRP4CTR(ModelSpec.from_dataset(tiny), cfg), seed=6)
    with torch.no_grad():
        m.item_statistics.table.normal_(generator=torch.Generator().manual_seed(7))
    assert m.item_bias.weight.abs().max() > 0
    path = _save(root / f"hub-{'-'.join(sorted(config))}", m, tiny)
    users = (1, 9, 17)
    cands = [1, 2, 3, 50, 10**6]
    for fold in (True, False):
        eng = Engine.load(path, dataset=tiny, backend=backend, fold_items=fold)
        caches = [eng.encode_user(raw_history(tiny, u)) for u in users]
        many = eng.score_many(caches, [cands] * len(users))
        for u, c, got in zip(users, caches, many):
            want = model_probs(m, tiny, raw_history(tiny, u), cands)
            assert close(eng.score(c, cands), want)
            assert close(got, want)
    # the user features matter even without the Q-Former (an unknown user: no features)
    h = raw_history(tiny, 1, user_id=False)
    known = eng.encode_user(h, user_id=int(tiny.user_raw[1]))
    assert not close(eng.score(known, cands), eng.score(eng.encode_user(h), cands))


def test_trainer_checkpoint(tiny, tmp_path):
    """A checkpoint written by ``finetune`` itself loads and scores like its model."""
    tc = TrainConfig(epochs=1, max_steps_per_epoch=2, batch_size=64, progress=False)
    finetune(tiny, tmp_path / "ft", model_config=ModelConfig(**TINY), train_config=tc)
    eng = Engine.load(tmp_path / "ft", dataset=tiny)
    m, _ = load_model(tmp_path / "ft")
    h = raw_history(tiny, 11)
    cands = list(range(1, 61))
    assert close(eng.score(eng.encode_user(h), cands), model_probs(m, tiny, h, cands))


# ----------------------------------------------------------------------------- semantics
@pytest.fixture(scope="module")
def caches(engine, tiny):
    users = [1, 2, 3, 4, 5]
    out = [engine.encode_user(raw_history(tiny, u)) for u in users]
    out.append(engine.encode_user({"item_id": [], "rating": [], "timestamp": []}))
    return out


def test_score_many_equals_score(engine, caches):
    rng = np.random.default_rng(0)
    lists = [rng.integers(1, 70, size=n).tolist() for n in (5, 1, 0, 33, 12, 7)]
    many = engine.score_many(caches, lists)
    assert len(many) == len(caches)
    for c, cands, got in zip(caches, lists, many):
        assert close(got, engine.score(c, cands), ROUNDING)
    assert engine.score_many([], []) == []
    # already-encoded candidates (a server's path): the same results, and bad ids refused
    by_ids = engine.score_many_ids(caches, [engine.encode_items(x) for x in lists])
    assert all(torch.equal(a, b) for a, b in zip(many, by_ids))
    top = engine.n_items + 1
    for bad in ([torch.tensor([top + 1])], [torch.tensor([-1])], [torch.tensor([1], dtype=torch.int32)],
                [[1, 2]], [torch.tensor([[1]])]):
        with pytest.raises(InputError):
            engine.score_many_ids(caches[:1], bad)
    with pytest.raises(InputError):
        engine.score_many_ids(caches[:2], [engine.encode_items([1])])


def test_score_many_chunks_users_and_long_lists(tiny, engine, caches):
    small = Engine.load(engine.checkpoint, dataset=tiny, chunk_size=8)
    rng = np.random.default_rng(1)
    lists = [rng.integers(1, 62, size=n).tolist() for n in (3, 30, 4, 4, 9, 2)]
    for a, b in zip(small.score_many(caches, lists), engine.score_many(caches, lists)):
        assert close(a, b, ROUNDING)


def test_chunked_equals_unchunked(tiny, engine, caches):
    cands = np.random.default_rng(2).integers(1, 62, size=500)
    whole = engine.score(caches[0], cands)
    for chunk in (1, 7, 64):
        e = Engine.load(engine.checkpoint, dataset=tiny, chunk_size=chunk)
        assert e.chunk_candidates(caches[0].length) == chunk
        assert close(e.score(caches[0], cands), whole, ROUNDING)
    by_bytes = Engine.load(engine.checkpoint, dataset=tiny, max_chunk_bytes=20_000)
    assert 1 < by_bytes.chunk_candidates(16) < 500
    assert close(by_bytes.score(caches[0], cands), whole, ROUNDING)


def test_permuting_candidates_permutes_scores(engine, caches):
    cands = np.arange(1, 61)
    p = engine.score(caches[1], cands)
    perm = np.random.default_rng(3).permutation(60)
    assert close(engine.score(caches[1], cands[perm]), p[torch.as_tensor(perm)], ROUNDING)
    # duplicates score the same
    d = engine.score(caches[1], [7, 7, 7])
    assert d[0] == d[1] == d[2]


@pytest.mark.parametrize("kind", ["list", "tuple", "numpy-int32", "tensor", "float-ints",
                                  "float-tensor", "range"])
def test_candidate_container_types(engine, caches, kind):
    ids = [3, 1, 4, 15, 9, 26]
    want = engine.score(caches[0], ids)
    arg = {
        "list": ids, "tuple": tuple(ids), "numpy-int32": np.asarray(ids, np.int32),
        "tensor": torch.tensor(ids), "float-ints": [float(i) for i in ids],
        "float-tensor": torch.tensor(ids, dtype=torch.float32), "range": None,
    }[kind]
    if kind == "range":
        assert torch.equal(engine.score(caches[0], range(1, 5)), engine.score(caches[0],
                                                                             [1, 2, 3, 4]))
        return
    assert torch.equal(engine.score(caches[0], arg), want)


@pytest.mark.parametrize("empty", [[], (), np.zeros(0, np.int64), torch.zeros(0, dtype=torch.long)])
def test_empty_candidate_list(engine, caches, empty):
    out = engine.score(caches[0], empty)
    assert out.shape == (0,) and out.dtype == torch.float32


def test_unknown_candidates(engine, caches):
    p = engine.score(caches[0], [10**6, 123456, 1])
    assert p[0] == p[1]  # both the out-of-vocabulary item
    assert p[0] == engine.score(caches[0], [0])[0]  # raw id 0 is no MovieLens id either
    with pytest.raises(UnknownItemError, match="unknown item id"):
        engine.score(caches[0], [1, 10**6], strict=True)
    assert issubclass(UnknownItemError, InputError)
    assert engine.score(caches[0], [1, 2], strict=True).shape == (2,)


BAD_CANDIDATES = {
    "negative": [1, -3],
    "fraction": [1, 2.5],
    "nan": [1.0, float("nan")],
    "inf": [float("inf")],
    "string": ["1", "2"],
    "mixed": [1, "a"],
    "bool": [True, 2],
    "bool-array": np.array([True, False]),
    "none": [1, None],
    "2d-list": [[1, 2], [3, 4]],
    "2d-tensor": torch.tensor([[1, 2]]),
    "float-tensor-fraction": torch.tensor([1.5]),
    "bool-tensor": torch.tensor([True]),
    "scalar": 5,
    "0d-tensor": torch.tensor(5),
    "str": "123",
    "complex": np.array([1 + 2j]),
}


@pytest.mark.parametrize("name", list(BAD_CANDIDATES))
def test_bad_candidates_raise_input_error(engine, caches, name):
    before = caches[0].k.clone()
    with pytest.raises(InputError):
        engine.score(caches[0], BAD_CANDIDATES[name])
    with pytest.raises(InputError):
        engine.score_many([caches[0], caches[1]], [[1], BAD_CANDIDATES[name]])
    assert torch.equal(caches[0].k, before)


BAD_HISTORIES = {
    "lengths": {"item_id": [1, 2, 3], "rating": [4, 5, 3], "timestamp": [1, 2]},
    "rating-length": {"item_id": [1, 2], "rating": [4], "timestamp": [1, 2]},
    "timestamps-text": {"item_id": [1, 2], "rating": [4, 5], "timestamp": ["x", "y"]},
    "timestamps-nan": {"item_id": [1, 2], "rating": [4, 5], "timestamp": [1.0, float("nan")]},
    "negative-item": {"item_id": [1, -2], "rating": [4, 5], "timestamp": [1, 2]},
    "fraction-item": {"item_id": [1, 2.5], "rating": [4, 5], "timestamp": [1, 2]},
    "no-rating": {"item_id": [1, 2], "timestamp": [1, 2]},
    "unknown-rating": {"item_id": [1, 2], "rating": [4, 9], "timestamp": [1, 2]},
    "no-items": {"rating": [4], "timestamp": [1]},
    "2d": {"item_id": [[1, 2]], "rating": [[4, 5]], "timestamp": [[1, 2]]},
    "ragged": {"item_id": [1, [2]], "rating": [4, 5], "timestamp": [1, 2]},
    "not-a-mapping": [1, 2, 3],
}


@pytest.mark.parametrize("name", list(BAD_HISTORIES))
def test_bad_histories_raise_input_error(engine, name):
    with pytest.raises(InputError):
        engine.encode_user(BAD_HISTORIES[name])


def test_score_many_argument_errors(engine, caches):
    with pytest.raises(InputError, match="2 caches but 1"):
        engine.score_many(caches[:2], [[1]])
    with pytest.raises(InputError):
        engine.score_many(caches[0], [[1]])


def test_cache_from_another_model_is_refused(engine, tiny, caches):
    torch.manual_seed(9)
    other_model = perturbed(SRP4CTR(ModelSpec.from_dataset(tiny), ModelConfig(**TINY)), 2)
    other = Engine.from_model(other_model, tiny)
    foreign = other.encode_user(raw_history(tiny, 1))
    with pytest.raises(CacheError, match="another|encode the user again"):
        engine.score(foreign, [1, 2])
    with pytest.raises(CacheError):
        engine.score_many([caches[0], foreign], [[1], [2]])
    with pytest.raises(CacheError):
        engine.score("not a cache", [1])
    bf = Engine.load(engine.checkpoint, dataset=tiny, dtype=torch.bfloat16)
    with pytest.raises(CacheError, match="dtype"):
        bf.score(caches[0], [1])


def test_cache_with_nan_is_refused(engine, tiny):
    cache = engine.encode_user(raw_history(tiny, 3))
    good = engine.score(cache, [1, 2])
    cache.v[1, 0, 0, 0] = float("nan")  # in place: the next check sees it
    with pytest.raises(CacheError, match="NaN"):
        engine.score(cache, [1, 2])
    cache.v[1, 0, 0, 0] = 0.0
    engine.score(cache, [1, 2])
    bad = UserCache(cache.k, cache.v, torch.full_like(cache.head_user, float("inf")),
                    cache.qtokens, fingerprint=cache.fingerprint)
    with pytest.raises(CacheError, match="head_user"):
        engine.score(bad, [1])
    assert good.shape == (2,)


def test_concurrent_scoring_equals_serial(engine, caches):
    rng = np.random.default_rng(4)
    jobs = [(i % len(caches), rng.integers(1, 62, size=int(rng.integers(0, 80))))
            for i in range(96)]
    serial = [engine.score(caches[c], ids) for c, ids in jobs]
    results: list = [None] * len(jobs)
    errors: list = []

    def work(t: int) -> None:
        try:
            for j in range(t, len(jobs), 8):
                c, ids = jobs[j]
                results[j] = engine.score(caches[c], ids)
        except Exception as e:  # noqa: BLE001 - any failure in a thread is reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for a, b in zip(results, serial):
        assert torch.equal(a, b)


def test_bfloat16_mode_is_close(engine, tiny, caches):
    bf = Engine.load(engine.checkpoint, dataset=tiny, dtype="bfloat16")
    h = raw_history(tiny, 1)
    c = bf.encode_user(h)
    assert c.dtype == torch.bfloat16
    cands = list(range(1, 62))
    p = bf.score(c, cands)
    assert p.dtype == torch.float32
    assert close(p, engine.score(caches[0], cands), 3e-2)


def test_logits_option(engine, caches):
    lg = engine.score(caches[0], [1, 2, 3], logits=True)
    assert close(torch.sigmoid(lg), engine.score(caches[0], [1, 2, 3]), 1e-7)
    many = engine.score_many(caches[:2], [[1], [2, 3]], logits=True)
    assert close(torch.sigmoid(many[1]), engine.score(caches[1], [2, 3]), 1e-7)


def test_generic_dataset_with_string_ids_and_behaviour_types(tmp_path):
    """A csv dataset (string item ids, Taobao-style behaviour types, a category column)."""
    rng = np.random.default_rng(0)
    lines = ["uid,iid,ts,act,cat"]
    for u in range(1, 9):
        t = 1_600_000_000
        for i in rng.choice(30, size=20, replace=False):
            t += int(rng.integers(1, 9000))
            act = ["pv", "pv", "cart", "fav", "buy"][int(rng.integers(0, 5))]
            lines.append(f"u{u},item-{i},{t},{act},c{i % 4}")
    (tmp_path / "log.csv").write_text("\n".join(lines) + "\n")
    ds = data.prepare("csv", path=str(tmp_path / "log.csv"), data_dir=str(tmp_path / "c"),
                      columns="user=uid,item=iid,timestamp=ts,behavior=act,category=cat",
                      progress=False)
    assert ds.kind == "behavior" and ds.item_raw.dtype.kind not in "iu"
    torch.manual_seed(5)
    m = perturbed(SRP4CTR(ModelSpec.from_dataset(ds), ModelConfig(**TINY)), seed=6)
    eng = Engine.from_model(m, ds)
    h = {"item_id": ["item-3", "item-7", "item-99"], "timestamp": [1, 50, 900],
         "behavior": ["pv", "buy", "cart"], "user_id": "u2"}
    cands = ["item-1", "item-3", "nope"]
    p = eng.score(eng.encode_user(h), cands)
    assert close(p, model_probs(m, ds, h, cands))
    with pytest.raises(UnknownItemError):
        eng.score(eng.encode_user(h), cands, strict=True)
    with pytest.raises(InputError):
        eng.encode_user({**h, "behavior": ["pv", "buy", "teleport"]})
    with pytest.raises(InputError):
        eng.score(eng.encode_user(h), [[1, 2]])


def test_caches_built_under_inference_mode(engine, tiny):
    with torch.inference_mode():
        c = engine.encode_user(raw_history(tiny, 1))
        p = engine.score(c, [1, 2])
    assert close(engine.score(c, [1, 2]), p, 0.0)


def test_user_kv_is_never_copied_per_candidate(engine, model, tiny, caches):
    """No allocation while scoring is as large as one copy of the user's K/V per candidate
    (the per-candidate gather the training path does is, as the profiler shows)."""
    from torch.profiler import ProfilerActivity, profile

    cache = caches[0]
    C = 2000
    cands = np.random.default_rng(5).integers(1, 61, size=C)
    one_kv_copy = C * cache.length * engine.model_config.d_model * 4

    def largest_allocation(fn) -> int:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return max(e.cpu_memory_usage for e in prof.events())

    big = Engine.load(engine.checkpoint, dataset=tiny, chunk_size=C)  # one chunk
    assert largest_allocation(lambda: big.score(cache, cands)) < one_kv_copy

    batch = model_batch(big.dataset, [tiny.encode_user_history(raw_history(tiny, 1), max_len=16)],
                        big.device)
    with torch.no_grad():
        state = model.encode_users(batch)
        ids = torch.as_tensor(tiny.encode_items(cands))
        gather = largest_allocation(
            lambda: model.score_candidates(state, ids, torch.zeros(C, dtype=torch.long)))
    assert gather >= one_kv_copy


# ----------------------------------------------------------------------------- user-side threads
def _spy_threads(engine) -> list[int]:
    """Record torch's thread count each time ``engine`` runs the user side."""
    seen: list[int] = []
    real = engine.model.encode_users

    def spy(batch):
        seen.append(torch.get_num_threads())
        return real(batch)

    engine.model.encode_users = spy
    return seen


def test_user_side_thread_count_and_restore(ckpt, tiny):
    default = Engine.load(ckpt, dataset=tiny, user_side="torch")
    one = Engine.load(ckpt, dataset=tiny, user_threads=1, user_side="torch")
    assert default.describe()["user_threads"] is None and one.describe()["user_threads"] == 1
    seen_default, seen_one = _spy_threads(default), _spy_threads(one)
    h = raw_history(tiny, 1)
    torch.set_num_threads(3)
    try:
        a = default.encode_user(h)  # torch's count, unchanged
        assert seen_default[-1] == 3 and torch.get_num_threads() == 3
        b = one.encode_user(h)
        assert seen_one[-1] == 1 and torch.get_num_threads() == 3
        assert close(a.k, b.k, ROUNDING) and close(a.head_user, b.head_user, ROUNDING)
        four = Engine.load(ckpt, dataset=tiny, user_threads=4, user_side="torch")
        seen_four = _spy_threads(four)
        four.encode_user(h)
        assert seen_four[-1] == 3  # never more than the thread's own count

        def boom(batch):
            seen_one.append(torch.get_num_threads())
            raise RuntimeError("boom")

        one.model.encode_users = boom
        with pytest.raises(RuntimeError, match="boom"):
            one.encode_user(h)
        assert seen_one[-1] == 1 and torch.get_num_threads() == 3  # restored after an error
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("side", ["torch", pytest.param("cpp", marks=pytest.mark.cpp)])
def test_overlapping_calls_restore_each_threads_count(ckpt, tiny, side):
    """Two threads inside the user side at once (forced): each gets its own count back."""
    eng = Engine.load(ckpt, dataset=tiny, user_threads=1, user_side=side)
    inside, both_in, release = threading.Barrier(2), threading.Event(), threading.Event()
    target = eng._user_side if side == "cpp" else eng.model
    name = "encode_one" if side == "cpp" else "encode_users"
    real = getattr(target, name)

    def held(*args):
        inside.wait(timeout=30)  # both threads are inside the block before either leaves
        both_in.set()
        release.wait(timeout=30)
        return real(*args)

    setattr(target, name, held)
    seen: dict = {}
    errors: list = []

    def work(tag: str, before: int) -> None:
        try:
            torch.set_num_threads(before)
            seen[tag, "before"] = torch.get_num_threads()
            eng.encode_user(raw_history(tiny, 2))
            seen[tag, "after"] = torch.get_num_threads()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(tag, n)) for tag, n in (("a", 3), ("b", 2))]
    try:
        for th in threads:
            th.start()
        assert both_in.wait(timeout=30)
    finally:
        release.set()
        for th in threads:
            th.join()
        torch.set_num_threads(1)
    assert not errors, errors
    for tag in ("a", "b"):
        assert seen[tag, "after"] == seen[tag, "before"], seen


@pytest.mark.parametrize("side", ["torch", "auto"])
def test_concurrent_encoding_restores_the_thread_count(ckpt, tiny, side):
    eng = Engine.load(ckpt, dataset=tiny, user_side=side, user_threads=1)
    hs = [raw_history(tiny, u) for u in range(1, 9)]
    serial = [eng.encode_user(h) for h in hs]
    torch.set_num_threads(3)
    errors: list = []
    results: list = [None] * (4 * len(hs))

    def work(t: int) -> None:
        try:
            torch.set_num_threads(2 + t % 2)
            before = torch.get_num_threads()
            for j in range(t, len(results), 6):
                results[j] = eng.encode_user(hs[j % len(hs)])
            if torch.get_num_threads() != before:
                errors.append(f"thread {t}: {before} -> {torch.get_num_threads()} threads")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    try:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(1)
    for j, c in enumerate(results):
        want = serial[j % len(hs)]
        assert close(c.k, want.k, ROUNDING) and close(c.head_user, want.head_user, ROUNDING)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_user_threads(ckpt, tiny, bad):
    with pytest.raises(InputError, match="user_threads"):
        Engine.load(ckpt, dataset=tiny, user_threads=bad)


# ----------------------------------------------------------------------------- C++ user side
_FEATURES = _ext.extension().cpu_features() if _ext.extension() is not None else {}
CPP_ISAS = (["generic"] + (["avx2"] if _FEATURES.get("avx2") else [])
            + (["avx512"] if _FEATURES.get("avx512") else [])
            + (["neon"] if _FEATURES.get("neon") else []))


def _assert_same_cache(a: UserCache, b: UserCache, atol: float = ATOL):
    assert a.length == b.length and a.k.shape == b.k.shape
    for name in ("k", "v", "head_user", "qtokens"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert close(x, y, atol), f"{name}: max diff {(x - y).abs().max().item():.3g}"


@pytest.mark.cpp
@pytest.mark.parametrize("isa", CPP_ISAS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(d_heads=st.sampled_from([(16, 2), (16, 1), (24, 3), (32, 4)]),
       layers=st.integers(1, 3), queries=st.integers(1, 4), blocks=st.integers(1, 2),
       qformer=st.booleans(), offset=st.booleans(), seed=st.integers(0, 100))
def test_cpp_user_side_equals_torch(tiny, isa, d_heads, layers, queries, blocks, qformer,
                                    offset, seed):
    torch.manual_seed(seed)
    d, heads = d_heads
    cfg = ModelConfig(**{**TINY, "d_model": d, "n_heads": heads, "n_layers": layers,
                         "n_queries": queries, "qformer_blocks": blocks,
                         "use_qformer": qformer, "qformer_user_offset": offset})
    m = perturbed(SRP4CTR(ModelSpec.from_dataset(tiny), cfg), seed=seed + 1, scale=0.2)
    cpp = Engine.from_model(m, tiny, backend="cpp", user_side="cpp", isa=isa)
    ref = Engine.from_model(m, tiny, backend="cpp", user_side="torch")
    assert cpp.user_side == "cpp" and ref.user_side == "torch"
    assert cpp._user_side.isa == isa
    hs = [raw_history(tiny, u) for u in (1 + seed % 7, 12)]
    hs += [{"item_id": [], "rating": [], "timestamp": []},          # empty history
           {**raw_history(tiny, 3), "item_id": raw_history(tiny, 3)["item_id"][:1],
            "rating": raw_history(tiny, 3)["rating"][:1],
            "timestamp": raw_history(tiny, 3)["timestamp"][:1]}]  # one interaction
    for h in hs:
        a, b = cpp.encode_user(h), ref.encode_user(h)
        _assert_same_cache(a, b)
        assert close(cpp.score(a, [1, 2, 30]), ref.score(b, [1, 2, 30]))
    many = cpp.encode_users(hs)
    for c, h in zip(many, hs):
        _assert_same_cache(c, ref.encode_user(h))


@pytest.mark.cpp
def test_cpp_user_side_choice(tiny, ckpt):
    auto = Engine.load(ckpt, dataset=tiny)
    assert auto.user_side == "cpp" and auto.describe()["user_side"] == "cpp"
    assert Engine.load(ckpt, dataset=tiny, backend="torch").user_side == "torch"
    assert Engine.load(ckpt, dataset=tiny, backend="torch", user_side="cpp").user_side == "cpp"
    pooled = perturbed(SRP4CTR(ModelSpec.from_dataset(tiny),
                               ModelConfig(**{**TINY, "use_xattn": False})), seed=2)
    assert Engine.from_model(pooled, tiny, backend="cpp").user_side == "torch"
    with pytest.raises(BackendUnavailableError, match="use_xattn"):
        Engine.from_model(pooled, tiny, backend="cpp", user_side="cpp")
    for bad in ("gpu", 1, None):
        with pytest.raises(InputError, match="user_side"):
            Engine.load(ckpt, dataset=tiny, user_side=bad)


@pytest.mark.cpp
def test_cpp_user_side_long_history_threads(tiny):
    """A history long enough for the encoder to split its rows over threads (n >= 384): the
    same result on 1 and 3 threads, bit for bit, and equal to the torch layers."""
    from srp4ctr.engine.backends import CppUserSide

    torch.manual_seed(5)
    cfg = ModelConfig(**{**TINY, "max_len": 512})
    m = perturbed(SRP4CTR(ModelSpec.from_dataset(tiny), cfg), seed=6, scale=0.2)
    enc = CppUserSide(m)
    n, d = 450, cfg.d_model
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    q = m.qformer.queries.detach().contiguous().numpy()
    one = enc._enc.encode(x.numpy(), q, 1)
    three = enc._enc.encode(x.numpy(), q, 3)
    for a, b in zip(one, three):
        assert np.array_equal(a, b)
    with torch.no_grad():
        valid = torch.ones(1, n, dtype=torch.bool)
        hidden, kv = m.encoder.encode_embedded(x[None], valid, return_kv=True)
        qtokens = m.qformer(hidden, valid, None)
        head_user = m.head.user_block(qtokens.flatten(1), 1)[0]
    k = torch.stack([kk[0].reshape(n, d) for kk, _ in kv])
    v = torch.stack([vv[0].reshape(n, d) for _, vv in kv])
    for got, want in zip(one, (k, v, qtokens[0], head_user)):
        assert close(torch.from_numpy(got), want, 1e-4)


@pytest.mark.cpp
def test_extension_without_the_user_side_falls_back(ckpt, tiny, monkeypatch):
    """An extension built before the C++ user side: auto serves the user side with torch,
    an explicit user_side='cpp' says to rebuild."""
    real = _ext.extension()

    class Old:
        def __getattr__(self, name):
            if name == "UserEncoder":
                raise AttributeError(name)
            return getattr(real, name)

    monkeypatch.setattr(_ext, "extension", lambda: Old())
    eng = Engine.load(ckpt, dataset=tiny)
    assert eng.backend == "cpp" and eng.user_side == "torch"
    with pytest.raises(BackendUnavailableError, match="rebuild"):
        Engine.load(ckpt, dataset=tiny, user_side="cpp")


@pytest.mark.cpp
def test_auto_leaves_the_portable_cpp_path_alone(ckpt, tiny, monkeypatch):
    """On a CPU without AVX2 + FMA or AVX-512 the portable C++ path is slower than torch, so auto
    scores (and encodes) with torch and says why; cpp asked for by name still runs, with the
    torch user side under auto."""
    real = _ext.extension()

    class Portable:
        def __getattr__(self, name):
            return getattr(real, name)

        def cpu_features(self):
            return {k: False for k in real.cpu_features()}

    fast = Engine.load(ckpt, dataset=tiny)
    if real.cpu_features().get("avx2") or real.cpu_features().get("avx512"):
        assert fast.backend == "cpp" and fast.user_side == "cpp"
        assert fast.describe()["backend_reason"].startswith("auto: cpp")
    monkeypatch.setattr(_ext, "extension", lambda: Portable())
    auto = Engine.load(ckpt, dataset=tiny)
    assert auto.backend == "torch" and auto.user_side == "torch"
    assert "neither AVX2" in auto.describe()["backend_reason"]
    named = Engine.load(ckpt, dataset=tiny, backend="cpp", isa="generic")
    assert named.backend == "cpp" and named.user_side == "torch"
    assert named.describe()["scorer"]["isa"] == "generic"
    h, cands = raw_history(tiny, 4), list(range(1, 30))
    assert close(auto.score(auto.encode_user(h), cands), named.score(named.encode_user(h), cands),
                 ATOL)
