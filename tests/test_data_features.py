"""Behaviour tokens (hand-worked cases) and the serving helpers, which must match training."""

from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import small_ml1m  # noqa: F401  (fixture)
from hypothesis import given, settings
from hypothesis import strategies as st

from srp4ctr import data
from srp4ctr.data import features as F
from srp4ctr.errors import InputError


def test_behaviour_features_by_hand():
    # 1970-01-01 00:00 UTC was a Thursday (weekday 4)
    ts = [0, 0, 1, 3, 100_000, 100_000 + 2**30]
    out = F.behaviour_features(ts, [5, 1, 3, 3, 4, 2], kind="rating", vocab=[1, 2, 3, 4, 5])
    assert list(out) == ["rating", "gap", "hour", "weekday"]
    assert out["rating"].tolist() == [5, 1, 3, 3, 4, 2]
    # first; 0 s; 1 s -> log2 = 0; 2 s -> 1; 99,997 s -> 16; 2**30 s -> capped at 21
    assert out["gap"].tolist() == [1, 2, 3, 4, 3 + 16, 3 + 21]
    assert out["hour"].tolist() == [1, 1, 1, 1, 100_000 // 3600 % 24 + 1, (100_000 + 2**30) // 3600 % 24 + 1]
    assert out["weekday"].tolist()[:5] == [4, 4, 4, 4, 5]  # 100,000 s is Friday 03:46
    assert all(v.dtype == np.int64 for v in out.values())
    assert out["gap"].max() < F.GAP_VOCAB and out["hour"].max() < F.HOUR_VOCAB


def test_behaviour_features_exact_powers_of_two():
    ts = np.cumsum([0, 1, 1, 2, 2, 4, 3, 8, 7])
    gaps = F.behaviour_features(ts)["gap"]
    # gaps 1,1,2,2,4,3,8,7 -> floor(log2): 0,0,1,1,2,1,3,2
    assert gaps.tolist() == [1] + [3 + k for k in (0, 0, 1, 1, 2, 1, 3, 2)]


def test_behaviour_features_many_users_and_errors():
    ts = [5, 9, 9, 1, 4]  # user A: 5, 9, 9; user B: 1, 4 (earlier than A's, fine)
    out = F.behaviour_features(ts, ["pv", "buy", "cart", "fav", "pv"], kind="behavior",
                               vocab=F.TAOBAO_BEHAVIOURS, offsets=[0, 3, 5])
    assert out["behavior"].tolist() == [1, 4, 2, 3, 1]
    assert out["gap"].tolist() == [1, 3 + 2, 2, 1, 3 + 1]  # 4 s -> log2 2; 3 s -> 1
    with pytest.raises(InputError, match="non-decreasing"):
        F.behaviour_features([5, 4])
    with pytest.raises(InputError, match="unknown"):
        F.behaviour_features([1, 2], ["pv", "click"], kind="behavior", vocab=F.TAOBAO_BEHAVIOURS)
    with pytest.raises(InputError, match="unknown"):
        F.behaviour_features([1], [3.5], kind="rating", vocab=[1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="NaN"):
        F.behaviour_features([1.0, np.nan])
    with pytest.raises(InputError):
        F.behaviour_features([1, 2], kind="rating", vocab=[1.0])  # values missing
    assert F.encode_values([0.5, 5.0, 2.5], [0.5, 1.0, 2.5, 5.0]).tolist() == [1, 4, 3]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2**33), min_size=1, max_size=30))
def test_gap_bucket_property(deltas):
    ts = np.cumsum(np.array(deltas, dtype=np.int64))
    gaps = F.behaviour_features(ts)["gap"]
    assert gaps[0] == F.GAP_FIRST
    for d, g in zip(deltas[1:], gaps[1:]):
        if d == 0:
            assert g == F.GAP_ZERO
        else:
            k = min(d.bit_length() - 1, F.GAP_MAX_LOG2)
            assert g == F.GAP_LOG_BASE + k
    assert gaps.max() < F.GAP_VOCAB


