"""Issue 17, part 4: test metrics split by the candidate's training popularity (long tail), and
the strict-time protocol (histories hold only interactions strictly earlier than the candidate).

The popularity split and the strict histories are checked by hand on tiny examples and against
per-user references; the runs (``finetune``, ``train_gbdt``, ``run_experiment``) on the tiny
synthetic dataset with one short epoch."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from data_fixtures import small_ml1m, write_ml_dat  # noqa: F401  (fixture)
from train_fixtures import prepare_tiny

from srp4ctr import data, metrics
from srp4ctr.data.samples import (
    CTRDataset,
    NextItemDataset,
    same_second_history_share,
    strict_history_end,
)
from srp4ctr.errors import InputError
from srp4ctr.models import ModelConfig
from srp4ctr.train import TrainConfig
from srp4ctr.train.experiment import (
    item_train_counts,
    metrics_by_popularity,
    popularity_info,
    popularity_threshold,
    run_experiment,
    write_markdown,
)

TINY = {"d_model": 16, "n_layers": 1, "n_heads": 2, "max_len": 12, "n_queries": 2,
        "head_hidden": (16, 8)}
POP_TITLE = "Test AUC by candidate popularity (tail = bottom 20% of items by training count)"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return prepare_tiny(tmp_path_factory.mktemp("longtail_tiny"), n_users=24, per_user=(12, 24))


def _tc(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 1, "batch_size": 64, "max_steps_per_epoch": 2,
                          "progress": False, "num_threads": 1, **kw})


# ------------------------------------------------------------------------ popularity split
def _toy_catalogue():
    """10 items; training counts of items 1..10: 0, 1, 1, 1, 2, 3, 4, 5, 6, 7 (item 1 only
    outside training)."""
    counts = [0, 1, 1, 1, 2, 3, 4, 5, 6, 7]
    item = np.concatenate([np.full(c, i + 1) for i, c in enumerate(counts)] + [[1, 1, 6]])
    split = np.concatenate([np.zeros(sum(counts), np.int8), [1, 2, 2]]).astype(np.int8)
    from srp4ctr.data.dataset import PreparedDataset

    ds = SimpleNamespace(item=item.astype(np.int32), split=split, n_items=10,
                         n_interactions=item.size, item_table={}, behaviour={}, name="toy")
    ds.training_counts = lambda sizes: PreparedDataset.training_counts(ds, sizes)
    return ds, counts


def test_popularity_threshold_and_assignment_by_hand():
    ds, counts = _toy_catalogue()
    c = item_train_counts(ds)
    assert c.tolist() == [0, *counts, 0]  # padding id 0 and the OOV id n_items + 1 are 0
    # 20% of 10 items = the 2nd smallest count = 1; every item tied at 1 is tail, so the tail
    # holds 4 items (40%): item 1 (never in training) and items 2, 3, 4 (one each)
    assert popularity_threshold(ds) == 1
    assert popularity_info(ds) == {"tail_share": 0.2, "threshold": 1, "catalogue_items": 10,
                                   "tail_items": 4, "untrained_items": 1}
    assert popularity_threshold(ds, tail_share=0.1) == 0  # the smallest count
    assert popularity_threshold(ds, tail_share=0.5) == 2  # the 5th smallest count
    assert popularity_threshold(ds, tail_share=1.0) == 7
    # the nearest-rank percentile is numpy's inverted_cdf
    for q in (0.1, 0.2, 0.35, 0.5, 0.9):
        assert popularity_threshold(ds, tail_share=q) == int(
            np.percentile(np.asarray(counts), 100 * q, method="inverted_cdf"))

    cand = np.array([1, 4, 2, 3, 5, 9, 10])  # tail: 1, 4, 2, 3; head: 5, 9, 10
    label = np.array([1, 0, 1, 0, 1, 0, 0])
    prob = np.array([0.9, 0.2, 0.3, 0.4, 0.8, 0.1, 0.9])
    user = np.array([1, 1, 2, 2, 1, 1, 2])
    r = metrics_by_popularity(ds, user, label, prob, cand)
    assert set(r) == {"tail", "head"}
    # tail: positives 0.9, 0.3 against negatives 0.2, 0.4 -> 3 of 4 pairs
    assert r["tail"]["auc"] == pytest.approx(0.75)
    assert r["tail"]["n"] == 4 and r["tail"]["threshold"] == 1 and r["tail"]["items"] == 4
    # per user: user 1 (0.9 vs 0.2) 1.0, user 2 (0.3 vs 0.4) 0.0, both weighted 2
    assert r["tail"]["gauc"] == pytest.approx(0.5)
    # head: positive 0.8 against 0.1 (won) and 0.9 (lost)
    assert r["head"]["auc"] == pytest.approx(0.5)
    assert r["head"]["n"] == 3 and r["head"]["items"] == 3
    assert r["head"]["logloss"] == pytest.approx(metrics.logloss(label[4:], prob[4:]))
    # a group without samples: NaN metrics, n 0
    r = metrics_by_popularity(ds, user[4:], label[4:], prob[4:], cand[4:])
    assert r["tail"]["n"] == 0 and math.isnan(r["tail"]["auc"]) and r["head"]["n"] == 3


def test_popularity_threshold_on_a_prepared_dataset(tiny):
    counts = np.bincount(tiny.item[tiny.split == 0], minlength=tiny.n_items + 1)[1:]
    t = popularity_threshold(tiny)
    assert t == int(np.percentile(counts, 20, method="inverted_cdf"))
    assert (counts <= t).mean() >= 0.2 and (counts < t).mean() < 0.2


# ------------------------------------------------------------------------ strict time
def _strict_reference(ds, rows):
    """Per row, by a loop over users: the first row of its user at the row's timestamp."""
    out = np.empty_like(rows)
    for u in range(1, ds.n_users + 1):
        s, e = int(ds.user_offsets[u - 1]), int(ds.user_offsets[u])
        m = (rows >= s) & (rows < e)
        out[m] = s + np.searchsorted(ds.timestamp[s:e], ds.timestamp[rows[m]], side="left")
    return out


