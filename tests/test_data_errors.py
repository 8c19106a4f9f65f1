"""Bad input: each failure is a typed error naming the file (and line), and leaves no cache."""

from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import dir_entries, random_ratings, write_lines, write_ml_csv, write_ml_dat

from srp4ctr import data
from srp4ctr.data import dataset as dataset_mod
from srp4ctr.data import pipeline as prepare_mod
from srp4ctr.errors import DataError, InputError, UnknownDatasetError


def _prep(name, path, tmp_path, **kw):
    return data.prepare(name, path=path, data_dir=tmp_path / "cache", progress=False, **kw)


def _no_cache_left(tmp_path):
    assert dir_entries(tmp_path / "cache") == []


@pytest.mark.parametrize(
    "bad_line, why",
    [
        ("3::20::4", "expected 4 fields"),  # too few fields
        ("3::20::4::noon", "not an integer"),  # non-numeric timestamp
        ("3::20::great::978300000", "not a number"),  # non-numeric rating
        ("3::20::4::978300000::extra", "expected 4 fields"),  # too many fields
    ],
)
def test_malformed_ratings_dat_names_file_and_line(tmp_path, bad_line, why):
    folder = write_ml_dat(tmp_path / "ml", [(1, 10, 4, 100), (2, 20, 3, 200)])
    with open(folder / "ratings.dat", "a") as f:
        f.write(bad_line + "\n4::10::5::300\n")
    with pytest.raises(DataError, match=why) as e:
        _prep("ml-1m", folder, tmp_path)
    assert e.value.line == 3 and e.value.path.endswith("ratings.dat")
    assert "ratings.dat:3" in str(e.value)
    _no_cache_left(tmp_path)


def test_malformed_movies_dat(tmp_path):
    folder = write_ml_dat(tmp_path / "ml", [(1, 10, 4, 100)], movies=[(10, "A (1990)", "Drama")])
    with open(folder / "movies.dat", "a") as f:
        f.write("\nx11::B (1991)::Drama\n")
    with pytest.raises(DataError, match=r"movies\.dat:3"):
        _prep("ml-1m", folder, tmp_path)
    _no_cache_left(tmp_path)


