"""Reading delimited text files fast, and naming the file and line when one is malformed.

The fast path is pandas' C parser with explicit dtypes. When it fails (or leaves a required value
missing), a slow line-by-line scan of the same bytes finds the first offending line, so the error
names the file and the 1-based line number. The scan only runs on failure.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd

from srp4ctr.errors import DataError

#: A column check for the scanner: "int", "float", "str" (non-empty string), "id" (non-empty,
#: dtype inferred), "any", "time" (number or ISO date-time), "label" (0/1/true/false), or a set
#: of allowed strings.
Kind = Any

_PD_DTYPE = {"int": "int64", "float": "float64"}


def _decode(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b.decode("latin-1")


def read_bytes(path: str | os.PathLike) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError("file not found", path=str(path)) from None
    except OSError as e:
        raise DataError(f"cannot read: {e}", path=str(path)) from None


def _check_field(value: str, kind: Kind) -> str | None:
    """None if ``value`` satisfies ``kind``, else a short description of the problem."""
    v = value.strip()
    if kind == "any":
        return None
    if isinstance(kind, (set, frozenset)):
        return None if v in kind else f"{v!r} is not one of {sorted(kind)}"
    if v == "":
        return "empty value"
    if kind in ("str", "id"):
        return None
    if kind == "int":
        try:
            int(v)
        except ValueError:
            return f"{v!r} is not an integer"
        return None
    if kind in ("float", "time", "label"):
        try:
            f = float(v)
        except ValueError:
            if kind == "time":
                try:
                    _dt.datetime.fromisoformat(v)
                    return None
                except ValueError:
                    pass
            if kind == "label" and v.lower() in ("true", "false"):
                return None
            return f"{v!r} is not a number"
        if not math.isfinite(f):
            return f"{v!r} is not a finite number"
        if kind == "time" and abs(f) > 2.0**53:
            return f"timestamp {v!r} out of range (|t| > 2**53 seconds)"
        if kind == "label" and f not in (0.0, 1.0):
            return f"label {v!r} is not 0 or 1"
        return None
    raise AssertionError(kind)


def _iter_records(
    source: bytes | str | os.PathLike, sep: str, quoted: bool
) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, fields) of every non-blank record."""
    if isinstance(source, (bytes, bytearray)):
        raw: io.BufferedIOBase = io.BytesIO(source)
    else:
        raw = open(source, "rb")
    with raw:
        if quoted:
            text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")
            reader = csv.reader(text, delimiter=sep)
            start = 1
            for rec in reader:
                if rec and any(x != "" for x in rec):
                    yield start, rec
                start = reader.line_num + 1
        else:
            for i, line in enumerate(raw, 1):
                s = _decode(line).rstrip("\r\n")
                if s.strip() == "":
                    continue
                yield i, s.split(sep)


def find_bad_line(
    source: bytes | str | os.PathLike,
    *,
    sep: str,
    kinds: Sequence[Kind],
    header_lines: int = 0,
    exact: bool = True,
    quoted: bool = False,
) -> tuple[int, str] | None:
    """The first record (after ``header_lines``) whose field count or values are wrong."""
    n = len(kinds)
    for line, fields in _iter_records(source, sep, quoted):
        if line <= header_lines:
            continue
        if len(fields) < n or (exact and len(fields) > n):
            return line, f"expected {n} fields, found {len(fields)}"
        for k, f in zip(kinds, fields):
            msg = _check_field(f, k)
            if msg is not None:
                return line, msg
    return None


def raise_located(
    display: str,
    source: bytes | str | os.PathLike,
    *,
    sep: str,
    kinds: Sequence[Kind],
    header_lines: int,
    exact: bool,
    quoted: bool,
    cause: Exception | str,
) -> None:
    bad = find_bad_line(
        source, sep=sep, kinds=kinds, header_lines=header_lines, exact=exact, quoted=quoted
    )
    if bad is not None:
        raise DataError(f"malformed row: {bad[1]}", path=display, line=bad[0])
    raise DataError(f"cannot parse: {cause}", path=display)


