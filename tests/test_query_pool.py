"""query_pool: the reference against candidate attention with replicated queries, the Triton kernel
against the reference (interpreter: fp32/fp16; gpu: fp32/fp16/bf16), and input validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from srp4ctr.errors import InputError
from srp4ctr.kernels import query_pool
from srp4ctr.kernels.reference import candidate_attention_ref, query_pool_ref
from srp4ctr.kernels.testing import assert_close, offsets_from_lengths

BLOCK = 16  # the interpreter config's BLOCK_N (kernels/_triton/query_pool.py)
HEAD_DIMS = [16, 32, 64, 128]
ODD_HEAD_DIMS = [8, 24, 40]
HYPOTHESIS = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def make_problem(n_queries, kv_lens, heads, head_dim, dtype, device="cpu", seed=0, jagged=True):
    g = torch.Generator().manual_seed(seed)
    n_kv = sum(kv_lens)
    queries = torch.randn(n_queries, heads, head_dim, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(n_kv, heads, head_dim, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(n_kv, heads, head_dim, generator=g).to(device=device, dtype=dtype)
    return queries, k, v, (offsets_from_lengths(kv_lens, device) if jagged else None)


# --------------------------------------------------------------------------- the reference itself


def test_reference_equals_candidate_attention_with_replicated_queries():
    """Pooling = candidate attention where every user has the same M candidates."""
    kv_lens = [5, 0, 9, 1]
    queries, k, v, ko = make_problem(3, kv_lens, 2, 16, torch.float64)
    got = query_pool_ref(queries, k, v, ko)  # (B, M, H, Dh)
    replicated = queries.repeat(len(kv_lens), 1, 1)  # (B*M, H, Dh)
    qo = offsets_from_lengths([3] * len(kv_lens))
    want = candidate_attention_ref(replicated, k, v, qo, ko).view(len(kv_lens), 3, 2, 16)
    torch.testing.assert_close(got, want)
    assert (got[1] == 0).all()  # the user with no states


def test_reference_without_offsets_is_one_user():
    queries, k, v, _ = make_problem(4, [7], 1, 16, torch.float32, jagged=False)
    got = query_pool_ref(queries, k, v)
    assert got.shape == (1, 4, 1, 16)
    torch.testing.assert_close(got[0], candidate_attention_ref(queries, k, v))


def test_reference_with_per_user_queries_is_each_users_own_pooling():
    """[B, M, H, Dh] queries: user b's rows are query_pool of its own queries over its states."""
    kv_lens = [5, 0, 9, 1]
    _, k, v, ko = make_problem(3, kv_lens, 2, 16, torch.float64)
    queries = torch.randn(len(kv_lens), 3, 2, 16, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(3))
    got = query_pool_ref(queries, k, v, ko)
    for b in range(len(kv_lens)):
        kb, ke = int(ko[b]), int(ko[b + 1])
        torch.testing.assert_close(got[b], query_pool_ref(queries[b], k[kb:ke], v[kb:ke])[0])
    assert (got[1] == 0).all()


# ------------------------------------------------------------------- Triton through the interpreter


def check_against_reference(n_queries, kv_lens, heads, head_dim, dtype, device, seed, jagged=True,
                            per_user=False):
    queries, k, v, ko = make_problem(
        n_queries, kv_lens, heads, head_dim, dtype, device, seed, jagged
    )
    if per_user:  # each user's own queries (a Q-Former offset by user features)
        g = torch.Generator().manual_seed(seed + 7)
        queries = torch.randn(len(kv_lens), *queries.shape, generator=g).to(device=device,
                                                                            dtype=dtype)
    got = query_pool(queries, k, v, ko, backend="triton")
    want = query_pool_ref(queries, k, v, ko)
    assert got.dtype == dtype and got.shape == want.shape
    assert_close(got, want, "attention", name=f"query_pool M={n_queries} L={kv_lens}")


@pytest.mark.interpreter
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@settings(max_examples=40, **HYPOTHESIS)
@given(
    n_queries=st.sampled_from([1, 2, 4, 5, 16, 17, 32]),
    kv_lens=st.lists(
        st.one_of(st.sampled_from([0, 1, BLOCK - 1, BLOCK, BLOCK + 1]), st.integers(0, 60)),
        min_size=1,
        max_size=6,
    ),
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from(HEAD_DIMS + ODD_HEAD_DIMS),
    jagged=st.booleans(),
    per_user=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_triton_matches_reference(dtype, n_queries, kv_lens, heads, head_dim, jagged, per_user,
                                  seed):
    if not jagged:
        kv_lens = [max(sum(kv_lens), 1)]
    check_against_reference(n_queries, kv_lens, heads, head_dim, dtype, "cpu", seed, jagged,
                            per_user)


@pytest.mark.interpreter
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "n_queries, kv_lens, heads, head_dim",
    [
        (1, [1], 1, 16),
        (4, [0, 0, 0], 2, 32),
        (32, [BLOCK - 1, BLOCK, BLOCK + 1], 2, 64),
        (130, [20, 3], 1, 16),  # more than one query tile (BLOCK_Q <= 128)
        (4, [2 * BLOCK + 1] * 12, 4, 24),
    ],
    ids=["1query-L1", "all-empty", "around-block", "two-query-tiles", "12-users-odd-Dh"],
)
@pytest.mark.parametrize("per_user", [False, True], ids=["shared", "per-user"])
def test_triton_edge_cases(dtype, n_queries, kv_lens, heads, head_dim, per_user):
    check_against_reference(n_queries, kv_lens, heads, head_dim, dtype, "cpu", seed=2,
                            per_user=per_user)


@pytest.mark.interpreter
def test_triton_refuses_autograd():
    queries, k, v, ko = make_problem(2, [3, 4], 1, 16, torch.float32)
    queries.requires_grad_(True)
    with pytest.raises(InputError, match="autograd"):
        query_pool(queries, k, v, ko, backend="triton")


# ------------------------------------------------------------------------------------ on the GPU


@pytest.mark.gpu
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@settings(max_examples=30, **HYPOTHESIS)
@given(
    n_queries=st.sampled_from([1, 4, 32, 33, 200]),
    kv_lens=st.lists(st.integers(0, 1100), min_size=1, max_size=16),
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from(HEAD_DIMS + ODD_HEAD_DIMS),
    per_user=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gpu_matches_reference(dtype, n_queries, kv_lens, heads, head_dim, per_user, seed):
    check_against_reference(n_queries, kv_lens, heads, head_dim, dtype, "cuda", seed,
                            per_user=per_user)


# ---------------------------------------------------------------------------- input validation


def test_validation_errors():
    queries, k, v, ko = make_problem(2, [3, 4], 2, 16, torch.float32)
    with pytest.raises(InputError, match="H and Dh must match"):
        query_pool(queries[:, :1], k, v, ko, backend="torch")
    with pytest.raises(InputError, match="queries must have 3 dimensions"):
        query_pool(queries[0], k, v, ko, backend="torch")
    with pytest.raises(InputError, match="end at the number of rows"):
        query_pool(queries, k, v, torch.tensor([0, 3, 5]), backend="torch")
    with pytest.raises(InputError, match="int64"):
        query_pool(queries, k, v, ko.int(), backend="torch")
    with pytest.raises(InputError, match="share one dtype"):
        query_pool(queries.half(), k, v, ko, backend="torch")
    with pytest.raises(InputError, match="per-user queries for 3 users"):
        query_pool(queries.expand(3, -1, -1, -1), k, v, ko, backend="torch")
