"""A tiny synthetic MovieLens-like dataset, written by the tests as an ml-1m folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_tiny_ml1m(folder: Path, n_users: int = 40, n_items: int = 60, per_user=(12, 40),
                    seed: int = 0) -> Path:
    """ratings.dat / movies.dat / users.dat in the MovieLens-1M ``::`` format.

    Users like items whose genre matches their taste, so there is a signal to learn.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    genres = ["Action", "Comedy", "Drama", "Horror", "Romance"]
    item_genre = rng.integers(0, len(genres), size=n_items + 1)
    with open(folder / "movies.dat", "w", encoding="latin-1") as f:
        for i in range(1, n_items + 1):
            g = genres[item_genre[i]]
            g2 = genres[(item_genre[i] + 1) % len(genres)]
            f.write(f"{i}::Movie {i} ({1970 + i % 40})::{g}|{g2}\n")
    with open(folder / "users.dat", "w") as f:
        for u in range(1, n_users + 1):
            f.write(f"{u}::{'MF'[u % 2]}::{[1, 18, 25, 35][u % 4]}::{u % 20}::0000{u}\n")
    rows = []
    for u in range(1, n_users + 1):
        taste = u % len(genres)
        n = int(rng.integers(per_user[0], per_user[1] + 1))
        items = rng.choice(np.arange(1, n_items + 1), size=min(n, n_items), replace=False)
        t = 978300000 + int(rng.integers(0, 10**6))
        for it in items:
            t += int(rng.integers(0, 50000))
            like = item_genre[it] == taste
            r = int(np.clip(rng.normal(4.3 if like else 2.7, 0.8), 1, 5).round())
            rows.append(f"{u}::{it}::{r}::{t}\n")
    with open(folder / "ratings.dat", "w") as f:
        f.writelines(rows)
    return folder
