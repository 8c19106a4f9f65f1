"""SRP4CTR (split user/candidate computation, invariances, freezing, ablations), the baselines,
the model factory and the FLOP counter."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from srp4ctr.errors import InputError
from srp4ctr.models import (
    BST,
    DIN,
    FGBERT,
    SRP4CTR,
    CandidateLayer,
    ModelConfig,
    UserVectorCTR,
    build_model,
    flops_per_request,
)
from srp4ctr.models.synthetic import random_batch, synthetic_spec

SMALL = {"d_model": 16, "n_heads": 2, "n_layers": 2, "max_len": 12, "head_hidden": (16, 8),
         "n_queries": 3}
ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: a second OpenMP thread only adds barrier waits (badly so on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SPEC = synthetic_spec()
SPEC_NO_USER = synthetic_spec(user_fields=False)


def cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**SMALL, **kw})


def model(seed: int = 0, spec=SPEC, **kw) -> SRP4CTR:
    torch.manual_seed(seed)
    return SRP4CTR(spec, cfg(**kw)).eval()


def replicate(batch: dict[str, torch.Tensor], user_index: torch.Tensor, cand: torch.Tensor
              ) -> dict[str, torch.Tensor]:
    """One row per candidate, each carrying a copy of its user's history."""
    out = {k: v[user_index] for k, v in batch.items() if k not in ("cand_item", "label")}
    out["cand_item"] = cand
    return out


def pad_right(batch, extra):
    out = dict(batch)
    for k, t in batch.items():
        if k.startswith("hist_") and t.dim() == 2:
            out[k] = torch.cat([t, t.new_zeros(t.shape[0], extra)], 1)
    return out


ABLATIONS = [
    {},
    {"use_xattn": False},
    {"use_qformer": False},
    {"use_xattn": False, "use_qformer": False},
    {"qformer_user_offset": False},
    {"item_only": True},
    {"qformer_blocks": 2},
]


# ---------------------------------------------------------------------------- SRP4CTR
@pytest.mark.parametrize("kw", ABLATIONS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items())
                         or "default")
def test_forward_shapes_no_nan(kw):
    m = model(**kw)
    b = random_batch(SPEC, 9, 12)  # lengths 0, 1, 12 (= max_len) and random
    out = m(b)
    assert out.shape == (9,) and torch.isfinite(out).all()
    st_ = m.encode_users(b)
    assert len(st_.k) == (2 if kw.get("use_xattn", True) else 0)
    if kw.get("use_xattn", True):
        assert st_.k[0].shape == (9, 12, 2, 8)
    assert (st_.qtokens is None) == (not kw.get("use_qformer", True))
    if st_.qtokens is not None:
        assert st_.qtokens.shape == (9, 3, 16)


def test_no_user_fields():
    m = model(spec=SPEC_NO_USER)
    assert m.query_offset is None
    b = random_batch(SPEC_NO_USER, 5, 10)
    assert torch.isfinite(m(b)).all()


@pytest.mark.parametrize("kw", ABLATIONS[:4], ids=["default", "no_xattn", "no_qformer", "neither"])
def test_forward_equals_split_many_candidates(kw):
    m = model(**kw)
    U, C = 5, 7
    b = random_batch(SPEC, U, 10, seed=1)
    g = torch.Generator().manual_seed(2)
    user_index = torch.arange(U).repeat_interleave(C)
    cand = torch.randint(1, SPEC.n_items + 2, (U * C,), generator=g)  # OOV included
    with torch.no_grad():
        state = m.encode_users(b)
        split = m.score_candidates(state, cand, user_index)
        full = m(replicate(b, user_index, cand))
        shuffled = torch.randperm(U * C, generator=g)
        split_shuffled = m.score_candidates(state, cand[shuffled], user_index[shuffled])
    assert (split - full).abs().max() <= ATOL
    assert (split_shuffled - split[shuffled]).abs().max() <= ATOL


@settings(max_examples=15, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=4),
    n_cand=st.integers(1, 9),
    seed=st.integers(0, 1000),
)
def test_one_user_path_equals_batched(lengths, n_cand, seed):
    m = _hypothesis_model()
    b = random_batch(SPEC, len(lengths), 12, seed=seed, lengths=lengths)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        state = m.encode_users(b)
        for u in range(len(lengths)):
            cand = torch.randint(1, SPEC.n_items + 1, (n_cand,), generator=g)
            one = m.score_candidates_one_user(state.user(u), cand)
            batched = m.score_candidates(state, cand, torch.full((n_cand,), u))
            assert (one - batched).abs().max() <= ATOL


