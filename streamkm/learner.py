"""The model as the loop sees it: a small protocol, and a factory from settings.

The loop needs only :class:`Learner`: how many rows the first step needs, ``step`` a batch,
a ``version``, a snapshot to undo a step (exactly-once), the estimator the checkpoint stores and
the metrics read, and the public state the model topic carries. A second model kind is a class
with these members registered in :data:`KINDS`; the loop does not change.

Examples
--------
>>> import numpy as np
>>> from streamkm.config import Settings
>>> settings = Settings.model_validate({"model": {"n_clusters": 2, "batch_size": 4, "seed": 0}})
>>> learner = learner_from_settings(settings)
>>> learner.rows_to_start, learner.fitted
(6, False)
>>> labels, distances, scores = learner.step(np.arange(12.0).reshape(6, 2))
>>> learner.version, learner.fitted, learner.dim
(1, True, 2)
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Protocol

import numpy as np

from streamkm.config import ModelSettings, Settings
from streamkm.errors import ConfigError


class StepOutput(Protocol):
    """What a step returns for a batch of n rows (a named tuple in practice)."""

    @property
    def labels(self) -> np.ndarray:
        """int (n,): nearest centroid."""
        ...

    @property
    def distances(self) -> np.ndarray:
        """float64 (n,): Euclidean distance to it."""
        ...

    @property
    def scores(self) -> np.ndarray:
        """float64 (n,): anomaly score (higher = more anomalous)."""
        ...


class Learner(Protocol):
    """A model kind, as the daemon's loop drives it."""

    kind: ClassVar[str]

    @property
    def rows_to_start(self) -> int:
        """Rows held back for the first step (e.g. k-means seeding)."""
        ...

    @property
    def fitted(self) -> bool:
        """Whether the model has learnt from a first batch."""
        ...

    @property
    def version(self) -> int:
        """Model version: +1 per batch learnt."""
        ...

    @property
    def dim(self) -> int | None:
        """Number of features, None before the first step."""
        ...

    @property
    def estimator(self) -> Any:
        """What the checkpoint store saves (``to_state``/``from_state``) and metrics read."""
        ...

    def step(self, X: np.ndarray) -> StepOutput:
        """Label and score a batch of shape (n, dim) with the model as it is, then learn."""
        ...

    def snapshot(self) -> Any:
        """The model now, to :meth:`restore` if the next step must be undone."""
        ...

    def restore(self, snapshot: Any) -> None:
        """Put the model back as it was at :meth:`snapshot`."""
        ...

    def public_state(self) -> dict[str, Any]:
        """JSON-able state published on the model topic (without the version)."""
        ...


class KMeansLearner:
    """:class:`~streamkm.model.StreamingKMeans` behind the :class:`Learner` protocol.

    Parameters
    ----------
    settings : ModelSettings
        The ``[model]`` section.
    estimator : StreamingKMeans, optional
        A model to go on with (restored from a checkpoint); a new one by default.
    """

    kind: ClassVar[str] = "kmeans"

    def __init__(self, settings: ModelSettings, estimator: Any = None) -> None:
        self.settings = settings
        self._estimator = estimator if estimator is not None else self._new()

    @staticmethod
    def estimator_cls() -> Any:
        """The class whose ``from_state`` rebuilds a checkpointed model."""
        from streamkm.model import StreamingKMeans

        return StreamingKMeans

    def _new(self) -> Any:
        cfg = self.settings
        init: Any = cfg.init
        if init.endswith(".npy"):
            try:
                init = np.load(init, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"model.init: cannot read {cfg.init}: {exc}") from None
        return self.estimator_cls()(
            n_clusters=cfg.n_clusters,
            batch_size=cfg.batch_size,
            init=init,
            init_size=cfg.effective_init_size,
            half_life=cfg.half_life,
            reassignment_ratio=cfg.reassignment_ratio,
            sample_size=cfg.sample_size,
            random_state=cfg.seed,
            dtype=np.float32,
        )

    @property
    def rows_to_start(self) -> int:
        return self.settings.effective_init_size

    @property
    def fitted(self) -> bool:
        return hasattr(self._estimator, "cluster_centers_")

    @property
    def version(self) -> int:
        return int(getattr(self._estimator, "n_steps_", 0))

    @property
    def dim(self) -> int | None:
        dim = getattr(self._estimator, "n_features_in_", None)
        return None if dim is None else int(dim)

    @property
    def estimator(self) -> Any:
        return self._estimator

    def step(self, X: np.ndarray) -> StepOutput:
        result: StepOutput = self._estimator.step(X)
        return result

    def snapshot(self) -> Any:
        snap = getattr(self._estimator, "snapshot", None)
        if snap is not None:
            return snap()
        return copy.deepcopy(self._estimator)

    def restore(self, snapshot: Any) -> None:
        if hasattr(self._estimator, "restore"):
            self._estimator.restore(snapshot)
        else:
            self._estimator = snapshot

    def public_state(self) -> dict[str, Any]:
        m = self._estimator
        return {
            "n_samples_seen": float(m.n_samples_seen_),
            "n_clusters": int(m.n_clusters),
            "dim": int(m.n_features_in_),
            "centroids": np.asarray(m.cluster_centers_, dtype=np.float64).tolist(),
            "counts": np.asarray(m.counts_, dtype=np.float64).tolist(),
        }


# Model kinds by name. A new kind: a class with the Learner members, registered here.
KINDS: dict[str, type[KMeansLearner]] = {KMeansLearner.kind: KMeansLearner}
DEFAULT_KIND = KMeansLearner.kind


def learner_from_settings(
    settings: Settings, estimator: Any = None, kind: str = DEFAULT_KIND
) -> KMeansLearner:
    """The learner the settings ask for, new or around a restored ``estimator``."""
    try:
        cls = KINDS[kind]
    except KeyError:
        raise ConfigError(f"unknown model kind {kind!r}; known: {', '.join(KINDS)}") from None
    return cls(settings.model, estimator)


__all__ = [
    "DEFAULT_KIND",
    "KINDS",
    "KMeansLearner",
    "Learner",
    "StepOutput",
    "learner_from_settings",
]
