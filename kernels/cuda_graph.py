"""Replaying a fixed-shape call through a CUDA graph, to take launch overhead off small requests.

A serving request of fixed shape (same candidate count, history length and users) launches the
same kernels every time; capturing them once and replaying the graph costs one launch instead of
one per kernel. Shapes change between requests, so keep one :class:`GraphedCall` per shape bucket.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from srp4ctr.errors import InputError


class GraphedCall:
    """``fn(*inputs)`` captured once in a CUDA graph and replayed on new inputs of the same shape.

    ``fn`` must take and return CUDA tensors, be free of host synchronisation (call the kernel ops
    with ``validate=False``) and allocate only through torch. The first ``warmup`` calls run
    eagerly on a side stream, so Triton compiles and autotunes before the capture.

    Example::

        step = GraphedCall(lambda z: candidate_tower(z, kv, params, validate=False), z0)
        out = step(z)  # copies z into the captured input, replays, returns the captured output

    The returned tensor is the graph's own output buffer, overwritten by the next replay: clone it
    to keep it.
    """

    def __init__(
        self, fn: Callable[..., torch.Tensor], *example_inputs: torch.Tensor, warmup: int = 2
    ):
        if not torch.cuda.is_available():
            raise InputError("GraphedCall needs a CUDA device")
        if not example_inputs or not all(
            isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs
        ):
            raise InputError("GraphedCall needs at least one example input, all CUDA tensors")
        self.fn = fn
        self.static_inputs = [t.clone() for t in example_inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_output = fn(*self.static_inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.static_inputs):
            raise InputError(f"expected {len(self.static_inputs)} inputs, got {len(inputs)}")
        for static, new in zip(self.static_inputs, inputs):
            if new.shape != static.shape or new.dtype != static.dtype:
                raise InputError(
                    f"GraphedCall was captured for {tuple(static.shape)} {static.dtype}, got "
                    f"{tuple(new.shape)} {new.dtype}; capture one per shape"
                )
            static.copy_(new)
        self.graph.replay()
        return self.static_output
