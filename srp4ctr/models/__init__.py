"""Models: FG-BERT (pre-training), the SRP4CTR CTR model, and the CTR baselines.

Every CTR model has ``forward(batch) -> logits [B]``; SRP4CTR also splits into the user side and
the candidate side that the serving engine calls::

    state = model.encode_users(batch)                           # once per request
    logits = model.score_candidates(state, cand_item, user_index)

Build models with :func:`build_model` from a :class:`ModelSpec` (the dataset's vocabularies,
fields and item side-feature table) and a :class:`ModelConfig` (hyperparameters).
"""

from __future__ import annotations

from torch import nn

from srp4ctr.errors import InputError
from srp4ctr.models.baselines import BST, DIN, UserVectorCTR
from srp4ctr.models.ctr import SRP4CTR, CandidateLayer, CTRHead, QFormer, UserState
from srp4ctr.models.fgbert import FGBERT
from srp4ctr.models.flops import FlopCount, flops_per_request, served_flops_per_candidate
from srp4ctr.models.layers import FieldEmbedding, UserFeatureEmbedding
from srp4ctr.models.spec import ModelConfig, ModelSpec, check_batch

__all__ = [
    "BST",
    "DIN",
    "FGBERT",
    "MODEL_KINDS",
    "SRP4CTR",
    "CTRHead",
    "CandidateLayer",
    "FieldEmbedding",
    "FlopCount",
    "ModelConfig",
    "ModelSpec",
    "QFormer",
    "UserFeatureEmbedding",
    "UserState",
    "UserVectorCTR",
    "build_model",
    "check_batch",
    "flops_per_request",
    "served_flops_per_candidate",
]

MODEL_KINDS = ("srp4ctr", "din", "bst", "user_vector", "fgbert")


def build_model(kind: str, spec: ModelSpec, config: ModelConfig,
                encoder: FGBERT | None = None) -> nn.Module:
    """A model of ``kind``: ``srp4ctr``, ``din``, ``bst``, ``user_vector`` (CTR models) or
    ``fgbert`` (the pre-training encoder). ``encoder`` (a pre-trained FG-BERT) is used by
    ``srp4ctr`` and ``user_vector`` and must match ``config``'s architecture; the others refuse it.
    """
    if kind == "srp4ctr":
        return SRP4CTR(spec, config, encoder)
    if kind == "user_vector":
        return UserVectorCTR(spec, config, encoder)
    if encoder is not None:
        raise InputError(f"model kind {kind!r} takes no pre-trained encoder")
    if kind == "din":
        return DIN(spec, config)
    if kind == "bst":
        return BST(spec, config)
    if kind == "fgbert":
        return FGBERT(spec, config)
    raise InputError(f"unknown model kind {kind!r}; expected one of {', '.join(MODEL_KINDS)}")
