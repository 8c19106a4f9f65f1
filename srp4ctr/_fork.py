"""What a process forked from one that used srp4ctr must redo before it can work.

GNU OpenMP (the runtime of torch's CPU wheels) cannot start a thread team in a child of a
process that had one: the child's first parallel torch op waits forever for threads that were
not copied. So a forked child runs torch's ops on one thread (``torch.set_num_threads(1)``, as
torch's own DataLoader workers do; the engine's ``threads`` setting only ever lowers it), and
locks that another thread of the parent held at the moment of ``fork()`` are made anew. The C++
thread pool rebuilds itself in the child with its full size (``csrc/threadpool.cpp``).
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from typing import Any

#: objects whose ``_lock`` is replaced by a new one in a forked child
_LOCKED: weakref.WeakSet[Any] = weakref.WeakSet()


def renew_lock_after_fork(obj: Any) -> None:
    """Give ``obj._lock`` (a ``threading.Lock``) a fresh lock in every forked child."""
    _LOCKED.add(obj)


def _after_fork_in_child() -> None:
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    for obj in list(_LOCKED):
        obj._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
