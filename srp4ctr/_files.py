"""File helpers shared by checkpoints, caches and exports: a file's sha256 and atomic directory
writes. Standard library only, so any layer (models, training, serving) can use them."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_write_dir", "sha256_file", "shareable"]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def shareable(directory: str | os.PathLike) -> None:
    """Give a folder made by :func:`tempfile.mkdtemp` (mode 0700) the permissions of an ordinary
    new folder (0777 less the umask): for folders other processes serve from."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)


def atomic_write_dir(final: str | os.PathLike, write) -> Path:
    """Call ``write(tmpdir)`` then move ``tmpdir`` to ``final`` (replacing an old directory).

    The folder gets the permissions of an ordinary new folder (0777 less the umask), not the
    0700 of a temporary one: checkpoints and bundles are read by serving processes that may run
    as another user."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        shareable(tmp)
        write(tmp)
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, trash / "old")
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
