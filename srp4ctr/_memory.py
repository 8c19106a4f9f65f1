"""Handing freed memory back to the system between the phases of a large job."""

from __future__ import annotations

import ctypes
import functools
import gc
import sys
from collections.abc import Callable

__all__ = ["drop_mapped_pages", "proc_status_mib", "release_memory", "trim_heap"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def trim_heap() -> None:
    """Give the freed heap pages back to the system (glibc; elsewhere nothing happens).

    glibc keeps freed blocks of up to 32 MB in its heap for reuse (its mmap threshold grows
    with the largest block freed), so the temporaries of one phase stay resident beside the
    next phase's; it costs about a millisecond."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def release_memory() -> None:
    """Collect reference cycles, then :func:`trim_heap`."""
    gc.collect()
    trim_heap()


def drop_mapped_pages(*arrays) -> None:
    """Let the resident pages of read-only memory-mapped arrays go from this process (Linux
    ``madvise(MADV_DONTNEED)``; elsewhere, or for arrays not backed by a file mapping, nothing
    happens). The pages stay in the page cache, so the next read is a minor fault, not disk
    I/O: after a one-off scan of a large prepared dataset, its pages are not held beside
    training."""
    import mmap

    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None:
        return
    for a in arrays:
        m = a
        while m is not None and not isinstance(getattr(m, "_mmap", None), mmap.mmap):
            m = getattr(m, "base", None)
        if m is None:
            continue
        try:
            m._mmap.madvise(advice)
        except (OSError, ValueError):  # closed, or a platform that refuses the advice
            pass


def proc_status_mib(key: str = "VmRSS", pid: int | str = "self") -> float:
    """A memory line of ``/proc/PID/status`` in MiB (``VmRSS``: resident now; ``VmHWM``: the
    process image's peak); NaN where there is no such file (not Linux) or line."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            text = f.read()
    except OSError:
        return float("nan")
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")
