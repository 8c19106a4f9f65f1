"""Training end to end on a tiny synthetic dataset: pre-training, fine-tuning, checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from train_fixtures import write_tiny_ml1m

from srp4ctr import data
from srp4ctr.data.samples import CTRDataset
from srp4ctr.errors import CheckpointError
from srp4ctr.models import ModelConfig
from srp4ctr.train import TrainConfig, evaluate, finetune, load_checkpoint, load_model, pretrain

TINY = dict(d_model=16, n_layers=1, n_heads=2, max_len=16, n_queries=2, head_hidden=(16, 8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    src = write_tiny_ml1m(root / "ml-1m")
    return data.prepare("ml-1m", path=str(src), data_dir=str(root / "cache"), progress=False)


def _tc(**kw):
    return TrainConfig(**{"epochs": 2, "batch_size": 64, "progress": False, **kw})


def test_pretrain_then_finetune_and_reload(tiny, tmp_path):
    mcfg = ModelConfig(**TINY)
    pre = pretrain(tiny, tmp_path / "pre", model_config=mcfg, train_config=_tc())
    assert {"hr@10", "ndcg@10", "hr@10_sampled100", "ndcg@10_sampled100"} <= set(pre["test"])
    assert 0.0 <= pre["test"]["ndcg@10"] <= pre["test"]["hr@10"] <= 1.0
    assert (tmp_path / "pre" / "config.json").exists()
    assert (tmp_path / "pre" / "curves.png").exists()

    res = finetune(tiny, tmp_path / "ctr", kind="srp4ctr", model_config=mcfg,
                   train_config=_tc(seed=3), pretrained=tmp_path / "pre")
    for split in ("valid", "test"):
        assert 0.0 <= res[split]["auc"] <= 1.0
        assert res[split]["logloss"] > 0
    metrics = json.loads((tmp_path / "ctr" / "metrics.json").read_text())
    assert metrics["test"] == pytest.approx(res["test"])
    # the saved checkpoint reproduces the reported test metrics exactly
    again = evaluate(tmp_path / "ctr", tiny, split="test")
    assert again["auc"] == pytest.approx(res["test"]["auc"], abs=1e-6)
    assert again["logloss"] == pytest.approx(res["test"]["logloss"], abs=1e-6)


def test_same_seed_same_result(tiny):
    mcfg = ModelConfig(**TINY)
    a = finetune(tiny, None, kind="din", model_config=mcfg, train_config=_tc(seed=7))
    b = finetune(tiny, None, kind="din", model_config=mcfg, train_config=_tc(seed=7))
    assert a["test"]["auc"] == b["test"]["auc"]
    assert a["test"]["logloss"] == b["test"]["logloss"]


@pytest.mark.parametrize("kind", ["din", "bst", "user_vector"])
def test_baselines_train(tiny, kind):
    res = finetune(tiny, None, kind=kind, model_config=ModelConfig(**TINY),
                   train_config=_tc(epochs=1))
    assert 0.0 <= res["test"]["auc"] <= 1.0


def test_checkpoint_is_checked_on_load(tiny, tmp_path):
    finetune(tiny, tmp_path / "c", kind="din", model_config=ModelConfig(**TINY),
             train_config=_tc(epochs=1))
    load_checkpoint(tmp_path / "c")
    weights = tmp_path / "c" / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated or replaced"):
        load_model(tmp_path / "c")
    weights.unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        load_model(tmp_path / "c")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_model(tmp_path / "nowhere")


def test_checkpoint_of_another_dataset_is_refused(tiny, tmp_path):
    finetune(tiny, tmp_path / "c", kind="din", model_config=ModelConfig(**TINY),
             train_config=_tc(epochs=1))
    with pytest.raises(CheckpointError, match="trained on dataset"):
        load_model(tmp_path / "c", dataset_fingerprint="0" * 64)


@pytest.mark.slow
def test_torchrun_two_processes(tiny, tmp_path):
    """DDP with gloo: two CPU processes train on the memory-mapped dataset, each on its own
    disjoint shard of every epoch; rank 0's checkpoint loads and evaluates. A pre-training with
    the sampled item head (sparse gradients) runs under DDP too."""
    script = tmp_path / "ddp_job.py"
    script.write_text(
        "import sys, json\n"
        "import numpy as np\n"
        "from srp4ctr import data\n"
        "import srp4ctr.train.loop as L\n"
        "from srp4ctr.models import ModelConfig\n"
        "from srp4ctr.train import TrainConfig, finetune, pretrain\n"
        "shards = []\n"
        "_orig = L.iterate_batches\n"
        "def spy(dataset, order, *a, **k):\n"
        "    if 'rng' in k:  # the training loop's call: this rank's shard of the epoch\n"
        "        shards.append(np.asarray(order).tolist())\n"
        "    return _orig(dataset, order, *a, **k)\n"
        "L.iterate_batches = spy\n"
        f"ds = data.load_prepared({str(tiny.cache_dir)!r})\n"
        "assert not ds.item.flags.writeable  # memory-mapped\n"
        f"res = finetune(ds, {str(tmp_path / 'ddp')!r}, kind='srp4ctr', "
        f"model_config=ModelConfig(**{TINY!r}), "
        "train_config=TrainConfig(epochs=2, batch_size=32, progress=False, num_threads=1))\n"
        f"pre = pretrain(ds, None, model_config=ModelConfig(**{TINY!r}, softmax='sampled', "
        "n_sampled=8), train_config=TrainConfig(epochs=1, batch_size=8, progress=False, "
        "num_threads=1, max_steps_per_epoch=3))\n"
        "assert pre['softmax']['item'].startswith('sampled softmax')\n"
        "import torch.distributed as dist\n"
        f"open({str(tmp_path)!r} + f'/shards{{dist.get_rank()}}.json', 'w')"
        ".write(json.dumps(shards[:2]))\n"
        f"open({str(tmp_path)!r} + f'/result{{dist.get_rank()}}.json', 'w').write("
        "json.dumps([dist.get_rank(), dist.get_world_size(), res['test']]))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # each rank writes its own file (long lines of two processes on one pipe interleave)
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in "01"]
    assert [r[:2] for r in results] == [[0, 2], [1, 2]]
    # both ranks gathered the same evaluation
    assert results[0][2] == results[1][2]
    shards = {r: json.loads((tmp_path / f"shards{r}.json").read_text()) for r in "01"}
    n_train = len(CTRDataset(tiny, "train", max_len=TINY["max_len"]))
    for epoch in range(2):  # each epoch: disjoint, equal shards covering all but a remainder
        a, b = set(shards["0"][epoch]), set(shards["1"][epoch])
        assert len(a) == len(b) == n_train // 2 and not a & b
        assert a | b <= set(range(n_train))
    assert shards["0"][0] != shards["0"][1]  # reshuffled per epoch
    again = evaluate(tmp_path / "ddp", tiny, split="test")
    assert again["auc"] == pytest.approx(results[0][2]["auc"], abs=1e-6)


def test_pretrained_lr_ratio_and_no_early_stopping(tiny, tmp_path):
    """TrainConfig.pretrained_lr_ratio scales the learning rate of the weights loaded from the
    pre-trained checkpoint only; early_stopping=False runs every epoch and keeps the last."""
    import torch

    from srp4ctr.train.optim import make_optimizer

    mcfg = ModelConfig(**TINY)
    pretrain(tiny, tmp_path / "pre", model_config=mcfg, train_config=_tc(epochs=1))
    pre, _ = load_model(tmp_path / "pre", dataset=tiny)
    start = {k: v.clone() for k, v in pre.state_dict().items()}

    def moved(ratio):
        res = finetune(tiny, tmp_path / f"ctr{ratio}", kind="srp4ctr", model_config=mcfg,
                       train_config=_tc(epochs=3, pretrained_lr_ratio=ratio,
                                        early_stopping=False), pretrained=tmp_path / "pre")
        assert [h["epoch"] for h in res["history"]] == [1, 2, 3] and res["best_epoch"] == 3
        model, _ = load_model(tmp_path / f"ctr{ratio}", dataset=tiny)
        enc = model.encoder.state_dict()
        enc_move = max(float((enc[k] - start[k]).abs().max()) for k in enc if k in start)
        head_move = float(model.head.first.weight.abs().max())
        return enc_move, head_move

    slow_enc, slow_head = moved(1e-6)
    fast_enc, fast_head = moved(1.0)
    assert slow_enc < 1e-4 < fast_enc  # Adam's step is ~lr: 1e-9 per step against 1e-3
    assert slow_head > 0.01 and fast_head > 0.01
    # the optimizer's groups: the scaled parameters at lr * ratio, the rest at lr
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    opt, _ = make_optimizer([a, b], lr=1e-3, weight_decay=0.0, total_steps=10,
                            scaled_params=[b], lr_ratio=0.1)
    lrs = sorted((g["lr"], len(g["params"])) for g in opt.param_groups)
    assert lrs == [(pytest.approx(1e-4), 1), (pytest.approx(1e-3), 1)]
    with pytest.raises(Exception, match="pretrained_lr_ratio"):
        TrainConfig(pretrained_lr_ratio=0.0)
    with pytest.raises(Exception, match="early_stopping"):
        TrainConfig(early_stopping=1)


def test_item_stats_input_is_out_of_fold_and_served_from_the_table(tiny, tmp_path):
    """ModelConfig.item_stats: a training sample's statistics never read its own label (flipping
    it leaves them unchanged, while the whole-split table moves); the table is the whole
    training split's; the checkpoint keeps it, so a reload reproduces the test metrics; sampled
    negatives are refused."""
    import numpy as np

    from srp4ctr.train.item_stats import item_statistics

    train = CTRDataset(tiny, "train", max_len=16)
    rows, cand = train.rows, train.extras["cand_item"]
    own, table = item_statistics(tiny, rows, cand, seed=0)
    assert own.shape == (len(train), 3) and table.shape == (tiny.n_items + 2, 3)
    assert np.isfinite(own).all() and np.isfinite(table).all()
    np.testing.assert_allclose(own.mean(0), 0, atol=1e-4)  # standardised on the training rows
    raw_own, raw_table = item_statistics(tiny, rows, cand, seed=0, standardise=False)
    flipped = tiny.label.copy()
    saved = tiny.label
    for i in (0, 5, len(train) - 1):
        flipped = saved.copy()
        flipped[rows[i]] = 1 - flipped[rows[i]]
        try:
            tiny.label = flipped
            own2, table2 = item_statistics(tiny, rows, cand, seed=0, standardise=False)
        finally:
            tiny.label = saved
        np.testing.assert_array_equal(own2[i], raw_own[i])  # its own label: not read
        assert not np.allclose(table2[cand[i]], raw_table[cand[i]])  # the whole split's: read
    mcfg = ModelConfig(**TINY, item_stats=True)
    res = finetune(tiny, tmp_path / "s", kind="srp4ctr", model_config=mcfg, train_config=_tc())
    again = evaluate(tmp_path / "s", tiny, split="test")
    assert again["auc"] == pytest.approx(res["test"]["auc"], abs=1e-6)
    model, _ = load_model(tmp_path / "s", dataset=tiny)
    np.testing.assert_allclose(model.item_statistics.table.numpy(), table, atol=1e-6)
    with pytest.raises(Exception, match="negatives"):
        finetune(tiny, None, kind="din", model_config=mcfg, train_config=_tc(negatives="uni100"))
