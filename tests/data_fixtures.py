"""Small datasets in the supported raw formats, written by the data tests themselves."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pytest

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]


def random_ratings(
    n_users: int = 30,
    n_items: int = 50,
    per_user: tuple[int, int] = (1, 40),
    seed: int = 0,
    half_stars: bool = False,
) -> list[tuple[int, int, float, int]]:
    """(user, item, rating, timestamp) rows in a shuffled file order, with many equal
    timestamps within a user (so the tie order matters) and raw ids that are not 1..n."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        n = int(rng.integers(per_user[0], per_user[1] + 1))
        items = rng.choice(n_items, size=min(n, n_items), replace=False)
        t = 978_300_000 + int(rng.integers(0, 10**6))
        for it in items:
            if rng.random() > 0.3:  # 30% share the previous timestamp
                t += int(rng.integers(1, 200_000))
            r = float(rng.integers(1, 6))
            if half_stars and rng.random() < 0.5:
                r -= 0.5
            rows.append((3 * u + 7, 10 * int(it) + 5, r, t))
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def _fmt_rating(r: float) -> str:
    return str(int(r)) if float(r).is_integer() else str(r)


def write_ml_dat(
    folder: Path,
    ratings: Sequence[tuple],
    movies: Sequence[tuple[int, str, str]] | None = None,
    users: Sequence[tuple] | None = None,
) -> Path:
    """MovieLens-1M/10M ``::`` files. ``movies``: (id, title, "G1|G2"); ``users``:
    (id, gender, age code, occupation code, zip)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "ratings.dat", "w") as f:
        f.writelines(f"{u}::{i}::{_fmt_rating(r)}::{t}\n" for u, i, r, t in ratings)
    if movies is None:
        ids = sorted({i for _, i, _, _ in ratings})
        movies = [
            (i, f"Movie {i}, The ({1950 + i % 60})", "|".join(GENRES[j % 6] for j in range(i % 3 + 1)))
            for i in ids
        ]
    with open(folder / "movies.dat", "w", encoding="latin-1") as f:
        f.writelines(f"{i}::{title}::{g}\n" for i, title, g in movies)
    if users is not None:
        with open(folder / "users.dat", "w") as f:
            f.writelines("::".join(str(x) for x in row) + "\n" for row in users)
    return folder


def write_ml_csv(
    folder: Path, ratings: Sequence[tuple], movies: Sequence[tuple[int, str, str]] | None = None
) -> Path:
    """MovieLens-20M/25M ``ratings.csv`` / ``movies.csv`` with headers (titles quoted)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "ratings.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["userId", "movieId", "rating", "timestamp"])
        for u, i, r, t in ratings:
            w.writerow([u, i, _fmt_rating(r), t])
    if movies is None:
        ids = sorted({i for _, i, _, _ in ratings})
        movies = [(i, f"Movie {i}, The ({1950 + i % 60})", "Comedy|Drama" if i % 2 else "(no genres listed)") for i in ids]
    with open(folder / "movies.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["movieId", "title", "genres"])
        for row in movies:
            w.writerow(row)
    return folder


def write_lines(path: Path, lines: Iterable[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def random_taobao(n_users: int = 20, n_items: int = 40, seed: int = 0) -> list[tuple]:
    """(user, item, category, behavior, timestamp) rows, items with a fixed category."""
    rng = np.random.default_rng(seed)
    cat = {i: 100 + i % 7 for i in range(n_items)}
    rows = []
    for u in range(n_users):
        t = 1_511_500_000 + int(rng.integers(0, 10**5))
        for _ in range(int(rng.integers(1, 30))):
            it = int(rng.integers(n_items))
            t += int(rng.integers(0, 5000))
            b = ["pv", "pv", "pv", "cart", "fav", "buy"][int(rng.integers(6))]
            rows.append((1000 + u, 50_000 + it, cat[it], b, t))
    return rows


def write_taobao(path: Path, rows: Sequence[tuple]) -> Path:
    return write_lines(path, (",".join(str(x) for x in r) for r in rows))


def dir_entries(d: Path) -> list[str]:
    """Names in ``d`` (hidden included), without the downloads folder."""
    return sorted(p.name for p in d.iterdir() if p.name != "downloads") if d.exists() else []


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def ml100k_wheel(request, tmp_path_factory) -> Path:
    """The recbole wheel, downloaded once and kept in pytest's cache between runs (once per
    session when the cache plugin is off)."""
    from srp4ctr.data import download

    cache_plugin = getattr(request.config, "cache", None)
    if cache_plugin is not None:
        cache = Path(cache_plugin.mkdir("srp4ctr_downloads"))
    else:
        cache = tmp_path_factory.mktemp("srp4ctr_downloads")
    return download.fetch_wheel(cache, local=None)


@pytest.fixture
def ml100k_data_dir(tmp_path, ml100k_wheel, monkeypatch) -> Path:
    """A fresh data dir whose downloads folder already holds the wheel (no network needed)."""
    monkeypatch.delenv("SRP4CTR_ML100K_WHEEL", raising=False)
    d = tmp_path / "data"
    (d / "downloads").mkdir(parents=True)
    shutil.copy(ml100k_wheel, d / "downloads" / ml100k_wheel.name)
    return d


@pytest.fixture(scope="module")
def small_ml1m(tmp_path_factory):
    """A prepared random ml-1m-format dataset (with users.dat); users 2 and 4 have one and two
    interactions, so their training part is empty."""
    from srp4ctr import data

    root = tmp_path_factory.mktemp("small_ml1m")
    ratings = random_ratings(n_users=30, n_items=50, per_user=(1, 40), seed=1)
    ratings += [(2, 15, 4.0, 978_300_000), (4, 25, 2.0, 978_300_000), (4, 15, 5.0, 978_400_000)]
    users = sorted({r[0] for r in ratings})
    write_ml_dat(
        root / "ml-1m",
        ratings,
        users=[(u, "MF"[u % 2], [1, 18, 25, 35, 45, 50, 56][u % 7], u % 21, "12345") for u in users],
    )
    ds = data.prepare("ml-1m", path=root / "ml-1m", data_dir=root / "cache", progress=False)
    ds._test_ratings = ratings  # type: ignore[attr-defined]
    return ds