def test_ml20m_missing_columns_and_bad_line(tmp_path):
    folder = write_ml_csv(tmp_path / "ml", random_ratings(n_users=3, seed=0))
    good = (folder / "ratings.csv").read_text()
    (folder / "ratings.csv").write_text(good.replace("userId,movieId,rating,timestamp", "userId,movieId,stars,ts"))
    with pytest.raises(DataError, match=r"missing column.*'rating'.*'timestamp'"):
        _prep("ml-20m", folder, tmp_path)
    lines = good.splitlines()
    lines[4] = lines[4].rsplit(",", 1)[0] + ",yesterday"
    (folder / "ratings.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"ratings\.csv:5") as e:
        _prep("ml-20m", folder, tmp_path)
    assert e.value.line == 5
    _no_cache_left(tmp_path)


def test_taobao_bad_behaviour_and_short_row(tmp_path):
    rows = [f"{u},{i},7,pv,{1511500000 + i}" for u in range(3) for i in range(4)]
    p = write_lines(tmp_path / "UserBehavior.csv", rows[:5] + ["1,2,7,click,1511500000"] + rows[5:])
    with pytest.raises(DataError, match=r"UserBehavior\.csv:6.*click"):
        _prep("taobao", p, tmp_path)
    p = write_lines(tmp_path / "UserBehavior.csv", rows[:8] + ["1,2,7,pv"] + rows[8:])
    with pytest.raises(DataError, match=r"UserBehavior\.csv:9"):
        _prep("taobao", p, tmp_path)
    _no_cache_left(tmp_path)


def test_generic_missing_columns_bad_values(tmp_path):
    p = write_lines(tmp_path / "t.csv", ["uid,iid,ts", "a,1,10", "b,2,11", "a,3,oops", "b,4,12"])
    with pytest.raises(DataError, match=r"missing column.*'when'"):
        _prep("csv", p, tmp_path, columns="user=uid,item=iid,timestamp=when")
    with pytest.raises(DataError, match=r"t\.csv:4"):
        _prep("csv", p, tmp_path, columns="user=uid,item=iid,timestamp=ts")
    p = write_lines(tmp_path / "t.csv", ["uid,iid,ts,y", "a,1,10,1", "b,2,11,0", "a,3,12,2"])
    with pytest.raises(DataError, match=r"t\.csv:4"):
        _prep("csv", p, tmp_path, columns="user=uid,item=iid,timestamp=ts,label=y")
    p = write_lines(tmp_path / "t.csv", ["uid,iid,ts", "a,1,10", "b,,11"])
    with pytest.raises(DataError, match=r"t\.csv:3"):
        _prep("csv", p, tmp_path, columns="user=uid,item=iid,timestamp=ts")
    p = write_lines(tmp_path / "t.csv", ["uid,iid,ts", "a,1,10", "b,-2,11"])
    with pytest.raises(DataError, match="non-negative"):
        _prep("csv", p, tmp_path, columns="user=uid,item=iid,timestamp=ts")
    _no_cache_left(tmp_path)


def test_parquet_missing_column_and_missing_value(tmp_path):
    import pandas as pd

    pd.DataFrame({"u": [1, 2], "i": [3, 4], "t": [5.0, None]}).to_parquet(tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"missing column.*'ts'"):
        _prep("parquet", tmp_path / "x.parquet", tmp_path, columns="user=u,item=i,timestamp=ts")
    with pytest.raises(DataError, match=r"row 2"):
        _prep("parquet", tmp_path / "x.parquet", tmp_path, columns="user=u,item=i,timestamp=t")
    _no_cache_left(tmp_path)


def test_empty_datasets(tmp_path):
    folder = write_ml_dat(tmp_path / "ml", [], movies=[(1, "A (1990)", "Drama")])
    with pytest.raises(DataError, match="no interactions"):
        _prep("ml-1m", folder, tmp_path)
    p = write_lines(tmp_path / "e.csv", ["user,item,timestamp"])
    with pytest.raises(DataError, match="no interactions"):
        _prep("csv", p, tmp_path)
    (tmp_path / "z.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        _prep("csv", tmp_path / "z.csv", tmp_path)
    (tmp_path / "UserBehavior.csv").write_text("")
    with pytest.raises(DataError, match="no interactions"):
        _prep("taobao", tmp_path / "UserBehavior.csv", tmp_path)
    _no_cache_left(tmp_path)


def test_unknown_dataset_and_bad_arguments(tmp_path):
    with pytest.raises(UnknownDatasetError, match="ml-100k.*taobao.*parquet"):
        data.prepare("ml-3m", data_dir=tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        data.prepare("ml-1m", path=tmp_path / "nope", data_dir=tmp_path)
    with pytest.raises(InputError, match="path"):
        data.prepare("taobao", data_dir=tmp_path)
    with pytest.raises(DataError, match="ratings.dat"):
        data.prepare("ml-1m", path=tmp_path, data_dir=tmp_path / "c")
    with pytest.raises(InputError, match="columns"):
        data.prepare("ml-1m", path=tmp_path, columns="user=a", data_dir=tmp_path / "c")


def test_failure_while_writing_leaves_no_cache_and_keeps_old(tmp_path, monkeypatch):
    folder = write_ml_dat(tmp_path / "ml", random_ratings(n_users=4, seed=2))
    real_save = dataset_mod.PreparedDataset.save

    def broken_save(self, directory):
        real_save(self, directory)  # files fully written ...
        raise OSError("disk full")  # ... then the build fails before the rename

    monkeypatch.setattr(dataset_mod.PreparedDataset, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _prep("ml-1m", folder, tmp_path)
    _no_cache_left(tmp_path)
    monkeypatch.setattr(dataset_mod.PreparedDataset, "save", real_save)
    good = _prep("ml-1m", folder, tmp_path)

    def broken_build(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_mod, "build", broken_build)
    with pytest.raises(KeyboardInterrupt):
        _prep("ml-1m", folder, tmp_path, force=True)
    assert dir_entries(tmp_path / "cache") == [good.path.name]  # the old cache survives intact
    again = data.load_prepared(good.path)
    assert again.fingerprint == good.fingerprint
    assert np.array_equal(again.item, good.item)


# ------------------------------------------------------------------- hostile generic tables
def _csv(tmp_path, lines: list[bytes]) -> object:
    path = tmp_path / "log.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


_COLS = "user=uid,item=iid,timestamp=ts,rating=r"
_GOOD = [b"uid,iid,ts,r", b"1,10,100,4", b"1,11,200,3", b"2,10,300,5", b"2,12,400,2"]


@pytest.mark.parametrize("bad,line,why", [
    (b"2,13,500,4,surplus", 6, "expected 4 fields"),       # an extra field
    (b"3,13,1e30,4", 6, "out of range"),                  # beyond any timestamp
    (b"3,13,-9.3e18,4", 6, "out of range"),
    (b"3,\xff\xfe,500,4", 6, "not valid UTF-8"),           # not UTF-8: never merged
])
def test_generic_csv_hostile_rows_name_file_and_line(tmp_path, bad, line, why):
    path = _csv(tmp_path, [*_GOOD, bad])
    with pytest.raises(DataError, match=why) as e:
        _prep("csv", path, tmp_path, columns=_COLS)
    assert e.value.line == line and e.value.path.endswith("log.csv")
    _no_cache_left(tmp_path)


def test_two_non_utf8_ids_are_not_merged(tmp_path):
    """Two distinct invalid byte sequences would both decode to U+FFFD with replacement: the
    file is refused instead of merging the two items."""
    path = _csv(tmp_path, [*_GOOD, b"3,\xff1,500,4", b"3,\xfe1,600,4"])
    with pytest.raises(DataError, match="UTF-8") as e:
        _prep("csv", path, tmp_path, columns=_COLS)
    assert e.value.line == 6


def test_parquet_ids_beyond_int64_are_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    big = np.array([1, 2, 2**63 + 5], dtype=np.uint64)
    table = pa.table({"uid": big, "iid": np.array([1, 2, 3], np.uint64),
                      "ts": np.array([1, 2, 3], np.int64), "r": np.array([4.0, 3.0, 5.0])})
    pq.write_table(table, tmp_path / "log.parquet")
    with pytest.raises(DataError, match="user ids beyond the int64 range") as e:
        _prep("parquet", tmp_path / "log.parquet", tmp_path, columns=_COLS)
    assert "row 3" in str(e.value)
    table = table.set_column(2, "ts", pa.array(np.array([1, 2, 2**60], np.int64)))
    pq.write_table(table.set_column(0, "uid", pa.array(np.array([1, 2, 3], np.uint64))),
                   tmp_path / "log.parquet")
    with pytest.raises(DataError, match="timestamp out of range"):
        _prep("parquet", tmp_path / "log.parquet", tmp_path, columns=_COLS)


@pytest.mark.parametrize("ts,why", [
    (np.array(["2020-01-01", "2020-01-02"], dtype="datetime64[D]"), "unix seconds"),
    (np.array([1, 2], dtype="timedelta64[s]"), "unix seconds"),
    ([1e30, 1.0], "out of range"),
    (np.array([2**63 - 1, 5], dtype=np.int64), "out of range"),
    (np.array([2**64 - 1, 5], dtype=np.uint64), "out of range"),
])
def test_history_timestamps_that_are_not_unix_seconds(tmp_path, ts, why):
    ratings = random_ratings(n_users=4, n_items=10, per_user=(3, 6), seed=0)
    ds = _prep("ml-1m", write_ml_dat(tmp_path / "ml", ratings), tmp_path)
    item = int(ds.item_raw[1])
    with pytest.raises(InputError, match=why):
        ds.encode_user_history({"item_id": [item, item], "rating": [4, 4], "timestamp": ts})
