"""candidate_tower_layer / candidate_tower: the reference against a naive per-candidate loop built
from torch.nn modules, the fused Triton kernel against the reference (interpreter: fp32/fp16;
gpu: fp32/fp16/bf16), the composed path for wide models, and input validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from srp4ctr.errors import InputError
from srp4ctr.kernels import TowerLayerParams, candidate_tower, candidate_tower_layer
from srp4ctr.kernels.reference import candidate_tower_layer_ref, candidate_tower_ref
from srp4ctr.kernels.testing import assert_close, offsets_from_lengths, random_tower_params

BLOCK = 16  # the interpreter config's BLOCK_M/BLOCK_N/BLOCK_F (kernels/_triton/candidate_tower.py)
HYPOTHESIS = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def make_problem(c_lens, kv_lens, heads, head_dim, d_ff, dtype, device="cpu", seed=0, jagged=True):
    g = torch.Generator().manual_seed(seed)
    d = heads * head_dim
    z = torch.randn(sum(c_lens), d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(sum(kv_lens), heads, head_dim, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(sum(kv_lens), heads, head_dim, generator=g).to(device=device, dtype=dtype)
    params = random_tower_params(d, d_ff, dtype=torch.float32, device=device, generator=g)
    if not jagged:
        return z, k, v, params, None, None
    return (
        z,
        k,
        v,
        params,
        offsets_from_lengths(c_lens, device),
        offsets_from_lengths(kv_lens, device),
    )


# --------------------------------------------------------------------------- the reference itself


def naive_tower_layer(z, k, v, params, c_lens, kv_lens):
    """One candidate at a time through nn.LayerNorm / nn.Linear / nn.GELU, attention per head."""
    d, d_ff = params.d_model, params.d_ff
    heads, head_dim = k.shape[1], k.shape[2]
    ln1, ln2 = torch.nn.LayerNorm(d).double(), torch.nn.LayerNorm(d).double()
    wq, wo = torch.nn.Linear(d, d).double(), torch.nn.Linear(d, d).double()
    w1, w2 = torch.nn.Linear(d, d_ff).double(), torch.nn.Linear(d_ff, d).double()
    with torch.no_grad():
        for mod, (w, b) in [
            (ln1, params[0:2]), (wq, params[2:4]), (wo, params[4:6]),
            (ln2, params[6:8]), (w1, params[8:10]), (w2, params[10:12]),
        ]:  # fmt: skip
            mod.weight.copy_(w)
            mod.bias.copy_(b)
    gelu = torch.nn.GELU()
    out = []
    q0 = kv0 = 0
    with torch.no_grad():
        for c_len, kv_len in zip(c_lens, kv_lens):
            k_u, v_u = k[kv0 : kv0 + kv_len].double(), v[kv0 : kv0 + kv_len].double()
            for i in range(q0, q0 + c_len):
                x = z[i].double()
                q = wq(ln1(x)).view(heads, head_dim)
                a = torch.zeros(heads, head_dim, dtype=torch.float64)
                for h in range(heads):
                    if kv_len:
                        w = torch.softmax(k_u[:, h] @ q[h] / head_dim**0.5, dim=0)
                        a[h] = w @ v_u[:, h]
                x = x + wo(a.reshape(d))
                out.append(x + w2(gelu(w1(ln2(x)))))
            q0, kv0 = q0 + c_len, kv0 + kv_len
    return torch.stack(out)


@pytest.mark.parametrize(
    "c_lens, kv_lens", [([3], [4]), ([2, 0, 3], [1, 5, 0])], ids=["one-user", "three-users"]
)
def test_reference_matches_naive_loop(c_lens, kv_lens):
    z, k, v, params, qo, ko = make_problem(c_lens, kv_lens, 2, 8, 24, torch.float64)
    params = params.to(torch.float64)
    got = candidate_tower_layer_ref(z, k, v, params, qo, ko)
    torch.testing.assert_close(got, naive_tower_layer(z, k, v, params, c_lens, kv_lens))


def test_reference_stack_is_layer_by_layer():
    z, k, v, p0, qo, ko = make_problem([2, 3], [4, 1], 2, 8, 32, torch.float32)
    p1 = random_tower_params(16, 32, generator=torch.Generator().manual_seed(9))
    k1, v1 = k.flip(0), v.flip(0)
    got = candidate_tower_ref(z, [(k, v), (k1, v1)], [p0, p1], qo, ko)
    want = candidate_tower_layer_ref(
        candidate_tower_layer_ref(z, k, v, p0, qo, ko), k1, v1, p1, qo, ko
    )
    torch.testing.assert_close(got, want)


def test_torch_backend_supports_autograd():
    z, k, v, params, qo, ko = make_problem([2, 2], [3, 0], 2, 8, 16, torch.float32)
    z.requires_grad_(True)
    candidate_tower_layer(z, k, v, params, qo, ko, backend="torch").sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


# ------------------------------------------------------------------- Triton through the interpreter


def check_layer(
    c_lens, kv_lens, heads, head_dim, d_ff, dtype, device, seed, jagged=True, param_dtype=None
):
    z, k, v, params, qo, ko = make_problem(
        c_lens, kv_lens, heads, head_dim, d_ff, dtype, device, seed, jagged
    )
    params = params.to(param_dtype or dtype)
    got = candidate_tower_layer(z, k, v, params, qo, ko, backend="triton")
    want = candidate_tower_layer_ref(z, k, v, params, qo, ko)
    assert got.dtype == dtype and got.shape == z.shape
    assert_close(
        got, want, "tower", name=f"tower layer C={c_lens} L={kv_lens} H={heads} Dh={head_dim}"
    )


@pytest.mark.interpreter
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@settings(max_examples=40, **HYPOTHESIS)
@given(
    users=st.lists(
        st.tuples(
            st.one_of(st.sampled_from([0, 1, BLOCK - 1, BLOCK + 1]), st.integers(0, 35)),
            st.one_of(st.sampled_from([0, 1, BLOCK, BLOCK + 1]), st.integers(0, 40)),
        ),
        min_size=1,
        max_size=4,
    ),
    shape=st.sampled_from([(1, 16), (2, 16), (2, 32), (4, 16), (2, 24), (1, 40), (2, 64), (1, 8)]),
    ffn_mult=st.sampled_from([1, 2, 4]),
    extra_ff=st.sampled_from([0, 0, 3]),  # widths off the BLOCK_F grid too
    jagged=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_triton_layer_matches_reference(dtype, users, shape, ffn_mult, extra_ff, jagged, seed):
    heads, head_dim = shape
    c_lens = [c for c, _ in users]
    kv_lens = [kv for _, kv in users]
    if not jagged:
        c_lens, kv_lens = [max(sum(c_lens), 1)], [sum(kv_lens)]
    d_ff = ffn_mult * heads * head_dim + extra_ff
    check_layer(c_lens, kv_lens, heads, head_dim, d_ff, dtype, "cpu", seed, jagged)


@pytest.mark.interpreter
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "c_lens, kv_lens, heads, head_dim, d_ff",
    [
        ([1], [1], 1, 16, 16),
        ([BLOCK + 1], [BLOCK - 1], 2, 32, 256),  # the model's default width d = 64
        ([3, 0, 5], [0, 2, 0], 2, 16, 64),  # empty histories and a user without candidates
        ([2, 1], [7, 9], 4, 64, 256),  # d = 256, the widest fused layer
        (
            [2, 3],
            [5, 4],
            2,
            136,
            300,
        ),  # d = 272: the composed path (torch linears + Triton attention)
    ],
    ids=["1cand-L1", "default-width", "empty-users", "d256", "d272-composed"],
)
def test_triton_layer_edge_cases(dtype, c_lens, kv_lens, heads, head_dim, d_ff):
    check_layer(c_lens, kv_lens, heads, head_dim, d_ff, dtype, "cpu", seed=4)


@pytest.mark.interpreter
@pytest.mark.usefixtures("nan_poison")
def test_triton_fp16_layer_with_fp32_weights():
    """Weights in another float dtype are rounded to the activations' dtype inside the kernel."""
    check_layer([5, 6], [9, 3], 2, 16, 64, torch.float16, "cpu", seed=5, param_dtype=torch.float32)


