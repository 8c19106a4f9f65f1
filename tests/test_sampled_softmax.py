"""Sampled softmax for large vocabularies: the estimate approaches the full softmax (loss and
gradient) on a toy problem, samplers draw what they claim, and FG-BERT pre-trains with it
(sparse gradients, SparseAdam, the choice recorded in the checkpoint)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_fixtures import prepare_tiny

from srp4ctr.errors import InputError
from srp4ctr.models import ModelConfig
from srp4ctr.models.sampled_softmax import NegativeSampler, sampled_softmax_loss


def _toy(vocab: int, p: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(p, d, generator=g)
    w = torch.randn(vocab, d, generator=g) * 0.7
    b = torch.randn(vocab, generator=g) * 0.5
    t = torch.randint(1, vocab, (p,), generator=g)
    return h, w, b, t


def _full(h, w, b, t):
    logits = h @ w.T + b
    logits[:, 0] = float("-inf")  # padding is never a class
    return F.cross_entropy(logits, t)


@pytest.mark.parametrize("kind", ["uniform", "log_uniform"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_loss_and_gradient_approach_the_full_softmax(kind, seed):
    """Averaged over draws, the logQ-corrected sampled loss, with a tenth of the vocabulary
    as negatives (the regime it exists for: K much smaller than V), is within 3% of the full
    cross-entropy and its gradient points the same way (cosine > 0.99); with few negatives it
    is further off, as an estimate should be."""
    vocab, P, d = 3000, 24, 8
    h, w, b, t = _toy(vocab, P, d, seed)
    counts = np.random.default_rng(seed).zipf(1.3, vocab).astype(float)  # skewed frequencies
    h.requires_grad_(True)
    full = _full(h, w, b, t)
    (g_full,) = torch.autograd.grad(full, h)

    def estimate(k: int, draws: int):
        sampler = NegativeSampler(kind, vocab, k, counts=counts, exclude=(0,))
        gen = torch.Generator().manual_seed(100 + seed)
        losses, grads = [], []
        for _ in range(draws):
            loss = sampled_softmax_loss(h, w, b, t, sampler, gen, sparse=False)
            (g,) = torch.autograd.grad(loss, h)
            losses.append(float(loss.detach()))
            grads.append(g)
        return float(np.mean(losses)), torch.stack(grads).mean(0)

    loss_k, g_k = estimate(300, 40)
    full = float(full.detach())
    assert abs(loss_k - full) < 0.03 * full
    cos = F.cosine_similarity(g_k.reshape(1, -1), g_full.reshape(1, -1)).item()
    assert cos > 0.99
    loss_small, _ = estimate(8, 20)
    assert abs(loss_small - full) > abs(loss_k - full)


def test_sampler_draws_follow_their_distribution_and_skip_excluded_ids():
    vocab = 50
    counts = np.arange(vocab, dtype=float)[::-1].copy()  # id 1 most frequent ... id 49 least
    counts[0] = 0
    s = NegativeSampler("log_uniform", vocab, 200_000, counts=counts, exclude=(0, vocab - 1))
    ids, log_e = s.draw(torch.tensor([1, 2]), torch.Generator().manual_seed(0))
    assert ids.min() >= 1 and ids.max() <= vocab - 2
    freq = np.bincount(ids.numpy(), minlength=vocab) / ids.numel()
    n = vocab - 2
    # the counts rank ids 1, 2, 3, ... in that order: id i has rank i - 1, and the Zipf law
    # P(rank r) = log((r + 2) / (r + 1)) / log(n + 1) in closed form
    zipf = np.zeros(vocab)
    r = np.arange(n)
    zipf[1 : n + 1] = np.log((r + 2) / (r + 1)) / math.log(n + 1)
    assert np.allclose(s.log_p.exp().numpy(), zipf, atol=1e-9)
    sd = np.sqrt(zipf * (1 - zipf) / ids.numel())
    assert (np.abs(freq - zipf) <= 5 * sd + 1e-12).all()  # every id within 5 sd of its law
    assert torch.allclose(log_e, torch.as_tensor(np.log(zipf[ids.numpy()]) + math.log(200_000),
                                                 dtype=log_e.dtype))
    u = NegativeSampler("uniform", vocab, 100_000, exclude=(0,))
    ids, _ = u.draw(torch.tensor([1]), torch.Generator().manual_seed(1))
    freq = np.bincount(ids.numpy(), minlength=vocab)[1:] / ids.numel()
    assert ids.min() >= 1 and np.abs(freq - 1 / (vocab - 1)).max() < 0.005


def test_in_batch_negatives_mask_every_hit_of_the_target():
    vocab, d = 20, 4
    h, w, b, _ = _toy(vocab, 6, d, 3)
    t = torch.tensor([3, 3, 5, 7, 7, 7])
    s = NegativeSampler("in_batch", vocab, 1, counts=np.ones(vocab), exclude=(0,))
    loss = sampled_softmax_loss(h, w, b, t, s, sparse=False)
    # by hand: position i's negatives are the other targets that differ from its own
    rows = []
    log_q = s.log_p[t] + math.log(len(t))
    for i in range(len(t)):
        pos = h[i] @ w[t[i]] + b[t[i]]
        negs = [h[i] @ w[t[j]] + b[t[j]] - log_q[j] for j in range(len(t)) if t[j] != t[i]]
        rows.append(-pos + torch.logsumexp(torch.stack([pos, *negs]), 0))
    assert torch.allclose(loss, torch.stack(rows).mean(), atol=1e-5)
    assert sampled_softmax_loss(h, w, b, torch.zeros(6, dtype=torch.long), s) is None


def test_bad_sampler_settings_are_input_errors():
    with pytest.raises(InputError, match="sampler"):
        NegativeSampler("zipf", 10, 5)
    with pytest.raises(InputError, match="n_sampled"):
        NegativeSampler("uniform", 10, 0)
    with pytest.raises(InputError, match="softmax"):
        ModelConfig(softmax="partial")
    with pytest.raises(InputError, match="sampler"):
        ModelConfig(sampler="zipf")
    with pytest.raises(InputError, match="n_sampled"):
        ModelConfig(n_sampled=0)


def test_auto_samples_only_the_large_vocabularies(tmp_path):
    from srp4ctr.models import FGBERT, ModelSpec

    ds = prepare_tiny(tmp_path)
    spec = ModelSpec.from_dataset(ds)
    small = dict(d_model=16, n_layers=1, n_heads=2, max_len=16)
    assert FGBERT(spec, ModelConfig(**small)).sampled_fields == []  # 62 item ids < 100k
    m = FGBERT(spec, ModelConfig(**small, sampled_softmax_above=50))
    assert m.sampled_fields == ["item"]  # the only vocabulary above 50
    assert m.embeddings.emb["item"].sparse and not m.embeddings.emb["gap"].sparse
    desc = m.softmax_description()
    assert desc["item"].startswith("sampled softmax") and desc["gap"] == "full softmax"
    assert desc["genre"].startswith("sigmoid")


def test_pretraining_with_a_sampled_item_head(tmp_path):
    """A run with the sampled item head: sparse gradients on the item table only, SparseAdam
    moving exactly the rows a step touched, a loss that falls, the choice in the checkpoint."""
    from srp4ctr.data.samples import PretrainDataset
    from srp4ctr.models import FGBERT, ModelSpec
    from srp4ctr.train import TrainConfig, pretrain
    from srp4ctr.train.optim import make_optimizer, sparse_parameters

    ds = prepare_tiny(tmp_path)
    mcfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, max_len=16, softmax="sampled",
                       n_sampled=16)
    model = FGBERT(ModelSpec.from_dataset(ds), mcfg)
    assert set(model.sampled_fields) == {"item", "year", "rating", "gap", "hour", "weekday"}
    batch = PretrainDataset(ds, max_len=16).batch(np.arange(8))
    loss, parts = model.pretrain_loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    item_w = model.embeddings.emb["item"].weight
    assert item_w.grad.is_sparse
    assert not model.embeddings.emb["genre"].weight.grad.is_sparse  # multi-valued: full
    sparse = sparse_parameters(model)
    assert any(p is item_w for p in sparse)
    opt, _ = make_optimizer(model.parameters(), lr=1e-2, weight_decay=0.01, total_steps=10,
                            sparse_params=sparse)
    touched = torch.unique(item_w.grad.coalesce().indices()[0])
    before = item_w.detach().clone()
    opt.step()
    moved = torch.nonzero((item_w.detach() - before).abs().sum(1) > 0)[:, 0]
    assert set(moved.tolist()) <= set(touched.tolist()) and len(moved) > 0
    assert any(isinstance(o, torch.optim.SparseAdam) for o in opt.parts)

    out = tmp_path / "run"
    res = pretrain(ds, out, model_config=mcfg, train_config=TrainConfig(
        epochs=3, batch_size=16, lr=3e-3, patience=5, progress=False))
    losses = [h["train_loss"] for h in res["history"]]
    assert losses[-1] < losses[0]
    assert res["softmax"]["item"].startswith("sampled softmax, 16 log_uniform negatives")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pretrain_softmax"] == res["softmax"]
    assert cfg["model_config"]["softmax"] == "sampled"


def test_large_catalogue_evaluation_counts_ranks_by_item_blocks(tmp_path, monkeypatch):
    """Above the logits budget the next-item ranks are counted block by block of items; they
    equal the ranks over the whole [B, V] matrix."""
    from srp4ctr.data.samples import NextItemDataset
    from srp4ctr.models import FGBERT, ModelSpec
    from srp4ctr.train import loop

    ds = prepare_tiny(tmp_path)
    torch.manual_seed(0)
    model = FGBERT(ModelSpec.from_dataset(ds), ModelConfig(d_model=16, n_layers=1, n_heads=2,
                                                           max_len=16))
    data = NextItemDataset(ds, "valid", max_len=16, n_negatives=20, seed=0)
    whole = loop.next_item_metrics(model, data, batch_size=16, ks=(1, 5, 10))
    monkeypatch.setattr(loop, "_LOGITS_BUDGET", 16 * 40)  # blocked: 62 items x 16 users
    monkeypatch.setattr(loop, "_BLOCK_LOGITS", 16 * 7)  # blocks of 7 items
    blocked = loop.next_item_metrics(model, data, batch_size=16, ks=(1, 5, 10))
    assert blocked == whole and whole["n"] == len(data)


def test_negatives_of_a_few_users_read_only_their_rows(tmp_path):
    """An evaluation subset's negatives come from its users' own interactions (not a key of
    every row of the log); the draw is the one the whole-log keys give."""
    from srp4ctr.data import samples as S

    ds = prepare_tiny(tmp_path, n_users=80)
    users = np.array([3, 17, 17, 40])
    sub = S.sample_negatives(ds, users, 50, np.random.default_rng(4))
    keys = S._user_item_keys(ds, users)
    assert keys.size == sum(np.unique(ds.item[ds.user_offsets[u - 1]:ds.user_offsets[u]]).size
                            for u in (3, 17, 40))
    whole = S._user_item_keys(ds)
    assert np.isin(keys, whole).all() and whole.size > keys.size
    for row, u in enumerate(users):  # never an item the user interacted with
        own = set(ds.item[ds.user_offsets[u - 1]:ds.user_offsets[u]].tolist())
        assert not own & set(sub[row].tolist())
    ds._ui_keys = whole
    many = np.arange(1, ds.n_users + 1)
    again = S.sample_negatives(ds, many, 5, np.random.default_rng(4))
    assert again.shape == (ds.n_users, 5)
