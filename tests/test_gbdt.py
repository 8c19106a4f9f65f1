"""The GBDT baseline (``srp4ctr.train.gbdt``): its features see no label of the sample itself and
nothing at or after it, its item statistics leave training samples' own rows out and read
training rows only, the vectorised features equal a slow per-sample reference, and
``run_experiment(models=["gbdt"])`` writes an ordinary results row.

The datasets are built here directly as :class:`PreparedDataset` arrays (repeated items, tied
timestamps, users with one or two interactions, with and without ratings and user fields), so
every branch of the feature code is reached in milliseconds.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from srp4ctr.data import features as F
from srp4ctr.data.dataset import PreparedDataset
from srp4ctr.data.samples import CTRDataset
from srp4ctr.errors import InputError
from srp4ctr.train import gbdt
from srp4ctr.train.gbdt import ITEM_STAT_FEATURES, GBDTConfig, ctr_features

# ----------------------------------------------------------------------------- datasets


def make_dataset(seed: int = 0, *, n_users: int = 14, n_items: int = 12, per_user=(1, 30),
                 ratings: bool = True, users: bool = True, category_vocab: int | None = None,
                 label=None, rating=None, item=None) -> PreparedDataset:
    """A random prepared dataset. ``label`` / ``rating`` / ``item``: arrays that replace the
    drawn ones (the perturbation tests), everything else drawn from ``seed`` as before."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(per_user[0], per_user[1] + 1, size=n_users)
    lens[:2] = [1, 2]  # empty training parts
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    n = int(off[-1])
    user = np.repeat(np.arange(1, n_users + 1), lens).astype(np.int32)
    it = rng.integers(1, n_items + 1, size=n)  # repeats allowed
    ts = np.empty(n, np.int64)
    for u in range(n_users):
        s, e = off[u], off[u + 1]
        steps = np.where(rng.random(e - s) < 0.3, 0, rng.integers(1, 90_000, size=e - s))
        ts[s:e] = 978_300_000 + int(rng.integers(0, 10**6)) + np.cumsum(steps)
        o = np.lexsort((it[s:e], ts[s:e]))
        it[s:e], ts[s:e] = it[s:e][o], ts[s:e][o]
    tok = rng.integers(1, 6, size=n)
    if item is not None:
        it = np.asarray(item)
    if rating is not None:
        tok = np.asarray(rating)
    lab = (tok >= 4).astype(np.int8) if label is None else np.asarray(label, np.int8)
    tr_end, va_end = F.split_rule_positions(lens)
    pos = np.arange(n) - np.repeat(off[:-1], lens)
    split = np.where(pos < np.repeat(tr_end, lens), 0,
                     np.where(pos < np.repeat(va_end, lens), 1, 2)).astype(np.int8)
    vocab_values = [1.0, 1.5, 3.0, 4.0, 5.0]
    beh = F.behaviour_features(ts, tok if ratings else None, kind="rating" if ratings else None,
                               vocab=vocab_values if ratings else None, offsets=off,
                               encoded=True)
    g = np.zeros((n_items + 2, 3), np.int64)
    for i in range(1, n_items + 1):
        k = int(rng.integers(1, 4))
        g[i, :k] = np.sort(rng.choice(np.arange(1, 7), size=k, replace=False))
    item_table = {"genre": g,
                  "year": np.concatenate([[0], rng.integers(1, 8, size=n_items), [0]])}
    vocab = {"item": n_items + 2, "genre": 7, "year": 8, "gap": F.GAP_VOCAB,
             "hour": F.HOUR_VOCAB, "weekday": F.WEEKDAY_VOCAB}
    if category_vocab is not None:  # a single-valued field and a large multi-valued one
        item_table["category"] = np.concatenate(
            [[0], rng.integers(1, category_vocab, size=n_items), [0]])
        tags = np.zeros((n_items + 2, 2), np.int64)
        for i in range(1, n_items + 1):
            tags[i] = np.sort(rng.choice(np.arange(1, category_vocab), size=2, replace=False))
        item_table["tags"] = tags
        vocab |= {"category": category_vocab, "tags": category_vocab}
    user_table = {}
    if users:
        user_table = {"age": rng.integers(1, 8, size=n_users + 1),
                      "gender": rng.integers(1, 3, size=n_users + 1),
                      "occupation": rng.integers(1, 22, size=n_users + 1)}
        for t in user_table.values():
            t[0] = 0
        vocab |= {"age": 8, "gender": 3, "occupation": 22}
    if ratings:
        vocab["rating"] = len(vocab_values) + 1
    multi = [f for f, t in item_table.items() if t.ndim == 2]
    meta = {"n_users": n_users, "n_items": n_items, "item_fields": ["item", *item_table],
            "behaviour_fields": list(beh), "multi_fields": multi, "user_fields": list(user_table),
            "vocab": vocab, "behaviour_kind": "rating" if ratings else None,
            "behaviour_values": vocab_values if ratings else None, "fingerprint": f"synthetic{seed}",
            "label_rule": "rating >= 4"}
    return PreparedDataset(
        name="synthetic", user=user, item=it, timestamp=ts, label=lab, split=split,
        user_offsets=off, behaviour=beh, item_table=item_table, user_table=user_table,
        item_raw=np.arange(n_items + 1), user_raw=np.arange(n_users + 1), meta=meta)


