"""Metrics against small cases worked by hand (and against scikit-learn on random data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from srp4ctr import metrics as M
from srp4ctr.errors import InputError


def test_auc_by_hand():
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: pairs won 1 + 2 of 4
    assert M.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert M.auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts one half
    assert M.auc(torch.tensor([1, 0, 1]), torch.tensor([0.9, 0.1, 0.8])) == pytest.approx(1.0)
    assert math.isnan(M.auc([1, 1], [0.2, 0.3]))  # undefined with one class


def test_gauc_by_hand():
    users = ["a", "a", "a", "b", "b", "b", "b", "c", "c"]
    labels = [1, 0, 0, 1, 1, 0, 0, 1, 1]
    scores = [0.9, 0.5, 0.95, 0.8, 0.2, 0.3, 0.1, 0.4, 0.6]
    # a: 0.9 beats 0.5, loses to 0.95 -> 1/2 (3 samples)
    # b: 0.8 beats 0.3 and 0.1, 0.2 beats 0.1 only -> 3/4 (4 samples)
    # c: one class -> skipped
    assert M.gauc(users, labels, scores) == pytest.approx((0.5 * 3 + 0.75 * 4) / 7)
    # ties within a user count one half
    assert M.gauc([1, 1, 1], [1, 0, 0], [0.5, 0.5, 0.1]) == pytest.approx(0.75)
    assert math.isnan(M.gauc([1, 2], [1, 0], [0.3, 0.4]))


def test_logloss_by_hand():
    want = -(math.log(0.8) + math.log(0.6)) / 2
    assert M.logloss([1, 0], [0.8, 0.4]) == pytest.approx(want)
    assert M.logloss([1, 0], [1.0, 0.0]) == pytest.approx(-math.log(1 - 1e-7), rel=1e-6)
    assert M.logloss([1], [0.0]) == pytest.approx(-math.log(1e-7))
    assert M.logloss([1], [0.0], eps=1e-3) == pytest.approx(-math.log(1e-3))


def test_hit_rate_and_ndcg_by_hand():
    ranks = [1, 3, 11, 10]
    assert M.hit_rate_at_k(ranks, 10) == pytest.approx(3 / 4)
    assert M.hit_rate_at_k(ranks, 1) == pytest.approx(1 / 4)
    # 1/log2(2) = 1, 1/log2(4) = 0.5, rank 11 misses, 1/log2(11)
    assert M.ndcg_at_k(ranks, 10) == pytest.approx((1 + 0.5 + 0 + 1 / math.log2(11)) / 4)
    r = M.ranking_metrics(ranks, ks=(1, 10))
    assert r["hr@1"] == 0.25 and r["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 11 + 1 / 10) / 4)


def test_rank_of_target_by_hand():
    scores = [[0.1, 0.5, 0.3, 0.5], [0.9, 0.2, 0.2, 0.0]]
    # row 0: target 1 (0.5) ties with item 3; row 1: target 2 (0.2) below 0.9, ties with item 1
    assert M.rank_of_target(scores, [1, 2]).tolist() == [2, 3]
    assert M.rank_of_target(scores, [1, 2], ties="average").tolist() == [1.5, 2.5]
    assert M.rank_of_target(scores, [1, 2], ties="optimistic").tolist() == [1, 2]
    assert M.rank_of_target(scores, [2, 0]).tolist() == [3, 1]
    t = M.rank_of_target(torch.tensor(scores), torch.tensor([1, 2]))
    assert isinstance(t, torch.Tensor) and t.tolist() == [2, 3]
    masked = torch.tensor([[-math.inf, 0.4, 0.9]])  # padding id masked out
    assert M.rank_of_target(masked, [1]).tolist() == [2]


def test_sampled_rank_by_hand():
    assert M.sampled_rank([0.5], [[0.6, 0.5, 0.1]]).tolist() == [3]
    assert M.sampled_rank([0.5], [[0.6, 0.5, 0.1]], ties="average").tolist() == [2.5]
    assert M.sampled_rank([0.7, 0.0], [[0.6, 0.5, 0.1], [0.1, 0.2, 0.3]]).tolist() == [1, 4]
    t = M.sampled_rank(torch.tensor([0.7]), torch.tensor([[0.6, 0.8]]))
    assert t.tolist() == [2]


def test_bad_inputs():
    with pytest.raises(InputError):
        M.auc([0, 1], [0.1])
    with pytest.raises(InputError):
        M.auc([0, 2], [0.1, 0.2])
    with pytest.raises(InputError):
        M.auc([0, 1], [0.1, float("nan")])
    with pytest.raises(InputError):
        M.logloss([0, 1], [0.1, 1.5])
    with pytest.raises(InputError):
        M.gauc([], [], [])
    with pytest.raises(InputError):
        M.hit_rate_at_k([0, 1], 10)
    with pytest.raises(InputError):
        M.rank_of_target([[0.1, 0.2]], [2])
    with pytest.raises(InputError):
        M.rank_of_target([[0.1, 0.2]], [0], ties="random")
    with pytest.raises(InputError):
        M.rank_of_target([[float("nan"), 0.2]], [1])


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 200))
def test_auc_gauc_match_sklearn(seed, n):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    users = rng.integers(0, 6, n)
    labels = rng.integers(0, 2, n)
    scores = rng.integers(0, 4, n) / 4.0  # many ties
    if labels.min() != labels.max():
        assert M.auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    num = den = 0.0
    for u in np.unique(users):
        m = users == u
        if labels[m].min() != labels[m].max():
            num += roc_auc_score(labels[m], scores[m]) * m.sum()
            den += m.sum()
    got = M.gauc(users, labels, scores)
    if den == 0:
        assert math.isnan(got)
    else:
        assert got == pytest.approx(num / den)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 300))
def test_logloss_matches_sklearn(seed, n):
    from sklearn.metrics import log_loss

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    probs = rng.random(n)
    probs[: n // 5] = rng.integers(0, 2, n // 5)  # exact 0 and 1: clipped
    want = log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7), labels=[0, 1])
    assert M.logloss(labels, probs) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_metrics_do_not_need_scikit_learn():
    import subprocess
    import sys

    code = ("import sys, importlib.abc\n"
            "class B(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('sklearn', 'scipy'):\n"
            "            raise ImportError(name)\n"
            "sys.meta_path.insert(0, B())\n"
            "from srp4ctr import metrics as M\n"
            "print(M.auc([0, 1, 1, 0], [0.1, 0.9, 0.5, 0.5]), M.logloss([0, 1], [0.2, 0.7]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert float(out[0]) == pytest.approx(0.875) and float(out[1]) == pytest.approx(
        -(np.log(0.8) + np.log(0.7)) / 2)
