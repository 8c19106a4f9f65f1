"""srp4ctr: SRP4CTR (sequential-recommendation pre-training for CTR prediction).

Importing the package is cheap and never touches a GPU or needs Triton. Sub-packages:

- ``srp4ctr.data``     real data (MovieLens, Taobao, generic tables), sequences, splits, samples
- ``srp4ctr.metrics``  AUC, gAUC, logloss, HR@k, NDCG@k
- ``srp4ctr.models``   FG-BERT, the SRP4CTR CTR model, baselines, the model registry, checkpoints
- ``srp4ctr.train``    pre-training, fine-tuning, experiments
- ``srp4ctr.kernels``  candidate attention and Q-Former pooling (Triton + torch references)
- ``srp4ctr.engine``   the serving engine (encode_user -> UserCache, score)
"""

from srp4ctr.errors import DataError, InputError, SRP4CTRError

__version__ = "0.1.0"

__all__ = ["DataError", "InputError", "SRP4CTRError", "__version__"]