def arrays_of(ds: PreparedDataset) -> dict:
    return {"label": ds.label.copy(), "rating": ds.behaviour["rating"].copy(),
            "item": ds.item.astype(np.int64).copy()}


# ----------------------------------------------------------------------------- the reference


def reference_features(samples: CTRDataset, cfg: GBDTConfig, seed: int) -> dict[str, list]:
    """The features one sample at a time, in plain Python, from the module docstring."""
    ds = samples.ds
    vocab = [None, *ds.value_vocab] if ds.kind else None
    n_rows = len(ds.item)
    folds = gbdt.fold_of_rows(n_rows, cfg.n_folds, seed)
    train_rows = [r for r in range(n_rows) if ds.split[r] == 0]
    out: dict[str, list] = {}

    def put(name, v):
        out.setdefault(name, []).append(v)

    def mean(xs):
        return sum(xs) / len(xs) if xs else math.nan

    def values(f, i):
        if f == "item":
            return [i] if i > 0 else []
        t = ds.item_table[f]
        row = t[i] if t.ndim == 2 else [t[i]]
        return [int(v) for v in row if v > 0]

    for j in range(len(samples)):
        r = int(samples.rows[j])
        c = int(samples.extras["cand_item"][j])
        u = int(ds.user[r])
        first = int(ds.user_offsets[u - 1])
        hist = list(range(max(first, r - samples.max_len), r))  # the deep models' window
        labels = [int(ds.label[h]) for h in hist]
        rat = [vocab[int(ds.behaviour["rating"][h])] for h in hist] if vocab else None
        put("hist_count", len(hist))
        put("hist_label_mean", mean(labels))
        if rat is not None:
            put("hist_rating_mean", mean(rat))
        for k in cfg.windows:
            if k >= samples.max_len:
                continue
            put(f"hist_label_mean_last{k}", mean(labels[-k:]))
            if rat is not None:
                put(f"hist_rating_mean_last{k}", mean(rat[-k:]))
        put("time_since_prev", ds.timestamp[r] - ds.timestamp[hist[-1]] if hist else math.nan)
        put("time_since_first", ds.timestamp[r] - ds.timestamp[hist[0]] if hist else math.nan)
        put("hour", (int(ds.timestamp[r]) // 3600) % 24)
        put("weekday", int(ds.behaviour["weekday"][r]))
        # item statistics: the training rows this sample may read
        if ds.split[r] != 0:
            seen = train_rows
        elif cfg.item_stats == "loo":
            seen = [t for t in train_rows if t != r or ds.item[r] != c]
        else:
            seen = [t for t in train_rows if folds[t] != folds[r]]
        own = [t for t in seen if ds.item[t] == c]
        m = cfg.prior_weight
        prior = sum(int(ds.label[t]) for t in seen) / len(seen)
        scale = cfg.n_folds / (cfg.n_folds - 1) if (ds.split[r] == 0 and
                                                    cfg.item_stats == "kfold") else 1.0
        put("item_count", len(own) * scale)
        put("item_label_mean", (sum(int(ds.label[t]) for t in own) + m * prior) / (len(own) + m))
        if vocab:
            vprior = sum(vocab[int(ds.behaviour["rating"][t])] for t in seen) / len(seen)
            put("item_rating_mean", (sum(vocab[int(ds.behaviour["rating"][t])] for t in own)
                                     + m * vprior) / (len(own) + m))
        for f, t in ds.item_table.items():
            if t.ndim == 1:
                put(f"item_{f}", int(t[c]))
                continue
            if ds.vocab[f] - 1 <= cfg.max_multi_hot:
                for v in range(1, ds.vocab[f]):
                    put(f"item_{f}={v}", float(v in values(f, c)))
            else:
                put(f"item_{f}_first", int(t[c][0]))
            put(f"item_{f}_n", len(values(f, c)))
        for f in ["item", *ds.item_table]:
            shared = [(h, v) for h in hist for v in values(f, int(ds.item[h]))
                      if v in values(f, c)]
            put(f"aff_{f}_count", len(shared))
            put(f"aff_{f}_share", len(shared) / len(hist) if hist else math.nan)
            put(f"aff_{f}_label_mean", mean([int(ds.label[h]) for h, _ in shared]))
            if vocab:
                put(f"aff_{f}_rating_mean",
                    mean([vocab[int(ds.behaviour["rating"][h])] for h, _ in shared]))
        for f, t in ds.user_table.items():
            put(f"user_{f}", int(t[u]))
    return out


# ----------------------------------------------------------------------------- (d) reference


@pytest.mark.parametrize("case", [
    {"seed": 0}, {"seed": 1, "item_stats": "loo"}, {"seed": 2, "max_len": 4, "windows": (2, 3, 9)},
    {"seed": 3, "ratings": False, "users": False}, {"seed": 4, "category_vocab": 90, "prior_weight": 0.0},
    {"seed": 5, "max_len": 1, "item_stats": "loo", "prior_weight": 3.5},
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_features_equal_the_per_sample_reference(case):
    case = dict(case)
    seed = case.pop("seed")
    max_len = case.pop("max_len", 7)
    ds_kw = {k: case.pop(k) for k in ("ratings", "users", "category_vocab") if k in case}
    cfg = GBDTConfig(**case)
    ds = make_dataset(seed, **ds_kw)
    for split in ("train", "valid", "test"):
        samples = CTRDataset(ds, split, max_len=max_len, seed=seed)
        table = ctr_features(samples, cfg)
        ref = reference_features(samples, cfg, seed)
        assert table.names == list(ref)
        for j, name in enumerate(table.names):
            np.testing.assert_allclose(table.X[:, j], np.asarray(ref[name], float), rtol=1e-12,
                                       atol=1e-9, equal_nan=True, err_msg=f"{split} {name}")
        np.testing.assert_array_equal(table.label, samples.extras["label"])
        np.testing.assert_array_equal(table.user, samples.users)
    assert set(table.categorical) <= set(table.names)
    assert "item_year" not in table.categorical and "user_age" not in table.categorical


# ----------------------------------------------------------------------------- (a) no leakage


def _perturb(ds, base: dict, sample_row: int, rng, later: bool) -> PreparedDataset:
    """``ds`` with the sample's own label and rating changed and, with ``later``, the items,
    labels and ratings of every later interaction of its user."""
    a = {k: v.copy() for k, v in base.items()}
    a["label"][sample_row] = 1 - a["label"][sample_row]
    a["rating"][sample_row] = a["rating"][sample_row] % 5 + 1
    if later:
        u = int(ds.user[sample_row])
        rest = np.arange(sample_row + 1, int(ds.user_offsets[u]))
        a["label"][rest] = rng.integers(0, 2, size=rest.size)
        a["rating"][rest] = rng.integers(1, 6, size=rest.size)
        a["item"][rest] = rng.integers(1, ds.n_items + 1, size=rest.size)
    return make_dataset(0, label=a["label"], rating=a["rating"], item=a["item"])


@pytest.mark.parametrize("item_stats", ["kfold", "loo"])
def test_no_feature_sees_the_own_label_or_the_future(item_stats):
    cfg = GBDTConfig(item_stats=item_stats, windows=(2,))
    ds = make_dataset(0)
    base = arrays_of(ds)
    rng = np.random.default_rng(7)
    tables = {s: ctr_features(CTRDataset(ds, s, max_len=6), cfg) for s in ("train", "valid", "test")}
    history_cols = [j for j, n in enumerate(tables["train"].names) if n not in ITEM_STAT_FEATURES]
    checked = 0
    for split in ("train", "valid", "test"):
        samples = CTRDataset(ds, split, max_len=6)
        for j in rng.choice(len(samples), size=min(12, len(samples)), replace=False):
            row = int(samples.rows[j])
            for later in (False, True):
                ds2 = _perturb(ds, base, row, rng, later)
                again = ctr_features(CTRDataset(ds2, split, max_len=6), cfg)
                before, after = tables[split].X[j], again.X[j]
                # the history, context, side-field and affinity features: never changed
                np.testing.assert_array_equal(before[history_cols], after[history_cols])
                # item statistics: training rows only (valid/test), own row left out (train);
                # a training sample's later training rows are training data of other samples
                if split != "train" or not later:
                    np.testing.assert_array_equal(before, after)
                checked += 1
    assert checked > 40


def test_the_own_label_is_what_the_perturbation_changes():
    """The leakage test would pass vacuously if the perturbed dataset changed nothing."""
    ds = make_dataset(0)
    samples = CTRDataset(ds, "valid", max_len=6)
    row = int(samples.rows[0])
    ds2 = _perturb(ds, arrays_of(ds), row, np.random.default_rng(0), later=True)
    assert ds2.label[row] != ds.label[row]
    u = int(ds.user[row])
    assert (ds2.label[row + 1:ds.user_offsets[u]] != ds.label[row + 1:ds.user_offsets[u]]).any()
    # and the features of later samples of that user do see it
    t1 = ctr_features(CTRDataset(ds, "valid", max_len=6))
    t2 = ctr_features(CTRDataset(ds2, "valid", max_len=6))
    later = np.flatnonzero((samples.users == u) & (samples.rows > row))
    if later.size:
        assert not np.array_equal(t1.X[later], t2.X[later], equal_nan=True)


# ----------------------------------------------------------------------------- (b), (c) item stats


def _tiny_by_hand(split_of_rows=None):
    """Two users; item 1 in training rows with labels 1, 0, 1 (rows 0, 1, 5), item 2 twice.

    user 1: rows 0..4 (items 1 1 2 3 1, the last two valid/test); user 2: rows 5..9.
    """
    item = np.array([1, 1, 2, 3, 1, 1, 2, 3, 2, 1])
    rating = np.array([5, 2, 4, 1, 5, 4, 1, 2, 5, 5])  # labels 1 0 1 0 1 1 0 0 1 1
    lab = (rating >= 4).astype(np.int8)
    n = 10
    off = np.array([0, 5, 10])
    ts = 1_000_000 + np.arange(n) * 100
    split = np.array([0, 0, 0, 1, 2, 0, 0, 0, 1, 2], np.int8)
    beh = F.behaviour_features(ts, rating, kind="rating", vocab=[1, 2, 3, 4, 5], offsets=off,
                               encoded=True)
    g = np.zeros((5, 1), np.int64)
    g[1:4, 0] = [1, 2, 1]
    meta = {"n_users": 2, "n_items": 3, "item_fields": ["item", "genre"],
            "behaviour_fields": list(beh), "multi_fields": ["genre"], "user_fields": [],
            "vocab": {"item": 5, "genre": 3, "rating": 6, "gap": F.GAP_VOCAB,
                      "hour": F.HOUR_VOCAB, "weekday": F.WEEKDAY_VOCAB},
            "behaviour_kind": "rating", "behaviour_values": [1, 2, 3, 4, 5],
            "fingerprint": "byhand"}
    return PreparedDataset(
        name="byhand", user=np.repeat([1, 2], 5), item=item, timestamp=ts, label=lab,
        split=split, user_offsets=off, behaviour=beh, item_table={"genre": g}, user_table={},
        item_raw=np.arange(4), user_raw=np.arange(3), meta=meta)


def test_leave_one_out_by_hand():
    ds = _tiny_by_hand()
    # training rows: 0 (item 1, y 1, r 5), 1 (item 1, y 0, r 2), 2 (item 2, y 1, r 4),
    # 5 (item 1, y 1, r 4), 6 (item 2, y 0, r 1), 7 (item 3, y 0, r 2): 6 rows, 3 positives
    cfg = GBDTConfig(item_stats="loo", prior_weight=0.0)
    t = ctr_features(CTRDataset(ds, "train", max_len=10), cfg)
    assert list(CTRDataset(ds, "train", max_len=10).rows) == [0, 1, 2, 5, 6, 7]
    assert t.column("item_count").tolist() == [2, 2, 1, 2, 1, 0]
    # item 1's other training labels: row 0 -> (0, 1), row 1 -> (1, 1), row 5 -> (1, 0)
    mean = t.column("item_label_mean")
    assert mean[[0, 1, 3]].tolist() == [0.5, 1.0, 0.5]
    assert mean[2] == 0.0 and mean[4] == 1.0 and math.isnan(mean[5])
    assert t.column("item_rating_mean")[[0, 1, 3]].tolist() == [3.0, 4.5, 3.5]
    # smoothed: (sum + m * prior) / (count + m), the prior left-one-out too
    m = 2.0
    t = ctr_features(CTRDataset(ds, "train", max_len=10), GBDTConfig(item_stats="loo",
                                                                      prior_weight=m))
    prior0 = 2 / 5  # the other five training labels of row 0: 0 1 1 0 0
    assert t.column("item_label_mean")[0] == pytest.approx((1 + m * prior0) / (2 + m))
    prior1 = 3 / 5
    assert t.column("item_label_mean")[1] == pytest.approx((2 + m * prior1) / (2 + m))


def test_out_of_fold_by_hand(monkeypatch):
    ds = _tiny_by_hand()
    folds = np.array([0, 1, 0, 1, 1, 1, 0, 1, 0, 0])
    monkeypatch.setattr(gbdt, "fold_of_rows", lambda n, k, seed: folds)
    t = ctr_features(CTRDataset(ds, "train", max_len=10),
                     GBDTConfig(item_stats="kfold", n_folds=2, prior_weight=0.0))
    # training rows 0, 2, 6 (fold 0; items 1 2 2) read fold 1's rows 1, 5, 7 (items 1 1 3) and
    # the other way round. Row 0 (item 1): rows 1, 5 -> count 2, x K/(K-1) = 4, labels 0 1;
    # row 1 and row 5 (item 1): row 0 -> 1 (x2), label 1; items 2 and 3: none on the other side
    assert t.column("item_count").tolist() == [4, 2, 0, 2, 0, 0]
    mean = t.column("item_label_mean")
    assert mean[0] == 0.5 and mean[1] == 1.0 and mean[3] == 1.0
    assert np.isnan(mean[[2, 4, 5]]).all()
    # the prior (prior_weight > 0) is the other fold's positive rate: fold 1 has 1 of 3
    t = ctr_features(CTRDataset(ds, "train", max_len=10),
                     GBDTConfig(item_stats="kfold", n_folds=2, prior_weight=3.0))
    assert t.column("item_label_mean")[0] == pytest.approx((1 + 3.0 * 1 / 3) / (2 + 3.0))
    assert t.column("item_label_mean")[2] == pytest.approx(1 / 3)


def test_valid_and_test_item_stats_read_training_rows_only():
    ds = _tiny_by_hand()
    cfg = GBDTConfig(prior_weight=0.0)
    for split, rows, counts, means in (("valid", [3, 8], [1, 2], [0.0, 0.5]),
                                       ("test", [4, 9], [3, 3], [2 / 3, 2 / 3])):
        s = CTRDataset(ds, split, max_len=10)
        assert list(s.rows) == rows
        t = ctr_features(s, cfg)
        assert t.column("item_count").tolist() == counts
        assert t.column("item_label_mean").tolist() == pytest.approx(means)
    # changing every validation and test label, rating and item moves no sample's item stats
    big = make_dataset(3)
    a = arrays_of(big)
    rng = np.random.default_rng(1)
    later = big.split > 0
    a["label"][later] = rng.integers(0, 2, size=later.sum())
    a["rating"][later] = rng.integers(1, 6, size=later.sum())
    other = make_dataset(3, label=a["label"], rating=a["rating"])
    for split in ("train", "valid", "test"):
        t1 = ctr_features(CTRDataset(big, split, max_len=5))
        t2 = ctr_features(CTRDataset(other, split, max_len=5))
        for name in ITEM_STAT_FEATURES:
            np.testing.assert_array_equal(t1.column(name), t2.column(name), err_msg=name)


def test_sampled_negatives_use_the_deep_models_samples():
    ds = make_dataset(2)
    for split in ("train", "valid"):
        s = CTRDataset(ds, split, max_len=5, negatives="uni100", seed=3)
        t = ctr_features(s)
        assert len(t) == len(s) and t.label.min() == 0 and t.label.max() == 1
        np.testing.assert_array_equal(t.label, s.extras["label"])
    # a negative's candidate is no interaction of its row: its item stats leave nothing out
    s = CTRDataset(ds, "train", max_len=5, negatives="uni100", seed=3)
    t = ctr_features(s, GBDTConfig(item_stats="loo"))
    neg = s.extras["label"] == 0
    tr = ds.split == 0
    full = np.bincount(ds.item[tr], minlength=ds.n_items + 2)[s.extras["cand_item"][neg]]
    np.testing.assert_array_equal(t.column("item_count")[neg], full)


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from train_fixtures import prepare_tiny

    return prepare_tiny(tmp_path_factory.mktemp("gbdt_tiny"), n_users=30, per_user=(12, 30))


def test_experiment_writes_a_gbdt_row(tiny, tmp_path):
    from srp4ctr.models import ModelConfig
    from srp4ctr.train import TrainConfig
    from srp4ctr.train.experiment import run_experiment

    tc = TrainConfig(epochs=1, progress=False, num_threads=1)
    res = run_experiment(tiny, tmp_path, models=["gbdt"], seeds=[0], progress=False,
                         model_config=ModelConfig(max_len=12), train_config=tc)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["runs"] == res["runs"]
    assert set(on_disk["runs"]) == {"gbdt"} and not on_disk["pretrain"]
    for k in ("auc", "gauc", "logloss"):
        (v,) = on_disk["runs"]["gbdt"][k]
        (w,) = on_disk["valid_runs"]["gbdt"][k]
        assert math.isfinite(v) and math.isfinite(w)
    d = on_disk["details"]["gbdt"]["0"]
    assert d["kind"] == "gbdt" and d["test"]["n"] == int((tiny.split == 2).sum())
    assert d["best_iteration"] >= 1 and d["epochs_run"] == d["rounds_run"]
    assert d["feature_importance"][0]["gain"] >= d["feature_importance"][-1]["gain"]
    assert "`gbdt` (GBDT (LightGBM) on history statistics)" in (tmp_path / "results.md").read_text()
    run = tmp_path / "runs" / "seed0" / "gbdt"
    assert {p.name for p in run.iterdir()} == {"model.txt", "features.json", "metrics.json"}
    # the saved model scores as the run did
    import lightgbm

    table = ctr_features(CTRDataset(tiny, "test", max_len=12))
    booster = lightgbm.Booster(model_file=str(run / "model.txt"))
    from srp4ctr import metrics

    assert metrics.auc(table.label, booster.predict(table.X)) == pytest.approx(d["test"]["auc"])
    # resume: the finished run is kept
    again = run_experiment(tiny, tmp_path, models=["gbdt"], seeds=[0], progress=False,
                           model_config=ModelConfig(max_len=12), train_config=tc)
    assert again["details"] == on_disk["details"]


def test_training_is_deterministic(tiny):
    from srp4ctr.models import ModelConfig
    from srp4ctr.train import TrainConfig

    kw = {"model_config": ModelConfig(max_len=12), "gbdt_config": GBDTConfig(num_rounds=60)}
    a = gbdt.train_gbdt(tiny, None, train_config=TrainConfig(seed=4, num_threads=2), **kw)
    b = gbdt.train_gbdt(tiny, None, train_config=TrainConfig(seed=4, num_threads=2), **kw)
    assert a["valid"] == b["valid"] and a["test"] == b["test"]
    assert a["history"] == b["history"]
    uni = gbdt.train_gbdt(tiny, None, train_config=TrainConfig(seed=4, negatives="uni100",
                                                               num_threads=1), **kw)
    assert math.isfinite(uni["test"]["auc"])


def test_the_evaluated_subset_is_the_deep_models(tiny):
    from srp4ctr.models import ModelConfig
    from srp4ctr.train import TrainConfig
    from srp4ctr.train.loop import eval_indices

    tc = TrainConfig(seed=1, num_threads=1, eval_max_samples=25)
    r = gbdt.train_gbdt(tiny, None, train_config=tc, model_config=ModelConfig(max_len=12),
                        gbdt_config=GBDTConfig(num_rounds=20))
    assert r["valid"]["n"] == r["test"]["n"] == 25
    assert eval_indices(int((tiny.split == 1).sum()), tc).size == 25


def test_missing_lightgbm_is_a_typed_error(tiny, tmp_path, monkeypatch):
    from srp4ctr.train.experiment import run_experiment

    monkeypatch.setitem(sys.modules, "lightgbm", None)  # `import lightgbm` raises ImportError
    with pytest.raises(InputError, match=r"pip install 'srp4ctr\[gbdt\]'"):
        gbdt.require_lightgbm()
    with pytest.raises(InputError, match=r"srp4ctr\[gbdt\]"):
        gbdt.train_gbdt(tiny, None)
    # the experiment refuses before training anything
    with pytest.raises(InputError, match=r"srp4ctr\[gbdt\]"):
        run_experiment(tiny, tmp_path / "exp", models=["din", "gbdt"], seeds=[0], progress=False)
    assert not (tmp_path / "exp" / "results.json").exists()


def test_settings_are_checked():
    for bad in ({"num_leaves": 0}, {"learning_rate": 0}, {"feature_fraction": 1.5},
                {"windows": (0,)}, {"item_stats": "target"}, {"n_folds": 1},
                {"prior_weight": -1.0}):
        with pytest.raises(InputError):
            GBDTConfig(**bad)
    with pytest.raises(InputError, match="unknown GBDT setting"):
        GBDTConfig.from_dict({"leaves": 3})
    cfg = GBDTConfig(windows=[3, 7])
    assert GBDTConfig.from_dict(cfg.to_dict()) == cfg


def test_cli_lists_every_experiment_model():
    from srp4ctr.cli import EXPERIMENT_MODELS
    from srp4ctr.train.experiment import VARIANTS

    assert list(EXPERIMENT_MODELS) == list(VARIANTS)
    assert VARIANTS["gbdt"].pretrain is None
