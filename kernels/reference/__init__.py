"""Plain-torch references for the kernel ops: readable, fp32 inside, always importable."""

from .candidate_attention import candidate_attention_ref
from .candidate_tower import candidate_tower_layer_ref, candidate_tower_ref
from .query_pool import query_pool_ref

__all__ = [
    "candidate_attention_ref",
    "candidate_tower_layer_ref",
    "candidate_tower_ref",
    "query_pool_ref",
]
