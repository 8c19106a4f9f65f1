"""Training throughput on CPU: FG-BERT pre-training sequences/s, CTR fine-tuning samples/s.

Run explicitly, or through ``srp4ctr bench``::

    python -m pytest bench/bench_training.py --benchmark-json=bench/results/training.json

Data: a synthetic MovieLens-1M-format dataset the suite writes to a temporary folder (64 users x
260 ratings, 2,000 items; nothing is downloaded), prepared by the data pipeline. Model: the default
architecture (d = 64, 2 layers, 2 heads, 4 Q-Former queries, dropout 0.1) at history length
L = 50 (the experiment's setting) and L = 200 (the default), batch 64 (the experiment's); 8 and
L = 50 only in a smoke run.

One timed call is one optimiser step as ``srp4ctr.train`` takes it: the next batch assembled by
the dataset (``get_batch`` of 64 shuffled samples), the loss (pre-training: ``FGBERT.pretrain_loss``,
multi-attribute masking; fine-tuning: BCE of ``model(batch)``), ``backward``, Adam
(``srp4ctr.train.optim.make_optimizer``) and the learning-rate schedule. Throughput = batch /
median step time. Providers: ``fgbert`` (table "pre-training"), ``srp4ctr`` (from a random encoder),
``din``, ``bst`` (table "fine-tuning"); eager torch all, so there is no baseline column.

FLOPs (``extra_info["flops"]``): 3 x the analytic forward FLOPs of the batch (backward ~ 2 x
forward) from :func:`srp4ctr.models.flops_per_request` — a CTR sample is one user with one
candidate; pre-training counts the encoder only (the per-field prediction heads over the
vocabularies are left out), so its roofline fraction is a lower bound.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see conftest)
import tempfile
from pathlib import Path

import benchlib
import numpy as np
import pytest
import torch
from torch import nn

from srp4ctr import data

LENGTHS = benchlib.pick((50, 200), (50,))
BATCH = benchlib.pick(64, 8)
PRETRAIN = "pre-training (FG-BERT)"
FINETUNE = "fine-tuning"
KINDS = {"fgbert": PRETRAIN, "srp4ctr": FINETUNE, "din": FINETUNE, "bst": FINETUNE}
N_USERS, PER_USER, N_ITEMS = benchlib.pick((64, 260, 2000), (16, 60, 300))


@pytest.fixture(scope="module")
def train_data():
    with tempfile.TemporaryDirectory(prefix="srp4ctr-bench-train-") as tmp:
        root = Path(tmp)
        src = benchlib.write_ml1m(root / "ml-1m", n_users=N_USERS, n_items=N_ITEMS,
                                  per_user=PER_USER, seed=2)
        yield data.prepare("ml-1m", path=str(src), data_dir=str(root / "cache"), progress=False,
                           max_len=max(LENGTHS))


def _step(ds, kind: str, L: int):
    """The timed callable (one optimiser step) and what it trains on."""
    from srp4ctr.data.samples import CTRDataset, PretrainDataset
    from srp4ctr.models import FGBERT, ModelConfig, ModelSpec, build_model
    from srp4ctr.train.optim import make_optimizer

    torch.manual_seed(0)
    cfg = ModelConfig(max_len=L)
    spec = ModelSpec.from_dataset(ds)
    if kind == "fgbert":
        model = FGBERT(spec, cfg)
        samples = PretrainDataset(ds, max_len=L, windows=True)
        gen = torch.Generator().manual_seed(0)

        def loss_of(batch):
            out = model.pretrain_loss(batch, generator=gen)
            return out[0] if isinstance(out, tuple) else out
    else:
        encoder = FGBERT(spec, cfg) if kind == "srp4ctr" else None
        model = build_model(kind, spec, cfg, encoder=encoder)
        samples = CTRDataset(ds, "train", max_len=L)
        bce = nn.BCEWithLogitsLoss()

        def loss_of(batch):
            return bce(model(batch), batch["label"])

    model.train()
    opt, sched = make_optimizer(model.parameters(), lr=1e-3, weight_decay=0.0,
                                total_steps=10**6, warmup_steps=0)
    order = np.random.default_rng(0).permutation(len(samples))
    batches = [order[i : i + BATCH] for i in range(0, len(order) - BATCH + 1, BATCH)]
    assert batches, f"{len(samples)} samples cannot fill a batch of {BATCH}"
    position = [0]

    def step():
        idx = batches[position[0] % len(batches)]
        position[0] += 1
        loss = loss_of(samples.get_batch(idx))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss

    return step, cfg, len(samples), sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_train_step(benchmark, train_data, kind, L):
    """One model and history length: median time of an optimiser step on a batch."""
    from srp4ctr.models import flops_per_request

    ds = train_data
    step, cfg, n_samples, n_params = _step(ds, kind, L)
    loss = float(step().detach())
    assert np.isfinite(loss)
    benchlib.timed(benchmark, step, 30, 2)
    if kind == "fgbert":
        forward = flops_per_request("user_vector", cfg, L, 0).user  # the encoder only
    else:
        forward = flops_per_request(kind, cfg, L, 1, n_user_fields=len(ds.user_fields)).total
    table = KINDS[kind]
    benchlib.record(
        benchmark, table=table, case=f"L={L}, batch {BATCH}", provider=kind,
        flops=3 * forward * BATCH, items=BATCH,
        unit="sequences" if table == PRETRAIN else "samples",
        history=L, batch=BATCH, d_model=cfg.d_model, n_layers=cfg.n_layers,
        n_heads=cfg.n_heads, n_queries=cfg.n_queries, dropout=cfg.dropout,
        flops_forward_per_sample=forward, n_samples=n_samples, n_params=n_params,
        first_loss=loss,
    )
