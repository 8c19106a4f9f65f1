"""Backend choice: what `import srp4ctr.kernels` does and does not do, the automatic choice, the
environment override, set_backend and the per-call backend, and the NaN-poisoning fixture."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import srp4ctr.kernels as K
from srp4ctr.errors import InputError
from srp4ctr.kernels import Backend, BackendUnavailableError, _backend


def run_python(code: str, **env_changes: str | None) -> str:
    """Run ``code`` in a fresh interpreter with the environment changed; return its stdout."""
    env = dict(os.environ)
    for name, value in env_changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_import_is_cheap_and_default_is_torch_without_cuda_or_interpreter():
    """In a fresh process with no GPU and no interpreter: importing touches neither triton nor
    CUDA, and the first op resolves the backend to torch."""
    out = run_python(
        "import sys, torch, srp4ctr.kernels as K, srp4ctr.kernels.reference\n"
        "print('triton' in sys.modules, torch.cuda.is_initialized())\n"
        "q = torch.randn(3, 2, 16); k = torch.randn(5, 2, 16)\n"
        "K.candidate_attention(q, k, k)\n"
        "print(K.get_backend().value, K.triton_available())",
        CUDA_VISIBLE_DEVICES="",
        TRITON_INTERPRET=None,
        SRP4CTR_KERNEL_BACKEND=None,
    )
    assert out.splitlines() == ["False False", "torch False"]


@pytest.fixture
def restore_backend():
    saved = (_backend._chosen, _backend._explicit)
    yield
    _backend._chosen, _backend._explicit = saved


@pytest.fixture
def unresolved(restore_backend, monkeypatch):
    """The backend not yet resolved, and no override in the environment."""
    _backend._chosen, _backend._explicit = None, False
    monkeypatch.delenv(_backend.ENV_BACKEND, raising=False)
    return monkeypatch


def test_env_override_to_torch(unresolved):
    unresolved.setenv(_backend.ENV_BACKEND, "torch")
    assert K.get_backend() is Backend.TORCH


def test_env_override_to_triton_where_it_cannot_run_raises(unresolved):
    unresolved.setenv(_backend.ENV_BACKEND, "Triton")
    unresolved.setattr(_backend, "triton_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="cannot run here"):
        K.get_backend()


def test_env_override_rejects_unknown_names(unresolved):
    unresolved.setenv(_backend.ENV_BACKEND, "cuda")
    with pytest.raises(InputError, match="unknown kernel backend 'cuda'"):
        K.get_backend()


@pytest.mark.interpreter
def test_default_is_triton_under_the_interpreter(unresolved):
    assert K.triton_available()
    assert K.get_backend() is Backend.TRITON


@pytest.mark.usefixtures("restore_backend")
def test_set_backend_and_reset():
    K.set_backend("torch")
    assert K.get_backend() is Backend.TORCH
    K.set_backend(Backend.TORCH)
    assert K.get_backend() is Backend.TORCH
    K.set_backend(None)
    assert K.get_backend() is (Backend.TRITON if K.triton_available() else Backend.TORCH)
    with pytest.raises(InputError, match="unknown kernel backend"):
        K.set_backend("fastest")


@pytest.mark.usefixtures("restore_backend")
def test_per_call_backend_wins():
    q, k = torch.randn(3, 2, 16), torch.randn(5, 2, 16)
    K.set_backend("torch")
    want = K.reference.candidate_attention_ref(q, k, k)
    torch.testing.assert_close(K.candidate_attention(q, k, k, backend="torch"), want)
    if not K.triton_available():
        with pytest.raises(BackendUnavailableError):
            K.candidate_attention(q, k, k, backend="triton")


@pytest.mark.usefixtures("restore_backend")
def test_automatic_triton_falls_back_where_triton_cannot_run():
    """Chosen automatically, Triton yields to torch for tensors it cannot run on (here: 'meta'
    tensors stand in for CPU tensors on a CUDA machine); asked for explicitly, it refuses."""
    _backend._chosen, _backend._explicit = Backend.TRITON, False
    device = torch.device("meta")
    assert _backend.select(None, device, False, "op") is Backend.TORCH
    _backend._explicit = True
    with pytest.raises(BackendUnavailableError, match="move them or use backend='torch'"):
        _backend.select(None, device, False, "op")


def test_nan_poison_fixture_poisons(nan_poison):
    assert torch.isnan(torch.empty(4)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(2, 3))).all()
    assert (torch.empty(3, dtype=torch.int64) == torch.iinfo(torch.int64).max).all()
