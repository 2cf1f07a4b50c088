"""One replica of the shared model: the deterministic fold of the sync log.

Every instance in shared-model mode keeps a :class:`Replica` and applies the sync log's records
to it in log order. The fold is elementwise float64 arithmetic in a fixed order (no reduction
whose order could differ, no fastmath), so two replicas that applied the same records are
bit-for-bit the same model.

A delta covers one input partition's offsets ``[first, after)`` and carries, per centroid it
touches, the weighted sum of its rows, their weight, their squared distances and the squares of
those (each clipped at ``scoring.CLIP`` times the cluster's spread, as one instance clips them:
a few far rows must not widen a cluster nor inflate the anomaly score's dispersion), and the
batch's unclipped squared error for the inertia. The fold
applies a delta only when it continues the partition where the log left it
(``first == absorbed[partition]``, or the partition is new to the log); any other delta is
*rejected*, whoever sent it, so every input offset is absorbed at most once whatever
instances replay or repeat — the model's counts stay exact in both delivery modes.

Forgetting (``half_life``, in samples) decays the weights by ``0.5 ** (n / half_life)`` per
delta of n samples: it follows the samples in the log, not the number of instances.

Examples
--------
>>> import numpy as np
>>> r = Replica.from_centroids(np.array([[0.0, 0.0], [10.0, 10.0]]))
>>> d = Delta("a", "in", 0, 0, 3, 3, np.array([0, 1]), np.array([[1.0, 1.0], [22.0, 22.0]]),
...           np.array([1.0, 2.0]), np.array([2.0, 2.0]))
>>> r.apply(d), r.apply(d), r.absorbed, r.cluster_centers_.tolist()
(True, False, {('in', 0): 3}, [[1.0, 1.0], [11.0, 11.0]])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamkm import kernel
from streamkm.errors import StateError
from streamkm.model import scoring

TopicPart = tuple[str, int]
KIND = "shared-kmeans"
_EWMA_ALPHA = 0.1


@dataclass(frozen=True)
class Delta:
    """What one instance learnt from one input partition's offsets ``[first, after)``.

    Attributes
    ----------
    instance : str
        Who sent it (``delivery.instance_id``).
    topic, partition : str, int
        The input partition.
    first, after : int
        The offsets it covers (dead letters included: they are processed, with no weight).
    n : int
        Rows learnt from.
    index : ndarray of int64, shape (m,)
        The centroids it touches (ascending).
    sums : ndarray of float64, shape (m, d)
        Weighted sum of the rows assigned to each.
    weights : ndarray of float64, shape (m,)
        Their weight.
    sse : ndarray of float64, shape (m,)
        Their weighted squared distances to the centroid that labelled them, each clipped at
        ``scoring.CLIP`` spreads (unclipped in records written before ``err`` travelled).
    epoch : int
        The sender's rewind count for the partition (a rejected delta of an older epoch asks
        for no new rewind).
    sse2 : ndarray of float64, shape (m,), or None
        Sums of the squares of their squared distances, each clipped at ``scoring.CLIP``
        spreads; None in records written before they travelled (the fold then takes a
        Gaussian cluster's, :func:`streamkm.model.scoring.gaussian_sse2`).
    err : float or None
        The rows' unclipped weighted squared distances, summed (the inertia); None in older
        records, whose ``sse`` is unclipped.
    """

    instance: str
    topic: str
    partition: int
    first: int
    after: int
    n: int
    index: np.ndarray
    sums: np.ndarray
    weights: np.ndarray
    sse: np.ndarray
    epoch: int = 0
    sse2: np.ndarray | None = None
    err: float | None = None

    @property
    def error(self) -> float:
        """The rows' unclipped squared error (``err``, or ``sse``'s sum in older records)."""
        return float(self.sse.sum()) if self.err is None else float(self.err)


@dataclass
class Replica:
    """The shared model as folded from the log.

    Attributes
    ----------
    centroids : ndarray of float64, shape (k, d)
        The master copy (float64 whatever the input dtype).
    counts_ : ndarray of float64, shape (k,)
        Weight behind each centroid (decayed with ``half_life``).
    sse : ndarray of float64, shape (k,)
        Weighted squared distances behind each centroid (decayed alike).
    sse2 : ndarray of float64, shape (k,)
        Sums of their (clipped) squares (decayed alike).
    absorbed : dict of (topic, partition) to int
        Next input offset the log expects of each partition.
    sync_offset : int
        Next sync-log offset to read (the replica stands for everything before it).
    n_steps_ : int
        Model version: records applied (deltas and the init).
    n_samples_seen_ : float
        Rows absorbed.
    half_life : float or None
        Forgetting, in samples.
    """

    centroids: np.ndarray
    counts_: np.ndarray
    sse: np.ndarray
    sse2: np.ndarray
    absorbed: dict[TopicPart, int] = field(default_factory=dict)
    sync_offset: int = 0
    n_steps_: int = 0
    n_samples_seen_: float = 0.0
    half_life: float | None = None
    inertia_: float = float("nan")
    inertia_ewma_: float = float("nan")
    last_shift_: float = 0.0
    rejected: int = 0

    @classmethod
    def from_centroids(cls, centroids: np.ndarray, half_life: float | None = None) -> Replica:
        """A replica seeded with ``centroids`` (the log's init record): version 1, no weight."""
        C = np.array(centroids, dtype=np.float64, order="C", copy=True)
        if C.ndim != 2 or not np.isfinite(C).all():
            raise StateError("init centroids must be a finite 2-D array")
        k = C.shape[0]
        return cls(C, np.zeros(k), np.zeros(k), np.zeros(k), n_steps_=1, half_life=half_life)

    # -- the attributes the daemon reads (metrics, checkpoint, model topic) ------------------

    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def n_features_in_(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def cluster_centers_(self) -> np.ndarray:
        return self.centroids

    # -- the fold ----------------------------------------------------------------------------

    def accepts(self, delta: Delta) -> bool:
        """Whether ``delta`` continues its partition where the log left it."""
        expected = self.absorbed.get((delta.topic, delta.partition))
        return expected is None or delta.first == expected

    def apply(self, delta: Delta) -> bool:
        """Fold one delta in; False (and nothing changes) if it is rejected."""
        if not (self.accepts(delta) and self._well_formed(delta)):
            self.rejected += 1
            return False
        key = (delta.topic, delta.partition)
        if self.half_life is not None and delta.n > 0:
            f = 0.5 ** (delta.n / self.half_life)
            self.counts_ *= f
            self.sse *= f
            self.sse2 *= f
        idx = delta.index
        if idx.size:
            before = self.centroids[idx].copy()
            old = self.counts_[idx]
            new = old + delta.weights
            moved = new > 0
            rows = idx[moved]
            self.centroids[rows] = (
                self.centroids[rows] * old[moved, None] + delta.sums[moved]
            ) / new[moved, None]
            self.counts_[idx] = new
            self.sse[idx] += delta.sse
            if delta.sse2 is not None:
                self.sse2[idx] += delta.sse2
            else:  # a record written before the second moments travelled
                d = self.centroids.shape[1]
                self.sse2[idx] += scoring.gaussian_sse2(delta.weights, delta.sse, d)
            shift = np.sqrt(((self.centroids[idx] - before) ** 2).sum(axis=1))
            self.last_shift_ = float(shift.mean())
        self.absorbed[key] = int(delta.after)
        self.n_steps_ += 1
        w = float(delta.weights.sum())
        self.n_samples_seen_ += float(delta.n)
        if w > 0:
            self.inertia_ = delta.error / w
            ewma = self.inertia_ewma_
            self.inertia_ewma_ = (
                self.inertia_ if ewma != ewma else ewma + _EWMA_ALPHA * (self.inertia_ - ewma)
            )
        return True

    def _well_formed(self, delta: Delta) -> bool:
        k, d = self.centroids.shape
        idx = delta.index
        m = idx.size
        return bool(
            delta.after >= delta.first
            and delta.sums.shape == (m, d)
            and delta.weights.shape == (m,)
            and delta.sse.shape == (m,)
            and (m == 0 or (idx.min() >= 0 and idx.max() < k and (np.diff(idx) > 0).all()))
            and np.isfinite(delta.sums).all()
            and (delta.weights >= 0).all()
            and np.isfinite(delta.sse).all()
            and (delta.sse2 is None or delta.sse2.shape == (m,))
            and (delta.sse2 is None or np.isfinite(delta.sse2).all())
            and (delta.err is None or np.isfinite(delta.err))
        )

    # -- labelling ---------------------------------------------------------------------------

    def _inv_spread(self) -> np.ndarray:
        """``1 / s_j`` of the anomaly score (see :mod:`streamkm.model.scoring`)."""
        w = self.counts_
        total = float(w.sum())
        overall = float(self.sse.sum()) / total if total > 0 else 0.0
        return scoring.inv_spread(w, self.sse, overall, self.centroids)

    def assign(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Labels, squared distances and anomaly scores of ``X`` under this replica.

        Distances are computed in the frame centred on the centroids' weighted mean (float32
        keeps its precision for data far from the origin). The score is the single-instance
        model's (:mod:`streamkm.model.scoring`), from the replica's centroids, counts and
        squared-error sums: every instance at a log offset publishes the same scores.
        """
        X = np.ascontiguousarray(X)
        n = X.shape[0]
        C64 = self.centroids
        w = self.counts_
        total = float(w.sum())
        shift64 = (w @ C64) / total if total > 0 else C64.mean(axis=0)
        shift = shift64.astype(X.dtype)
        Cc = (C64 - shift64).astype(X.dtype)
        c_sq = np.einsum("ij,ij->i", Cc, Cc)
        labels = np.empty(n, dtype=np.int64)
        d2 = np.empty(n, dtype=np.float64)
        k, d = Cc.shape
        work = np.empty(kernel.work_size(k, d), dtype=X.dtype)
        sigma = scoring.deviation(w, self.sse, self.sse2, d)
        coef = scoring.score_coef(w, self._inv_spread(), C64, sigma)
        scores = np.empty(n, dtype=np.float64)
        kernel.assign(X, Cc, c_sq, coef, labels, d2, scores, work, shift=shift)
        np.clip(scores, 0.0, scoring.SCORE_MAX, out=scores)
        return labels, d2, scores

    def delta(
        self,
        instance: str,
        topic: str,
        partition: int,
        first: int,
        after: int,
        X: np.ndarray,
        labels: np.ndarray,
        d2: np.ndarray,
        epoch: int = 0,
    ) -> Delta:
        """The sufficient statistics of rows ``X`` (with their labels) as one delta."""
        k, d = self.centroids.shape
        weights = np.bincount(labels, minlength=k).astype(np.float64)
        if float(self.counts_.sum()) > 0:
            limit = scoring.CLIP / self._inv_spread()[labels]
        else:  # no spread known yet: the batch's own mean squared distance
            limit = scoring.CLIP * float(d2.mean()) if d2.size else 0.0
        clipped = np.minimum(d2, limit)
        sse = np.bincount(labels, weights=clipped, minlength=k)
        sse2 = np.bincount(labels, weights=clipped * clipped, minlength=k)
        index = np.flatnonzero(weights > 0)
        if index.size:
            # Rows grouped by centroid, one reduction per group (faster than np.add.at).
            order = np.argsort(labels, kind="stable")
            starts = np.searchsorted(labels[order], index)
            sums = np.add.reduceat(X[order].astype(np.float64), starts, axis=0)
        else:
            sums = np.empty((0, d))
        return Delta(
            instance, topic, int(partition), int(first), int(after), int(X.shape[0]),
            index, sums, weights[index], sse[index], int(epoch), sse2[index], float(d2.sum()),
        )  # fmt: skip

    # -- state -------------------------------------------------------------------------------

    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-able metadata and arrays for a checkpoint; refused if not finite."""
        if not (np.isfinite(self.centroids).all() and np.isfinite(self.counts_).all()):
            raise StateError("the shared model is not finite; not writing it")
        meta = {
            "kind": KIND,
            "n_clusters": self.n_clusters,
            "n_features": self.n_features_in_,
            "sync_offset": int(self.sync_offset),
            "n_steps": int(self.n_steps_),
            "n_samples_seen": float(self.n_samples_seen_),
            "half_life": self.half_life,
            "inertia": self.inertia_,
            "inertia_ewma": self.inertia_ewma_,
            "absorbed": [[t, int(p), int(o)] for (t, p), o in sorted(self.absorbed.items())],
        }
        arrays = {
            "centroids": self.centroids, "counts": self.counts_, "sse": self.sse,
            "sse2": self.sse2,
        }  # fmt: skip
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Replica:
        """Rebuild a replica from :meth:`to_state` output (bit-exact)."""
        if meta.get("kind") != KIND:
            raise StateError(f"not a shared model state (kind {meta.get('kind')!r})")
        try:
            C = np.array(arrays["centroids"], dtype=np.float64, order="C")
            k, d = C.shape
            if (k, d) != (int(meta["n_clusters"]), int(meta["n_features"])):
                raise StateError("shared model shape does not match its metadata")
            counts = np.array(arrays["counts"], dtype=np.float64).reshape(k)
            sse = np.array(arrays["sse"], dtype=np.float64).reshape(k)
            if "sse2" in arrays:
                sse2 = np.array(arrays["sse2"], dtype=np.float64).reshape(k)
            else:  # a state written before the second moments: a Gaussian cluster's
                sse2 = scoring.gaussian_sse2(counts, sse, d)
            return cls(
                C,
                counts,
                sse,
                sse2,
                absorbed={(str(t), int(p)): int(o) for t, p, o in meta["absorbed"]},
                sync_offset=int(meta["sync_offset"]),
                n_steps_=int(meta["n_steps"]),
                n_samples_seen_=float(meta["n_samples_seen"]),
                half_life=None if meta["half_life"] is None else float(meta["half_life"]),
                inertia_=float(meta["inertia"]),
                inertia_ewma_=float(meta["inertia_ewma"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"inconsistent shared model state: {exc}") from exc


def seed_centroids(X: np.ndarray, k: int, seed: int | None) -> np.ndarray:
    """Greedy k-means++ centroids of rows ``X`` (a proposal for the log's init record)."""
    X = np.ascontiguousarray(X)
    n = X.shape[0]
    if n < k:
        raise ValueError(f"{n} rows cannot seed {k} centroids")
    rng = np.random.default_rng(seed)
    trials = 2 + int(np.log(k)) if k > 1 else 1
    u = rng.random(1 + (k - 1) * trials)
    centers = np.empty(k, dtype=np.int64)
    closest, cand, best, cum = (np.empty(n) for _ in range(4))
    w = np.ones(n)
    kernel.kmeans_plusplus(X, w, u, centers, closest, cand, best, cum)
    return np.asarray(X[centers], dtype=np.float64)


__all__ = ["KIND", "Delta", "Replica", "seed_centroids"]
