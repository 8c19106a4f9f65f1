"""Loading the optional C++ extension ``srp4ctr._C`` (built from csrc/ by ``pip install``).

The import is attempted once; a failure is kept (not raised) so the package works without the
extension, and :func:`warn_fallback` tells the user once per process that scoring falls back to
torch. (To score without it on purpose, ask the engine for ``backend="torch"``.)
"""

from __future__ import annotations

import sys
import threading
import warnings
from types import ModuleType

from srp4ctr._fork import renew_lock_after_fork

__all__ = ["extension", "unavailable_reason", "warn_fallback"]

_lock = threading.Lock()
renew_lock_after_fork(sys.modules[__name__])  # held by a thread of the parent at fork time?
_loaded = False
_module: ModuleType | None = None
_error: str | None = None
_warned = False


def extension() -> ModuleType | None:
    """The ``srp4ctr._C`` module, or None when it is not built / cannot be loaded / disabled."""
    global _loaded, _module, _error
    with _lock:
        if not _loaded:
            _loaded = True
            try:
                from srp4ctr import _C
            except ImportError as e:  # not built, or built for another Python / platform
                _error = f"srp4ctr._C could not be imported ({e})"
            else:
                _module = _C
        return _module


def unavailable_reason() -> str | None:
    """Why the extension cannot be used, or None when it can."""
    return None if extension() is not None else _error


def warn_fallback(what: str) -> None:
    """One warning per process: the C++ path was wanted for ``what`` but torch is used."""
    global _warned
    with _lock:
        if _warned:
            return
        _warned = True
    warnings.warn(
        f"srp4ctr: the C++ CPU kernels are not available ({unavailable_reason()}); {what} uses "
        "the torch backend instead. Reinstall with a C++17 compiler (`pip install .`) to build "
        "them.", RuntimeWarning, stacklevel=3)
