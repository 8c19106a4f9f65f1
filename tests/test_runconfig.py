"""Settings files (``--config``), runs that remember their dataset, and output that explains
itself: the shipped ``configs/ml-100k.yaml`` is the committed results' settings; unknown keys and
bad values are named; flags override the file; a run's ``run.yaml`` repeats it; ``evaluate`` and
``finetune --pretrained`` find the recorded dataset; a mismatch names both datasets; the log is
labelled and has no progress bars when stderr is not a terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from srp4ctr.cli import build_parser, experiment_settings
from srp4ctr.errors import InputError
from srp4ctr.models import ModelConfig
from srp4ctr.runconfig import dump_run_config, load_run_config
from srp4ctr.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    # the default cache of these runs is their own folder's (never the user's)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["SRP4CTR_DATA_DIR"] = str(Path(cwd) / "default-cache")
    return subprocess.run([sys.executable, "-m", "srp4ctr", *args], capture_output=True,
                          text=True, timeout=600, env=env, cwd=str(cwd), check=False)


def _settings(*argv: str) -> dict:
    return experiment_settings(build_parser().parse_args(["experiment", "--out", "x", *argv]))


def test_shipped_config_is_the_committed_results_settings():
    """configs/ml-100k.yaml resolves to exactly the settings recorded in
    docs/results/ml-100k/results.json (the table in the README)."""
    got = _settings("--config", str(ROOT / "configs" / "ml-100k.yaml"))
    want = json.loads((ROOT / "docs" / "results" / "ml-100k" / "results.json").read_text())
    # a setting added after the results were recorded is absent there: its default then (every
    # new setting's default is the behaviour before it)
    assert got["model_config"] == ModelConfig.from_dict(want["model_config"])
    assert got["pretrain_model_config"] == ModelConfig.from_dict(want["pretrain_model_config"])
    assert got["train_config"] == TrainConfig.from_dict(want["train_config"])
    assert got["pretrain_config"] == TrainConfig.from_dict(want["pretrain_config"])
    assert got["seeds"] == len(want["seeds"])
    assert got["jobs"] == want["parallel"]["jobs"]
    assert load_run_config(ROOT / "configs" / "ml-100k.yaml")["dataset"] == {"name": "ml-100k"}


def test_tuned_config_differs_from_the_shipped_one_only_where_its_header_says():
    """configs/ml-100k-tuned.yaml (the settings chosen on validation, docs/results/ml-100k/
    tuning.md) resolves, and differs from configs/ml-100k.yaml in the settings it names only."""
    base = _settings("--config", str(ROOT / "configs" / "ml-100k.yaml"))
    tuned = _settings("--config", str(ROOT / "configs" / "ml-100k-tuned.yaml"))

    def diff(key):
        a, b = base[key].to_dict(), tuned[key].to_dict()
        return {k: b[k] for k in a if a[k] != b[k]}

    weights = {"item": 3.0, "rating": 2.0, "hour": 0.25, "weekday": 0.25}
    assert diff("model_config") == {"head_user_features": True}
    assert diff("pretrain_model_config") == {"head_user_features": True, "loss_weights": weights}
    assert diff("pretrain_config") == {"epochs": 100, "lr": 0.004, "early_stopping": False}
    assert diff("train_config") == {}
    assert tuned["seeds"] == base["seeds"] and tuned["jobs"] == base["jobs"]
    assert base["pretrain_overrides"] == {}
    assert tuned["pretrain_overrides"] == {"bert": {"lr": 0.001}}
    # the experiment's plan: each pre-training kind with its own settings
    from pathlib import Path as _P

    from srp4ctr.train.experiment import _plan

    empty = {"pretrain": {}, "details": {}}
    tasks = _plan(empty, [0], ["srp4ctr_fgbert", "srp4ctr_bert"], _P("x"),
                  tuned["model_config"], tuned["pretrain_model_config"], tuned["train_config"],
                  tuned["pretrain_config"], False, False, tuned["pretrain_overrides"])
    lrs = {t.name: t.kwargs["train_config"].lr for t in tasks if t.kind == "pretrain"}
    assert lrs == {"fgbert": 0.004, "bert": 0.001}


@pytest.mark.parametrize("text,message", [
    ("experiment:\n  pretrain_overrides:\n    sasrec: {lr: 0.1}\n", "not a pre-training kind"),
    ("experiment:\n  pretrain_overrides:\n    bert: {lrr: 0.1}\n", "unknown training setting"),
    ("experiment:\n  pretrain_overrides:\n    bert: {seed: 3}\n", "set by the experiment"),
    ("experiment:\n  pretrain_overrides:\n    bert: 3\n", "mapping"),
])
def test_bad_pretrain_overrides_are_named(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(InputError, match=message):
        load_run_config(f)


def test_flags_override_the_file_and_the_file_overrides_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  d_model: 32\n  dropout: 0.2\npretrain_model:\n  dropout: 0.3\n"
                 "finetune:\n  epochs: 4\n  lr: 1e-3\n  warmup_ratio: 0.1\n"
                 "pretrain:\n  batch_size: 16\nexperiment:\n  seeds: [3, 4]\n  jobs: 2\n")
    s = _settings("--config", str(f))
    assert s["model_config"].d_model == 32 and s["model_config"].dropout == 0.2
    assert s["pretrain_model_config"].dropout == 0.3 and s["pretrain_model_config"].d_model == 32
    assert s["train_config"].epochs == 4 and s["train_config"].lr == 1e-3  # "1e-3": a float
    assert s["train_config"].warmup_ratio == 0.1  # a field without a flag
    assert s["pretrain_config"].batch_size == 16 and s["pretrain_config"].epochs == 30
    assert s["seeds"] == [3, 4] and s["jobs"] == 2
    s = _settings("--config", str(f), "--epochs", "7", "--d-model", "48", "--seeds", "2",
                  "--pretrain-batch-size", "8", "--jobs", "1")
    assert s["train_config"].epochs == 7 and s["model_config"].d_model == 48
    assert s["pretrain_model_config"].d_model == 48
    assert s["pretrain_config"].batch_size == 8 and s["seeds"] == 2 and s["jobs"] == 1
    s = _settings()  # no file: the defaults
    assert s["model_config"] == ModelConfig() and s["train_config"] == TrainConfig()
    assert s["seeds"] == 5 and s["jobs"] == 1


@pytest.mark.parametrize("text,message", [
    ("model:\n  d_modle: 3\n", r"unknown key\(s\) \['model.d_modle'\]"),
    ("finetune:\n  epoch: 3\n", r"unknown key\(s\) \['finetune.epoch'\]"),
    ("trainer:\n  epochs: 3\n", r"unknown section\(s\) \['trainer'\]"),
    ("pretrain_model:\n  d_model: 32\n", r"unknown key\(s\) \['pretrain_model.d_model'\]"),
    ("finetune:\n  lr: -1\n", r"section 'finetune': lr must be a finite number > 0"),
    ("model:\n  n_heads: 3\n", r"section 'model': d_model \(64\) must be a multiple"),
    ("experiment:\n  models: [dien]\n", r"unknown experiment.models \['dien'\]"),
    ("experiment:\n  seeds: 0\n", r"experiment.seeds must be"),
    ("[1, 2]\n", r"a mapping of sections"),
    ("model: [\n", r"not valid YAML"),
])
def test_bad_config_files_are_named(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(InputError, match=message) as e:
        load_run_config(f)
    assert str(f) in str(e.value)


def test_bad_config_file_is_a_one_line_cli_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  d_modle: 3\n")
    proc = _cli("finetune", "--config", "bad.yaml", "--out", "run", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("srp4ctr: error:")]
    assert len(errors) == 1 and "model.d_modle" in errors[0]


def test_dump_and_load_round_trip(tmp_path):
    cfg = {"dataset": {"name": "csv", "path": str(tmp_path / "x.csv"), "columns": {"user": "u"}},
           "model": ModelConfig(d_model=32).to_dict(), "finetune": TrainConfig(epochs=3).to_dict()}
    (tmp_path / "c.yaml").write_text(dump_run_config(cfg, "a header"))
    back = load_run_config(tmp_path / "c.yaml")
    assert ModelConfig.from_dict(back["model"]) == ModelConfig(d_model=32)
    assert TrainConfig.from_dict(back["finetune"]) == TrainConfig(epochs=3)
    assert back["dataset"] == cfg["dataset"]


def test_runs_remember_their_dataset_and_repeat_from_run_yaml(tmp_path):
    """From one settings file: pre-train; fine-tune from it with no dataset flags (the run's
    recorded dataset and the encoder's architecture); evaluate with none; repeat the fine-tuning
    from its run.yaml; a run given another dataset names both."""
    from train_fixtures import write_tiny_ml1m

    write_tiny_ml1m(tmp_path / "ml-1m", n_users=16, n_items=30)
    write_tiny_ml1m(tmp_path / "other", n_users=12, n_items=20, seed=1)
    (tmp_path / "tiny.yaml").write_text(
        "dataset:\n  name: ml-1m\n  path: ml-1m\n  data_dir: cache\n"
        "model:\n  d_model: 16\n  n_layers: 1\n  max_len: 16\n  n_queries: 2\n"
        "  head_hidden: [16]\n"
        "pretrain:\n  epochs: 1\n  batch_size: 16\n  num_threads: 1\n"
        "finetune:\n  epochs: 1\n  batch_size: 64\n  num_threads: 1\n")
    proc = _cli("pretrain", "--config", "tiny.yaml", "--out", "runs/pre", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # labelled output: the table on stdout, the log on stderr without progress bars
    assert re.search(r"^validation\s", proc.stdout, re.MULTILINE) and "written to runs/pre" in proc.stdout
    assert re.search(r"fgbert epoch 1/1: train loss [\d.]+ .*\| validation .*ndcg@10",
                     proc.stderr), proc.stderr
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr
    assert "wrote runs/pre" in proc.stderr

    # no --dataset, no --d-model: both from runs/pre
    proc = _cli("finetune", "--pretrained", "runs/pre", "--out", "runs/ctr", "--epochs", "1",
                "--threads", "1", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "recorded by runs/pre" in proc.stderr
    first = json.loads(proc.stdout)
    cfg = json.loads((tmp_path / "runs/ctr/config.json").read_text())
    assert cfg["model_config"]["d_model"] == 16 and cfg["model_config"]["n_layers"] == 1
    rec = cfg["dataset"]
    assert rec["name"] == "ml-1m" and Path(rec["path"]) == (tmp_path / "ml-1m").resolve()
    assert Path(rec["prepared"]).parent == (tmp_path / "cache").resolve()

    proc = _cli("evaluate", "--run", "runs/ctr", "--split", "test", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["auc"] == pytest.approx(first["test"]["auc"], abs=1e-9)
    proc = _cli("--quiet", "evaluate", "--run", "runs/ctr", "--split", "valid", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert re.match(r"srp4ctr runs/ctr on 'ml-1m', validation split \(\d+ samples\): auc ",
                    proc.stdout)

    # run.yaml repeats the run (same data, same settings, same seed: same weights)
    run_yaml = load_run_config(tmp_path / "runs/ctr/run.yaml")
    assert TrainConfig.from_dict(run_yaml["finetune"]).to_dict() == cfg["train_config"]
    assert run_yaml["model"] == cfg["model_config"]
    header = (tmp_path / "runs/ctr/run.yaml").read_text().splitlines()[0]
    assert "srp4ctr finetune --model srp4ctr --pretrained runs/pre --config run.yaml" in header
    proc = _cli("finetune", "--config", "runs/ctr/run.yaml", "--pretrained", "runs/pre",
                "--out", "runs/again", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tmp_path / "runs/again/config.json").read_text())
    assert again["weights_sha256"] == cfg["weights_sha256"]

    # another dataset: refused, both named by name, source and size
    proc = _cli("evaluate", "--run", "runs/ctr", "--dataset", "ml-1m", "--path", "other",
                "--data-dir", "cache", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert "trained on dataset 'ml-1m' from" in err and str(tmp_path / "ml-1m") in err
    assert "16 users" in err and "12 users" in err, err

    # the recorded prepared folder gone: found again by preparing the recorded source
    import shutil

    shutil.rmtree(tmp_path / "cache")
    proc = _cli("evaluate", "--run", "runs/ctr", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["auc"] == pytest.approx(first["test"]["auc"], abs=1e-9)
    # ... and with the source gone too: an error naming what was looked for
    shutil.rmtree(tmp_path / "cache")
    shutil.rmtree(tmp_path / "ml-1m")
    proc = _cli("evaluate", "--run", "runs/ctr", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "its source" in proc.stderr and "is gone" in proc.stderr, proc.stderr


def test_finetune_refuses_an_encoder_of_another_architecture(tmp_path):
    from train_fixtures import write_tiny_ml1m

    from srp4ctr import data
    from srp4ctr.train import finetune, pretrain

    ds = data.prepare("ml-1m", path=write_tiny_ml1m(tmp_path / "ml-1m", n_users=12, n_items=20),
                      data_dir=tmp_path / "cache", progress=False)
    small = ModelConfig(d_model=16, n_layers=1, max_len=16, head_hidden=(8,))
    tc = TrainConfig(epochs=1, batch_size=32, progress=False, num_threads=1)
    pretrain(ds, tmp_path / "pre", model_config=small, train_config=tc)
    for change in ({"d_model": 32}, {"max_len": 20}, {"n_layers": 2}):
        with pytest.raises(InputError, match="pre-trained encoder has " + next(iter(change))):
            finetune(ds, None, model_config=small.replace(**change), train_config=tc,
                     pretrained=tmp_path / "pre")
