"""candidate_attention: the reference against a naive loop, the Triton kernel against the reference
(interpreter: fp32/fp16 on CPU; gpu: fp32/fp16/bf16 on CUDA), and input validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from srp4ctr.errors import InputError
from srp4ctr.kernels import candidate_attention
from srp4ctr.kernels.reference import candidate_attention_ref
from srp4ctr.kernels.testing import assert_close, offsets_from_lengths

# Tile sizes the interpreter config uses (kernels/_triton/candidate_attention.py); lengths around
# them exercise full tiles, masked tails and tile boundaries.
BLOCK = 16
AROUND_BLOCKS = [1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK - 1, 2 * BLOCK + 1]
HEAD_DIMS = [16, 32, 64, 128]  # powers of two: no padding
ODD_HEAD_DIMS = [8, 24, 40]  # padded to a power of two (>= 16) inside the kernel
HYPOTHESIS = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def make_problem(c_lens, kv_lens, heads, head_dim, dtype, device="cpu", seed=0, jagged=True):
    g = torch.Generator().manual_seed(seed)
    n_q, n_kv = sum(c_lens), sum(kv_lens)
    q = torch.randn(n_q, heads, head_dim, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(n_kv, heads, head_dim, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(n_kv, heads, head_dim, generator=g).to(device=device, dtype=dtype)
    if not jagged:
        return q, k, v, None, None
    return q, k, v, offsets_from_lengths(c_lens, device), offsets_from_lengths(kv_lens, device)


def naive_candidate_attention(q, k, v, c_lens, kv_lens, scale):
    """One candidate, one head at a time, in float64, with an explicit softmax."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    q0 = kv0 = 0
    for c_len, kv_len in zip(c_lens, kv_lens):
        for i in range(q0, q0 + c_len):
            for h in range(q.shape[1]):
                if kv_len == 0:
                    continue
                scores = [
                    float(q[i, h].double() @ k[j, h].double()) * scale
                    for j in range(kv0, kv0 + kv_len)
                ]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for w, j in zip(weights, range(kv0, kv0 + kv_len)):
                    out[i, h] += (w / total) * v[j, h].double()
        q0, kv0 = q0 + c_len, kv0 + kv_len
    return out


# --------------------------------------------------------------------------- the reference itself


