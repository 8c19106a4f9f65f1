"""Bad command-line input is a one-line error with exit status 2 (never a traceback), training
settings are checked (unknown keys named), ``--version`` answers, and written folders respect
the umask."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch

from srp4ctr.errors import InputError
from srp4ctr.train import TrainConfig


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "srp4ctr", *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=cwd, check=False)


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "0"], "epochs must be a positive integer"),
    (["--lr", "-1"], "lr must be a finite number > 0"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--batch-size", "0"], "batch_size must be a positive integer"),
    (["--weight-decay", "-0.1"], "weight_decay"),
    (["--device", "tpu"], "device must be 'cpu', 'cuda' or 'cuda:N'"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "sees no CUDA device")]))
def test_bad_training_flags_are_one_line_errors(tmp_path, flags, message):
    from train_fixtures import write_tiny_ml1m

    src = write_tiny_ml1m(tmp_path / "ml-1m", n_users=12, n_items=30)
    proc = _cli("finetune", "--dataset", "ml-1m", "--path", str(src), "--data-dir",
                str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--quiet", *flags,
                cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("srp4ctr: error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_version():
    proc = _cli("--version")
    from srp4ctr import __version__

    assert proc.returncode == 0 and proc.stdout.strip() == f"srp4ctr {__version__}"


def test_train_config_round_trip_and_unknown_keys():
    tc = TrainConfig(epochs=3, lr=5e-4, negatives="uni100")
    assert TrainConfig.from_dict(tc.to_dict()) == tc
    with pytest.raises(InputError, match=r"unknown training setting\(s\) \['epoch'\]"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(InputError, match="negatives"):
        TrainConfig(negatives="uni1000")
    with pytest.raises(InputError, match="patience"):
        TrainConfig(patience=-1)


def test_checkpoints_and_bundles_respect_the_umask(tmp_path):
    from srp4ctr._files import atomic_write_dir

    old = os.umask(0o022)
    try:
        out = atomic_write_dir(tmp_path / "ckpt", lambda d: (d / "f").write_text("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    old = os.umask(0o077)
    try:
        out = atomic_write_dir(tmp_path / "private", lambda d: None)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700


def test_click_only_data_is_named_at_prepare_and_finetune(tmp_path):
    """A log without rating or label column: every interaction a positive. ``prepare`` warns
    and names --negatives uni100; ``finetune`` without it is a one-line error saying so."""
    rows = ["uid,iid,ts"] + [f"u{u},i{(u * 7 + k) % 40},{1000 + 100 * k}"
                             for u in range(20) for k in range(15)]
    (tmp_path / "log.csv").write_text("\n".join(rows) + "\n")
    common = ["--dataset", "csv", "--path", str(tmp_path / "log.csv"), "--columns",
              "user=uid,item=iid,timestamp=ts", "--data-dir", str(tmp_path / "cache")]
    proc = _cli("data", "prepare", *common, "--quiet", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "click-only" in proc.stderr and "--negatives uni100" in proc.stderr
    proc = _cli("finetune", *common, "--out", str(tmp_path / "run"), "--quiet",
                cwd=str(tmp_path))
    assert proc.returncode == 2 and "--negatives uni100" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("env,first,want", [
    ({}, "srp4ctr", "PASSIVE"),                         # the library default
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "srp4ctr", "ACTIVE"),  # the user's choice wins
    ({}, "torch", "None"),                              # too late to take effect: left alone
])
def test_omp_wait_policy_default_for_library_use(env, first, want):
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "PYTHONPATH")}
    code = f"import {first}, srp4ctr, os; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**base, **env}, timeout=120, check=True).stdout.strip()
    assert out == want