def test_age_buckets():
    assert F.age_bucket([7, 17, 18, 24, 25, 44, 45, 50, 55, 56, 73]).tolist() == [
        1, 1, 2, 2, 3, 4, 5, 6, 6, 7, 7]
    assert F.age_bucket([1, 18, 25, 35, 45, 50, 56]).tolist() == [1, 2, 3, 4, 5, 6, 7]  # ML-1M codes


def test_encode_items(small_ml1m):
    ds = small_ml1m
    raw = ds.item_raw[1:4]
    assert ds.encode_items(raw).tolist() == [1, 2, 3]
    assert ds.encode_items(np.array([[raw[2], 999_999]])).tolist() == [[3, ds.n_items + 1]]
    assert ds.encode_items([float(raw[0])]).tolist() == [1]
    assert ds.encode_items([]).shape == (0,)
    with pytest.raises(InputError, match="unknown"):
        ds.encode_items([999_999], strict=True)
    for bad in ([-5], [1.5], ["15"], [True]):
        with pytest.raises(InputError):
            ds.encode_items(bad)
        with pytest.raises(InputError):
            ds.encode_items(bad, strict=True)


def _raw_history(ds, u, rng):
    sl = ds.user_rows(u)
    vals = np.asarray(ds.value_vocab)[ds.behaviour["rating"][sl] - 1]
    hist = {"item_id": ds.item_raw[ds.item[sl]], "timestamp": ds.timestamp[sl], "rating": vals}
    perm = rng.permutation(sl.stop - sl.start)  # the engine may get it in any order
    return {k: np.asarray(v)[perm] for k, v in hist.items()}, sl


def test_encode_user_history_matches_training(small_ml1m):
    ds = small_ml1m
    rng = np.random.default_rng(0)
    for u in range(1, ds.n_users + 1):
        hist, sl = _raw_history(ds, u, rng)
        enc = ds.encode_user_history(hist, max_len=10_000)
        assert np.array_equal(enc["hist_item"], ds.item[sl])
        for f in ds.behaviour_fields:
            assert np.array_equal(enc[f"hist_{f}"], ds.behaviour[f][sl]), f
        assert int(enc["hist_len"]) == sl.stop - sl.start
        # truncated: the last 5, with gaps still measured from the dropped predecessor
        short = ds.encode_user_history(hist, max_len=5)
        keep = slice(max(sl.start, sl.stop - 5), sl.stop)
        assert np.array_equal(short["hist_item"], ds.item[keep])
        assert np.array_equal(short["hist_gap"], ds.behaviour["gap"][keep])


def test_encode_user_history_serving_cases(small_ml1m):
    ds = small_ml1m
    hist, _ = _raw_history(ds, 1, np.random.default_rng(1))
    hist["item_id"] = hist["item_id"].copy()
    hist["item_id"][0] = 123_456_789  # an item the model never saw
    enc = ds.encode_user_history({**hist, "user_id": int(ds.user_raw[1])})
    assert (enc["hist_item"] == ds.n_items + 1).sum() == 1
    assert int(enc["user"]) == 1 and "user_age" in enc
    assert int(ds.encode_user_history({**hist, "user_id": -3})["user"]) == 0
    empty = ds.encode_user_history({"item_id": [], "timestamp": [], "rating": []})
    assert int(empty["hist_len"]) == 0 and empty["hist_item"].shape == (0,)
    with pytest.raises(InputError, match="rating"):
        ds.encode_user_history({"item_id": [1], "timestamp": [1]})
    with pytest.raises(InputError):
        ds.encode_user_history({"item_id": [-1], "timestamp": [1], "rating": [4]})
    with pytest.raises(InputError):
        ds.encode_user_history({"item_id": [1, 2], "timestamp": [1], "rating": [4, 4]})
    with pytest.raises(InputError):
        ds.encode_user_history({"item_id": [ds.item_raw[1]], "timestamp": [1], "rating": [4.2]})
    # the dataset method and the module function agree
    t = np.array([10, 20, 20, 5000])
    a = ds.behaviour_features(t, [1, 2, 3, 4])
    b = data.behaviour_features(t, [1, 2, 3, 4], kind="rating", vocab=ds.value_vocab)
    assert all(np.array_equal(a[k], b[k]) for k in a)
