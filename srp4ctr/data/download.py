"""MovieLens-100k from the ``recbole==1.2.1`` wheel on PyPI (see the package docs).

The wheel is fetched with ``python -m pip download --no-deps`` (recbole is never installed),
checked against its sha256 and kept in ``<data_dir>/downloads`` so later runs need no network.
On a machine without network, put the wheel there yourself, or point ``SRP4CTR_ML100K_WHEEL``
(or ``prepare(..., path=...)``) at it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from srp4ctr.errors import ChecksumError, DataError

WHEEL_NAME = "recbole-1.2.1-py3-none-any.whl"
WHEEL_REQUIREMENT = "recbole==1.2.1"
WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
WHEEL_MEMBERS = {
    "inter": "recbole/dataset_example/ml-100k/ml-100k.inter",
    "item": "recbole/dataset_example/ml-100k/ml-100k.item",
    "user": "recbole/dataset_example/ml-100k/ml-100k.user",
}
ENV_WHEEL = "SRP4CTR_ML100K_WHEEL"

Downloader = Callable[[Path], None]


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip_download(dest: Path) -> None:
    """Download the wheel into ``dest`` with pip (the default downloader)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        WHEEL_REQUIREMENT,
        "-d",
        str(dest),
    ]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"could not run pip to download {WHEEL_REQUIREMENT}: {e}") from None
    if r.returncode != 0:
        tail = (r.stderr or r.stdout or "").strip().splitlines()[-5:]
        raise DataError(
            f"pip could not download {WHEEL_REQUIREMENT} (needs network access to PyPI; "
            f"offline, place {WHEEL_NAME} in the cache's downloads folder or set "
            f"{ENV_WHEEL}): " + " | ".join(tail)
        )


#: the function that fetches the wheel into a folder; tests replace it to avoid the network
downloader: Downloader = pip_download


def verify_wheel(path: Path, *, remove_bad: bool = True, expected: str = WHEEL_SHA256) -> Path:
    """Check the sha256 of ``path``; a mismatch removes the file (if asked) and raises."""
    got = sha256_file(path)
    if got != expected:
        if remove_bad:
            try:
                path.unlink()
            except OSError:
                pass
        raise ChecksumError(f"sha256 {got} != expected {expected}", path=str(path))
    return path


def fetch_wheel(
    downloads_dir: str | os.PathLike,
    *,
    local: str | os.PathLike | None = None,
    download: Downloader | None = None,
) -> Path:
    """The verified wheel: ``local`` if given (or ``$SRP4CTR_ML100K_WHEEL``), else the copy in
    ``downloads_dir``, else a fresh download into ``downloads_dir`` (atomic: temp + rename).

    A wheel whose sha256 differs raises :class:`ChecksumError`; a downloaded or cached bad file
    is removed (a file the user pointed at is left alone).
    """
    local = local if local is not None else os.environ.get(ENV_WHEEL) or None
    if local is not None:
        p = Path(local)
        if not p.is_file():
            raise DataError("wheel not found", path=str(p))
        return verify_wheel(p, remove_bad=False)
    d = Path(downloads_dir)
    target = d / WHEEL_NAME
    if target.is_file():
        return verify_wheel(target)
    d.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=d))
    try:
        (download or downloader)(tmp)
        got = tmp / WHEEL_NAME
        if not got.is_file():
            found = sorted(p.name for p in tmp.iterdir())
            raise DataError(f"the download produced {found}, not {WHEEL_NAME}", path=str(d))
        verify_wheel(got)
        os.replace(got, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_members(wheel: Path) -> dict[str, bytes]:
    """The three ml-100k files of the wheel, by short name (inter, item, user)."""
    try:
        with zipfile.ZipFile(wheel) as z:
            return {k: z.read(m) for k, m in WHEEL_MEMBERS.items()}
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise DataError(f"not a usable recbole wheel: {e}", path=str(wheel)) from None
