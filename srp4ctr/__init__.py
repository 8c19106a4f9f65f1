"""srp4ctr: SRP4CTR (sequential-recommendation pre-training for CTR prediction).

Importing the package is cheap and never touches a GPU or needs Triton. Sub-packages:

- ``srp4ctr.data``     real data (MovieLens, Taobao, generic tables), sequences, splits, samples
- ``srp4ctr.metrics``  AUC, gAUC, logloss, HR@k, NDCG@k
- ``srp4ctr.models``   FG-BERT, the SRP4CTR CTR model, baselines, the model registry, checkpoints
- ``srp4ctr.train``    pre-training, fine-tuning, experiments
- ``srp4ctr.kernels``  candidate attention and Q-Former pooling (Triton + torch references)
- ``srp4ctr.engine``   the serving engine (encode_user -> UserCache, score)
"""

import os as _os
import sys as _sys
from pathlib import Path as _Path

# Passive OpenMP waiting unless the user chose: on a shared or oversubscribed CPU, spinning
# workers turned a 1 ms scoring call into 150 ms (README). OpenMP reads it once, when torch's
# runtime starts, so it is set only while torch is not loaded yet.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from srp4ctr import _fork  # noqa: F401  (a forked child's torch threads and locks)
from srp4ctr.errors import DataError, InputError, SRP4CTRError


def _source_tree_subpackages() -> None:
    """``srp4ctr.engine`` and ``srp4ctr.kernels`` live in ``engine/`` and ``kernels/`` beside
    this folder in a source checkout (the install maps them in). Imported straight from a
    checkout (its root on ``sys.path``, e.g. a script run from the clone root), this folder would
    shadow the installed package and hide them: then the checkout's root is searched for them
    too."""
    here = _Path(__file__).resolve().parent
    root = here.parent
    if (here / "engine").is_dir() or not all(
            (root / name / "__init__.py").is_file() for name in ("engine", "kernels")):
        return
    if (root / "pyproject.toml").is_file() and str(root) not in __path__:
        __path__.append(str(root))


_source_tree_subpackages()

__version__ = "0.1.0"

__all__ = ["DataError", "InputError", "SRP4CTRError", "__version__"]
