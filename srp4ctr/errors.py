"""The project's exception hierarchy.

Every error the package raises on purpose derives from :class:`SRP4CTRError`. Errors caused by
the caller's input (bad ids, shapes, dtypes, files) derive from :class:`InputError`, which is also
a :class:`ValueError`, so ``except ValueError`` keeps working for code that does not know us.
"""

from __future__ import annotations


class SRP4CTRError(Exception):
    """Base class of every error raised on purpose by srp4ctr."""


class BenchError(SRP4CTRError):
    """``srp4ctr bench`` could not run: no source checkout with the bench/ folder, a missing
    requirement, or a benchmark run that produced no results."""


class InputError(SRP4CTRError, ValueError):
    """The caller's input is invalid (ids, shapes, dtypes, values, arguments)."""


class DataError(InputError):
    """A data file or dataset is malformed, missing, empty or fails its checksum.

    ``path`` and ``line`` name the offending file and 1-based line where known.
    """

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f":{line}"
            where += ": "
        super().__init__(where + message)
        self.path = path
        self.line = line


class ChecksumError(DataError):
    """A downloaded file does not have the expected sha256."""


class UnknownDatasetError(InputError):
    """A dataset name that no loader knows."""


class CheckpointError(InputError):
    """A checkpoint directory is missing files, truncated, or from another model."""


class BundleError(CheckpointError):
    """A serving bundle is incomplete, truncated, altered or of another format version."""


class CacheError(InputError):
    """A user cache is invalid: from another model, truncated, or holding NaN/inf."""


class UnknownItemError(InputError):
    """An item id that the dataset does not know, where unknown ids were not allowed (strict)."""