@pytest.fixture(scope="module")
def ties(tmp_path_factory):
    """Two users with 10 interactions each and hand-placed same-second ties.

    User 7 (raw item id @ time): 11@100, 12@200, 13@200, 14@200, 15@300, 16@400, 17@400,
    18@500, 19@600, 20@600 -- positions 0..7 train, 8 valid, 9 test. User 8 starts at time 600
    too (the same second as user 7's last two): 21@600, 22@600, then 23..30 at 700..1400.
    """
    times7 = [100, 200, 200, 200, 300, 400, 400, 500, 600, 600]
    ratings = [(7, 11 + k, 5.0 if k % 2 else 2.0, t) for k, t in enumerate(times7)]
    times8 = [600, 600] + [700 + 100 * k for k in range(8)]
    ratings += [(8, 21 + k, 4.0 if k % 3 else 1.0, t) for k, t in enumerate(times8)]
    root = tmp_path_factory.mktemp("ties")
    write_ml_dat(root / "ml-1m", ratings[::-1])  # file order does not matter
    return data.prepare("ml-1m", path=root / "ml-1m", data_dir=root / "cache", progress=False)


def test_strict_history_by_hand(ties):
    ds = ties
    assert ds.n_users == 2 and ds.item_raw[ds.item].tolist() == list(range(11, 31))
    rows = np.arange(20)
    # user 7: ties at positions 1-3 (t 200), 5-6 (t 400), 8-9 (t 600); user 8: 10-11 (t 600),
    # whose first row never reaches back into user 7 despite the same second
    want = [0, 1, 1, 1, 4, 5, 5, 7, 8, 8, 10, 10, *range(12, 20)]
    assert strict_history_end(ds, rows).tolist() == want
    c = CTRDataset(ds, "train", max_len=2, strict_time=True)
    assert c.rows.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 15, 16, 17]
    assert c.end.tolist() == [0, 1, 1, 1, 4, 5, 5, 7, 10, 10, 12, 13, 14, 15, 16, 17]
    assert c.start.tolist() == [0, 0, 0, 0, 2, 3, 3, 5, 10, 10, 10, 11, 12, 13, 14, 15]
    b = c.batch([2, 6, 9])
    raw = lambda t: [[int(ds.item_raw[i]) if i else 0 for i in r] for r in t.tolist()]
    assert raw(b["hist_item"]) == [[11, 0], [14, 15], [0, 0]]  # 13@200 sees 11@100 only
    assert b["hist_len"].tolist() == [1, 2, 0]
    loose = CTRDataset(ds, "train", max_len=2)
    assert loose.end.tolist() == loose.rows.tolist()
    assert raw(loose.batch([2, 6, 9])["hist_item"]) == [[11, 12], [15, 16], [21, 0]]
    # the share of samples with a same-second interaction in the default history
    assert c.same_second_share() == loose.same_second_share() == pytest.approx(4 / 16)
    assert same_second_history_share(ds, "train") == pytest.approx(4 / 16)  # rows 2, 3, 6, 11
    assert same_second_history_share(ds, "valid") == 0.0  # 19@600 after 18@500; 29@1300
    assert same_second_history_share(ds, "test") == pytest.approx(1 / 2)  # 20@600 after 19@600
    test = CTRDataset(ds, "test", max_len=3, strict_time=True)
    assert test.rows.tolist() == [9, 19] and test.end.tolist() == [8, 19]
    nxt = NextItemDataset(ds, "test", max_len=3, strict_time=True)
    assert nxt.end.tolist() == [8, 19]
    with pytest.raises(InputError, match="strict_time"):
        CTRDataset(ds, "train", strict_time="yes")