@functools.cache
def _hypothesis_model() -> SRP4CTR:
    return model(seed=3)


def test_one_user_path_does_not_copy_kv():
    m = model()
    b = random_batch(SPEC, 3, 12, lengths=[5, 12, 0])
    state = m.encode_users(b)
    one = state.user(1)
    assert one.k[0].data_ptr() == state.k[0][1].data_ptr()  # a view
    seen = []
    orig = CandidateLayer.forward_one_user

    def spy(self, z, k, v):
        seen.append((k.data_ptr(), v.data_ptr(), k.shape))
        return orig(self, z, k, v)

    CandidateLayer.forward_one_user = spy
    try:
        m.score_candidates_one_user(one, torch.tensor([1, 2, 3, 4]))
    finally:
        CandidateLayer.forward_one_user = orig
    assert seen[0][0] == state.k[0][1].data_ptr() and seen[0][2] == (12, 2, 8)
    assert seen[1][1] == state.v[1][1].data_ptr()


def test_candidates_independent():
    m = model()
    b = random_batch(SPEC, 2, 10, lengths=[6, 10], seed=4)
    state = m.encode_users(b)
    cand = torch.tensor([3, 9, 14, 27, 40])
    ui = torch.tensor([0, 0, 1, 0, 1])
    with torch.no_grad():
        base = m.score_candidates(state, cand, ui)
        perm = torch.tensor([4, 2, 0, 3, 1])
        assert (m.score_candidates(state, cand[perm], ui[perm]) - base[perm]).abs().max() <= ATOL
        more = m.score_candidates(state, torch.cat([cand, torch.tensor([5, 6])]),
                                  torch.cat([ui, torch.tensor([1, 0])]))
        assert (more[:5] - base).abs().max() <= ATOL
        for u in (0, 1):
            sel = ui == u
            one = m.score_candidates_one_user(state.user(u), cand[sel])
            assert (one - base[sel]).abs().max() <= ATOL
            single = torch.stack([m.score_candidates_one_user(state.user(u), c[None])[0]
                                  for c in cand[sel]])
            assert (single - base[sel]).abs().max() <= ATOL


@pytest.mark.parametrize("kind", ["srp4ctr", "din", "bst", "user_vector"])
def test_padding_invariance(kind):
    torch.manual_seed(0)
    m = build_model(kind, SPEC, cfg(max_len=16)).eval()
    b = random_batch(SPEC, 6, 10, seed=5)
    with torch.no_grad():
        assert (m(pad_right(b, 6)) - m(b)).abs().max() <= ATOL


def test_empty_history_ignores_kv_content():
    """A user with no history gets zero attention: the padding K/V values do not matter."""
    m = model()
    b = random_batch(SPEC, 3, 8, lengths=[0, 0, 4])
    with torch.no_grad():
        state = m.encode_users(b)
        assert torch.isfinite(state.qtokens).all()
        noisy = state.replace(k=tuple(k + torch.randn_like(k) * 10 for k in state.k),
                              v=tuple(v + torch.randn_like(v) * 10 for v in state.v))
        cand = torch.tensor([1, 2, 3])
        a = m.score_candidates(state, cand)
        c = m.score_candidates(noisy, cand)
        assert (a[:2] - c[:2]).abs().max() <= ATOL and (a[2] - c[2]).abs() > 1e-4
        # the tower of an empty-history candidate is z0 -> (a = 0) -> FFN only
        layer = m.cand_layers[0]
        z0 = m.candidate_embedding(cand[:1])
        want = layer.finish(z0, torch.zeros_like(z0))
        got = layer(z0, state.k[0][:1], state.v[0][:1], state.kv_len[:1])
        torch.testing.assert_close(got, want)


def test_tower_params_layout():
    layer = model().cand_layers[0]
    p = layer.tower_params()
    assert len(p) == 12
    shapes = [tuple(t.shape) for t in p]
    assert shapes == [(16,), (16,), (16, 16), (16,), (16, 16), (16,), (16,), (16,),
                      (64, 16), (64,), (16, 64), (16,)]
    assert p[2] is layer.wq.weight and p[8] is layer.w1.weight and p[11] is layer.w2.bias


