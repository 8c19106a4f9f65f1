"""Specs, configs, embeddings and FG-BERT (encoding, K/V, masked pre-training, next-item)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from srp4ctr.errors import InputError
from srp4ctr.models import FGBERT, FieldEmbedding, ModelConfig, ModelSpec, check_batch
from srp4ctr.models.synthetic import random_batch, synthetic_spec

SMALL = {"d_model": 16, "n_heads": 2, "n_layers": 2, "max_len": 12, "head_hidden": (16, 8),
         "n_queries": 3}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: a second OpenMP thread only adds barrier waits (badly so on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return synthetic_spec()


def small_config(**kw) -> ModelConfig:
    return ModelConfig(**{**SMALL, **kw})


def pad_right(batch: dict[str, torch.Tensor], extra: int) -> dict[str, torch.Tensor]:
    """The same batch with `extra` more padding columns on every history field."""
    out = dict(batch)
    for k, t in batch.items():
        if k.startswith("hist_") and k != "hist_len":
            out[k] = torch.cat([t, t.new_zeros(t.shape[0], extra)], 1)
    return out


# ---------------------------------------------------------------------------- spec & config
def test_spec_round_trips_through_json(spec):
    d = json.loads(json.dumps(spec.to_dict()))
    back = ModelSpec.from_dict(d)
    assert back.vocab == spec.vocab and back.item_fields == spec.item_fields
    assert back.user_fields == spec.user_fields and back.multi_fields == spec.multi_fields
    assert back.item_table["genre"].shape == spec.item_table["genre"].shape
    assert not back.item_table["genre"].any()  # shapes only: filled by load_state_dict
    full = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict(include_tables=True))))
    np.testing.assert_array_equal(full.item_table["genre"], spec.item_table["genre"])


def test_state_dict_carries_item_table(spec):
    a = FGBERT(spec, small_config())
    b = FGBERT(ModelSpec.from_dict(spec.to_dict()), small_config())
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.embeddings.table("genre"), a.embeddings.table("genre"))


def test_spec_from_dataset_duck_typed(spec):
    ds = types.SimpleNamespace(
        vocab=spec.vocab,
        item_fields=spec.item_fields,
        behaviour_fields=spec.behaviour_fields,
        multi_fields=spec.multi_fields,
        item_table=spec.item_table,
        user_table={f: np.zeros(spec.n_users + 1, dtype=np.int64) for f in spec.user_fields},
        n_items=spec.n_items,
        n_users=spec.n_users,
        fingerprint="abc",
    )
    s = ModelSpec.from_dataset(ds)
    assert s.user_fields == ["age", "gender", "occupation"] and s.fingerprint == "abc"
    assert s.oov_item == spec.n_items + 1


@pytest.mark.parametrize(
    "change",
    [
        {"item_fields": ["genre", "item"]},
        {"vocab": {"item": 52}},
        {"multi_fields": ["rating"]},
        {"behaviour_fields": ["rating", "a.b"]},
        {"item_table": {"genre": np.zeros((3, 2), dtype=np.int64), "year": np.zeros(52)}},
    ],
)
def test_spec_rejects_inconsistent(spec, change):
    d = spec.to_dict(include_tables=True)
    d.update(change)
    with pytest.raises(InputError):
        ModelSpec.from_dict(d)


def test_config_round_trip_and_validation():
    c = ModelConfig(head_hidden=(32, 16), item_only=True)
    back = ModelConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c and back.head_hidden == (32, 16)
    for bad in ({"d_model": 30, "n_heads": 4}, {"dropout": 1.0}, {"mask_rate": 0.0},
                {"n_layers": 0}, {"head_hidden": ()}):
        with pytest.raises(InputError):
            ModelConfig(**bad)
    with pytest.raises(InputError):
        ModelConfig.from_dict({"nope": 1})


def test_check_batch(spec):
    cfg = small_config()
    b = random_batch(spec, 5, 10)
    check_batch(spec, cfg, b)
    for key, value in [
        ("hist_item", b["hist_item"] + spec.vocab["item"]),
        ("hist_len", b["hist_len"] + 11),
        ("cand_item", b["cand_item"].float()),
        ("hist_rating", b["hist_rating"][:, :3]),
    ]:
        with pytest.raises(InputError):
            check_batch(spec, cfg, {**b, key: value})
    with pytest.raises(InputError):
        check_batch(spec, cfg, random_batch(spec, 2, 13))  # wider than max_len


# ---------------------------------------------------------------------------- embeddings
def test_field_embedding_sum_and_multi_mean(spec):
    emb = FieldEmbedding(spec, small_config())
    ids = torch.arange(spec.vocab["item"])
    got = emb.item_embedding(ids)
    E = {f: emb.weight(f) for f in emb.item_group}
    for i in ids.tolist():
        g = [x for x in spec.item_table["genre"][i].tolist() if x]
        want = E["item"][i] + E["year"][int(spec.item_table["year"][i])]
        if g:
            want = want + E["genre"][g].mean(0)
        torch.testing.assert_close(got[i], want)
    assert not got[0].any()  # padding
    assert not emb.weight("item")[spec.oov_item].any()  # OOV starts at zero
    only = FieldEmbedding(spec, small_config(item_only=True))
    assert only.item_group == ["item"] and only.behaviour_group == []
    torch.testing.assert_close(only.item_embedding(ids), only.weight("item"))


# ---------------------------------------------------------------------------- FG-BERT
def test_encode_shapes_no_nan_and_kv(spec):
    cfg = small_config()
    m = FGBERT(spec, cfg).eval()
    b = random_batch(spec, 7, 10)
    assert b["hist_len"][:3].tolist() == [0, 1, 10]
    h, kv = m.encode(b, return_kv=True)
    assert h.shape == (7, 10, 16) and len(kv) == cfg.n_layers
    assert torch.isfinite(h).all()
    # K^l, V^l = LN1_l(H^{l-1}) W + b, recomputed from each layer's input
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
             for layer in m.layers]
    m.encode(b)
    for hk in hooks:
        hk.remove()
    for layer, x, (k, v) in zip(m.layers, inputs, kv):
        assert k.shape == (7, 10, 2, 8)
        torch.testing.assert_close(k, layer.attn.wk(layer.ln1(x)).view(7, 10, 2, 8))
        torch.testing.assert_close(v, layer.attn.wv(layer.ln1(x)).view(7, 10, 2, 8))


def test_encode_padding_invariance(spec):
    m = FGBERT(spec, small_config()).eval()
    b = random_batch(spec, 6, 8, seed=3)
    h, kv = m.encode(b, return_kv=True)
    h2, kv2 = m.encode(pad_right(b, 4), return_kv=True)
    valid = torch.arange(8)[None] < b["hist_len"][:, None]
    torch.testing.assert_close(h2[:, :8][valid], h[valid], atol=1e-5, rtol=0)
    for (k, v), (k2, v2) in zip(kv, kv2):
        torch.testing.assert_close(k2[:, :8][valid], k[valid], atol=1e-5, rtol=0)
        torch.testing.assert_close(v2[:, :8][valid], v[valid], atol=1e-5, rtol=0)


def test_recency_positions_align_most_recent(spec):
    """The same history written at different widths encodes identically."""
    m = FGBERT(spec, small_config()).eval()
    b = random_batch(spec, 4, 5, lengths=[5, 3, 1, 4], seed=1)
    h = m.encode(b)
    h_wide = m.encode(pad_right(b, 7))
    torch.testing.assert_close(h_wide[:, :5][b["hist_item"] > 0], h[b["hist_item"] > 0],
                               atol=1e-5, rtol=0)


def test_too_long_history_rejected(spec):
    m = FGBERT(spec, small_config())
    with pytest.raises(InputError):
        m.encode(random_batch(spec, 2, 13))


def test_sample_mask(spec):
    m = FGBERT(spec, small_config(mask_rate=0.05))
    hist_len = torch.tensor([0, 1, 2, 12, 12, 7] * 20)
    g = torch.Generator().manual_seed(0)
    im, bm = m.sample_mask(hist_len, 12, g)
    valid = torch.arange(12)[None] < hist_len[:, None]
    chosen = im | bm
    assert not (im & bm).any() and not (chosen & ~valid).any()
    assert (chosen.any(1) == (hist_len > 0)).all()
    assert im.any() and bm.any()
    im_only, bm_only = FGBERT(spec, small_config(item_only=True)).sample_mask(hist_len, 12, g)
    assert not bm_only.any() and (im_only.any(1) == (hist_len > 0)).all()


def test_pretrain_loss_fields_and_reproducible(spec):
    m = FGBERT(spec, small_config(mask_rate=0.5)).eval()  # dropout draws from the global RNG
    b = random_batch(spec, 16, 12, ctr=False, seed=2)
    loss, parts = m.pretrain_loss(b, torch.Generator().manual_seed(5))
    assert torch.isfinite(loss)
    assert set(parts) == set(spec.item_fields + spec.behaviour_fields)
    torch.testing.assert_close(loss, torch.stack(list(parts.values())).mean())
    loss2, _ = m.pretrain_loss(b, torch.Generator().manual_seed(5))
    assert loss2.item() == loss.item()
    loss.backward()
    assert m.embeddings.weight("item").grad is not None
    only = FGBERT(spec, small_config(item_only=True))
    l_only, p_only = only.pretrain_loss(b)
    assert set(p_only) == {"item"} and torch.isfinite(l_only)


def test_pretrain_loss_weights(spec):
    """ModelConfig.loss_weights: the loss is the weighted mean of the same per-field losses (the
    same masks: the same generator seed); unnamed fields weigh 1; unknown fields are refused."""
    b = random_batch(spec, 16, 12, ctr=False, seed=2)
    torch.manual_seed(0)
    plain = FGBERT(spec, small_config(mask_rate=0.5)).eval()
    weights = {"item": 3.0, spec.behaviour_fields[0]: 0.25}
    torch.manual_seed(0)
    weighted = FGBERT(spec, small_config(mask_rate=0.5, loss_weights=weights)).eval()
    loss, parts = plain.pretrain_loss(b, torch.Generator().manual_seed(5))
    wloss, wparts = weighted.pretrain_loss(b, torch.Generator().manual_seed(5))
    assert wparts.keys() == parts.keys()
    for f in parts:
        torch.testing.assert_close(wparts[f], parts[f])
    w = {f: weights.get(f, 1.0) for f in parts}
    want = sum(w[f] * parts[f] for f in parts) / sum(w.values())
    torch.testing.assert_close(wloss, want)
    assert abs(float(wloss) - float(loss)) > 1e-4  # the weights do change the loss
    with pytest.raises(InputError, match="does not have"):
        FGBERT(spec, small_config(loss_weights={"no_such_field": 1.0}))
    # the item-only model predicts the item alone: the other fields' weights do not apply
    only = FGBERT(spec, small_config(item_only=True, loss_weights=weights))
    l_only, p_only = only.pretrain_loss(b, torch.Generator().manual_seed(5))
    torch.testing.assert_close(l_only, p_only["item"])
    for bad in ({"item": -1.0}, {"item": float("nan")}, {"item": True}, [("item", 1.0)]):
        with pytest.raises(InputError, match="loss_weights"):
            small_config(loss_weights=bad)
    assert ModelConfig.from_dict(small_config(loss_weights=weights).to_dict()).loss_weights == \
        weights


def test_pretrain_loss_all_empty(spec):
    m = FGBERT(spec, small_config())
    b = random_batch(spec, 3, 6, lengths=[0, 0, 0], ctr=False)
    loss, parts = m.pretrain_loss(b)
    assert loss.item() == 0.0 and parts == {}
    loss.backward()  # still has a graph


def _pattern_batch(spec, B: int, L: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A learnable task: consecutive items, behaviour fields functions of the item."""
    n = spec.n_items
    start = torch.randint(0, n, (B, 1), generator=gen)
    lengths = torch.randint(2, L + 1, (B,), generator=gen)
    valid = torch.arange(L)[None] < lengths[:, None]
    items = ((start + torch.arange(L)[None]) % n + 1) * valid
    b = {"hist_item": items, "hist_len": lengths, "user": torch.ones(B, dtype=torch.int64)}
    for j, f in enumerate(spec.behaviour_fields):
        b["hist_" + f] = (items % (spec.vocab[f] - 1) + 1) * valid
    return b


