"""``srp4ctr experiment`` on a tiny dataset: the files it writes, resume, and that running the
trainings in parallel worker processes gives the same numbers as running them one by one."""

from __future__ import annotations

import json

import pytest
from train_fixtures import write_tiny_ml1m

from srp4ctr import data
from srp4ctr.errors import InputError
from srp4ctr.models import ModelConfig
from srp4ctr.train import TrainConfig
from srp4ctr.train.experiment import run_experiment

TINY = dict(d_model=16, n_layers=1, n_heads=2, max_len=12, n_queries=2, head_hidden=(16, 8))
MODELS = ["din", "srp4ctr_nopretrain", "srp4ctr_fgbert", "srp4ctr_bert"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_exp")
    src = write_tiny_ml1m(root / "ml-1m", n_users=24, per_user=(12, 24))
    return data.prepare("ml-1m", path=str(src), data_dir=str(root / "cache"), progress=False)


def _run(ds, out, jobs, seeds=2, models=MODELS, resume=True):
    tc = TrainConfig(epochs=1, batch_size=64, progress=False, num_threads=1)
    pc = TrainConfig(epochs=1, batch_size=32, progress=False, num_threads=1)
    return run_experiment(ds, out, seeds=seeds, models=models, model_config=ModelConfig(**TINY),
                          train_config=tc, pretrain_config=pc, progress=False, jobs=jobs,
                          resume=resume)


@pytest.mark.slow
def test_parallel_equals_serial_and_resume(tiny, tmp_path):
    serial = _run(tiny, tmp_path / "serial", jobs=1)
    parallel = _run(tiny, tmp_path / "parallel", jobs=2)
    for out, res in ((tmp_path / "serial", serial), (tmp_path / "parallel", parallel)):
        on_disk = json.loads((out / "results.json").read_text())
        assert on_disk["runs"] == res["runs"]
        assert set(on_disk["runs"]) == set(MODELS)
        for m in MODELS:
            for k in ("auc", "gauc", "logloss"):
                assert len(on_disk["runs"][m][k]) == 2
        assert set(on_disk["pretrain"]) == {"fgbert", "bert"}
        assert (out / "results.md").read_text().count("`srp4ctr_fgbert`") == 1
        assert (out / "results.png").stat().st_size > 0
    assert parallel["parallel"] == {"jobs": 2, "threads_per_job": 1}
    # same seeds, same data, one thread each: the same numbers whichever process ran them
    for m in MODELS:
        assert parallel["runs"][m]["auc"] == pytest.approx(serial["runs"][m]["auc"], abs=1e-9)

    # resume: nothing is retrained, a new seed only adds its runs
    before = json.loads((tmp_path / "serial" / "results.json").read_text())
    again = _run(tiny, tmp_path / "serial", jobs=1)
    assert again["details"] == before["details"]
    more = _run(tiny, tmp_path / "serial", jobs=2, seeds=3)
    for m in MODELS:
        assert more["runs"][m]["auc"][:2] == before["runs"][m]["auc"]
        assert len(more["runs"][m]["auc"]) == 3


def test_bad_arguments(tiny, tmp_path):
    with pytest.raises(InputError, match="jobs"):
        _run(tiny, tmp_path, jobs=0)
    with pytest.raises(InputError, match="unknown model"):
        _run(tiny, tmp_path, jobs=1, models=["nope"])