@pytest.mark.parametrize("negatives", [None, "uni100"])
@pytest.mark.parametrize("max_len", [1, 4, 200])
def test_strict_histories_end_before_the_candidates_second(small_ml1m, negatives,  # noqa: F811
                                                            max_len):
    ds = small_ml1m
    for split in ("train", "valid", "test"):
        strict = CTRDataset(ds, split, max_len=max_len, negatives=negatives, seed=3,
                            strict_time=True)
        loose = CTRDataset(ds, split, max_len=max_len, negatives=negatives, seed=3)
        assert np.array_equal(strict.rows, loose.rows)
        for k in ("cand_item", "label"):
            assert np.array_equal(strict.extras[k], loose.extras[k])
        assert np.array_equal(strict.end, _strict_reference(ds, strict.rows))
        t = ds.timestamp[strict.rows]
        lens = strict.end - strict.start
        assert np.all(lens <= max_len) and np.all(lens >= 0)
        for i in range(len(strict)):  # no interaction at or after the candidate's second
            s, e, r = int(strict.start[i]), int(strict.end[i]), int(strict.rows[i])
            assert np.all(ds.timestamp[s:e] < t[i])
            assert np.all(ds.user[s:e] == ds.user[r])
            # nothing strictly earlier is missing from the window (up to max_len)
            u0 = int(ds.user_offsets[ds.user[r] - 1])
            earlier = np.flatnonzero(ds.timestamp[u0:r] < t[i]) + u0
            assert np.array_equal(np.arange(s, e), earlier[max(0, earlier.size - max_len):])
        # where no same-second interaction precedes the candidate, the histories agree
        prev = np.maximum(strict.rows - 1, 0)
        first = strict.rows == ds.user_offsets[ds.user[strict.rows].astype(np.int64) - 1]
        no_tie = first | (ds.timestamp[prev] != t)
        assert no_tie.any() and (~no_tie).any()  # the fixture has both kinds
        assert np.array_equal(strict.start[no_tie], loose.start[no_tie])
        assert np.array_equal(strict.end[no_tie], loose.end[no_tie])
        assert np.all(strict.end[~no_tie] < loose.end[~no_tie])
        assert strict.same_second_share() == pytest.approx(float((~no_tie).mean()))
        if negatives is None:
            assert same_second_history_share(ds, split) == pytest.approx(float((~no_tie).mean()))


def test_strict_gbdt_features_never_see_the_same_second(small_ml1m):  # noqa: F811
    from srp4ctr.train.gbdt import GBDTConfig, ctr_features

    ds = small_ml1m
    samples = CTRDataset(ds, "test", max_len=6, strict_time=True)
    table = ctr_features(samples, GBDTConfig())
    gap = table.column("time_since_prev")
    has = samples.end > samples.start
    assert np.all(gap[has] > 0) and np.all(np.isnan(gap[~has]))
    assert np.array_equal(table.column("hist_count"), (samples.end - samples.start).astype(float))
    loose = ctr_features(CTRDataset(ds, "test", max_len=6), GBDTConfig())
    assert np.any(loose.column("time_since_prev") == 0)  # the default history has same seconds


