"""Type stub of the C++ CPU kernels ``srp4ctr._C`` (built from csrc/ by ``pip install``).

The engine's wrappers (``srp4ctr.engine.backends.cpp``) are the supported way to call these. The
extension checks every buffer itself (typed numpy arrays, never raw addresses): dtype, shape,
contiguity, id ranges, counts and the caches' finiteness.
"""

from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

_F32: TypeAlias = npt.NDArray[np.float32]
#: float32, or the bit patterns of bfloat16 as uint16
_Buf: TypeAlias = npt.NDArray[np.float32] | npt.NDArray[np.uint16]

class Tower:
    """The candidate side of one model: packed weights, scored tile by tile over a pool."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        layers: list[dict[str, _F32]],
        head_zn: _F32 | None,
        rest: list[tuple[_F32, _F32]],
        h1: int,
        precision: str,
        isa: str,
        ln_eps: float,
    ) -> None: ...
    def score(
        self,
        ids: npt.NDArray[np.int64],
        tables: tuple[_Buf, _Buf | None, _Buf],
        users: list[tuple[_Buf, _Buf, _Buf]],
        counts: npt.NDArray[np.int64],
        out: _F32,
        threads: int,
        tile: int,
    ) -> None:
        """Logits into ``out`` [N] of ``ids`` [N] (rows of the tables z0 [R, d], q0 [R, d] or
        None without tower layers, hz0 [R, h1]) against the users' caches (k, v
        [n_layers, n, H, Dh], head_user [h1]) with ``counts`` [B] candidates each, in order.
        Arrays are float32, or bfloat16 as their uint16 bits, C-contiguous; every dtype, shape,
        id and count is checked (``ValueError`` / ``IndexError``) before any work, and caches
        holding NaN or inf are refused."""
    @property
    def isa(self) -> str: ...
    @property
    def precision(self) -> str: ...

class UserEncoder:
    """The user side of one model in fp32: FG-BERT layers, Q-Former, the head's user block."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        layers: list[dict[str, _F32]],
        final_ln: tuple[_F32, _F32],
        qblocks: list[dict[str, _F32]],
        q_ln: tuple[_F32, _F32] | None,
        head_user: tuple[_F32 | None, _F32],
        n_queries: int,
        h1: int,
        isa: str,
        ln_eps: float,
    ) -> None: ...
    def encode(
        self, x: _F32, queries: _F32 | None, threads: int = 1
    ) -> tuple[_F32, _F32, _F32, _F32]:
        """x [n, d] -> (k [L, n, d], v [L, n, d], qtokens [M, d], head_user [h1])."""
    @property
    def isa(self) -> str: ...

def cpu_features() -> dict[str, Any]: ...
