"""The engine's Triton backend equals the training forward (fp32).

Runs on CPU through the Triton interpreter (``TRITON_INTERPRET=1 python -m pytest -m
interpreter``; fp32 only there) and, with the ``gpu`` tests, on a CUDA device.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from srp4ctr import data
from srp4ctr.engine import Engine
from srp4ctr.models import SRP4CTR, ModelConfig, ModelSpec

from train_fixtures import write_tiny_ml1m

torch.set_num_threads(1)

TINY = {"d_model": 16, "n_layers": 2, "n_heads": 2, "max_len": 16, "n_queries": 2,
        "head_hidden": (16, 8)}
ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    src = write_tiny_ml1m(root / "ml-1m", n_users=10)
    return data.prepare("ml-1m", path=str(src), data_dir=str(root / "c"), progress=False)


@pytest.fixture(scope="module")
def model(tiny):
    torch.manual_seed(0)
    m = SRP4CTR(ModelSpec.from_dataset(tiny), ModelConfig(**TINY))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


def _history(ds, user: int) -> dict:
    rows = ds.user_rows(user)
    return {
        "item_id": ds.item_raw[ds.item[rows]],
        "rating": np.asarray(ds.value_vocab)[ds.behaviour["rating"][rows] - 1],
        "timestamp": ds.timestamp[rows],
        "user_id": int(ds.user_raw[user]),
    }


def _forward(model, ds, history, raw_cands) -> torch.Tensor:
    """The training model's forward on C copies of the history."""
    arr = ds.encode_user_history(history, max_len=model.config.max_len)
    cand = torch.as_tensor(ds.encode_items(np.asarray(raw_cands)))
    C, n = cand.shape[0], int(arr["hist_len"])
    width = max(n, 1)

    def rows(key):
        a = np.zeros(width, np.int64)
        a[:n] = arr[key]
        return torch.as_tensor(a).expand(C, width)

    batch = {"hist_item": rows("hist_item"), "hist_len": torch.full((C,), n), "cand_item": cand}
    for f in ds.behaviour_fields:
        batch[f"hist_{f}"] = rows(f"hist_{f}")
    for f, t in ds.user_table.items():
        batch[f"user_{f}"] = torch.full((C,), int(arr.get(f"user_{f}", t[0])))
    with torch.no_grad():
        return torch.sigmoid(model(batch))


def _check(engine, model, tiny, device):
    hs = [_history(tiny, 1), _history(tiny, 2),
          {"item_id": [3], "rating": [4], "timestamp": [1]},
          {"item_id": [], "rating": [], "timestamp": []}]
    lists = [list(range(1, 40)), [5, 10**6], list(range(20, 45)), [1, 2, 3]]
    caches = [engine.encode_user(h) for h in hs]
    assert [c.length for c in caches] == [16, 16, 1, 0]
    want = [_forward(model, tiny, h, cands) for h, cands in zip(hs, lists)]
    for c, cands, w in zip(caches, lists, want):
        got = engine.score(c, cands)
        assert got.device.type == device
        assert (got.cpu() - w).abs().max().item() <= ATOL
    for got, w in zip(engine.score_many(caches, lists), want):
        assert (got.cpu() - w).abs().max().item() <= ATOL


@pytest.mark.interpreter
def test_triton_backend_equals_training_forward_interpreter(tiny, model):
    engine = Engine.from_model(model, tiny, backend="triton")
    assert engine.backend == "triton"
    _check(engine, model, tiny, "cpu")
    # chunked scoring runs the kernels chunk by chunk with the same results
    small = Engine.from_model(model, tiny, backend="triton", chunk_size=16)
    cache = small.encode_user(_history(tiny, 3))
    cands = list(range(1, 50))
    assert (small.score(cache, cands) - _forward(model, tiny, _history(tiny, 3), cands)
            ).abs().max().item() <= ATOL


@pytest.mark.interpreter
def test_auto_backend_on_cpu_is_torch(tiny, model):
    assert Engine.from_model(model, tiny).backend == "torch"


@pytest.mark.gpu
def test_triton_backend_equals_training_forward_gpu(tiny, model):
    engine = Engine.from_model(copy.deepcopy(model), tiny, device="cuda")  # moves its model
    assert engine.backend == "triton"
    _check(engine, model, tiny, "cuda")