def test_pretrain_loss_decreases(spec):
    torch.manual_seed(0)
    m = FGBERT(spec, small_config(d_model=32, dropout=0.0, mask_rate=0.3))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(50):
        loss, _ = m.pretrain_loss(_pattern_batch(spec, 32, 12, gen), gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.7 * first, (first, last)


def test_next_item_logits(spec):
    m = FGBERT(spec, small_config()).eval()
    b = random_batch(spec, 6, 12, ctr=False, seed=4)  # rows 0, 1, 12 (full at max_len)
    logits = m.next_item_logits(b)
    assert logits.shape == (6, spec.vocab["item"])
    assert torch.isneginf(logits[:, 0]).all() and torch.isneginf(logits[:, spec.oov_item]).all()
    assert torch.isfinite(logits[:, 1 : spec.oov_item]).all()
    top = logits.topk(spec.n_items, dim=1).indices
    assert not ((top == 0) | (top == spec.oov_item)).any()
    # a zero-width history works too
    empty = {**{k: v[:, :0] for k, v in b.items() if k.startswith("hist_") and v.dim() == 2},
             "hist_len": torch.zeros(6, dtype=torch.int64)}
    assert torch.isfinite(m.next_item_logits(empty)[:, 1 : spec.oov_item]).all()


def test_next_item_full_history_drops_oldest(spec):
    m = FGBERT(spec, small_config()).eval()
    b = random_batch(spec, 3, 12, lengths=[12, 12, 12], ctr=False, seed=6)
    dropped = {k: (v[:, 1:] if k.startswith("hist_") and k != "hist_len" else v)
               for k, v in b.items()}
    dropped["hist_len"] = b["hist_len"] - 1
    torch.testing.assert_close(m.next_item_logits(b), m.next_item_logits(dropped),
                               atol=1e-5, rtol=0)


def test_next_item_equals_explicit_masked_token(spec):
    """Appending = a history one longer whose last token has both groups masked."""
    m = FGBERT(spec, small_config()).eval()
    b = random_batch(spec, 4, 6, lengths=[2, 6, 0, 3], ctr=False, seed=8)
    got = m.next_item_logits(b)
    ext = pad_right(b, 1)
    ext["hist_len"] = b["hist_len"] + 1
    pos = torch.arange(7)[None] == b["hist_len"][:, None]
    x, valid = m.embed(ext, pos, pos)
    h = m.encode_embedded(x, valid)
    want = m.item_logits(h[torch.arange(4), b["hist_len"]])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