def test_freeze_encoder():
    torch.manual_seed(0)
    enc = FGBERT(SPEC, cfg())
    m = SRP4CTR(SPEC, cfg(freeze_encoder=True), encoder=enc)
    m.train()
    assert not m.encoder.training and m.head.training
    assert all(not p.requires_grad for p in m.encoder.parameters())
    before = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    trainable = [p for p in m.parameters() if p.requires_grad]
    head_before = m.head.first.weight.clone()
    opt = torch.optim.Adam(trainable, lr=1e-2)
    b = random_batch(SPEC, 8, 10)
    loss = F.binary_cross_entropy_with_logits(m(b), b["label"])
    loss.backward()
    assert all(p.grad is None for p in m.encoder.parameters())
    assert m.cand_layers[0].wq.weight.grad is not None
    opt.step()
    for k, v in m.encoder.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    assert not torch.equal(m.head.first.weight, head_before)


def test_trainable_encoder_gets_gradients():
    m = model()
    m.train()
    b = random_batch(SPEC, 8, 10)
    F.binary_cross_entropy_with_logits(m(b), b["label"]).backward()
    assert m.encoder.layers[0].attn.wk.weight.grad is not None
    assert m.encoder.embeddings.weight("item").grad is not None
    assert m.encoder.layers[0].attn.wq.weight.grad is not None  # via the encoder's own queries


def test_encoder_mismatch_and_bad_calls():
    enc = FGBERT(SPEC, cfg(d_model=32))
    with pytest.raises(InputError):
        SRP4CTR(SPEC, cfg(), encoder=enc)
    m = model()
    state = m.encode_users(random_batch(SPEC, 3, 6))
    with pytest.raises(InputError):
        m.score_candidates(state, torch.tensor([1, 2]))  # 2 candidates, 3 users, no index
    with pytest.raises(InputError):
        m.score_candidates_one_user(state, torch.tensor([1]))
    with pytest.raises(InputError):
        state.user(3)
    assert m.score_candidates(state, torch.zeros(0, dtype=torch.int64),
                              torch.zeros(0, dtype=torch.int64)).shape == (0,)
    assert m.score_candidates_one_user(state.user(0), torch.zeros(0, dtype=torch.int64)
                                       ).shape == (0,)


def test_user_state_select():
    m = model()
    b = random_batch(SPEC, 4, 6)
    with torch.no_grad():
        state = m.encode_users(b)
        sub = state.select(torch.tensor([2, 0]))
        cand = torch.tensor([5, 6])
        torch.testing.assert_close(m.score_candidates(sub, cand),
                                   m.score_candidates(state, cand, torch.tensor([2, 0])))


def test_pretrained_encoder_is_used():
    torch.manual_seed(1)
    enc = FGBERT(SPEC, cfg())
    m = SRP4CTR(SPEC, cfg(), encoder=enc)
    assert m.encoder is enc
    # the candidate tower reads FG-BERT's own tables
    ids = torch.tensor([1, 7])
    torch.testing.assert_close(m.candidate_embedding(ids), enc.embeddings.item_embedding(ids))


