"""The streaming k-means model: :class:`StreamingKMeans` and its parts.

The estimator (:mod:`~streamkm.model.estimator`) reads as the scikit-learn API over a few
policies, each in a module of its own, as scikit-learn keeps ``_kmeans.py`` apart from its
``_k_means_*`` helpers:

* :mod:`~streamkm.model.sample` — the bounded weighted sample of the stream;
* :mod:`~streamkm.model.refine` — weighted Lloyd iterations on it, and their schedule;
* :mod:`~streamkm.model.relocation` — starved centroids and the swap of the least useful one;
* :mod:`~streamkm.model.scoring` — the anomaly score;
* :mod:`~streamkm.model.state` — the state format of ``save``/``load`` and checkpoints;
* :mod:`~streamkm.model._validation` — input checks and scikit-learn compatibility shims.

The compiled kernels live in :mod:`streamkm.kernel`.
"""

from __future__ import annotations

from streamkm.errors import NotFittedError, StateError
from streamkm.model.estimator import Snapshot, StepResult, StreamingKMeans
from streamkm.model.state import STATE_VERSION

__all__ = [
    "STATE_VERSION",
    "NotFittedError",
    "Snapshot",
    "StateError",
    "StepResult",
    "StreamingKMeans",
]
