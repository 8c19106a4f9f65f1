"""Loaders of every supported format, on small files the tests write, and the data contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from data_fixtures import (
    random_ratings,
    random_taobao,
    small_ml1m,  # noqa: F401  (fixture)
    write_lines,
    write_ml_csv,
    write_ml_dat,
    write_taobao,
)

from srp4ctr import data
from srp4ctr.data import features as F
from srp4ctr.data import loaders
from srp4ctr.errors import DataError, InputError


def check_contract(ds: data.PreparedDataset) -> None:
    """Every structural promise of the package docstring."""
    N, nu, ni = ds.n_interactions, ds.n_users, ds.n_items
    assert ds.user.dtype == np.int32 and ds.item.dtype == np.int32
    assert ds.timestamp.dtype == np.int64 and ds.label.dtype == np.int8 and ds.split.dtype == np.int8
    assert ds.user.shape == ds.item.shape == ds.timestamp.shape == ds.label.shape == (N,)
    assert ds.user.min() == 1 and ds.user.max() == nu and len(np.unique(ds.user)) == nu
    assert ds.item.min() >= 1 and ds.item.max() == ni and len(np.unique(ds.item)) == ni
    assert ds.user_offsets.dtype == np.int64 and ds.user_offsets.shape == (nu + 1,)
    assert ds.user_offsets[0] == 0 and ds.user_offsets[-1] == N
    for u in (1, nu):
        assert np.all(ds.user[ds.user_offsets[u - 1] : ds.user_offsets[u]] == u)
    # sorted by (user, timestamp, raw item id)
    key = np.lexsort((ds.item_raw[ds.item], ds.timestamp, ds.user))
    assert np.array_equal(key, np.arange(N))
    assert set(np.unique(ds.label)) <= {0, 1}
    # split rule, per user
    for u in range(1, nu + 1):
        s = ds.split[ds.user_offsets[u - 1] : ds.user_offsets[u]]
        n = s.size
        want = np.where(np.arange(n) < (8 * n) // 10, 0, np.where(np.arange(n) < (9 * n) // 10, 1, 2))
        assert np.array_equal(s, want)
    assert ds.vocab["item"] == ni + 2
    assert ds.item_fields == ["item", *ds.item_table]
    for f, t in ds.item_table.items():
        assert t.dtype == np.int64 and t.shape[0] == ni + 2
        assert not t[0].any() and not t[ni + 1].any()
        assert t.min() >= 0 and t.max() < ds.vocab[f]
        assert (t.ndim == 2) == (f in ds.multi_fields)
    for f in ds.behaviour_fields:
        b = ds.behaviour[f]
        assert b.dtype.kind == "u" and b.dtype.itemsize <= 2 and b.shape == (N,)
        assert b.min() >= 1 and b.max() < ds.vocab[f]
    for f, t in ds.user_table.items():
        assert t.shape == (nu + 1,) and t[0] == 0 and t.max() < ds.vocab[f]
    assert len(ds.item_raw) == ni + 1 and len(ds.user_raw) == nu + 1
    json.dumps(ds.meta)
    s = ds.summary()
    for k in ("dataset", "n_users", "n_items", "n_interactions", "positive_rate", "seq_len",
              "splits", "vocab", "fingerprint", "cache_path"):
        assert k in s
    assert sum(s["splits"].values()) == N
    json.dumps(s)
    assert len(ds.fingerprint) == 64


def rows_of(ds: data.PreparedDataset, raw_user) -> list[tuple]:
    u = int(ds.encode_users([raw_user])[0])
    sl = slice(ds.user_offsets[u - 1], ds.user_offsets[u])
    return list(zip(ds.item_raw[ds.item[sl]].tolist(), ds.timestamp[sl].tolist()))


# ----------------------------------------------------------------------------- MovieLens .dat
def test_ml1m_small_handmade(tmp_path):
    ratings = [
        (5, 30, 4, 100),
        (5, 10, 2, 100),  # same second as item 30: item 10 comes first
        (5, 20, 5, 50),
        (9, 10, 3, 10),
    ]
    movies = [(10, "Heat (1995)", "Action|Crime|Thriller"), (20, "Toy Story (1995)", "Animation"),
              (30, "Metropolis (1927)", "Drama|Sci-Fi"), (40, "Unrated (2000)", "Drama")]
    users = [(5, "F", 25, 3, "111"), (9, "M", 1, 10, "222")]
    folder = write_ml_dat(tmp_path / "ml-1m", ratings, movies, users)
    ds = data.prepare("ml-1m", path=folder, data_dir=tmp_path / "c", progress=False)
    check_contract(ds)
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (2, 3, 4)
    assert ds.item_raw[1:].tolist() == [10, 20, 30]  # movie 40 was never rated
    assert rows_of(ds, 5) == [(20, 50), (10, 100), (30, 100)]
    assert ds.label.tolist() == [1, 0, 1, 0]  # rating >= 4 (user 5: 5, 2, 4; user 9: 3)
    # each distinct rating value (here 2, 3, 4, 5) gets a token in sorted order
    assert ds.meta["behaviour_values"] == [2.0, 3.0, 4.0, 5.0]
    assert ds.behaviour["rating"].tolist() == [4, 1, 3, 2]
    assert ds.behaviour["gap"].tolist() == [F.GAP_FIRST, F.GAP_LOG_BASE + 5, F.GAP_ZERO, F.GAP_FIRST]
    # user 5 has 3 interactions: floor(2.4) = 2 train, floor(2.7) = 2 -> 0 valid, 1 test
    assert ds.split.tolist() == [0, 0, 2, 2]
    genre = ds.item_table["genre"]
    names = ds.meta["field_values"]["genre"]
    assert [names[g] for g in genre[1] if g] == ["Action", "Crime", "Thriller"]
    assert [names[g] for g in genre[3] if g] == ["Drama", "Sci-Fi"]
    assert genre.shape == (5, 3)
    years = ds.meta["field_values"]["year"]
    assert years[ds.item_table["year"][1]] == "1995-1999" and years[ds.item_table["year"][3]] == "1925-1929"
    assert ds.user_fields == ["age", "gender", "occupation"]
    ages = ds.meta["field_values"]["age"]
    assert ages[ds.user_table["age"][1]] == "25-34" and ages[ds.user_table["age"][2]] == "<18"
    assert ds.meta["field_values"]["gender"][ds.user_table["gender"][1]] == "F"


def test_ml1m_random(small_ml1m):
    ds = small_ml1m
    check_contract(ds)
    ratings = small_ml1m._test_ratings
    assert ds.n_interactions == len(ratings)
    assert ds.n_users == len({r[0] for r in ratings})
    assert ds.n_items == len({r[1] for r in ratings})
    # the rows of each user, in (timestamp, raw item id) order, are exactly the file's rows
    for raw_u in sorted({r[0] for r in ratings})[:5]:
        want = sorted((t, i) for u, i, _, t in ratings if u == raw_u)
        assert rows_of(ds, raw_u) == [(i, t) for t, i in want]
    n = ds.seq_lengths()
    tr, va = (8 * n) // 10, (9 * n) // 10
    assert ds.split_counts() == {"train": int(tr.sum()), "valid": int((va - tr).sum()),
                                 "test": int((n - va).sum())}
    want_pos = np.mean([r[2] >= 4 for r in ratings])
    assert ds.summary()["positive_rate"] == pytest.approx(want_pos, abs=1e-6)


def test_ml10m_half_stars_and_no_users(tmp_path):
    ratings = random_ratings(n_users=8, n_items=20, seed=3, half_stars=True)
    folder = write_ml_dat(tmp_path / "ml-10M100K", ratings)
    ds = data.prepare("ml-10m", path=folder / "ratings.dat", data_dir=tmp_path / "c", progress=False)
    check_contract(ds)
    values = sorted({r[2] for r in ratings})
    assert ds.meta["behaviour_values"] == values
    assert ds.vocab["rating"] == len(values) + 1
    assert ds.user_table == {} and ds.user_fields == []
    # rating tokens decode back to the file's ratings, labels follow rating >= 4
    raw = np.array(ds.meta["behaviour_values"])[ds.behaviour["rating"] - 1]
    assert np.array_equal(ds.label, (raw >= 4).astype(np.int8))
    assert sorted(raw.tolist()) == sorted(r[2] for r in ratings)


# ----------------------------------------------------------------------------- MovieLens .csv
def test_ml20m_csv(tmp_path):
    ratings = random_ratings(n_users=10, n_items=30, seed=4, half_stars=True)
    folder = write_ml_csv(tmp_path / "ml-20m", ratings)
    ds = data.prepare("ml-20m", path=folder, data_dir=tmp_path / "c", progress=False)
    check_contract(ds)
    assert ds.n_interactions == len(ratings)
    names = ds.meta["field_values"]["genre"]
    i = int(ds.encode_items([15])[0])  # raw 15: odd -> "Comedy|Drama", year 1965
    assert [names[g] for g in ds.item_table["genre"][i] if g] == ["Comedy", "Drama"]
    assert ds.meta["field_values"]["year"][ds.item_table["year"][i]] == "1965-1969"
    j = int(ds.encode_items([25])[0])  # odd too; raw 5 would be even
    assert j != i
    for name in ("ml-25m", "ml-latest-small"):
        other = data.prepare(name, path=folder / "ratings.csv", data_dir=tmp_path / "c", progress=False)
        assert np.array_equal(other.item, ds.item) and np.array_equal(other.timestamp, ds.timestamp)


def test_year_from_title():
    assert loaders.year_from_title("Toy Story (1995)") == 1995
    assert loaders.year_from_title("Babylon 5 (1994) ") == 1994
    assert loaders.year_from_title("Fight Club (1999) (Special)") == 1999
    assert np.isnan(loaders.year_from_title("Untitled"))
    assert F.year_bucket([1995, 1900, np.nan, 2100]).tolist() == [
        3 + (1995 - 1920) // 5, 2, F.YEAR_UNKNOWN, F.YEAR_VOCAB - 1]


# ----------------------------------------------------------------------------- Taobao
def test_taobao(tmp_path):
    rows = random_taobao(seed=5)
    path = write_taobao(tmp_path / "tb" / "UserBehavior.csv", rows)
    ds = data.prepare("taobao", path=path.parent, data_dir=tmp_path / "c", progress=False)
    check_contract(ds)
    assert ds.n_interactions == len(rows)
    assert ds.behaviour_fields == ["behavior", "gap", "hour", "weekday"]
    assert ds.meta["behaviour_values"] == ["pv", "cart", "fav", "buy"]
    beh = np.array(["pv", "cart", "fav", "buy"])[ds.behaviour["behavior"] - 1]
    assert np.array_equal(ds.label, np.isin(beh, ["cart", "fav", "buy"]).astype(np.int8))
    assert sorted(beh.tolist()) == sorted(r[3] for r in rows)
    cats = ds.meta["field_values"]["category"]
    want = {r[1]: r[2] for r in rows}
    for i in range(1, ds.n_items + 1):
        assert cats[ds.item_table["category"][i]] == str(want[int(ds.item_raw[i])])
    assert ds.item_fields == ["item", "category"]


def test_taobao_chunked_reading_equals_one_pass(tmp_path):
    rows = random_taobao(seed=6)
    path = write_taobao(tmp_path / "UserBehavior.csv", rows)
    a = loaders.load_taobao(path, chunksize=7)
    b = loaders.load_taobao(path, chunksize=10**6)
    for k in ("user", "item", "timestamp", "values", "label"):
        assert np.array_equal(getattr(a, k), getattr(b, k))
    assert a.item.dtype == np.int32 and a.values.dtype == np.int8
    assert np.array_equal(a.item_row_fields["category"], b.item_row_fields["category"])


# ----------------------------------------------------------------------------- generic tables
def _generic_frame() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    n = 120
    return pd.DataFrame({
        "uid": [f"u{int(x)}" for x in rng.integers(0, 12, n)],
        "iid": rng.integers(0, 25, n) * 3,
        "ts": rng.integers(1_600_000_000, 1_600_050_000, n) // 1000 * 1000,  # many ties
        "score": rng.integers(1, 6, n).astype(float),
        "kind": rng.choice(["view", "like"], n),
        "genre_col": rng.choice(["a", "b", "c"], n),
    })


def test_generic_csv_and_parquet_agree(tmp_path):
    df = _generic_frame()
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_parquet(tmp_path / "t.parquet", index=False)
    cols = "user=uid,item=iid,timestamp=ts,rating=score,tag=genre_col"
    a = data.prepare("csv", path=tmp_path / "t.csv", columns=cols, data_dir=tmp_path / "c", progress=False)
    b = data.prepare("parquet", path=tmp_path / "t.parquet",
                     columns={"user": "uid", "item": "iid", "timestamp": "ts", "rating": "score",
                              "tag": "genre_col"},
                     data_dir=tmp_path / "c", progress=False)
    for ds in (a, b):
        check_contract(ds)
        assert ds.item_fields == ["item", "tag"]
        assert ds.behaviour_fields == ["rating", "gap", "hour", "weekday"]
        assert ds.meta["label_rule"] == "rating >= 4"
        assert ds.user_raw.dtype.kind == "U" and ds.item_raw.dtype.kind == "i"
    for k in ("user", "item", "timestamp", "label", "split"):
        assert np.array_equal(getattr(a, k), getattr(b, k))
    assert np.array_equal(a.item_table["tag"], b.item_table["tag"])
    assert a.n_interactions == len(df)
    # the side column is the item's value at its earliest interaction
    first = df.sort_values(["iid", "ts"], kind="stable").groupby("iid").first()["genre_col"]
    tags = a.meta["field_values"]["tag"]
    for i in range(1, a.n_items + 1):
        assert tags[a.item_table["tag"][i]] == first[int(a.item_raw[i])]


def test_generic_label_behaviour_and_dates(tmp_path):
    df = _generic_frame()
    df["clicked"] = (df["score"] >= 3).astype(int)
    df["when"] = pd.to_datetime(df["ts"], unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    df.to_csv(tmp_path / "t.csv", index=False)
    ds = data.prepare(
        "csv", path=tmp_path / "t.csv",
        columns=json.dumps({"user": "uid", "item": "iid", "timestamp": "when", "label": "clicked",
                            "behavior": "kind"}),
        data_dir=tmp_path / "c", progress=False,
    )
    check_contract(ds)
    assert ds.behaviour_fields == ["behavior", "gap", "hour", "weekday"]
    assert ds.meta["behaviour_values"] == ["like", "view"]
    assert ds.label.sum() == df["clicked"].sum()
    assert ds.timestamp.min() == df["ts"].min() and ds.timestamp.max() == df["ts"].max()


def test_generic_default_mapping_implicit(tmp_path):
    write_lines(tmp_path / "x.csv", ["user,item,timestamp", "1,10,5", "1,11,6", "2,10,7"])
    ds = data.prepare("csv", path=tmp_path, data_dir=tmp_path / "c", progress=False)
    assert ds.n_interactions == 3 and ds.label.tolist() == [1, 1, 1]
    assert ds.behaviour_fields == ["gap", "hour", "weekday"]
    assert "implicit" in ds.meta["label_rule"]


def test_parse_columns():
    want = {"user": "a", "item": "b", "timestamp": "c", "category": "d"}
    assert loaders.parse_columns("user=a, item=b,timestamp=c,category=d") == want
    assert loaders.parse_columns(json.dumps(want)) == want
    assert loaders.parse_columns(want) == want
    from srp4ctr.errors import InputError

    with pytest.raises(InputError, match="timestamp"):
        loaders.parse_columns("user=a,item=b")
    with pytest.raises(InputError):
        loaders.parse_columns("user=a,item=b,timestamp=c,gap=z")  # reserved field name
    with pytest.raises(InputError):
        loaders.parse_columns("user=a,item")


# ----------------------------------------------------------------------------- cache
def test_cache_reuse_force_and_source_change(tmp_path):
    folder = write_ml_dat(tmp_path / "ml", random_ratings(n_users=5, seed=8))
    kw = dict(path=folder, data_dir=tmp_path / "c", progress=False)
    a = data.prepare("ml-1m", **kw)
    assert not a.from_cache and a.path.parent == tmp_path / "c"
    assert a.path.name.startswith("ml-1m-")
    arrays = a.path / "arrays" / "item.npy"
    m0 = arrays.stat().st_mtime_ns
    b = data.prepare("ml-1m", **kw)
    assert b.from_cache and arrays.stat().st_mtime_ns == m0
    assert b.fingerprint == a.fingerprint and b.summary()["from_cache"]
    assert np.array_equal(b.item_table["genre"], a.item_table["genre"])
    c = data.prepare("ml-1m", force=True, **kw)
    assert not c.from_cache and c.fingerprint == a.fingerprint
    # editing the source invalidates the cache
    with open(folder / "ratings.dat", "a") as f:
        f.write("99999::5::4::1\n")
    d = data.prepare("ml-1m", **kw)
    assert not d.from_cache and d.n_interactions == a.n_interactions + 1
    # a corrupted cache is rebuilt, not trusted
    (d.path / "arrays" / "item.npy").write_bytes(b"garbage")
    e = data.prepare("ml-1m", **kw)
    assert not e.from_cache and e.fingerprint == d.fingerprint
    assert [p.name for p in (tmp_path / "c").iterdir()] == [d.path.name]


def test_prepared_arrays_are_memory_mapped_and_equal_the_built_ones(tmp_path):
    """The cache is one .npy per array, opened read-only with mmap_mode="r"; the mapped
    dataset equals the one built in memory array by array (values, dtypes, fingerprint) and
    gives the same training batches."""
    from srp4ctr.data import loaders as L
    from srp4ctr.data.pipeline import build
    from srp4ctr.data.samples import CTRDataset, PretrainDataset

    folder = write_ml_dat(tmp_path / "ml", random_ratings(n_users=9, seed=11))
    ds = data.prepare("ml-1m", path=folder, data_dir=tmp_path / "c", progress=False)
    built = build(L.load_movielens_dat(folder, "ml-1m"), "ml-1m", source=ds.meta["source"])
    assert built.compute_fingerprint() == ds.fingerprint
    mapped = data.load_prepared(ds.path)

    def mapped_file(a: np.ndarray) -> bool:
        while a is not None and not isinstance(a, np.memmap):
            a = a.base if isinstance(a.base, np.ndarray) else None
        return a is not None

    for a in (mapped.user, mapped.item, mapped.timestamp, mapped.label, mapped.split,
              *mapped.behaviour.values()):
        assert mapped_file(a) and not a.flags.writeable
    assert mapped.behaviour["gap"].dtype == np.uint8  # tokens stored compact, not int64
    whole = data.load_prepared(ds.path, mmap=False)
    assert not mapped_file(whole.item)
    for other in (mapped, whole, ds):
        assert other.compute_fingerprint() == built.fingerprint
        for k, v in built.arrays().items():
            w = other.arrays()[k]
            assert np.array_equal(w, v), k
            if not k.startswith("behaviour__"):
                assert w.dtype == v.dtype, k
    for make in (lambda d: CTRDataset(d, "valid", max_len=5),
                 lambda d: PretrainDataset(d, max_len=5)):
        a, b = make(built), make(mapped)
        idx = np.arange(len(a))
        ba, bb = a.batch(idx), b.batch(idx)
        assert ba.keys() == bb.keys()
        for k in ba:
            assert ba[k].dtype == bb[k].dtype and torch.equal(ba[k], bb[k]), k
        assert all(np.array_equal(np.asarray(a[i][k]), np.asarray(b[i][k]))
                   for i in (0, len(a) - 1) for k in a[i])


def test_older_npz_caches_are_still_read(tmp_path):
    folder = write_ml_dat(tmp_path / "ml", random_ratings(n_users=5, seed=12))
    ds = data.prepare("ml-1m", path=folder, data_dir=tmp_path / "c", progress=False)
    old = tmp_path / "old"
    old.mkdir()
    arrays = {k: np.asarray(v) for k, v in ds.arrays().items()}
    np.savez(old / "arrays.npz", **arrays)
    meta = dict(ds.meta, fingerprint=ds.fingerprint)
    meta.pop("storage", None)
    (old / "meta.json").write_text(json.dumps(meta))
    again = data.load_prepared(old)
    assert again.compute_fingerprint() == ds.fingerprint
    assert np.array_equal(again.item, ds.item)
    # a truncated .npy file is a DataError naming it, not a numpy traceback
    (ds.path / "arrays" / "timestamp.npy").write_bytes(
        (ds.path / "arrays" / "timestamp.npy").read_bytes()[:100])
    with pytest.raises(DataError, match="timestamp"):
        data.load_prepared(ds.path)


def test_saving_over_a_mapped_folder_and_missing_or_stray_files(tmp_path):
    """save() into the folder a dataset is memory-mapped from keeps it intact (each file is
    written beside and renamed over), drops an earlier save's extra arrays, and a folder that
    lost an array is a DataError naming the file, with or without verify."""
    folder = write_ml_dat(tmp_path / "ml", random_ratings(n_users=6, seed=13))
    ds = data.prepare("ml-1m", path=folder, data_dir=tmp_path / "c", progress=False)
    mapped = data.load_prepared(ds.path)
    want = {k: np.array(v) for k, v in mapped.arrays().items()}
    stray = ds.path / "arrays" / "behaviour__zzz.npy"
    np.save(stray, np.zeros(3, np.uint8))
    mapped.save(ds.path)
    assert not stray.exists() and not list((ds.path / "arrays").glob("*.tmp"))
    for k, v in mapped.arrays().items():  # the old mapping still reads what it did
        assert np.array_equal(v, want[k]), k
    again = data.load_prepared(ds.path)
    assert again.compute_fingerprint() == ds.fingerprint
    assert set(again.behaviour) == set(ds.behaviour)
    np.save(stray, np.zeros(3, np.uint8))  # a file meta.json does not list is not read
    assert set(data.load_prepared(ds.path).behaviour) == set(ds.behaviour)
    (ds.path / "arrays" / "behaviour__gap.npy").unlink()
    for verify in (True, False):
        with pytest.raises(DataError, match="behaviour__gap.npy missing"):
            data.load_prepared(ds.path, verify=verify)
    meta = json.loads((ds.path / "meta.json").read_text())
    (ds.path / "meta.json").write_text(json.dumps({**meta, "arrays": ["../meta"]}))
    with pytest.raises(DataError, match="'arrays'"):
        data.load_prepared(ds.path)


def test_load_prepared_and_env_data_dir(tmp_path, monkeypatch):
    folder = write_ml_dat(tmp_path / "ml", random_ratings(n_users=4, seed=9))
    monkeypatch.setenv("SRP4CTR_DATA_DIR", str(tmp_path / "envdir"))
    ds = data.prepare("ml-1m", path=folder, progress=False)
    assert ds.path.parent == tmp_path / "envdir"
    again = data.load_prepared(ds.path)
    assert again.fingerprint == ds.fingerprint == again.compute_fingerprint()
    for k, v in ds.arrays().items():
        assert np.array_equal(again.arrays()[k], v)
        assert again.arrays()[k].dtype == v.dtype
    with pytest.raises(DataError):
        data.load_prepared(tmp_path / "nowhere")


def test_building_in_blocks_equals_one_pass(tmp_path, monkeypatch):
    """The memory-bounded build (ids factorised through a presence table, behaviour tokens
    computed block by block of whole users) gives the arrays of the plain one-pass way."""
    from srp4ctr.data import loaders as L
    from srp4ctr.data import pipeline as P

    rng = np.random.default_rng(5)
    for ids in (rng.integers(0, 50, 1000), rng.integers(0, 2**40, 300), np.array([7]),
                rng.integers(0, 2**20, 5000).astype(np.int32), np.array(["b", "a", "b", "c"])):
        uniq, inv = P._factorize(ids)
        want_u, want_inv = np.unique(ids, return_inverse=True)
        assert np.array_equal(uniq, want_u) and uniq.dtype == want_u.dtype
        assert np.array_equal(inv, want_inv.reshape(-1)) and inv.dtype == np.int32
    folder = write_ml_dat(tmp_path / "ml", random_ratings(n_users=30, seed=13))
    one = P.build(L.load_movielens_dat(folder, "ml-1m"), "ml-1m")
    monkeypatch.setattr(P, "_TOKEN_BLOCK", 7)  # many blocks, cut at user boundaries
    blocks = P.build(L.load_movielens_dat(folder, "ml-1m"), "ml-1m", consume=True)
    assert blocks.compute_fingerprint() == one.compute_fingerprint()
    ts = one.timestamp
    want = F.behaviour_features(ts, np.asarray(one.value_vocab)[one.behaviour["rating"] - 1],
                                kind="rating", vocab=one.value_vocab, offsets=one.user_offsets)
    for f, v in want.items():
        assert np.array_equal(blocks.behaviour[f], v), f
        assert blocks.behaviour[f].dtype == np.uint8


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS (Linux)")
def test_dropping_mapped_pages_keeps_the_values_and_frees_the_residency(tmp_path):
    from srp4ctr._memory import drop_mapped_pages, proc_status_mib

    def rss_mib() -> float:
        return proc_status_mib("VmRSS")

    a = np.arange(8_000_000, dtype=np.int64)  # 61 MiB
    np.save(tmp_path / "a.npy", a)
    m = np.ascontiguousarray(np.load(tmp_path / "a.npy", mmap_mode="r"), dtype=np.int64)
    del a
    total = int(m.sum())  # every page resident
    before = rss_mib()
    drop_mapped_pages(m, np.zeros(3))  # a plain array is left alone
    assert before - rss_mib() > 40
    assert int(m.sum()) == total and m[12345] == 12345  # read again from the page cache


def test_training_counts_in_blocks_equal_one_bincount(tmp_path, monkeypatch):
    from srp4ctr.data import dataset as D

    folder = write_ml_dat(tmp_path / "ml", random_ratings(n_users=7, seed=14))
    ds = data.prepare("ml-1m", path=folder, data_dir=tmp_path / "c", progress=False)
    tr = ds.split == 0
    f_item = next(iter(ds.item_table))
    f_beh = next(iter(ds.behaviour))
    sizes = {"item": ds.n_items + 2, f_item: int(ds.item_table[f_item].max()) + 1,
             f_beh: int(ds.behaviour[f_beh].max()) + 1}
    want = {"item": np.bincount(ds.item[tr], minlength=sizes["item"]),
            f_item: np.bincount(ds.item_table[f_item][ds.item[tr]].reshape(-1),
                                minlength=sizes[f_item]),
            f_beh: np.bincount(ds.behaviour[f_beh][tr], minlength=sizes[f_beh])}
    for block in (7, 1 << 23):
        monkeypatch.setattr(D, "_COUNT_BLOCK", block)
        got = ds.training_counts(sizes)
        for f in sizes:
            assert got[f].dtype == np.int64 and np.array_equal(got[f], want[f]), (f, block)
    with pytest.raises(InputError, match="no field 'nope'"):
        ds.training_counts({"nope": 3})