def read_fixed(
    source: bytes | str | os.PathLike,
    display: str,
    *,
    sep: str,
    names: Sequence[str],
    kinds: Sequence[Kind],
    header_lines: int = 0,
    chunksize: int | None = None,
) -> pd.DataFrame | Iterator[pd.DataFrame]:
    """Read a file whose every line has exactly ``len(names)`` fields, no quoting.

    ``kinds`` is one scanner kind per column; "int"/"float" columns are parsed with numeric
    dtypes, the others as strings. With ``chunksize`` an iterator of frames is returned.
    ``sep="::"`` (MovieLens) is handled by rewriting the bytes to tabs first (C parser).
    """
    if sep == "::":
        data = source if isinstance(source, (bytes, bytearray)) else read_bytes(source)
        source = bytes(data).replace(b"::", b"\t")
        sep = "\t"
    dtype = {n: _PD_DTYPE.get(k, "str") if isinstance(k, str) else "str" for n, k in zip(names, kinds)}
    common = dict(
        sep=sep,
        header=None,
        names=list(names),
        dtype=dtype,
        skiprows=header_lines,
        quoting=csv.QUOTE_NONE,
        keep_default_na=False,
        na_values={n: [""] for n, k in zip(names, kinds) if k in ("int", "float")},
        engine="c",
        encoding="utf-8",
        encoding_errors="replace",
    )
    locate = dict(sep=sep, kinds=kinds, header_lines=header_lines, exact=True, quoted=False)
    numeric = [n for n, k in zip(names, kinds) if k in ("int", "float")]
    required_str = [n for n, k in zip(names, kinds) if k == "str"]

    def _check(df: pd.DataFrame) -> None:
        for n in numeric:
            col = df[n]
            if col.dtype.kind == "f" and not np.isfinite(col.to_numpy()).all():
                raise ValueError(f"missing or non-finite value in column {n}")
        for n in required_str:
            if (df[n].fillna("").str.strip() == "").any():
                raise ValueError(f"empty value in column {n}")

    def _src():
        return io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source

    if chunksize is None:
        try:
            df = pd.read_csv(_src(), **common)
            _check(df)
        except FileNotFoundError:
            raise DataError("file not found", path=display) from None
        except (ValueError, pd.errors.ParserError, OverflowError) as e:
            if isinstance(e, pd.errors.EmptyDataError):
                return pd.DataFrame({n: pd.Series([], dtype=dtype[n]) for n in names})
            raise_located(display, source, cause=e, **locate)
        return df

    def _gen() -> Iterator[pd.DataFrame]:
        try:
            reader = pd.read_csv(_src(), chunksize=chunksize, **common)
            with reader:
                for df in reader:
                    _check(df)
                    yield df
        except FileNotFoundError:
            raise DataError("file not found", path=display) from None
        except pd.errors.EmptyDataError:
            return
        except (ValueError, pd.errors.ParserError, OverflowError) as e:
            raise_located(display, source, cause=e, **locate)

    return _gen()


def read_header(path: str | os.PathLike, display: str, sep: str = ",") -> list[str]:
    try:
        df = pd.read_csv(path, sep=sep, nrows=0, engine="c")
    except FileNotFoundError:
        raise DataError("file not found", path=display) from None
    except pd.errors.EmptyDataError:
        raise DataError("empty file (no header line)", path=display) from None
    except (ValueError, pd.errors.ParserError) as e:
        raise DataError(f"cannot read the header: {e}", path=display) from None
    return [str(c) for c in df.columns]


def read_named(
    path: str | os.PathLike,
    display: str,
    *,
    columns: dict[str, Kind],
    sep: str = ",",
    chunksize: int | None = None,
) -> pd.DataFrame | Iterator[pd.DataFrame]:
    """Read the named ``columns`` of a CSV with a header (quoting allowed).

    Missing columns raise :class:`DataError` naming them; a malformed row names its line. With
    ``chunksize`` an iterator of frames of at most ``chunksize`` rows is returned, under the same
    rules: the first chunk with a bad row raises, naming the file's first bad line.
    """
    header = read_header(path, display, sep)
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"missing column(s) {missing}; the file has {header}", path=display)
    dtype = {c: (_PD_DTYPE.get(k, "str") if isinstance(k, str) else "str") for c, k in columns.items()}
    dtype = {c: d for c, d in dtype.items() if columns[c] in ("int", "float", "str")}

    def fail(e: Exception | str) -> None:
        raise_named(path, display, header=header, columns=columns, sep=sep, cause=e)

    # every column is parsed, not only ``columns``: with ``usecols`` the parser silently drops
    # the extra fields of a row that has more than the header; the others are read as strings
    # and dropped. Invalid UTF-8 is an error (replacing it would merge ids).
    options: dict[str, Any] = {
        "sep": sep,
        "dtype": {**{c: "str" for c in header}, **dtype},
        "engine": "c",
        "keep_default_na": False,
        "na_values": {c: [""] for c in columns},
        "encoding": "utf-8",
        "encoding_errors": "strict",
    }

    def checked(df: pd.DataFrame) -> pd.DataFrame:
        df = df[list(columns)]
        for c, k in columns.items():
            if k != "any" and df[c].isna().any():
                fail(f"missing value in column {c!r}")
        return df

    def located(e: Exception) -> None:
        if isinstance(e, UnicodeDecodeError):
            line = _first_non_utf8_line(path)
            raise DataError("not valid UTF-8 (save the file as UTF-8)", path=display,
                            line=line) from None
        fail(e)

    if chunksize is None:
        try:
            df = pd.read_csv(path, **options)
        except (ValueError, pd.errors.ParserError, OverflowError) as e:
            located(e)
            raise  # unreachable
        return checked(df)

    def _gen() -> Iterator[pd.DataFrame]:
        try:
            reader = pd.read_csv(path, chunksize=chunksize, **options)
        except (ValueError, pd.errors.ParserError, OverflowError) as e:
            located(e)
            raise  # unreachable
        with reader:
            while True:
                try:
                    df = next(reader)
                except StopIteration:
                    return
                except (ValueError, pd.errors.ParserError, OverflowError) as e:
                    located(e)
                    raise  # unreachable
                yield checked(df)

    return _gen()


def _first_non_utf8_line(path: str | os.PathLike) -> int | None:
    """The 1-based number of the first line that is not valid UTF-8."""
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return i
    return None


def raise_named(
    path: str | os.PathLike,
    display: str,
    *,
    header: Sequence[str],
    columns: dict[str, Kind],
    sep: str = ",",
    cause: Exception | str,
) -> None:
    """Find the first bad row of a CSV with a header and raise :class:`DataError` naming it."""
    kinds_all = [columns.get(c, "any") for c in header]
    raise_located(
        display, path, sep=sep, kinds=kinds_all, header_lines=1, exact=True, quoted=True, cause=cause
    )
