"""srp4ctr.kernels: the two hot operations of folded inference, plus the fused candidate tower.

- :func:`candidate_attention` — each user's candidates attend to that user's cached K/V.
- :func:`query_pool` — M shared (Q-Former) queries attend to every user's states.
- :func:`candidate_tower_layer` / :func:`candidate_tower` — the fused candidate-tower layer
  (LN → Q projection → attention → O projection → residual → LN → FFN → residual).

Each op has a Triton implementation (``_triton/``, imported only when used) and a plain torch
reference (``reference/``, always importable) that defines correctness. Which one runs is the
:class:`Backend`, resolved once at first use (see :mod:`srp4ctr.kernels._backend`). Importing this
package never imports triton nor touches a GPU.
"""

from ._backend import Backend, BackendUnavailableError, get_backend, set_backend, triton_available
from ._params import TowerLayerParams
from .candidate_attention import candidate_attention
from .candidate_tower import candidate_tower, candidate_tower_layer
from .cuda_graph import GraphedCall
from .query_pool import query_pool

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "GraphedCall",
    "TowerLayerParams",
    "candidate_attention",
    "candidate_tower",
    "candidate_tower_layer",
    "get_backend",
    "query_pool",
    "set_backend",
    "triton_available",
]
