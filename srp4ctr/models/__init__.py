"""Models: FG-BERT (pre-training), the SRP4CTR CTR model, and the CTR baselines.

Every CTR model has ``forward(batch) -> logits [B]``; SRP4CTR also splits into the user side and
the candidate side that the serving engine calls::

    state = model.encode_users(batch)                           # once per request
    logits = model.score_candidates(state, cand_item, user_index)

Build models with :func:`build_model` from a model kind (:mod:`srp4ctr.models.registry`), a
:class:`ModelSpec` (the dataset's vocabularies, fields and item side-feature table) and a
:class:`ModelConfig` (hyperparameters); save and load them with :mod:`srp4ctr.models.checkpoint`.
"""

from __future__ import annotations

from srp4ctr._files import atomic_write_dir, sha256_file
from srp4ctr.models import flops
from srp4ctr.models.baselines import BST, DIN, UserVectorCTR
from srp4ctr.models.checkpoint import (
    Checkpoint,
    load_checkpoint,
    load_model,
    read_config,
    save_checkpoint,
)
from srp4ctr.models.ctr import SRP4CTR, CandidateLayer, CTRHead, QFormer, UserState
from srp4ctr.models.fgbert import FGBERT
from srp4ctr.models.flops import FlopCount, flops_per_request, served_flops_per_candidate
from srp4ctr.models.layers import FieldEmbedding, UserFeatureEmbedding
from srp4ctr.models.registry import (
    ModelEntry,
    build_model,
    model_class,
    model_entry,
    model_kinds,
    register,
)
from srp4ctr.models.spec import ModelConfig, ModelSpec, check_batch

__all__ = [
    "BST",
    "DIN",
    "FGBERT",
    "MODEL_KINDS",
    "SRP4CTR",
    "CTRHead",
    "CandidateLayer",
    "Checkpoint",
    "FieldEmbedding",
    "FlopCount",
    "ModelConfig",
    "ModelEntry",
    "ModelSpec",
    "QFormer",
    "UserFeatureEmbedding",
    "UserState",
    "UserVectorCTR",
    "atomic_write_dir",
    "build_model",
    "check_batch",
    "flops_per_request",
    "load_checkpoint",
    "load_model",
    "model_class",
    "model_entry",
    "model_kinds",
    "read_config",
    "register",
    "save_checkpoint",
    "served_flops_per_candidate",
    "sha256_file",
]

# The registration order is the order kinds are listed in (command-line choices, error messages).
register(SRP4CTR, role="ctr", takes_encoder=True, macs=flops.srp4ctr_macs)
register(DIN, role="ctr", macs=flops.din_macs)
register(BST, role="ctr", macs=flops.bst_macs)
register(UserVectorCTR, role="ctr", takes_encoder=True, macs=flops.user_vector_macs)
register(FGBERT, role="pretrain")
# BERT (BERT4Rec-style): FG-BERT whose tokens carry only the item id
register(FGBERT, role="pretrain", kind="bert", overrides={"item_only": True})

MODEL_KINDS = model_kinds()