# ------------------------------------------------------------------------ runs
def test_finetune_records_test_by_popularity(tiny, tmp_path):
    from srp4ctr.train import finetune, load_model
    from srp4ctr.train.loop import eval_indices, predict_ctr

    tc = _tc(eval_max_samples=40)
    r = finetune(tiny, tmp_path / "din", kind="din", model_config=ModelConfig(**TINY),
                 train_config=tc, strict_time=True)
    assert r["strict_time"] is True
    pop = r["test_by_popularity"]
    assert set(pop) == {"tail", "head"}
    assert pop["tail"]["n"] + pop["head"]["n"] == r["test"]["n"] == 40
    assert pop["tail"]["threshold"] == pop["head"]["threshold"] == popularity_threshold(tiny)
    # the split is the one of the evaluated samples' candidates, aligned with their predictions
    test = CTRDataset(tiny, "test", max_len=TINY["max_len"], strict_time=True)
    idx = eval_indices(len(test), tc)
    model, _ = load_model(tmp_path / "din", dataset=tiny)
    pred = predict_ctr(model, test, indices=idx)
    want = metrics_by_popularity(tiny, pred["user"], pred["label"], pred["prob"],
                                 test.extras["cand_item"][idx])
    for g in ("tail", "head"):
        assert pop[g] == pytest.approx(want[g], nan_ok=True)
    counts = item_train_counts(tiny)
    assert pop["tail"]["n"] == int((counts[test.extras["cand_item"][idx]]
                                    <= pop["tail"]["threshold"]).sum())
    on_disk = json.loads((tmp_path / "din" / "metrics.json").read_text())
    assert on_disk["test_by_popularity"]["head"]["n"] == pop["head"]["n"]


def test_a_strict_time_run_is_evaluated_under_its_protocol(small_ml1m, tmp_path):  # noqa: F811
    """The checkpoint records strict_time, and ``evaluate`` of it uses that protocol (on a
    dataset where the two protocols' histories, and so their metrics, differ)."""
    from srp4ctr.train import evaluate, finetune, load_model
    from srp4ctr.train.loop import ctr_metrics, predict_ctr

    ds = small_ml1m
    finetune(ds, tmp_path / "din", kind="din", model_config=ModelConfig(**TINY),
             train_config=_tc(), strict_time=True)
    assert json.loads((tmp_path / "din" / "config.json").read_text())["strict_time"] is True
    ev = evaluate(tmp_path / "din", ds)
    model, _ = load_model(tmp_path / "din", dataset=ds)
    strict = CTRDataset(ds, "test", max_len=TINY["max_len"], strict_time=True)
    assert strict.same_second_share() > 0
    want = ctr_metrics(predict_ctr(model, strict))
    loose = ctr_metrics(predict_ctr(model, CTRDataset(ds, "test", max_len=TINY["max_len"])))
    assert ev["strict_time"] is True
    assert ev["logloss"] == pytest.approx(want["logloss"]) and ev["auc"] == pytest.approx(
        want["auc"])
    assert abs(want["logloss"] - loose["logloss"]) > 1e-9


def test_gbdt_records_test_by_popularity(tiny):
    pytest.importorskip("lightgbm")
    from srp4ctr.train.gbdt import GBDTConfig, train_gbdt

    kw = {"model_config": ModelConfig(max_len=12), "gbdt_config": GBDTConfig(num_rounds=10)}
    for strict in (False, True):
        r = train_gbdt(tiny, None, train_config=_tc(eval_max_samples=30), strict_time=strict,
                       **kw)
        assert r["strict_time"] is strict
        pop = r["test_by_popularity"]
        assert pop["tail"]["n"] + pop["head"]["n"] == r["test"]["n"] == 30
        assert pop["tail"]["threshold"] == popularity_threshold(tiny)
        for g in ("tail", "head"):
            assert set(pop[g]) == {"auc", "gauc", "logloss", "n", "threshold", "items"}


def _experiment(ds, out, **kw):
    return run_experiment(ds, out, seeds=[0], model_config=ModelConfig(**TINY),
                          train_config=_tc(), progress=False, **kw)


