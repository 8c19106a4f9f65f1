"""Serving bundles (``srp4ctr.bundle``): what ``finetune`` and ``srp4ctr bundle`` write, an engine
served from a bundle copied alone into an empty folder (no data directory, no network), and the
refusal of incomplete, truncated, altered or other-version bundles."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from train_fixtures import perturbed, prepare_tiny, raw_history

from srp4ctr.bundle import BUNDLE_FILE, make_bundle, read_bundle
from srp4ctr.engine import Engine
from srp4ctr.errors import BundleError, CheckpointError, InputError
from srp4ctr.models import ModelConfig
from srp4ctr.models.checkpoint import model_identity
from srp4ctr.train import TrainConfig, finetune, load_model
from srp4ctr.train.checkpoint import read_config, save_checkpoint

CONFIG = {"d_model": 16, "n_layers": 2, "n_heads": 2, "max_len": 16, "n_queries": 2,
          "head_hidden": (16, 8)}
BUNDLE_FILES = ["bundle.json", "config.json", "model.safetensors", "serving.json", "serving.npz"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    ds = prepare_tiny(root)
    tc = TrainConfig(epochs=1, max_steps_per_epoch=1, batch_size=64, progress=False)
    finetune(ds, root / "run", model_config=ModelConfig(**CONFIG), train_config=tc)
    return root, ds


def test_finetune_writes_a_bundle(trained):
    root, ds = trained
    run = root / "run"
    names = sorted(p.name for p in run.iterdir())
    assert set(BUNDLE_FILES) <= set(names) and "metrics.json" in names
    doc = read_bundle(run)
    assert doc["model_fingerprint"] == model_identity(read_config(run))
    assert doc["dataset"]["fingerprint"] == ds.fingerprint
    assert sorted(doc["files"]) == [n for n in BUNDLE_FILES if n != BUNDLE_FILE]
    # compact: the serving tables, not the interactions
    assert (run / "serving.npz").stat().st_size < sum(
        f.stat().st_size for f in (Path(ds.path) / "arrays").iterdir())


_ALONE = textwrap.dedent('''
    import json, socket, sys
    def refuse(*a, **k):
        raise OSError("network access is blocked in this test")
    socket.socket.connect = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    from srp4ctr.engine import Engine
    bundle, inputs = sys.argv[1:3]
    spec = json.load(open(inputs))
    engine = Engine.load(bundle, backend="torch", threads=1)
    caches = [engine.encode_user(h) for h in spec["histories"]]
    print(json.dumps([engine.score(c, spec["candidates"]).tolist() for c in caches]))
''')


def test_a_bundle_copied_alone_serves_the_training_runs_scores(trained, tmp_path):
    root, ds = trained
    engine = Engine.load(root / "run", data_dir=root / "cache", backend="torch", threads=1)
    # `srp4ctr bundle` copies a bundle run's listed files only
    from srp4ctr.cli import main

    assert main(["bundle", "--run", str(root / "run"), "--out", str(tmp_path / "b")]) == 0
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == BUNDLE_FILES
    alone = tmp_path / "server" / "model"
    shutil.copytree(tmp_path / "b", alone)
    empty = {name: tmp_path / "server" / name for name in ("home", "cache", "data", "tmp")}
    for p in empty.values():
        p.mkdir()
    histories = [raw_history(ds, u) for u in (1, 5, 9)]
    histories.append({"item_id": [], "timestamp": [], "rating": []})
    cands = [int(x) for x in ds.item_raw[1:]] + [10**7]
    (tmp_path / "in.json").write_text(json.dumps({"histories": histories, "candidates": cands}))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SRP4CTR_") and k != "PYTHONPATH"}
    env.update(HOME=str(empty["home"]), XDG_CACHE_HOME=str(empty["cache"]),
               SRP4CTR_DATA_DIR=str(empty["data"]), TMPDIR=str(empty["tmp"]),
               PIP_NO_INDEX="1", no_proxy="*")
    proc = subprocess.run([sys.executable, "-c", _ALONE, str(alone), str(tmp_path / "in.json")],
                          capture_output=True, text=True, env=env, timeout=300, check=False,
                          cwd=str(tmp_path / "server"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    for h, probs in zip(histories, got):
        want = engine.score(engine.encode_user(h), cands).numpy()
        assert np.abs(np.asarray(probs, np.float32) - want).max() <= 1e-6
    assert not any(any(p.iterdir()) for name, p in empty.items() if name != "home")


def test_a_run_from_before_bundles_gets_one_from_its_dataset(trained, tmp_path):
    root, ds = trained
    model, cfg = load_model(root / "run", dataset_fingerprint=ds.fingerprint)
    perturbed(model, seed=3)
    cfg = {k: v for k, v in cfg.items() if k not in ("format", "format_version",
                                                      "weights_sha256")}
    # an older run: it recorded its dataset's name and fingerprint, not where it was prepared
    cfg["dataset"] = {k: cfg["dataset"][k] for k in ("name", "fingerprint")}
    plain = save_checkpoint(tmp_path / "plain", model, cfg)  # a checkpoint, no bundle files
    with pytest.raises(BundleError, match="not a serving bundle"):
        read_bundle(plain)
    with pytest.raises(CheckpointError, match="neither in its recorded folder nor under"):
        make_bundle(plain, tmp_path / "b", data_dir=tmp_path / "nothing-here")
    doc = make_bundle(plain, tmp_path / "b", data_dir=root / "cache")
    assert doc["model_fingerprint"] == model_identity(read_config(plain))
    h = raw_history(ds, 4)
    a = Engine.load(plain, data_dir=root / "cache")
    b = Engine.load(tmp_path / "b")
    assert torch.equal(a.score(a.encode_user(h), [1, 2, 3]), b.score(b.encode_user(h), [1, 2, 3]))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="refusing"):
        make_bundle(plain, busy, data_dir=root / "cache")
    with pytest.raises(InputError, match="another folder"):
        make_bundle(tmp_path / "b", tmp_path / "b")


def _damage(folder: Path, how: str) -> None:
    if how == "missing serving.npz":
        (folder / "serving.npz").unlink()
    elif how == "truncated weights":
        w = folder / "model.safetensors"
        w.write_bytes(w.read_bytes()[:-100])
    elif how == "altered serving tables":
        p = folder / "serving.npz"
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0xFF
        p.write_bytes(bytes(b))
    elif how == "altered config":  # same size: n_heads 2 -> 4 (same weight shapes)
        p = folder / "config.json"
        text = p.read_text()
        assert '"n_heads": 2' in text
        p.write_text(text.replace('"n_heads": 2', '"n_heads": 4'))
    elif how == "other version":
        p = folder / BUNDLE_FILE
        doc = json.loads(p.read_text())
        doc["format_version"] = 99
        p.write_text(json.dumps(doc))
    elif how == "not json":
        (folder / BUNDLE_FILE).write_text("{not json")
    elif how == "swapped weights":  # another model's weights with its own config.json
        cfg = json.loads((folder / "config.json").read_text())
        cfg["weights_sha256"] = "0" * 64
        (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("how,message", [
    ("missing serving.npz", "missing"), ("truncated weights", "truncated"),
    ("altered serving tables", "altered"), ("altered config", "altered|edited"),
    ("other version", "version 99"), ("not json", "unreadable"),
    ("swapped weights", "truncated or replaced"),
])
def test_a_damaged_bundle_is_refused(trained, tmp_path, how, message):
    root, _ = trained
    folder = tmp_path / "b"
    shutil.copytree(root / "run", folder)
    _damage(folder, how)
    with pytest.raises(BundleError, match=message):
        Engine.load(folder)