@pytest.mark.parametrize(
    "c_lens, kv_lens",
    [([3], [5]), ([1], [1]), ([2, 0, 3], [4, 2, 0]), ([1, 4, 2], [3, 1, 6])],
    ids=["one-user", "one-by-one", "empty-users", "three-users"],
)
def test_reference_matches_naive_loop(c_lens, kv_lens):
    q, k, v, qo, ko = make_problem(c_lens, kv_lens, heads=2, head_dim=8, dtype=torch.float64)
    got = candidate_attention_ref(q, k, v, qo, ko)
    want = naive_candidate_attention(q, k, v, c_lens, kv_lens, 8**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_reference_one_user_without_offsets_equals_sdpa():
    q, k, v, _, _ = make_problem([7], [11], heads=3, head_dim=16, dtype=torch.float32, jagged=False)
    got = candidate_attention_ref(q, k, v)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    ).transpose(0, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_reference_candidates_do_not_see_each_other():
    """Changing one candidate leaves every other candidate's output unchanged."""
    q, k, v, qo, ko = make_problem([4, 3], [5, 6], heads=2, head_dim=16, dtype=torch.float32)
    before = candidate_attention_ref(q, k, v, qo, ko)
    q2 = q.clone()
    q2[1] += 10.0
    after = candidate_attention_ref(q2, k, v, qo, ko)
    keep = torch.ones(q.shape[0], dtype=torch.bool)
    keep[1] = False
    torch.testing.assert_close(after[keep], before[keep])


def test_torch_backend_supports_autograd():
    q, k, v, qo, ko = make_problem([2, 3], [4, 1], heads=2, head_dim=16, dtype=torch.float32)
    q.requires_grad_(True)
    candidate_attention(q, k, v, qo, ko, backend="torch").sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# ------------------------------------------------------------------- Triton through the interpreter


def check_against_reference(
    c_lens, kv_lens, heads, head_dim, dtype, device, seed, jagged=True, scale=None
):
    q, k, v, qo, ko = make_problem(c_lens, kv_lens, heads, head_dim, dtype, device, seed, jagged)
    got = candidate_attention(q, k, v, qo, ko, scale=scale, backend="triton")
    want = candidate_attention_ref(q, k, v, qo, ko, scale=scale)
    assert got.dtype == dtype and got.shape == q.shape
    assert_close(got, want, "attention", name=f"candidate_attention C={c_lens} L={kv_lens}")


users = st.lists(
    st.tuples(
        st.one_of(st.sampled_from([0, 1, BLOCK - 1, BLOCK + 1]), st.integers(0, 40)),
        st.one_of(st.sampled_from([0, 1, BLOCK - 1, BLOCK, BLOCK + 1]), st.integers(0, 50)),
    ),
    min_size=1,
    max_size=5,
)


@pytest.mark.interpreter
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@settings(max_examples=40, **HYPOTHESIS)
@given(
    users=users,
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from(HEAD_DIMS + ODD_HEAD_DIMS),
    seed=st.integers(0, 2**16),
)
def test_triton_matches_reference_jagged(dtype, users, heads, head_dim, seed):
    c_lens = [c for c, _ in users]
    kv_lens = [kv for _, kv in users]
    check_against_reference(c_lens, kv_lens, heads, head_dim, dtype, "cpu", seed)


@pytest.mark.interpreter
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@settings(max_examples=30, **HYPOTHESIS)
@given(
    n_q=st.one_of(st.sampled_from(AROUND_BLOCKS), st.integers(1, 70)),
    n_kv=st.one_of(st.sampled_from(AROUND_BLOCKS), st.integers(1, 70)),
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from(HEAD_DIMS + ODD_HEAD_DIMS),
    seed=st.integers(0, 2**16),
)
def test_triton_matches_reference_one_user(dtype, n_q, n_kv, heads, head_dim, seed):
    check_against_reference([n_q], [n_kv], heads, head_dim, dtype, "cpu", seed, jagged=False)


@pytest.mark.interpreter
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "c_lens, kv_lens, heads, head_dim",
    [
        ([1], [1], 1, 16),
        ([BLOCK + 1], [BLOCK - 1], 2, 32),
        ([2 * BLOCK], [2 * BLOCK + 1], 4, 64),
        ([3], [5], 1, 128),
        ([5, 1, 0, 17, 2, 9], [33, 0, 4, 1, 16, 0], 2, 16),
        ([4, 4], [0, 0], 2, 24),
        ([0, 0, 3], [3, 5, 7], 1, 40),
        ([1] * 20, list(range(20)), 1, 16),
    ],
    ids=[
        "1cand-L1",
        "block+1-cands-block-1-hist",
        "2blocks-L2blocks+1",
        "Dh128",
        "six-unequal-users",
        "all-histories-empty",
        "users-without-candidates",
        "20-users-1-cand",
    ],
)
def test_triton_edge_cases(dtype, c_lens, kv_lens, heads, head_dim):
    check_against_reference(c_lens, kv_lens, heads, head_dim, dtype, "cpu", seed=1)


@pytest.mark.interpreter
@pytest.mark.usefixtures("nan_poison")
def test_triton_strided_inputs_and_custom_scale():
    """Views with arbitrary strides (q/k/v sliced out of one packed qkv tensor) are read in place."""
    g = torch.Generator().manual_seed(3)
    packed = torch.randn(30, 3, 2, 32, generator=g)  # (N, qkv, H, Dh)
    q, k, v = packed[:12, 0], packed[:, 1], packed[:, 2]
    qo, ko = offsets_from_lengths([5, 7]), offsets_from_lengths([13, 17])
    got = candidate_attention(q, k, v, qo, ko, scale=0.3, backend="triton")
    assert_close(got, candidate_attention_ref(q, k, v, qo, ko, scale=0.3), "attention")


@pytest.mark.interpreter
@pytest.mark.usefixtures("nan_poison")
def test_triton_one_user_without_history_gets_zeros():
    q, k, v, _, _ = make_problem([5], [0], 2, 16, torch.float16, jagged=False)
    assert (candidate_attention(q, k, v, backend="triton") == 0).all()