@pytest.mark.interpreter
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_tower_stack(dtype):
    z, k, v, p0, qo, ko = make_problem([4, 17], [20, 3], 2, 16, 128, dtype, seed=6)
    p1 = random_tower_params(32, 128, generator=torch.Generator().manual_seed(7))
    kv = [(k, v), (v.clone(), k.clone())]
    got = candidate_tower(z, kv, [p0.to(dtype), p1.to(dtype)], qo, ko, backend="triton")
    want = candidate_tower_ref(z, kv, [p0.to(dtype), p1.to(dtype)], qo, ko)
    assert_close(got, want, "tower", name="2-layer tower")


@pytest.mark.interpreter
def test_triton_refuses_autograd():
    z, k, v, params, _, _ = make_problem([3], [4], 1, 16, 16, torch.float32, jagged=False)
    params = params._replace(wq=params.wq.clone().requires_grad_(True))
    with pytest.raises(InputError, match="autograd"):
        candidate_tower_layer(z, k, v, params, backend="triton")


# ------------------------------------------------------------------------------------ on the GPU


@pytest.mark.gpu
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@settings(max_examples=25, **HYPOTHESIS)
@given(
    users=st.lists(st.tuples(st.integers(0, 600), st.integers(0, 300)), min_size=1, max_size=6),
    shape=st.sampled_from([(2, 32), (4, 16), (2, 24), (4, 64), (2, 128), (1, 8)]),
    ffn_mult=st.sampled_from([2, 4]),
    seed=st.integers(0, 2**16),
)
def test_gpu_layer_matches_reference(dtype, users, shape, ffn_mult, seed):
    heads, head_dim = shape
    c_lens = [c for c, _ in users]
    kv_lens = [kv for _, kv in users]
    check_layer(c_lens, kv_lens, heads, head_dim, ffn_mult * heads * head_dim, dtype, "cuda", seed)


