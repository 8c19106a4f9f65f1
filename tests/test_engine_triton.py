"""The engine's Triton backend equals the training forward (fp32).

Runs on CPU through the Triton interpreter (``TRITON_INTERPRET=1 python -m pytest -m
interpreter``; fp32 only there) and, with the ``gpu`` tests, on a CUDA device.
"""

from __future__ import annotations

import copy

import pytest
import torch
from train_fixtures import TINY, model_probs, perturbed, prepare_tiny, raw_history

from srp4ctr.engine import Engine
from srp4ctr.models import SRP4CTR, ModelConfig, ModelSpec

torch.set_num_threads(1)

ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return prepare_tiny(tmp_path_factory.mktemp("triton"), cache="c", n_users=10)


@pytest.fixture(scope="module")
def model(tiny):
    torch.manual_seed(0)
    return perturbed(SRP4CTR(ModelSpec.from_dataset(tiny), ModelConfig(**TINY)), seed=1)


def _check(engine, model, tiny, device):
    hs = [raw_history(tiny, 1, lists=False), raw_history(tiny, 2, lists=False),
          {"item_id": [3], "rating": [4], "timestamp": [1]},
          {"item_id": [], "rating": [], "timestamp": []}]
    lists = [list(range(1, 40)), [5, 10**6], list(range(20, 45)), [1, 2, 3]]
    caches = [engine.encode_user(h) for h in hs]
    assert [c.length for c in caches] == [16, 16, 1, 0]
    want = [model_probs(model, tiny, h, cands) for h, cands in zip(hs, lists)]
    for c, cands, w in zip(caches, lists, want):
        got = engine.score(c, cands)
        assert got.device.type == device
        assert (got.cpu() - w).abs().max().item() <= ATOL
    for got, w in zip(engine.score_many(caches, lists), want):
        assert (got.cpu() - w).abs().max().item() <= ATOL


@pytest.mark.interpreter
def test_triton_backend_equals_training_forward_interpreter(tiny, model):
    engine = Engine.from_model(model, tiny, backend="triton")
    assert engine.backend == "triton" and engine.user_side == "triton"  # query_pool Q-Former
    assert engine.folded.q0 is None  # the kernel computes the first query itself
    _check(engine, model, tiny, "cpu")
    # chunked scoring runs the kernels chunk by chunk with the same results
    small = Engine.from_model(model, tiny, backend="triton", chunk_size=16)
    h = raw_history(tiny, 3, lists=False)
    cache = small.encode_user(h)
    cands = list(range(1, 50))
    assert (small.score(cache, cands) - model_probs(model, tiny, h, cands)
            ).abs().max().item() <= ATOL


@pytest.mark.interpreter
def test_auto_backend_on_cpu_is_not_triton(tiny, model):
    """Even where the interpreter could run Triton on CPU, auto picks the CPU paths."""
    from srp4ctr import _ext

    want = "cpp" if _ext.extension() is not None else "torch"
    assert Engine.from_model(model, tiny).backend == want


@pytest.mark.gpu
def test_triton_backend_equals_training_forward_gpu(tiny, model):
    engine = Engine.from_model(copy.deepcopy(model), tiny, device="cuda")  # moves its model
    assert engine.backend == "triton" and engine.user_side == "triton"
    _check(engine, model, tiny, "cuda")