@pytest.mark.interpreter
def test_triton_no_candidates_returns_empty():
    q, k, v, _, _ = make_problem([0], [5], 2, 16, torch.float32, jagged=False)
    assert candidate_attention(q, k, v, backend="triton").shape == (0, 2, 16)


@pytest.mark.interpreter
def test_triton_refuses_autograd():
    q, k, v, _, _ = make_problem([3], [4], 1, 16, torch.float32, jagged=False)
    q.requires_grad_(True)
    with pytest.raises(InputError, match="autograd"):
        candidate_attention(q, k, v, backend="triton")
    with torch.no_grad():
        candidate_attention(q, k, v, backend="triton")


# ------------------------------------------------------------------------------------ on the GPU


@pytest.mark.gpu
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@settings(max_examples=40, **HYPOTHESIS)
@given(
    users=st.lists(
        st.tuples(
            st.integers(0, 300),
            st.one_of(st.sampled_from([0, 1, 63, 64, 65, 127, 129]), st.integers(0, 700)),
        ),
        min_size=1,
        max_size=8,
    ),
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from(HEAD_DIMS + ODD_HEAD_DIMS),
    seed=st.integers(0, 2**16),
)
def test_gpu_matches_reference(dtype, users, heads, head_dim, seed):
    c_lens = [c for c, _ in users]
    kv_lens = [kv for _, kv in users]
    check_against_reference(c_lens, kv_lens, heads, head_dim, dtype, "cuda", seed)


@pytest.mark.gpu
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("n_q, n_kv", [(4096, 1024), (4097, 257), (1, 1)])
def test_gpu_one_user_large(dtype, n_q, n_kv):
    check_against_reference([n_q], [n_kv], 4, 128, dtype, "cuda", seed=0, jagged=False)


# ---------------------------------------------------------------------------- input validation


def _qkv(n_q=3, n_kv=4, heads=2, head_dim=16, dtype=torch.float32):
    return make_problem([n_q], [n_kv], heads, head_dim, dtype, jagged=False)[:3]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda q, k, v: (q[0], k, v, None, None), "q must have 3 dimensions"),
        (lambda q, k, v: (q.long(), k, v, None, None), "dtype int64"),
        (lambda q, k, v: (q, k, v[:-1], None, None), "same shape"),
        (lambda q, k, v: (q, k.half(), v.half(), None, None), "share one dtype"),
        (lambda q, k, v: (q[:, :1], k, v, None, None), "H and Dh must match"),
        (lambda q, k, v: (q, k, v, torch.tensor([0, 3]), None), "both q_offsets and kv_offsets"),
        (lambda q, k, v: (q, k, v, torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0, 4])), "int64"),
        (lambda q, k, v: (q, k, v, torch.tensor([0, 2, 3]), torch.tensor([0, 4])), "same users"),
        (lambda q, k, v: (q, k, v, torch.tensor([0, 2]), torch.tensor([0, 4])), "end at the number of rows"),
        (lambda q, k, v: (q, k, v, torch.tensor([1, 3]), torch.tensor([0, 4])), "start at 0"),
        (lambda q, k, v: (q, k, v, torch.tensor([0, 3, 1, 3]), torch.tensor([0, 1, 2, 4])), "non-decreasing"),
        (lambda q, k, v: (q, k, v, torch.tensor([[0, 3]]), torch.tensor([[0, 4]])), "shape \\[B\\+1\\]"),
        (lambda q, k, v: (q.to("meta"), k, v, None, None), "one device"),
    ],
    ids=[
        "q-2d", "q-int", "kv-shape", "mixed-dtype", "head-mismatch", "one-offsets", "int32-offsets",
        "offsets-length", "offsets-end", "offsets-start", "offsets-decrease", "offsets-2d", "device",
    ],
)  # fmt: skip
def test_validation_errors(mutate, message):
    args = mutate(*_qkv())
    with pytest.raises(InputError, match=message):
        candidate_attention(*args, backend="torch")


def test_validation_bad_scale_and_backend():
    q, k, v = _qkv()
    with pytest.raises(InputError, match="scale must be finite"):
        candidate_attention(q, k, v, scale=float("nan"), backend="torch")
    with pytest.raises(InputError, match="unknown kernel backend"):
        candidate_attention(q, k, v, backend="cuda")
