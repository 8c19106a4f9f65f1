"""Streaming generic tables (issue 18): ``load_generic`` reads CSV in chunks and parquet (a file
or a dataset folder) in record batches, and gives exactly what reading the whole table at once
gives, whatever the batch size; a bad value in a late batch names its file and global line/row.

The reference is the whole-table reader as it was before streaming (``_old_*`` below: one pandas
frame of the whole file, then the column conversions of ``srp4ctr.data.loaders`` at the time).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from data_fixtures import write_lines
from hypothesis import given, settings
from hypothesis import strategies as st

from srp4ctr import data
from srp4ctr.data import features as F
from srp4ctr.data import loaders
from srp4ctr.data.loaders import RawData, load_generic
from srp4ctr.errors import DataError, InputError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


# ----------------------------------------------------------------------------- the reference
def _old_ids(s: pd.Series) -> np.ndarray:
    if s.dtype.kind in "iu":
        return s.to_numpy(dtype=np.int64)
    if s.dtype.kind == "f":
        a = s.to_numpy(dtype=np.float64)
        if np.all(a == np.floor(a)):
            return a.astype(np.int64)
    if s.dtype.kind in "OUT" or str(s.dtype) in ("str", "string"):
        num = pd.to_numeric(s, errors="coerce")
        if not num.isna().any():
            a = num.to_numpy(dtype=np.float64)
            if np.all(a == np.floor(a)) and np.all(np.abs(a) < 2**53):
                strs = s.astype(str).str.strip()
                if (strs == pd.Series(a.astype(np.int64), index=s.index).astype(str)).all():
                    return a.astype(np.int64)
    return s.astype(str).to_numpy(dtype=str)


def _old_seconds(s: pd.Series) -> np.ndarray:
    if isinstance(s.dtype, pd.DatetimeTZDtype) or s.dtype.kind == "M":
        t = pd.to_datetime(s, utc=True)
        return ((t - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(np.int64)
    if s.dtype.kind in "iu":
        return s.to_numpy().astype(np.int64)
    if s.dtype.kind == "f":
        return np.floor(s.to_numpy(dtype=np.float64)).astype(np.int64)
    num = pd.to_numeric(s, errors="coerce")
    if not num.isna().any():
        return _old_seconds(num)
    t = pd.to_datetime(s, utc=True, errors="coerce", format="ISO8601")
    assert not t.isna().any()
    return _old_seconds(t)


def _old_labels(s: pd.Series) -> np.ndarray:
    if s.dtype.kind == "b":
        return s.to_numpy(dtype=np.int8)
    if s.dtype.kind not in "iuf":
        low = s.astype(str).str.strip().str.lower().replace({"true": "1", "false": "0"})
        s = pd.to_numeric(low, errors="coerce")
    return s.to_numpy(dtype=np.float64).astype(np.int8)


def _old_reader(path: Path, fmt: str, m: dict[str, str]) -> dict:
    """The whole-table reader: one frame of the whole file, then the conversions."""
    if fmt == "csv":
        header = [str(c) for c in pd.read_csv(path, nrows=0).columns]
        dtype = {c: "str" for c in header}
        if "rating" in m:
            dtype[m["rating"]] = "float64"
        df = pd.read_csv(path, dtype=dtype, engine="c", keep_default_na=False,
                         na_values={c: [""] for c in m.values()}, encoding="utf-8")
    else:
        df = pd.read_parquet(path, columns=list(dict.fromkeys(m.values())))
    out: dict = {"user": _old_ids(df[m["user"]]), "item": _old_ids(df[m["item"]]),
                 "timestamp": _old_seconds(df[m["timestamp"]]), "kind": None, "values": None,
                 "value_vocab": None}
    rating = pd.to_numeric(df[m["rating"]]).to_numpy(np.float64) if "rating" in m else None
    if "behavior" in m:
        bs = df[m["behavior"]]
        if bs.dtype.kind in "iu":
            values = bs.to_numpy(dtype=np.int64)
            vocab = [int(v) for v in np.unique(values)]
        else:
            values = bs.astype(str).str.strip().to_numpy(dtype=str)
            vocab = [str(v) for v in np.unique(values)]
        out.update(kind="behavior", values=values, value_vocab=vocab)
    elif rating is not None:
        out.update(kind="rating", values=rating,
                   value_vocab=[float(v) for v in np.unique(rating)])
    if "label" in m:
        out.update(label=_old_labels(df[m["label"]]), label_rule=f"label column {m['label']!r}")
    elif rating is not None:
        out.update(label=(rating >= 4).astype(np.int8), label_rule="rating >= 4")
    elif "behavior" in m and set(out["value_vocab"]) <= set(F.TAOBAO_BEHAVIOURS):
        out.update(label=np.isin(out["values"], loaders.POSITIVE_BEHAVIOURS).astype(np.int8),
                   label_rule="behavior in {cart, fav, buy}")
    else:
        out.update(label=np.ones(len(df), dtype=np.int8),
                   label_rule="implicit feedback: every interaction is a positive")
    out["item_row_fields"] = {k: df[c].to_numpy() for k, c in m.items()
                              if k not in loaders.STANDARD_KEYS}
    return out


def _same_array(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.dtype == b.dtype, (what, a.dtype, b.dtype)
    assert a.shape == b.shape, what
    if a.dtype == object:
        assert pd.Series(a).equals(pd.Series(b)), what
        assert [type(x) for x in a] == [type(x) for x in b], what
    else:
        np.testing.assert_array_equal(a, b, err_msg=what)


def _assert_same(raw: RawData, ref: dict | RawData) -> None:
    get = ref.get if isinstance(ref, dict) else lambda k: getattr(ref, k)
    for k in ("user", "item", "timestamp", "label"):
        _same_array(getattr(raw, k), get(k), k)
    assert raw.label_rule == get("label_rule") and raw.kind == get("kind")
    assert raw.value_vocab == get("value_vocab")
    assert [type(v) for v in raw.value_vocab or []] == [type(v) for v in get("value_vocab") or []]
    if raw.values is None:
        assert get("values") is None
    else:
        _same_array(raw.values, get("values"), "values")
    assert sorted(raw.item_row_fields) == sorted(get("item_row_fields"))
    for k, v in raw.item_row_fields.items():
        _same_array(v, get("item_row_fields")[k], k)
    if not isinstance(ref, dict):
        assert raw.files == ref.files and raw.display == ref.display


# ----------------------------------------------------------------------------- random tables
ID_CASES = ("int", "str", "mixed", "padded", "spaces", "spaces-int")
TS_CASES = ("int", "float", "iso", "compact-then-iso")


def _table(seed: int, n: int, ids: str, ts: str) -> pd.DataFrame:
    """A table of text, as a CSV holds it. ``ids``: how user/item ids are written (``mixed``:
    integers in the first two thirds, strings after; ``padded``: one late "007"; ``spaces``:
    some " 7" early, strings late; ``spaces-int``: some " 7", all integers). ``ts``: numbers,
    decimals, ISO date-times, or compact ISO dates (which read as numbers too) then ISO."""
    rng = np.random.default_rng(seed)
    late = np.arange(n) >= 2 * n // 3
    u = rng.integers(0, 15, n)
    i = rng.integers(0, 40, n) * 3 + 1
    user = [str(x) for x in u]
    item = [str(x) for x in i]
    if ids == "str":
        user = [f"u{x}" for x in u]
        item = [f"i{x}" for x in i]
    elif ids == "mixed":
        user = [f"u{x}" if lt else str(x) for x, lt in zip(u, late)]
        item = [f"x{x}" if lt else str(x) for x, lt in zip(i, late)]
    elif ids == "padded":
        item[-3] = "007"
    elif ids in ("spaces", "spaces-int"):
        for r in rng.choice(n // 2, size=4, replace=False):
            item[r] = f" {item[r]}"
        if ids == "spaces":
            item = [f"x{x}" if lt else x for x, lt in zip(item, late)]
    t = 1_600_000_000 + np.sort(rng.integers(0, 10**6, n))
    if ts == "int":
        when = [str(x) for x in t]
    elif ts == "float":
        when = [f"{x}.{rng.integers(0, 10)}" if rng.random() < 0.5 else str(x) for x in t]
    elif ts == "iso":
        when = pd.to_datetime(t, unit="s", utc=True).strftime("%Y-%m-%dT%H:%M:%SZ").tolist()
    else:
        dt = pd.to_datetime(t, unit="s", utc=True)
        when = [d.strftime("%Y-%m-%dT%H:%M:%SZ") if lt else d.strftime("%Y%m%d")
                for d, lt in zip(dt, late)]
    return pd.DataFrame({
        "uid": user,
        "iid": item,
        "ts": when,
        "score": [str(x / 2) for x in rng.integers(2, 11, n)],
        "clicked": rng.choice(["0", "1", "true", "False"], n),
        "kind": rng.choice(["pv", " buy", "cart ", "fav"], n),
        "genre": rng.choice(["a", "b", "c", ""], n),
        "day": rng.choice(["d1", "d2", "d3"], n),
    })


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    lines = [",".join(df.columns)] + [",".join(r) for r in df.itertuples(index=False)]
    return write_lines(path, lines)


def _typed(df: pd.DataFrame, ids: str, ts: str) -> pd.DataFrame:
    """The same table with the types a parquet file would have where the values allow."""
    out = df.copy()
    if ids in ("int",):
        out["uid"] = out["uid"].astype(np.int64)
        out["iid"] = out["iid"].astype(np.int64)
    if ts == "int":
        out["ts"] = out["ts"].astype(np.int64)
    elif ts == "float":
        out["ts"] = out["ts"].astype(np.float64)
    elif ts == "iso":
        out["ts"] = pd.to_datetime(out["ts"], utc=True)
    out["score"] = out["score"].astype(np.float64)
    out["genre"] = out["genre"].replace("", None)
    return out


def _write_parquet_forms(df: pd.DataFrame, root: Path) -> dict[str, Path]:
    """A single file (small row groups), a plain folder of three files, a hive dataset."""
    root.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    single = root / "one.parquet"
    pq.write_table(table, single, row_group_size=11)
    folder = root / "folder"
    folder.mkdir()
    n = len(df)
    cuts = [0, n // 5, n // 2, n]
    for k in range(3):
        pq.write_table(table.slice(cuts[k], cuts[k + 1] - cuts[k]), folder / f"part-{k}.parquet",
                       row_group_size=9)
    (folder / "_SUCCESS").write_text("")  # skipped, as pandas.read_parquet skips it
    hive = root / "hive"
    pq.write_to_dataset(table, hive, partition_cols=["day"])
    return {"single": single, "folder": folder, "hive": hive}


_MAP = {"user": "uid", "item": "iid", "timestamp": "ts", "rating": "score", "genre": "genre"}
_MAP_LABEL = {"user": "uid", "item": "iid", "timestamp": "ts", "label": "clicked",
              "behavior": "kind", "genre": "genre"}


@pytest.mark.parametrize("ts", TS_CASES)
@pytest.mark.parametrize("ids", ID_CASES)
def test_csv_batches_equal_the_whole_table(tmp_path, ids, ts):
    seed = ID_CASES.index(ids) + 10 * TS_CASES.index(ts)
    n = 61 + seed % 7
    df = _table(seed, n, ids, ts)
    path = _write_csv(df, tmp_path / "t.csv")
    for m in (_MAP, _MAP_LABEL):
        ref = _old_reader(path, "csv", m)
        whole = load_generic(path, "csv", m, batch_rows=n)
        _assert_same(whole, ref)
        for rows in (7, 10**6):
            _assert_same(load_generic(path, "csv", m, batch_rows=rows), whole)
    if ids in ("mixed", "padded", "spaces"):
        assert whole.item.dtype.kind == "U"
    if ids == "spaces":  # the text of an id read as an integer in its batch is kept: " 7"
        assert any(v.startswith(" ") for v in whole.item.tolist())
    if ids in ("int", "spaces-int"):
        assert whole.item.dtype == np.int64


_PARQUET_CASES = [
    *[("text", i, t) for i in ("mixed", "padded", "spaces") for t in ("int", "compact-then-iso")],
    *[("typed", i, t) for i in ("int", "str") for t in ("int", "float", "iso")],
]


@pytest.mark.parametrize("typed,ids,ts", _PARQUET_CASES)
def test_parquet_batches_equal_the_whole_table(tmp_path, typed, ids, ts):
    typed = typed == "typed"
    n = 73
    df = _table(3, n, ids, ts)
    if typed:
        df = _typed(df, ids, ts)
    forms = _write_parquet_forms(df, tmp_path)
    for form, path in forms.items():
        m = dict(_MAP_LABEL if form == "folder" else _MAP)
        if form == "hive":
            m["part"] = "day"  # a partition column, as pandas.read_parquet reads it
        ref = _old_reader(path, "parquet", m)
        whole = load_generic(path, "parquet", m, batch_rows=10**6)
        _assert_same(whole, ref)
        for rows in (7, n):
            _assert_same(load_generic(path, "parquet", m, batch_rows=rows), whole)


def test_one_row_batches(tmp_path):
    df = _table(4, 30, "mixed", "compact-then-iso")
    path = _write_csv(df, tmp_path / "t.csv")
    _assert_same(load_generic(path, "csv", _MAP_LABEL, batch_rows=1),
                 _old_reader(path, "csv", _MAP_LABEL))
    forms = _write_parquet_forms(df, tmp_path / "p")
    _assert_same(load_generic(forms["folder"], "parquet", _MAP, batch_rows=1),
                 _old_reader(forms["folder"], "parquet", _MAP))


def test_parquet_side_columns_with_and_without_nulls_by_batch(tmp_path):
    """A nullable integer side column: integers in the batches without nulls, floats where
    there are some; joined, it is what the whole column gives (floats with NaN)."""
    n = 40
    df = pd.DataFrame({"u": np.arange(n) % 7, "i": np.arange(n) % 11,
                       "t": 1_600_000_000 + np.arange(n),
                       "g": pd.array([None if k == 33 else k % 5 for k in range(n)], "Int64"),
                       "h": pd.array([k % 2 == 0 for k in range(n)], "boolean")})
    df.to_parquet(tmp_path / "x.parquet")
    m = {"user": "u", "item": "i", "timestamp": "t", "g": "g", "h": "h"}
    ref = _old_reader(tmp_path / "x.parquet", "parquet", m)
    for rows in (7, n):
        _assert_same(load_generic(tmp_path / "x.parquet", "parquet", m, batch_rows=rows), ref)


def test_prepare_reads_a_parquet_dataset_folder_as_the_single_file(tmp_path):
    """``data.prepare`` on a parquet dataset folder equals it on the single file."""
    df = _typed(_table(5, 90, "int", "int"), "int", "int")
    forms = _write_parquet_forms(df, tmp_path / "p")
    cols = "user=uid,item=iid,timestamp=ts,rating=score,genre=genre"
    a = data.prepare("parquet", path=forms["single"], columns=cols, data_dir=tmp_path / "c",
                     progress=False)
    b = data.prepare("parquet", path=forms["folder"], columns=cols, data_dir=tmp_path / "c",
                     progress=False)
    for k in ("user", "item", "timestamp", "label", "split"):
        assert np.array_equal(getattr(a, k), getattr(b, k))
    assert np.array_equal(a.item_table["genre"], b.item_table["genre"])


# ----------------------------------------------------------------------------- ids, batch by batch
_ID_TEXT = st.one_of(
    st.integers(-50, 10**6).map(str),
    st.integers(0, 99).map(lambda x: f"{x:03d}"),       # "007": a string id
    st.integers(0, 99).map(lambda x: f" {x}"),          # " 7": an integer, text kept if strings
    st.integers(0, 99).map(lambda x: f"x{x}"),
    st.sampled_from(["+4", "1e3", "7.0", "-0", "9007199254740993", "inf"]),
)


def _split(values: list, cuts: list[int]) -> list[list]:
    cuts = sorted({c % (len(values) + 1) for c in cuts} | {0, len(values)})
    return [values[a:b] for a, b in itertools.pairwise(cuts) if b > a]


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(_ID_TEXT, min_size=1, max_size=30), st.lists(st.integers(0, 40), max_size=5))
def test_text_ids_by_batch_equal_the_whole_column(values, cuts):
    whole = _old_ids(pd.Series(values, dtype="str"))
    parts = [loaders._id_part(pd.Series(b, dtype="str")) for b in _split(values, cuts)]
    got = loaders._join_ids(parts)
    assert got.dtype == whole.dtype and got.tolist() == whole.tolist()


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.one_of(st.integers(-10**6, 10**6).map(float),
                          st.floats(-1e6, 1e6, allow_nan=False)), min_size=1, max_size=30),
       st.lists(st.integers(0, 40), max_size=5))
def test_float_ids_by_batch_equal_the_whole_column(values, cuts):
    whole = _old_ids(pd.Series(values, dtype=np.float64))
    parts = [loaders._id_part(pd.Series(b, dtype=np.float64)) for b in _split(values, cuts)]
    got = loaders._join_ids(parts)
    assert got.dtype == whole.dtype and got.tolist() == whole.tolist()


# ----------------------------------------------------------------------------- bad input, late
_GOOD_CSV = ["uid,iid,ts,r"] + [f"{k % 9},{k % 13},{1_600_000_000 + k},4" for k in range(40)]
_COLS = "user=uid,item=iid,timestamp=ts,rating=r"


@pytest.mark.parametrize("bad,why", [
    (b"3,13,noon,4", "not a number"),
    (b"3,,500,4", "empty value"),
    (b"3,13,500,great", "not a number"),
    (b"3,13,500,4,surplus", "expected 4 fields"),
    (b"3,13,1e30,4", "out of range"),
    (b"3,\xff1,500,4", "UTF-8"),
])
def test_csv_bad_value_in_a_late_batch_names_file_and_line(tmp_path, bad, why):
    lines = [x.encode() for x in _GOOD_CSV]
    lines[33] = bad  # line 34 of the file, in the fifth batch of 7 rows
    path = tmp_path / "log.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    for rows in (7, 10**6):
        with pytest.raises(DataError, match=why) as e:
            load_generic(path, "csv", _COLS, batch_rows=rows)
        assert e.value.line == 34 and e.value.path.endswith("log.csv")


def test_csv_negative_item_ids(tmp_path):
    lines = list(_GOOD_CSV)
    lines[30] = "3,-5,1600000500,4"
    with pytest.raises(DataError, match="non-negative"):
        load_generic(write_lines(tmp_path / "a.csv", lines), "csv", _COLS, batch_rows=7)
    lines[38] = "3,x5,1600000600,4"  # a string id later: all ids are strings, "-5" is fine
    raw = load_generic(write_lines(tmp_path / "b.csv", lines), "csv", _COLS, batch_rows=7)
    assert raw.item.dtype.kind == "U" and "-5" in raw.item.tolist()


def test_csv_numbers_then_dates_is_refused_like_the_whole_table(tmp_path):
    lines = list(_GOOD_CSV)
    lines[35] = "3,13,2020-09-13T12:00:00Z,4"
    for rows in (7, 10**6):
        with pytest.raises(DataError, match="neither a number nor an ISO date-time"):
            load_generic(write_lines(tmp_path / "t.csv", lines), "csv", _COLS, batch_rows=rows)


def _parquet(path: Path, n: int = 40, **cols) -> Path:
    base = {"uid": np.arange(n) % 9, "iid": np.arange(n) % 13,
            "ts": 1_600_000_000 + np.arange(n), "r": np.full(n, 4.0)}
    base.update(cols)
    pq.write_table(pa.table(base), path, row_group_size=10)
    return path


@pytest.mark.parametrize("rows", [7, 10**6])
def test_parquet_bad_value_in_a_late_batch_names_the_global_row(tmp_path, rows):
    r = ["4"] * 40
    r[33] = "great"
    p = _parquet(tmp_path / "a.parquet", r=r)
    with pytest.raises(DataError, match=r"rating is not a number \(row 34\)") as e:
        load_generic(p, "parquet", _COLS, batch_rows=rows)
    assert e.value.path.endswith("a.parquet")
    ts = [1_600_000_000 + k for k in range(40)]
    ts[36] = None
    p = _parquet(tmp_path / "b.parquet", ts=ts)
    with pytest.raises(DataError, match=r"'ts': missing value \(row 37\)"):
        load_generic(p, "parquet", _COLS, batch_rows=rows)
    ts = np.array([1_600_000_000 + k for k in range(40)], np.int64)
    ts[29] = 2**60
    with pytest.raises(DataError, match=r"timestamp out of range.*\(row 30\)"):
        load_generic(_parquet(tmp_path / "c.parquet", ts=ts), "parquet", _COLS, batch_rows=rows)
    iid = np.arange(40) % 13
    iid[38] = -4
    with pytest.raises(DataError, match=r"non-negative.*\(row 39\)"):
        load_generic(_parquet(tmp_path / "d.parquet", iid=iid), "parquet", _COLS,
                     batch_rows=rows)
    ts = [str(1_600_000_000 + k) for k in range(40)]
    ts[35] = "2020-09-13T12:00:00Z"  # numbers, then a date-time: neither reads all of them
    with pytest.raises(DataError, match=r"neither a number nor an ISO date-time \(row 36\)"):
        load_generic(_parquet(tmp_path / "t.parquet", ts=ts), "parquet", _COLS, batch_rows=rows)
    lab = np.ones(40, np.int64)
    lab[25] = 2
    with pytest.raises(DataError, match=r"label must be 0 or 1 \(row 26\)"):
        load_generic(_parquet(tmp_path / "e.parquet", y=lab), "parquet", _COLS + ",label=y",
                     batch_rows=rows)


def test_parquet_dataset_bad_value_names_the_file_and_both_rows(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    _parquet(folder / "part-0.parquet", n=30, r=["4"] * 30)
    _parquet(folder / "part-1.parquet", n=25, r=["4"] * 25)
    r = ["4"] * 20
    r[4] = "great"
    _parquet(folder / "part-2.parquet", n=20, r=r)
    for rows in (7, 10**6):
        with pytest.raises(DataError, match=r"row 5 of this file, row 60 of the dataset") as e:
            load_generic(folder, "parquet", _COLS, batch_rows=rows)
        assert e.value.path.endswith("part-2.parquet")
    # the dataset's types are the first file's: a value the cast refuses names its file
    _parquet(folder / "part-0.parquet", n=30)  # ratings as numbers; "4" casts, "great" not
    with pytest.raises(DataError, match="cannot read parquet.*'great'") as e:
        load_generic(folder, "parquet", _COLS, batch_rows=7)
    assert e.value.path.endswith("part-2.parquet")


def test_empty_or_unreadable_parquet_folders_are_data_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no parquet files in this folder") as e:
        load_generic(empty, "parquet", _COLS)
    assert e.value.path == str(empty)
    (empty / "_SUCCESS").write_text("")
    (empty / ".hidden.parquet").write_text("")
    with pytest.raises(DataError, match="no parquet files in this folder"):
        load_generic(empty, "parquet", _COLS)
    with pytest.raises(DataError, match="no parquet files"):
        data.prepare("parquet", path=empty, columns=_COLS, data_dir=tmp_path / "c",
                     progress=False)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot read parquet"):
        load_generic(junk, "parquet", _COLS)
    zero = _parquet(tmp_path / "zero.parquet", n=0)
    with pytest.raises(DataError, match="no interactions"):
        load_generic(zero, "parquet", _COLS, batch_rows=7)


@pytest.mark.parametrize("rows", [0, -3, True, 2.5, "7"])
def test_batch_rows_must_be_a_positive_integer(tmp_path, rows):
    path = write_lines(tmp_path / "t.csv", _GOOD_CSV)
    with pytest.raises(InputError, match="batch_rows"):
        load_generic(path, "csv", _COLS, batch_rows=rows)
