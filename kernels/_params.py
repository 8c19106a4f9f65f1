"""The weights of one candidate-tower layer, shared by the reference and the Triton kernel."""

from __future__ import annotations

from typing import NamedTuple

import torch

LAYER_NORM_EPS = 1e-5


class TowerLayerParams(NamedTuple):
    """One layer of the candidate tower (pre-LN cross-attention block + FFN).

    Linear weights use the ``torch.nn.Linear`` layout ``[out, in]``; d = H * Dh is the model width
    and F the FFN width::

        ln1_w, ln1_b: [d]        wq: [d, d]  bq: [d]     wo: [d, d]  bo: [d]
        ln2_w, ln2_b: [d]        w1: [F, d]  b1: [F]     w2: [d, F]  b2: [d]

    The layer computes, for candidate states z [N, d] and the user's cached k, v [L, H, Dh]::

        q = LN1(z) @ wq.T + bq                       # viewed [N, H, Dh]
        z = z + attention(q, k, v) @ wo.T + bo       # candidates attend to their user's k/v
        z = z + gelu(LN2(z) @ w1.T + b1) @ w2.T + b2 # exact (erf) GELU; LayerNorm eps 1e-5
    """

    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    wq: torch.Tensor
    bq: torch.Tensor
    wo: torch.Tensor
    bo: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    def to(self, *args, **kwargs) -> TowerLayerParams:
        """Every tensor through ``Tensor.to(*args, **kwargs)`` (device and/or dtype)."""
        return TowerLayerParams(*(t.to(*args, **kwargs) for t in self))

    @property
    def d_model(self) -> int:
        return self.wq.shape[1]

    @property
    def d_ff(self) -> int:
        return self.w1.shape[0]