# ---------------------------------------------------------------------------- input validation


def test_validation_errors():
    z, k, v, params, qo, ko = make_problem([2, 3], [4, 1], 2, 8, 32, torch.float32)
    with pytest.raises(InputError, match="need H \\* Dh == d"):
        candidate_tower_layer(z[:, :8], k, v, params, qo, ko, backend="torch")
    with pytest.raises(InputError, match="params.w2 has shape"):
        candidate_tower_layer(
            z, k, v, params._replace(w2=params.w2[:, :5]), qo, ko, backend="torch"
        )
    with pytest.raises(InputError, match="params.bq has shape"):
        candidate_tower_layer(z, k, v, params._replace(bq=params.bq[:3]), qo, ko, backend="torch")
    with pytest.raises(InputError, match="TowerLayerParams"):
        candidate_tower_layer(z, k, v, tuple(params), qo, ko, backend="torch")
    with pytest.raises(InputError, match="z must have 2 dimensions"):
        candidate_tower_layer(z[None], k, v, params, qo, ko, backend="torch")
    with pytest.raises(InputError, match="pairs for 1 layers"):
        candidate_tower(z, [(k, v), (k, v)], [params], qo, ko, backend="torch")
    with pytest.raises(InputError, match="every layer covers the same users"):
        candidate_tower(z, [(k, v), (k[:2], v[:2])], [params, params], qo, ko, backend="torch")


def test_params_helpers():
    params = random_tower_params(16, 40)
    assert isinstance(params, TowerLayerParams)
    assert (params.d_model, params.d_ff) == (16, 40)
    assert all(t.dtype == torch.float16 for t in params.to(torch.float16))


@pytest.mark.gpu
def test_gpu_tower_replays_through_a_cuda_graph():
    from srp4ctr.kernels import GraphedCall

    z, k, v, params, qo, ko = make_problem(
        [300, 0, 77], [50, 9, 0], 2, 32, 256, torch.bfloat16, "cuda", seed=8
    )
    params = params.to(torch.bfloat16)
    layers = [(k, v), (v, k)]

    def tower(x):
        return candidate_tower(x, layers, [params, params], qo, ko, validate=False)

    step = GraphedCall(tower, z)
    for scale in (1.0, -0.5):
        x = z * scale
        assert_close(
            step(x).clone(), candidate_tower_ref(x, layers, [params, params], qo, ko), "tower"
        )