# ---------------------------------------------------------------------------- training smoke
@pytest.mark.parametrize("kind", ["srp4ctr", "din", "bst", "user_vector"])
def test_models_train(kind):
    """A few Adam steps on a learnable rule (click iff the candidate's year is even) lower the
    loss; no NaN on empty histories."""
    torch.manual_seed(0)
    m = build_model(kind, SPEC, cfg(dropout=0.0))
    m.train()
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    b = random_batch(SPEC, 64, 10, seed=7)
    year = torch.as_tensor(SPEC.item_table["year"])[b["cand_item"]]
    b["label"] = (year % 2 == 0).float()
    losses = []
    for _ in range(15):
        loss = F.binary_cross_entropy_with_logits(m(b), b["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


def test_user_vector_pooling():
    torch.manual_seed(0)
    enc = FGBERT(SPEC, cfg()).eval()
    b = random_batch(SPEC, 5, 8, seed=2)
    h = enc.encode(b)
    last = UserVectorCTR(SPEC, cfg(), encoder=enc, pooling="last").eval().user_vector(b)
    for i, n in enumerate(b["hist_len"].tolist()):
        want = h[i, n - 1] if n else torch.zeros(16)
        torch.testing.assert_close(last[i], want)
    mean = UserVectorCTR(SPEC, cfg(), encoder=enc).eval().user_vector(b)
    n = int(b["hist_len"][2])
    torch.testing.assert_close(mean[2], h[2, :n].mean(0))
    assert not mean[0].any()
    frozen = UserVectorCTR(SPEC, cfg(freeze_encoder=True), encoder=FGBERT(SPEC, cfg()))
    frozen.train()
    assert not frozen.encoder.training
    assert all(not p.requires_grad for p in frozen.encoder.parameters())


def test_din_attention_ignores_padding_and_candidate_matters():
    torch.manual_seed(0)
    m = DIN(SPEC, cfg()).eval()
    b = random_batch(SPEC, 4, 8, lengths=[0, 3, 8, 5])
    noisy = dict(b)
    pad = torch.arange(8)[None] >= b["hist_len"][:, None]
    noisy["hist_item"] = torch.where(pad, torch.randint(1, 50, (4, 8)), b["hist_item"])
    with torch.no_grad():
        assert (m(noisy) - m(b)).abs().max() <= ATOL
        other = {**b, "cand_item": b["cand_item"] % 50 + 1}
        assert (m(other) - m(b)).abs().max() > 1e-6


def test_bst_full_length_history():
    torch.manual_seed(0)
    m = BST(SPEC, cfg()).eval()
    b = random_batch(SPEC, 3, 12, lengths=[12, 0, 1])  # candidate + 12 = max_len + 1 tokens
    assert torch.isfinite(m(b)).all()


def test_build_model():
    for kind, cls in [("srp4ctr", SRP4CTR), ("din", DIN), ("bst", BST),
                      ("user_vector", UserVectorCTR), ("fgbert", FGBERT)]:
        assert isinstance(build_model(kind, SPEC, cfg()), cls)
    with pytest.raises(InputError):
        build_model("dien", SPEC, cfg())
    with pytest.raises(InputError):
        build_model("din", SPEC, cfg(), encoder=FGBERT(SPEC, cfg()))


# ---------------------------------------------------------------------------- FLOPs
def test_flops():
    c = ModelConfig()  # d 64, 2 layers, ffn 4, M 4, head 200-80
    L = 200
    srp1 = flops_per_request("srp4ctr", c, L, 1)
    srp100 = flops_per_request("srp4ctr", c, L, 100)
    bst100 = flops_per_request("bst", c, L, 100)
    din100 = flops_per_request("din", c, L, 100)
    assert srp100.user == srp1.user and srp100.total == srp1.user + 100 * srp1.per_candidate
    assert srp100.total * 10 < bst100.total  # folded vs re-encoding per candidate
    assert bst100.total == 100 * flops_per_request("bst", c, L, 1).total
    # efficiency-FLOPs grow a lot over DIN, inference-FLOPs much less (the paper's argument)
    din1 = flops_per_request("din", c, L, 1)
    assert srp1.total / din1.total > srp100.total / din100.total
    # the candidate tower by hand: 2 layers x (Wq + Wo + FFN + attention) + head
    d, f = 64, 4
    tower = 2 * ((2 + 2 * f) * d * d + 2 * L * d)
    head = 2 * d * 200 + 200 * 80 + 80
    assert srp1.per_candidate == 2 * (tower + head)
    layer = (4 + 2 * f) * (L + 1) * d * d + 2 * (L + 1) ** 2 * d
    assert bst100.per_candidate == 2 * (2 * layer + (3 * d * 200 + 200 * 80 + 80))
    assert {**srp100} == {"user": srp100.user, "per_candidate": srp100.per_candidate,
                          "n_candidates": 100, "total": srp100.total}
    no_x = flops_per_request("srp4ctr", c.replace(use_xattn=False), L, 1)
    assert no_x.per_candidate < srp1.per_candidate
    with pytest.raises(InputError):
        flops_per_request("nope", c, L, 1)


# ---------------------------------------------------------------------------- kernels contract
def test_tower_matches_kernel_reference():
    """The candidate tower equals the kernels' reference fed with ``tower_params()`` and the
    users' K/V laid out jagged (rows ``[:kv_len]`` of each user, one user after another)."""
    ref = pytest.importorskip("srp4ctr.kernels.reference.candidate_tower")
    from srp4ctr.kernels import TowerLayerParams

    m = model()
    lengths = [3, 0, 12, 1]
    b = random_batch(SPEC, 4, 12, lengths=lengths, seed=11)
    counts = [2, 3, 1, 4]  # candidates per user, grouped by user
    user_index = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    cand = torch.randint(1, SPEC.n_items + 1, (int(user_index.numel()),),
                         generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        state = m.encode_users(b)
        z0 = m.candidate_embedding(cand)
        want = m.tower(z0, state, user_index)
        kv = [(torch.cat([k[u, :n] for u, n in enumerate(lengths)]),
               torch.cat([v[u, :n] for u, n in enumerate(lengths)]))
              for k, v in zip(state.k, state.v, strict=True)]
        params = [TowerLayerParams(*layer.tower_params()) for layer in m.cand_layers]
        q_off = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
        kv_off = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        got = ref.candidate_tower_ref(z0, kv, params, q_off, kv_off)
    assert (got - want).abs().max() <= ATOL


@pytest.mark.parametrize("kw", [{}, {"use_qformer": False}, {"use_xattn": False}],
                         ids=["default", "no_qformer", "no_xattn"])
def test_head_user_features(kw):
    """head_user_features: the user-feature embedding reaches the head's user part, so the user
    features change the logits even without the Q-Former (whose query offset is otherwise their
    only way in); the head block it adds is folded into UserState.head_user like the rest."""
    m = model(head_user_features=True, **kw)
    plain = model(**kw)
    assert m.head.user_dim == plain.head.user_dim + m.user_emb.out_dim
    b = random_batch(SPEC, 6, 10, seed=4)
    other = dict(b)
    f = SPEC.user_fields[0]
    other[f"user_{f}"] = (b[f"user_{f}"] % (SPEC.vocab[f] - 1)) + 1
    assert not torch.equal(other[f"user_{f}"], b[f"user_{f}"])
    with torch.no_grad():
        assert (m(b) - m(other)).abs().max() > 1e-4
        if kw.get("use_qformer") is False:  # without the option the user features are unused
            assert (plain(b) - plain(other)).abs().max() == 0
        state = m.encode_users(b)
        split = m.score_candidates(state, b["cand_item"])
        torch.testing.assert_close(split, m(b), atol=ATOL, rtol=0)
    # a spec without user fields: the option has nothing to add
    assert model(spec=SPEC_NO_USER, head_user_features=True).head.user_dim == \
        model(spec=SPEC_NO_USER).head.user_dim


def test_item_bias():
    """item_bias: one learned scalar per item id added to the logit, zero at initialisation
    (the model then equals the one without it), trained, and the same on every scoring path."""
    torch.manual_seed(0)
    m = model(item_bias=True)
    b = random_batch(SPEC, 6, 10, seed=5)
    with torch.no_grad():
        base = m(b)
        m.item_bias.weight[int(b["cand_item"][0])] = 2.5
        moved = m(b)
    same = b["cand_item"] == b["cand_item"][0]
    torch.testing.assert_close(moved[same], base[same] + 2.5)
    torch.testing.assert_close(moved[~same], base[~same])
    state = m.encode_users(b)
    with torch.no_grad():
        one = m.score_candidates_one_user(state.user(0), b["cand_item"])
        batched = m.score_candidates(state, b["cand_item"], torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(one, batched, atol=ATOL, rtol=0)
    m.train()
    m(b).sum().backward()
    assert m.item_bias.weight.grad[b["cand_item"]].abs().sum() > 0


@pytest.mark.parametrize("cls", [DIN, BST, UserVectorCTR], ids=lambda c: c.kind)
def test_baselines_item_bias(cls):
    """ModelConfig.item_bias on the baselines: zero at start (the same logits as without it),
    then the candidate's row is added to its logit."""
    torch.manual_seed(0)
    plain = cls(SPEC, cfg()).eval()
    torch.manual_seed(0)
    m = cls(SPEC, cfg(item_bias=True)).eval()
    b = random_batch(SPEC, 6, 10, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(m(b), plain(b))
        m.item_bias.weight[int(b["cand_item"][0])] = -1.5
        same = b["cand_item"] == b["cand_item"][0]
        torch.testing.assert_close(m(b)[same], plain(b)[same] - 1.5)
        torch.testing.assert_close(m(b)[~same], plain(b)[~same])


@pytest.mark.parametrize("kind", ["srp4ctr", "din", "bst", "user_vector"])
def test_item_stats_input(kind):
    """ModelConfig.item_stats: the head reads batch['cand_stats'] where given (training samples'
    out-of-fold values) and the model's table otherwise; the two agree when they hold the same."""
    torch.manual_seed(0)
    m = build_model(kind, SPEC, cfg(item_stats=True)).eval()
    with torch.no_grad():
        m.item_statistics.table.normal_(generator=torch.Generator().manual_seed(1))
    b = random_batch(SPEC, 6, 10, seed=8)
    with torch.no_grad():
        from_table = m(b)
        same = m({**b, "cand_stats": m.item_statistics.table[b["cand_item"]]})
        other = m({**b, "cand_stats": torch.zeros(6, 3)})
    torch.testing.assert_close(same, from_table)
    assert (other - from_table).abs().max() > 1e-4