def test_experiment_table_old_results_and_no_mixing(tiny, tmp_path):
    models = ["din", "gbdt"] if _has_lightgbm() else ["din"]
    out = tmp_path / "exp"
    res = _experiment(tiny, out, models=models)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["strict_time"] is False
    assert set(on_disk["same_second_history_share"]) == {"train", "valid", "test"}
    assert on_disk["popularity"]["threshold"] == popularity_threshold(tiny)
    for m in models:
        d = on_disk["details"][m]["0"]
        assert d["strict_time"] is False
        assert d["test_by_popularity"]["tail"]["n"] + d["test_by_popularity"]["head"]["n"] \
            == d["test"]["n"]
        row = on_disk["runs_by_popularity"][m]
        assert row["tail"]["auc"] == [d["test_by_popularity"]["tail"]["auc"]]
        assert row["auc_gap"] == pytest.approx(
            [d["test_by_popularity"]["head"]["auc"] - d["test_by_popularity"]["tail"]["auc"]],
            nan_ok=True)
    md = (out / "results.md").read_text()
    assert f"## {POP_TITLE}" in md
    section = md.split(POP_TITLE)[1].split("\n## ")[0]
    for m in models:
        assert f"| {m} |" in section
    assert "history = up to 12 earlier interactions" in res["protocol"]
    assert "of test samples have such a same-second interaction" in res["protocol"]
    assert "Long tail: tail = test samples whose candidate item has at most" in res["protocol"]
    assert "strict_time: false" in (out / "config.yaml").read_text()

    # an older results.json (no strict_time, no popularity split): resumed, nothing retrained,
    # the tables are written without the section
    old = json.loads((out / "results.json").read_text())
    for k in ("strict_time", "runs_by_popularity", "popularity", "same_second_history_share"):
        old.pop(k)
    for per_seed in old["details"].values():
        for r in per_seed.values():
            r.pop("test_by_popularity")
            r.pop("strict_time")
    (out / "results.json").write_text(json.dumps(old))
    again = _experiment(tiny, out, models=models)
    assert {m: again["details"][m] for m in models} == old["details"]
    assert again["runs_by_popularity"] == {}
    md = (out / "results.md").read_text()
    assert POP_TITLE not in md and "| model | AUC | gAUC" in md
    # write_markdown on a results dict from before the analysis, or with one model lacking it
    legacy = {k: v for k, v in again.items() if k != "runs_by_popularity"}
    write_markdown(tmp_path / "legacy.md", legacy)
    assert POP_TITLE not in (tmp_path / "legacy.md").read_text()
    mixed = json.loads(json.dumps(legacy))
    mixed["details"]["din"]["0"]["test_by_popularity"] = on_disk["details"]["din"]["0"][
        "test_by_popularity"]
    mixed["runs"]["bst"] = {"auc": [], "gauc": [], "logloss": []}
    mixed["valid_runs"]["bst"] = {"auc": [], "gauc": [], "logloss": []}
    write_markdown(tmp_path / "mixed.md", mixed)
    section = (tmp_path / "mixed.md").read_text().split(POP_TITLE)[1]
    assert "| bst | — | — | — | — | — | — | — |" in section
    assert f"| din | {on_disk['details']['din']['0']['test_by_popularity']['tail']['auc']:.4f}" \
        in section

    # a strict-time experiment never resumes into this (default-protocol) folder, nor back
    with pytest.raises(InputError, match=r"strict_time=False.*strict_time=True"):
        _experiment(tiny, out, models=models, strict_time=True)
    assert json.loads((out / "results.json").read_text())["details"] == old["details"]
    strict_out = tmp_path / "strict"
    res = _experiment(tiny, strict_out, models=["din"], strict_time=True)
    assert res["strict_time"] is True and res["details"]["din"]["0"]["strict_time"] is True
    assert "strictly earlier than the candidate's" in res["protocol"]
    with pytest.raises(InputError, match=r"strict_time=True.*strict_time=False"):
        _experiment(tiny, strict_out, models=["din"])
    # the resolved settings repeat the protocol
    from srp4ctr.runconfig import load_run_config

    assert load_run_config(strict_out / "config.yaml")["experiment"]["strict_time"] is True


def _has_lightgbm() -> bool:
    try:
        import lightgbm  # noqa: F401
    except ImportError:
        return False
    return True


def test_cli_flag_and_settings_file(tmp_path):
    from srp4ctr.cli import build_parser, experiment_settings

    def settings(*argv):
        return experiment_settings(build_parser().parse_args(["experiment", "--out", "x", *argv]))

    assert settings()["strict_time"] is False
    assert settings("--strict-time")["strict_time"] is True
    f = tmp_path / "c.yaml"
    f.write_text("experiment:\n  strict_time: true\n")
    assert settings("--config", str(f))["strict_time"] is True
    assert settings("--config", str(f), "--no-strict-time")["strict_time"] is False
    f.write_text("experiment:\n  strict_time: false\n")
    assert settings("--config", str(f), "--strict-time")["strict_time"] is True
    f.write_text("experiment:\n  strict_time: maybe\n")
    with pytest.raises(InputError, match="experiment.strict_time must be true or false"):
        settings("--config", str(f))
