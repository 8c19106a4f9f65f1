"""Real data: loaders, time-ordered sequences with side information, splits, samples.

Entry points
------------
``prepare(dataset, path=None, data_dir=None, columns=None, force=False, progress=True,
max_len=200) -> PreparedDataset`` builds a dataset into the cache (``data_dir``, else
``$SRP4CTR_DATA_DIR``, else the user cache folder) or reuses it; ``load_prepared(dir)`` reads one
back. Datasets: ``ml-100k`` (fetched as the ``recbole==1.2.1`` wheel with ``pip download``,
sha256-checked, kept in ``<data_dir>/downloads``; offline, point ``$SRP4CTR_ML100K_WHEEL`` or
``path=`` at the wheel), ``ml-1m`` / ``ml-10m`` (``ratings.dat``, ``movies.dat``, ml-1m also
``users.dat``), ``ml-20m`` / ``ml-25m`` / ``ml-latest`` / ``ml-latest-small`` (``ratings.csv``,
``movies.csv``), ``taobao`` (``UserBehavior.csv``, read in chunks), ``csv`` / ``parquet`` (a
generic table with a column mapping ``columns``: ``user``, ``item``, ``timestamp`` required --
timestamps are unix seconds or ISO date-times; ``rating``, ``label``, ``behavior`` optional;
any other key maps an item side column that becomes an item field). ``path`` is the file or its
folder. Malformed files raise :class:`~srp4ctr.errors.DataError` naming the file and 1-based line.

Data contract of :class:`PreparedDataset`
-----------------------------------------
Interactions are sorted by (internal user, timestamp, raw item id) -- stable, so full ties keep
file order -- and grouped by user. Token id 0 is padding everywhere.

- ``name: str``; ``meta: dict`` (JSON-able: counts, field lists, vocab, field value names,
  label rule, split rule, gap rule, source, fingerprint); ``fingerprint: str`` (sha256 of the
  arrays and the preparation config).
- ``user: int32[N]`` internal ids 1..n_users; ``item: int32[N]`` internal ids 1..n_items
  (0 = padding; ``n_items + 1`` is the out-of-vocabulary id used at serving time).
- ``timestamp: int64[N]`` unix seconds; ``label: int8[N]``; ``split: int8[N]`` (0 train,
  1 valid, 2 test).
- ``user_offsets: int64[n_users + 1]``: user u's rows are ``user_offsets[u-1]:user_offsets[u]``.
- ``behaviour: dict[str, uint8[N] | uint16[N]]`` behaviour-field tokens (the smallest unsigned
  type that holds the field's vocabulary; cast before arithmetic); ``behaviour_fields`` lists them:
  ``"rating"`` (MovieLens; each distinct rating value -> 1..K in sorted order, half stars
  included) or ``"behavior"`` (Taobao pv/cart/fav/buy -> 1..4; generic if mapped), then
  ``"gap"`` (1 = first interaction of the user, 2 = same second as the previous one,
  3 + min(floor(log2(seconds since the user's previous interaction)), 21); 24 buckets),
  ``"hour"`` (UTC hour + 1, 1..24), ``"weekday"`` (Monday 1 .. Sunday 7, UTC).
- ``item_table: dict[str, int64 ndarray]`` indexed by internal item id, ``n_items + 2`` rows
  (row 0 padding and row ``n_items + 1`` OOV are all 0). MovieLens: ``"genre"``
  ``[n_items + 2, G]`` multi-label (sorted ids, 0-padded, G = most genres of one item) and
  ``"year"`` (1 = unknown, 2 = before 1920, then 5-year buckets to 2029). Taobao:
  ``"category"``. Generic: each mapped side column (value at the item's earliest interaction;
  missing -> 0).
- ``user_table: dict[str, int64[n_users + 1]]`` (may be empty); ml-100k / ml-1m: ``"age"``
  (<18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+), ``"gender"``, ``"occupation"``.
- ``vocab: dict[str, int]`` vocabulary size including padding for ``"item"`` (= n_items + 2),
  every item_table field, every behaviour field and every user field.
- ``item_fields = ["item", *item_table]``, ``behaviour_fields``, ``multi_fields`` (multi-valued
  item fields), ``user_fields``, ``n_users``, ``n_items``, ``item_raw`` / ``user_raw`` (raw id per
  internal id, index 0 unused; int64, or str for string ids).
- Label: MovieLens rating >= 4; Taobao behavior in {cart, fav, buy}; generic: the label column,
  else rating >= 4, else (behaviour types pv/cart/fav/buy) as Taobao, else every interaction 1.
- Split, per user with n interactions in time order: positions p < floor(0.8 n) train,
  p < floor(0.9 n) valid, else test (ml-100k: 79,619 / 9,942 / 10,439).
- ``summary()``: dataset, n_users, n_items, n_interactions, positive_rate, seq_len {min, median,
  mean, max}, splits {train, valid, test}, vocab, fields, rules, fingerprint, cache_path.
- Serving: ``ds.behaviour_features(timestamps, values)`` is the one definition of behaviour
  tokens (``prepare`` calls the same :func:`behaviour_features`); ``ds.encode_items(raw_ids,
  strict=False)`` (unknown -> ``n_items + 1``, or :class:`InputError` when strict; negative or
  non-integer ids always raise); ``ds.encode_user_history({"item_id", "timestamp",
  "rating"|"behavior"[, "user_id"]}, max_len=None)`` -> ``hist_item``, ``hist_<f>``, ``hist_len``
  (time-sorted as in training, behaviour fields over the whole history, last ``max_len`` kept).
- Stored as ``arrays/<key>.npy`` (one file per array; per-row arrays in the dtypes above, tables
  compact) + ``meta.json`` in ``<data_dir>/<dataset>[-<hash of path and columns>]/``, and
  memory-mapped read-only on load (``load_prepared(dir, mmap=True)``): DDP ranks and loader
  workers share the pages. Folders from before (one ``arrays.npz``) are still read, whole.

Samples (:mod:`srp4ctr.data.samples`)
-------------------------------------
- ``PretrainDataset(ds, max_len=200)``: per user, the last ``max_len`` interactions of the
  training part only (no validation or test interaction ever appears); users with an empty
  training part are skipped; ``windows=True`` adds earlier ``max_len`` windows of the
  training part.
- ``CTRDataset(ds, split, max_len=200, negatives=None | "uni100", n_negatives=1, seed=0)``:
  every interaction of the split is a sample (history = up to ``max_len`` earlier interactions
  of the same user, from any split; candidate = its item; label = its label). ``"uni100"``:
  each positive interaction of the split gives one positive sample and ``n_negatives`` samples
  of items the user never interacted with (label 0), with the same history.
- ``NextItemDataset(ds, split="valid" | "test", max_len=200, n_negatives=None)``: per user,
  target = the user's first interaction of that split, history = everything before it
  (valid: the training part; test: train + valid), last ``max_len``.
- ``collate(samples)`` / ``dataset.batches(batch_size, shuffle, seed)`` give dicts of torch
  tensors: ``hist_item [B, L]`` int64 right-padded with 0, oldest first (L = longest in the
  batch, or ``pad_to``), ``hist_<f> [B, L]`` for every behaviour field, ``hist_len [B]``,
  ``user [B]``, ``user_<f> [B]`` per user field; CTR adds ``cand_item [B]`` and ``label [B]``
  float32; next-item adds ``target_item [B]`` (and ``neg_item [B, n]`` with ``n_negatives``).
  Histories may be empty (``hist_len`` 0).
"""

from srp4ctr.data.dataset import SPLIT_NAMES, PreparedDataset, load_prepared
from srp4ctr.data.features import behaviour_features, encode_values

_SAMPLES = ("PretrainDataset", "CTRDataset", "NextItemDataset", "collate")
# the loaders and the pipeline import pandas (and the samples torch): loaded when first asked
# for, so that serving (srp4ctr.serving reads srp4ctr.data.dataset) needs numpy alone
_LAZY = {**{name: "samples" for name in _SAMPLES},
         "KNOWN_DATASETS": "loaders", "parse_columns": "loaders",
         "build": "pipeline", "default_data_dir": "pipeline", "prepare": "pipeline"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"srp4ctr.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'srp4ctr.data' has no attribute {name!r}")


__all__ = [
    *_SAMPLES,
    "PreparedDataset",
    "prepare",
    "load_prepared",
    "behaviour_features",
    "encode_values",
    "build",
    "default_data_dir",
    "parse_columns",
    "KNOWN_DATASETS",
    "SPLIT_NAMES",
]
