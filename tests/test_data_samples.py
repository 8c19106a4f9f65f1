"""Samples: no leakage into pre-training, CTR histories, uni100 negatives, next-item, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_fixtures import small_ml1m  # noqa: F401  (fixture)

from srp4ctr.data.samples import CTRDataset, NextItemDataset, PretrainDataset, collate
from srp4ctr.errors import InputError


def _rows(batch):
    """Flat row ids of every real history position of a batch."""
    hr = batch["hist_row"]
    return hr[hr >= 0].numpy()


@pytest.mark.parametrize("windows", [False, True])
@pytest.mark.parametrize("max_len", [3, 200])
def test_pretrain_sees_only_training_interactions(small_ml1m, windows, max_len):
    ds = small_ml1m
    pre = PretrainDataset(ds, max_len=max_len, windows=windows, return_rows=True)
    seen = []
    for batch in pre.batches(7, shuffle=True, seed=1):
        rows = _rows(batch)
        assert np.all(ds.split[rows] == 0), "a validation/test interaction reached pre-training"
        # the row ids really are the interactions shown: items and users agree
        hr, m = batch["hist_row"], batch["hist_row"] >= 0
        assert torch.equal(batch["hist_item"][m], torch.from_numpy(ds.item[hr[m].numpy()].astype(np.int64)))
        assert np.all(ds.user[rows] == np.repeat(batch["user"].numpy(), batch["hist_len"].numpy()))
        assert int(batch["hist_len"].max()) <= max_len
        seen.append(rows)
    seen = np.concatenate(seen)
    n_train = np.bincount(ds.user[ds.split == 0], minlength=ds.n_users + 1)[1:]
    assert len(pre) == (int(np.sum(-(-n_train // max_len))) if windows else int((n_train > 0).sum()))
    if windows:  # the windows cover every training interaction exactly once
        assert np.array_equal(np.sort(seen), np.flatnonzero(ds.split == 0))
    else:  # each user's latest training interactions, oldest first
        for i in range(len(pre)):
            s = pre[i]
            u = s["user"]
            tr = np.flatnonzero((ds.user == u) & (ds.split == 0))
            assert np.array_equal(s["hist_row"], tr[-max_len:])
    # users with an empty training part (one or two interactions... floor(0.8 n) = 0) are skipped
    empty = np.flatnonzero(n_train == 0) + 1
    assert not set(empty.tolist()) & set(pre.users.tolist())
    assert len(empty) > 0  # the fixture has such users


def test_ctr_samples(small_ml1m):
    ds = small_ml1m
    for split, name in enumerate(["train", "valid", "test"]):
        c = CTRDataset(ds, name, max_len=4, return_rows=True)
        assert len(c) == int((ds.split == split).sum())
        for batch in c.batches(16):
            row = batch["row"].numpy()
            assert np.all(ds.split[row] == split)
            assert torch.equal(batch["cand_item"], torch.from_numpy(ds.item[row].astype(np.int64)))
            assert torch.equal(batch["label"], torch.from_numpy(ds.label[row].astype(np.float32)))
            assert batch["label"].dtype == torch.float32
            for b in range(row.size):
                r = int(row[b])
                u = int(batch["user"][b])
                start = ds.user_offsets[u - 1]
                want = np.arange(max(start, r - 4), r)  # strictly before, same user, any split
                got = batch["hist_row"][b].numpy()
                got = got[got >= 0]
                assert np.array_equal(got, want)
                assert np.all(ds.timestamp[got] <= ds.timestamp[r])
                assert int(batch["hist_len"][b]) == want.size <= 4
                # right-padded with zeros
                assert not batch["hist_item"][b, want.size :].any()
    # a user's first interaction has an empty history
    c = CTRDataset(ds, "test", max_len=4)
    lens = c.hist_lengths()
    assert (lens == 0).any()
    i = int(np.flatnonzero(lens == 0)[0])
    b = c.batch([i])
    assert b["hist_len"].tolist() == [0] and b["hist_item"].shape == (1, 1)


def test_uni100_negatives(small_ml1m):
    ds = small_ml1m
    c = CTRDataset(ds, "train", max_len=5, negatives="uni100", n_negatives=3, seed=4)
    pos_rows = np.flatnonzero((ds.split == 0) & (ds.label == 1))
    assert len(c) == 4 * pos_rows.size
    assert c.extras["label"].reshape(-1, 4).tolist() == [[1, 0, 0, 0]] * pos_rows.size
    cand = c.extras["cand_item"].reshape(-1, 4)
    assert np.array_equal(cand[:, 0], ds.item[pos_rows])
    for k, r in enumerate(pos_rows):
        u = ds.user[r]
        own = set(ds.item[ds.user == u].tolist())  # every split
        assert not own & set(cand[k, 1:].tolist())
        assert np.all((cand[k, 1:] >= 1) & (cand[k, 1:] <= ds.n_items))
    # same history for the positive and its negatives
    assert np.all(c.start.reshape(-1, 4) == c.start.reshape(-1, 4)[:, :1])
    # deterministic per seed, redrawn per epoch
    again = CTRDataset(ds, "train", max_len=5, negatives="uni100", n_negatives=3, seed=4)
    assert np.array_equal(again.extras["cand_item"], c.extras["cand_item"])
    c.set_epoch(1)
    assert not np.array_equal(again.extras["cand_item"], c.extras["cand_item"])
    with pytest.raises(InputError):
        CTRDataset(ds, "train", negatives="pop")
    with pytest.raises(InputError):
        CTRDataset(ds, "dev")


def test_next_item(small_ml1m):
    ds = small_ml1m
    for split in ("valid", "test"):
        s = 1 if split == "valid" else 2
        nx = NextItemDataset(ds, split, max_len=6, n_negatives=20, return_rows=True)
        users_with = np.unique(ds.user[ds.split == s])
        assert np.array_equal(np.sort(nx.users), users_with)
        b = nx.batch(np.arange(len(nx)))
        for k in range(len(nx)):
            u = int(b["user"][k])
            r = int(b["row"][k])
            assert r == np.flatnonzero((ds.user == u) & (ds.split == s))[0]
            assert int(b["target_item"][k]) == ds.item[r]
            hist = b["hist_row"][k].numpy()
            hist = hist[hist >= 0]
            assert np.array_equal(hist, np.arange(max(ds.user_offsets[u - 1], r - 6), r))
            assert np.all(ds.split[hist] < s)  # valid: train part only; test: train + valid
            own = set(ds.item[ds.user == u].tolist())
            assert not own & set(b["neg_item"][k].tolist())
        assert b["neg_item"].shape == (len(nx), 20)
    with pytest.raises(InputError):
        NextItemDataset(ds, "train")


@pytest.mark.parametrize("kind", ["pretrain", "ctr", "uni100", "next"])
def test_collate_equals_batch(small_ml1m, kind):
    ds = small_ml1m
    kw = dict(item_features=True, return_rows=True)
    s = {
        "pretrain": lambda: PretrainDataset(ds, 8, **kw),
        "ctr": lambda: CTRDataset(ds, "test", 8, **kw),
        "uni100": lambda: CTRDataset(ds, "train", 8, "uni100", **kw),
        "next": lambda: NextItemDataset(ds, "valid", 8, n_negatives=5, **kw),
    }[kind]()
    idx = np.random.default_rng(0).choice(len(s), size=min(9, len(s)), replace=False)
    a = s.batch(idx)
    b = collate([s[int(i)] for i in idx])
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    L = a["hist_item"].shape[1]
    assert L == max(1, int(a["hist_len"].max()))
    for f in ds.behaviour_fields:
        assert a[f"hist_{f}"].shape == (len(idx), L)
    assert a["hist_genre"].shape == (len(idx), L, ds.item_table["genre"].shape[1])
    for f in ds.user_fields:
        assert a[f"user_{f}"].shape == (len(idx),)
    # fixed width
    p = s.__class__.__new__(s.__class__)
    p.__dict__.update(s.__dict__, pad_to=12)
    assert p.batch(idx)["hist_item"].shape == (len(idx), 12)
    assert collate([s[int(i)] for i in idx], pad_to=12)["hist_rating"].shape == (len(idx), 12)


def test_dataloader_and_batches_cover_everything(small_ml1m):
    ds = small_ml1m
    c = CTRDataset(ds, "train", max_len=10)
    loader = torch.utils.data.DataLoader(c, batch_size=32, collate_fn=collate)
    n = sum(b["cand_item"].shape[0] for b in loader)
    assert n == len(c)
    seen = np.concatenate([b["cand_item"].numpy() for b in c.batches(32, shuffle=True, seed=3)])
    assert np.array_equal(np.sort(seen), np.sort(c.extras["cand_item"]))
    assert sum(1 for _ in c.batches(32, drop_last=True)) == len(c) // 32 == c.n_batches(32, True)
