"""Small synthetic specs and batches that follow the data contract, for tests and benchmarks.

``synthetic_spec()`` looks like a tiny MovieLens: item fields ``item, genre (multi), year``,
behaviour fields ``rating, gap, hour, weekday``, user fields ``age, gender, occupation``.
``random_batch(spec, B, L)`` draws right-padded histories with lengths that include 0, 1 and L.
"""

from __future__ import annotations

import numpy as np
import torch

from srp4ctr.models.spec import ModelSpec

__all__ = ["random_batch", "synthetic_spec"]


def synthetic_spec(n_items: int = 50, n_users: int = 20, n_genres: int = 6, genres_per_item: int = 3,
                   n_years: int = 8, user_fields: bool = True, seed: int = 0) -> ModelSpec:
    rng = np.random.default_rng(seed)
    rows = n_items + 2  # padding 0, items 1..n_items, OOV n_items + 1
    genre = np.zeros((rows, genres_per_item), dtype=np.int64)
    year = np.zeros(rows, dtype=np.int64)
    for i in range(1, n_items + 1):
        k = int(rng.integers(0, genres_per_item + 1))  # some items have no genre
        genre[i, :k] = rng.choice(np.arange(1, n_genres + 1), size=k, replace=False)
        year[i] = int(rng.integers(1, n_years + 1))
    vocab = {"item": rows, "genre": n_genres + 1, "year": n_years + 1,
             "rating": 6, "gap": 10, "hour": 25, "weekday": 8}
    ufields = ["age", "gender", "occupation"] if user_fields else []
    if user_fields:
        vocab.update({"age": 8, "gender": 3, "occupation": 22})
    return ModelSpec(
        vocab=vocab,
        item_fields=["item", "genre", "year"],
        behaviour_fields=["rating", "gap", "hour", "weekday"],
        multi_fields=["genre"],
        user_fields=ufields,
        item_table={"genre": genre, "year": year},
        n_items=n_items,
        n_users=n_users,
        fingerprint="synthetic-" + str(seed),
    )


def random_batch(spec: ModelSpec, B: int, L: int, seed: int = 0, ctr: bool = True,
                 lengths: list[int] | None = None) -> dict[str, torch.Tensor]:
    """A batch of B users with histories of width L (right-padded with 0).

    lengths: explicit history lengths; by default the first rows are 0, 1 and L (when B allows)
    and the rest uniform in [0, L].
    """
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        fixed = [0, 1, L][: min(B, 3)]
        rest = torch.randint(0, L + 1, (B - len(fixed),), generator=g).tolist()
        lengths = [min(x, L) for x in fixed] + rest
    hist_len = torch.tensor(lengths, dtype=torch.int64)
    valid = torch.arange(L)[None, :] < hist_len[:, None]
    b: dict[str, torch.Tensor] = {
        "hist_item": torch.randint(1, spec.n_items + 1, (B, L), generator=g) * valid,
        "hist_len": hist_len,
        "user": torch.randint(1, max(spec.n_users, 1) + 1, (B,), generator=g),
    }
    for f in spec.behaviour_fields:
        b["hist_" + f] = torch.randint(1, spec.vocab[f], (B, L), generator=g) * valid
    for f in spec.user_fields:
        b["user_" + f] = torch.randint(1, spec.vocab[f], (B,), generator=g)
    if ctr:
        b["cand_item"] = torch.randint(1, spec.n_items + 1, (B,), generator=g)
        b["label"] = torch.randint(0, 2, (B,), generator=g).float()
    else:
        b["target_item"] = torch.randint(1, spec.n_items + 1, (B,), generator=g)
    return b
