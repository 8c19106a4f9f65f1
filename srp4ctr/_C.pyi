"""Type stub of the C++ CPU kernels ``srp4ctr._C`` (built from csrc/ by ``pip install``).

The engine's wrappers (``srp4ctr.engine.backends.cpp``) are the supported way to call these: they
check dtypes, shapes and contiguity and keep the buffers alive for the call.
"""

from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

_F32: TypeAlias = npt.NDArray[np.float32]

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
        ids: int,
        n_ids: int,
        tables: tuple[int, int, int, int, str],
        users: npt.NDArray[np.int64],
        kv_dtype: str,
        out: int,
        threads: int,
        tile: int,
    ) -> None:
        """``ids``/``out``/``tables`` are buffer addresses; ``users`` rows are (k address,
        v address, head_user address, history rows, candidate count)."""
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
