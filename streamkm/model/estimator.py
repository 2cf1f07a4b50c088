"""Streaming mini-batch k-means: :class:`StreamingKMeans`.

The model keeps, for every centroid, a weight sum (``counts_``) and moves the centroid by the
streaming average of the points assigned to it: over a batch,
``c_j ← (c_j·W_j + Σ w·x) / (W_j + Σ w)``. Next to the centroids it keeps a bounded weighted
sample of the stream (:mod:`~streamkm.model.sample`) and, on a schedule that bounds the cost,
refines the centroids with weighted Lloyd iterations on it, with swaps of the least useful
centroid and (while the sample still holds the whole stream) fresh k-means++ restarts, each
kept only when it lowers the sample's error (:mod:`~streamkm.model.refine`,
:mod:`~streamkm.model.relocation`). With ``half_life`` the weight of old samples decays, in
the counts and in the sample, so that the model follows a drifting stream. Distances are summed
from differences when ``d·k`` is small and taken on rows centred by a shift vector (the
sample's mean) on the BLAS path, which keeps float32 exact for data far from the origin.

The estimator follows the scikit-learn API (``fit``, ``partial_fit``, ``predict``,
``transform``, ``score``, ``get_params``/``set_params``, ``clone``) without depending on
scikit-learn. The streaming entry point is :meth:`StreamingKMeans.step`, which labels and scores
a batch with the current model and then learns from it, in one assignment pass;
:meth:`~StreamingKMeans.snapshot` and :meth:`~StreamingKMeans.restore` undo a step cheaply.

Examples
--------
>>> import numpy as np
>>> from streamkm.model import StreamingKMeans
>>> rng = np.random.default_rng(0)
>>> X = np.concatenate([rng.normal(0, 1, (500, 2)), rng.normal(10, 1, (500, 2))])
>>> model = StreamingKMeans(n_clusters=2, random_state=0).fit(X)
>>> sorted(np.round(model.cluster_centers_[:, 0]).astype(int).tolist())
[0, 10]
>>> result = model.step(np.array([[0.1, -0.2], [30.0, 30.0]]))
>>> bool(result.scores[1] > 10 * result.scores[0])
True
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from streamkm import fileformat, kernel
from streamkm.errors import StateError
from streamkm.model import refine, relocation, scoring, state
from streamkm.model._validation import (
    EstimatorShims,
    check_params,
    check_weight,
    new_rng,
    not_fitted_error,
    resolve_dtype,
    validate,
)
from streamkm.model.sample import Sample

__all__ = ["Snapshot", "StepResult", "StreamingKMeans"]

logger = logging.getLogger(__name__)

# Half-life, in batches of ``batch_size`` rows, of the recent weight used to detect starved
# centroids, and of ``inertia_ewma_``.
_RECENT_HALF_LIFE_BATCHES = 4.0
_EWMA_HALF_LIFE_BATCHES = 10.0

_EMPTY = np.empty(0, dtype=np.float64)
_NO_SCORES = np.empty((0, 0), dtype=np.float64)
_NO_SHIFT = {np.dtype(t): np.empty(0, dtype=t) for t in (np.float32, np.float64)}
# attributes a step changes, restored by StreamingKMeans.restore
_ARRAYS = ("cluster_centers_", "counts_", "_sse", "_sse2", "_recent", "_shift")
_SCALARS = (
    "n_samples_seen_",
    "n_steps_",
    "inertia_",
    "inertia_ewma_",
    "last_shift_",
    "_next_refine",
    "n_refines_",
)
_FITTED = ("cluster_centers_", "labels_", "_work", "_sample")


class StepResult(NamedTuple):
    """What :meth:`StreamingKMeans.step` returns, computed with the model before the update.

    Attributes
    ----------
    labels : ndarray of shape (n,), int64
        Nearest centroid of every row.
    distances : ndarray of shape (n,), float64
        Euclidean distance to that centroid.
    scores : ndarray of shape (n,), float64
        Anomaly score of every row (see :meth:`StreamingKMeans.anomaly_score`).
    """

    labels: np.ndarray
    distances: np.ndarray
    scores: np.ndarray


class Snapshot(NamedTuple):
    """A model as it was before a step (see :meth:`StreamingKMeans.snapshot`)."""

    fitted: bool
    arrays: dict[str, np.ndarray]
    scalars: dict[str, Any]
    rng_state: Mapping[str, Any] | None
    sample: tuple[int, int, float] | None
    token: object


class StreamingKMeans(EstimatorShims):
    """Mini-batch k-means that learns from a stream, one batch at a time.

    Parameters
    ----------
    n_clusters : int
        Number of centroids k.
    batch_size : int, default=1024
        Rows per update in :meth:`fit`; also the unit of the internal time constants.
    init : {"k-means++", "random"} or ndarray of shape (n_clusters, n_features)
        Initialisation: greedy k-means++ (``2 + ln k`` candidates per centroid), k distinct
        random rows, or given centroids.
    init_size : int, optional
        Rows used for the initialisation (drawn at random from the data given to :meth:`fit`, or
        from the first batch given to :meth:`partial_fit`/:meth:`step`). Default
        ``3 * batch_size``; never fewer than ``n_clusters``.
    half_life : float, optional
        Forgetting for drifting streams, in samples: a sample's weight halves after
        ``half_life`` further samples (in the counts and in the sample). None keeps every
        sample at full weight.
    reassignment_ratio : float, default=0.01
        A centroid whose recent and overall weights are below ``reassignment_ratio`` times the
        largest ones is starved and is moved to where it removes the most error of the current
        batch. At each refinement, in addition, the least useful centroid is offered the best
        place found on the sample and moves if that lowers the sample's error, and while the
        sample holds the whole stream a fresh k-means++ seeding of it replaces the centroids
        if it ends with a lower error. 0 turns all three off.
    sample_size : int, default=32768
        Rows of the weighted sample the centroids are refined on (0: no sample, no refinement).
        Memory: about ``1.25 · sample_size · (4·d + 24)`` bytes in float32.
    random_state : int, numpy Generator or RandomState, optional
        Seed of every random draw; an int gives reproducible models.
    dtype : {numpy.float32, numpy.float64}, default=numpy.float32
        Precision of the centroids, the sample and the distance computations. Weight sums,
        error sums and reported distances are always float64.
    n_epochs : int, default=1
        Passes over the data made by :meth:`fit`.

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_clusters, n_features)
        Centroids.
    counts_ : ndarray of shape (n_clusters,), float64
        Weight sum behind each centroid (decayed when ``half_life`` is set).
    n_samples_seen_ : int
        Rows learnt from.
    n_steps_ : int
        Model version: +1 per batch learnt.
    n_refines_ : int
        Refinements made so far.
    n_features_in_ : int
        Dimension of the vectors.
    inertia_ : float
        Weighted mean squared distance to the nearest centroid over the last batch, measured
        before the model learnt from it.
    inertia_ewma_ : float
        Exponentially weighted ``inertia_`` (half-life 10 batches of ``batch_size`` rows), for
        dashboards.
    last_shift_ : float
        Mean Euclidean distance the centroids moved in the last step.
    labels_ : ndarray of shape (n_samples,), int64
        Labels of the training data under the final model (set by :meth:`fit` only).

    Examples
    --------
    >>> import numpy as np
    >>> from streamkm.model import StreamingKMeans
    >>> model = StreamingKMeans(n_clusters=3, batch_size=256, random_state=0)
    >>> rng = np.random.default_rng(1)
    >>> for _ in range(4):
    ...     labels, distances, scores = model.step(rng.normal(size=(256, 5)))
    >>> model.n_steps_, model.n_samples_seen_, model.cluster_centers_.shape
    (4, 1024, (3, 5))
    """

    def __init__(
        self,
        n_clusters: int = 8,
        batch_size: int = 1024,
        init: str | np.ndarray = "k-means++",
        init_size: int | None = None,
        half_life: float | None = None,
        reassignment_ratio: float = 0.01,
        sample_size: int = 32768,
        random_state: Any = None,
        dtype: Any = np.float32,
        n_epochs: int = 1,
    ) -> None:
        self.n_clusters = n_clusters
        self.batch_size = batch_size
        self.init = init
        self.init_size = init_size
        self.half_life = half_life
        self.reassignment_ratio = reassignment_ratio
        self.sample_size = sample_size
        self.random_state = random_state
        self.dtype = dtype
        self.n_epochs = n_epochs

    # ------------------------------------------------------------------ checks

    def _validate(self, X: Any, reset: bool = False) -> np.ndarray:
        expected = None if reset else getattr(self, "n_features_in_", None)
        return validate(X, self._dtype(), expected, type(self).__name__)

    def _dtype(self) -> np.dtype:
        """``resolve_dtype(self.dtype)``, remembered for as long as ``dtype`` is the same object."""
        cached = self.__dict__.get("_resolved_dtype")
        if cached is not None and cached[0] is self.dtype:
            return cached[1]
        resolved = resolve_dtype(self.dtype)
        self._resolved_dtype = (self.dtype, resolved)
        return resolved

    def _check_weight(self, sample_weight: Any, n: int) -> np.ndarray:
        return check_weight(sample_weight, n, self.__dict__.setdefault("_ones", {}))

    def _check_fitted(self) -> None:
        if not hasattr(self, "cluster_centers_"):
            raise not_fitted_error(
                f"This {type(self).__name__} instance is not fitted yet: call fit, "
                "partial_fit or step first."
            )

    def _check_consistent(self) -> None:
        k = self.cluster_centers_.shape[0]
        if self.n_clusters != k:
            raise ValueError(
                f"n_clusters was changed to {self.n_clusters} after the model was built "
                f"with {k}; call fit to start again"
            )
        if self._dtype() != self.cluster_centers_.dtype:
            raise ValueError(
                f"dtype was changed to {self.dtype!r} after the model was built with "
                f"{self.cluster_centers_.dtype}; call fit to start again"
            )

    # ------------------------------------------------------------------ initialisation

    def _new_sample(self, d: int, dtype: np.dtype) -> Sample:
        return Sample(int(self.sample_size), d, dtype, self.half_life)

    def _initialise(self, X: np.ndarray, w: np.ndarray) -> None:
        """Set up a fresh model from the rows of ``X`` (an init buffer is drawn from them)."""
        n, d = X.shape
        check_params(self, d)
        k = int(self.n_clusters)
        if n < k:
            raise ValueError(
                f"n_samples={n} should be >= n_clusters={k}: the first batch must hold at "
                "least one row per centroid."
            )
        if not w.sum() > 0:
            raise ValueError("the rows used for initialisation all have zero sample_weight")
        dtype = resolve_dtype(self.dtype)
        self._rng = rng = new_rng(self.random_state)
        size = 3 * int(self.batch_size) if self.init_size is None else int(self.init_size)
        size = min(max(size, k), n)
        X_init, w_init = X, w
        if size < n:
            idx = np.sort(rng.choice(n, size=size, replace=False))
            if w[idx].sum() > 0:
                X_init, w_init = np.ascontiguousarray(X[idx]), np.ascontiguousarray(w[idx])
        m = X_init.shape[0]
        self.n_features_in_ = d
        self._shift = (np.dot(w_init, X_init.astype(np.float64)) / w_init.sum()).astype(dtype)
        scale0: float | None = None
        if isinstance(self.init, str) and self.init == "k-means++":
            trials = kernel.n_local_trials(k)
            u = rng.random(1 + (k - 1) * trials)
            centers = np.empty(k, dtype=np.int64)
            closest, cand, best, cum = (np.empty(m) for _ in range(4))
            pot = kernel.kmeans_plusplus(X_init, w_init, u, centers, closest, cand, best, cum)
            C = X_init[centers].copy()
            scale0 = float(pot) / float(w_init.sum())
        elif isinstance(self.init, str):  # "random"
            nonzero = np.flatnonzero(w_init > 0)
            pool = nonzero if nonzero.size >= k else np.arange(m)
            C = X_init[np.sort(rng.choice(pool, size=k, replace=False))].copy()
        else:
            C = np.array(self.init, dtype=dtype, order="C", copy=True)
        self.cluster_centers_ = np.ascontiguousarray(C, dtype=dtype)
        self.counts_ = np.zeros(k, dtype=np.float64)
        self._sse = np.zeros(k, dtype=np.float64)
        self._sse2 = np.zeros(k, dtype=np.float64)
        self._recent = np.zeros(k, dtype=np.float64)
        if scale0 is None:
            d2 = self._assign(X_init, want_scores=False)[1]
            scale0 = float(np.dot(w_init, d2) / w_init.sum())
        self._scale0 = scale0
        self._sample = self._new_sample(d, dtype)
        self.n_samples_seen_ = 0
        self.n_steps_ = 0
        self.n_refines_ = 0
        self._next_refine = int(self.batch_size)
        self.inertia_ = float("nan")
        self.inertia_ewma_ = float("nan")
        self.last_shift_ = 0.0
        self._work: dict[str, tuple[np.ndarray, tuple[int, ...], np.ndarray]] = {}

    # ------------------------------------------------------------------ core

    def _workspace(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A cached scratch array (grown on demand), so that steady streams do not allocate."""
        work = self.__dict__.setdefault("_work", {})
        entry = work.get(name)
        if entry is not None and entry[1] == shape and entry[2].dtype == dtype:
            return entry[2]  # the same shape as last time: the common case
        size = math.prod(shape)
        buf = entry[0] if entry is not None else None
        if buf is None or buf.size < size or buf.dtype != np.dtype(dtype):
            buf = np.empty(max(size, 1), dtype=dtype)
        view = buf[:size].reshape(shape)
        work[name] = (buf, shape, view)
        return view

    def _inv_scale(self) -> np.ndarray:
        """``1 / s_j``: inverse of each cluster's spread (see :mod:`~streamkm.model.scoring`)."""
        return scoring.inv_spread(self.counts_, self._sse, self._scale0, self.cluster_centers_)

    def _score_coef(self, inv: np.ndarray) -> np.ndarray:
        """The anomaly score's coefficients (see :mod:`~streamkm.model.scoring`)."""
        C = self.cluster_centers_
        sigma = scoring.deviation(self.counts_, self._sse, self._sse2, C.shape[1])
        return scoring.score_coef(self.counts_, inv, C, sigma)

    def _assign(
        self,
        X: np.ndarray,
        want_scores: bool,
        out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        score_coef: np.ndarray | None = None,
        scratch: bool = False,
        d2_second: np.ndarray | None = None,
        centroids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Labels, squared distances and (optionally) scores of ``X`` under the model."""
        n, d = X.shape
        C = self.cluster_centers_ if centroids is None else centroids
        k = C.shape[0]
        if out is None:
            labels = np.empty(n, dtype=np.int64)
            d2 = np.empty(n, dtype=np.float64)
            scores = np.empty(n if want_scores else 0, dtype=np.float64)
        else:
            labels, d2, scores = out
        if want_scores and score_coef is None:
            score_coef = self._score_coef(self._inv_scale())
        coef = score_coef if want_scores and score_coef is not None else _NO_SCORES
        if d * k < kernel.GEMM_MIN_DK:
            # sums of squared differences: exact wherever the data lie, no centring needed
            none = _NO_SHIFT[X.dtype]
            second = _EMPTY if d2_second is None else d2_second
            kernel.assign_direct(X, none, C, coef, labels, d2, scores, second, none)
        else:
            Cc = C - self._shift  # the centred frame: no cancellation for data far from 0
            c_sq = np.einsum("ij,ij->i", Cc, Cc)
            size = kernel.work_size(k, d)
            work = (
                self._workspace("assign", (size,), C.dtype) if scratch else np.empty(size, C.dtype)
            )
            kernel.assign(
                X, Cc, c_sq, coef, labels, d2, scores, work, d2_second=d2_second, shift=self._shift
            )
        if want_scores:
            np.clip(scores, 0.0, scoring.SCORE_MAX, out=scores)
        return labels, d2, scores

    def _assign_to(
        self, X: np.ndarray, C: np.ndarray, d2_second: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        labels, d2, _ = self._assign(X, False, d2_second=d2_second, centroids=C)
        return labels, d2

    def _swap_due(self, n: int) -> bool:
        """Whether this step also tries to move the least useful centroid on the batch."""
        return (
            float(self.reassignment_ratio) > 0
            and self.cluster_centers_.shape[0] >= 2
            and n >= max(2, relocation.BATCH_SWAP_MIN_ROWS * self.cluster_centers_.shape[0])
            and (self.n_steps_ + 1) % relocation.SWAP_EVERY == 0
        )

    def _learn(
        self,
        X: np.ndarray,
        w: np.ndarray,
        labels: np.ndarray,
        d2: np.ndarray,
        inv: np.ndarray,
        d2_second: np.ndarray | None,
    ) -> None:
        """Update the model with a batch already assigned with the current centroids."""
        n, d = X.shape
        k = self.cluster_centers_.shape[0]
        decay = 1.0 if self.half_life is None else 0.5 ** (n / float(self.half_life))
        per_batch = 1.0 - 0.5 ** (n / (_RECENT_HALF_LIFE_BATCHES * float(self.batch_size)))
        sums = self._workspace("sums", (k, d), np.float64)
        wsum = self._workspace("wsum", (k,), np.float64)
        totals = self._workspace("totals", (2,), np.float64)
        C, counts, sse, sse2 = self.cluster_centers_, self.counts_, self._sse, self._sse2
        recent = self._recent
        shift = kernel.learn_batch(
            X, w, labels, d2, inv, scoring.CLIP, decay, 1.0 - per_batch,
            C, counts, sse, sse2, recent, sums, wsum, totals,
        )  # fmt: skip
        total_w = float(totals[0])
        inertia = float(totals[1]) / total_w if total_w > 0 else 0.0
        # the median spread (of the k values, as np.median takes it), for a moved centroid
        spread_sorted = np.sort(inv)
        spread = 0.5 * (1.0 / spread_sorted[(k - 1) // 2] + 1.0 / spread_sorted[k // 2])
        ratio = float(self.reassignment_ratio)
        rng = self._rng
        moved = relocation.relocate_on_batch(
            X, w, labels, d2, d2_second, C, counts, sse, sse2, recent, ratio, rng, spread,
            per_batch,
        )  # fmt: skip
        shift += moved / k
        u = self._workspace("u", (n,), np.float64)
        rng.random(out=u)
        self._sample.offer(X, w, u, self.n_samples_seen_)
        self.n_samples_seen_ += n
        self.n_steps_ += 1
        self.inertia_ = inertia
        if math.isnan(self.inertia_ewma_):
            self.inertia_ewma_ = inertia
        else:
            alpha = 1.0 - 0.5 ** (n / (_EWMA_HALF_LIFE_BATCHES * float(self.batch_size)))
            self.inertia_ewma_ += alpha * (inertia - self.inertia_ewma_)
        if self.n_samples_seen_ >= self._next_refine and self._sample.n_live >= k:
            shift += self._refine()
        self.last_shift_ = float(shift)

    def _refine(self) -> float:
        """Refine the centroids on the sample; returns the mean distance they moved."""
        sample = self._sample
        X, w = sample.live_rows(), sample.weights(float(self.n_samples_seen_))
        old = self.cluster_centers_.astype(np.float64)
        swap = float(self.reassignment_ratio) > 0
        # reseeding is relocation too: reassignment_ratio=0 turns it off with the swaps
        restarts = refine.RESTARTS if swap and sample.n_live < sample.size else 0
        out = refine.refine(X, w, self.cluster_centers_, self._assign_to, self._rng, swap, restarts)
        k = old.shape[0]
        total_w = float(out.wsum.sum())
        self._next_refine = refine.next_refine(
            self.n_samples_seen_, out.passes, sample.n_live, sample.size, int(self.batch_size)
        )
        if not total_w > 0:
            return 0.0
        self.cluster_centers_ = np.ascontiguousarray(out.centroids)
        share = out.wsum / total_w
        mean_sq = np.divide(out.wsse, out.wsum, out=np.zeros(k), where=out.wsum > 0)
        clipped = np.minimum(out.d2, scoring.CLIP * mean_sq[out.labels])
        wsse = np.bincount(out.labels, weights=w * clipped, minlength=k)
        wsse2 = np.bincount(out.labels, weights=w * clipped * clipped, minlength=k)
        self.counts_ = float(self.counts_.sum()) * share
        hit = out.wsum > 0
        self._sse = np.divide(wsse * self.counts_, out.wsum, out=np.zeros(k), where=hit)
        self._sse2 = np.divide(wsse2 * self.counts_, out.wsum, out=np.zeros(k), where=hit)
        self._recent = float(self._recent.sum()) * share
        mean = (out.wsum @ out.centroids.astype(np.float64)) / total_w
        self._shift = mean.astype(self._shift.dtype)
        self.n_refines_ += 1
        if out.swapped:
            logger.debug("refinement %d moved a centroid", self.n_refines_)
        diff = self.cluster_centers_.astype(np.float64) - old
        return float(np.sqrt((diff * diff).sum(axis=1)).mean())

    # ------------------------------------------------------------------ streaming API

    def step(self, X: Any, sample_weight: Any = None) -> StepResult:
        """Label and score a batch with the current model, then learn from it.

        The labels, distances and scores are computed with the centroids as they were before
        this batch (for the very first batch: right after initialisation); the model is then
        updated exactly as :meth:`partial_fit` would. One assignment pass serves both.

        Parameters
        ----------
        X : array-like of shape (n, n_features)
            The batch; an empty batch is a no-op.
        sample_weight : array-like of shape (n,), optional
            Non-negative weights; default 1.

        Returns
        -------
        StepResult
            ``(labels int64[n], distances float64[n], scores float64[n])``.
        """
        return self._step(X, sample_weight, want_result=True)

    def _step(self, X: Any, sample_weight: Any, want_result: bool) -> StepResult:
        fitted = hasattr(self, "cluster_centers_")
        Xv = self._validate(X, reset=not fitted)
        n = Xv.shape[0]
        w = self._check_weight(sample_weight, n)
        if n == 0:
            empty = np.empty(0)
            return StepResult(np.empty(0, dtype=np.int64), empty, empty.copy())
        if not fitted:
            self._initialise(Xv, w)
        else:
            self._check_consistent()
        inv = self._inv_scale()
        second = self._workspace("d2_second", (n,), np.float64) if self._swap_due(n) else None
        if want_result:
            coef = self._score_coef(inv)
            labels, d2, scores = self._assign(
                Xv, True, score_coef=coef, scratch=True, d2_second=second
            )
            distances = np.sqrt(d2)
        else:
            out = (
                self._workspace("labels", (n,), np.int64),
                self._workspace("d2", (n,), np.float64),
                _EMPTY,
            )
            labels, d2, scores = self._assign(Xv, False, out=out, scratch=True, d2_second=second)
            distances = d2
        self._learn(Xv, w, labels, d2, inv, second)
        return StepResult(labels, distances, scores)

    def partial_fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> StreamingKMeans:
        """Learn from one batch (the first call also initialises the model).

        Parameters
        ----------
        X : array-like of shape (n, n_features)
            The batch. The first non-empty batch needs at least ``n_clusters`` rows; an empty
            batch is a no-op.
        y : ignored
            Present for scikit-learn API compatibility.
        sample_weight : array-like of shape (n,), optional
            Non-negative weights; default 1.

        Returns
        -------
        self
        """
        self._step(X, sample_weight, want_result=False)
        return self

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> StreamingKMeans:
        """Start again and learn from ``X``, streamed in order in batches of ``batch_size``.

        The initialisation uses ``init_size`` rows drawn at random from the whole of ``X``;
        ``n_epochs`` passes are made.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data, with ``n_samples >= n_clusters``.
        y : ignored
            Present for scikit-learn API compatibility.
        sample_weight : array-like of shape (n_samples,), optional
            Non-negative weights; default 1.

        Returns
        -------
        self
        """
        Xv = self._validate(X, reset=True)
        n = Xv.shape[0]
        if n == 0:
            raise ValueError("Found array with 0 sample(s) (shape=(0, ...)): fit needs data")
        w = self._check_weight(sample_weight, n).copy()
        for name in _FITTED:
            self.__dict__.pop(name, None)
        self._initialise(Xv, w)
        bs = int(self.batch_size)
        for _ in range(int(self.n_epochs)):
            for start in range(0, n, bs):
                self._step(Xv[start : start + bs], w[start : start + bs], want_result=False)
        self.labels_ = self._assign(Xv, want_scores=False)[0]
        return self

    # ------------------------------------------------------------------ exactly-once

    def snapshot(self) -> Snapshot:
        """The model as it is now, to :meth:`restore` if the next steps must be undone.

        The cost does not grow with the sample: the centroids and per-centroid statistics are
        copied (``k·d`` values), and from now on the sample logs the slots a step overwrites
        (at most the rows of that step). Only the latest snapshot can be restored.

        Returns
        -------
        Snapshot
        """
        token = object()
        self._snapshot_token = token
        if not hasattr(self, "cluster_centers_"):
            return Snapshot(False, {}, {}, None, None, token)
        arrays = {name: getattr(self, name).copy() for name in _ARRAYS}
        scalars = {name: getattr(self, name) for name in _SCALARS}
        rng_state = self._rng.bit_generator.state
        return Snapshot(True, arrays, scalars, rng_state, self._sample.begin_log(), token)

    def restore(self, snapshot: Snapshot) -> None:
        """Put the model back as it was at :meth:`snapshot` (bit for bit).

        Raises
        ------
        ValueError
            If ``snapshot`` is not the latest one taken of this model.
        """
        if getattr(self, "_snapshot_token", None) is not snapshot.token:
            raise ValueError("only the latest snapshot of this model can be restored")
        if not snapshot.fitted:
            for name in (*_FITTED, "n_features_in_"):
                self.__dict__.pop(name, None)
            return
        for name, value in snapshot.arrays.items():
            setattr(self, name, value.copy())
        for name, value in snapshot.scalars.items():
            setattr(self, name, value)
        self._rng.bit_generator.state = dict(snapshot.rng_state or {})
        assert snapshot.sample is not None
        self._sample.rollback(snapshot.sample)

    # ------------------------------------------------------------------ inference

    def predict(self, X: Any) -> np.ndarray:
        """Index of the nearest centroid of every row.

        Parameters
        ----------
        X : array-like of shape (n, n_features)

        Returns
        -------
        ndarray of shape (n,), int64
        """
        self._check_fitted()
        return self._assign(self._validate(X), want_scores=False)[0]

    def fit_predict(self, X: Any, y: Any = None, sample_weight: Any = None) -> np.ndarray:
        """:meth:`fit`, then the labels of ``X`` under the final model (``labels_``)."""
        return self.fit(X, sample_weight=sample_weight).labels_

    def transform(self, X: Any) -> np.ndarray:
        """Euclidean distance of every row to every centroid.

        Parameters
        ----------
        X : array-like of shape (n, n_features)

        Returns
        -------
        ndarray of shape (n, n_clusters), float64
        """
        self._check_fitted()
        shift = self._shift.astype(np.float64)
        Xv = self._validate(X).astype(np.float64) - shift
        C = self.cluster_centers_.astype(np.float64) - shift
        d2 = (
            np.einsum("ij,ij->i", Xv, Xv)[:, None]
            - 2.0 * (Xv @ C.T)
            + np.einsum("ij,ij->i", C, C)[None, :]
        )
        np.maximum(d2, 0.0, out=d2)
        return np.sqrt(d2, out=d2)

    def fit_transform(self, X: Any, y: Any = None, sample_weight: Any = None) -> np.ndarray:
        """:meth:`fit`, then :meth:`transform` of ``X``."""
        return self.fit(X, sample_weight=sample_weight).transform(X)

    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> float:
        """Opposite of the weighted sum of squared distances to the nearest centroid.

        Parameters
        ----------
        X : array-like of shape (n, n_features)
        y : ignored
        sample_weight : array-like of shape (n,), optional

        Returns
        -------
        float
            ``-Σ w·‖x − c(x)‖²`` (higher is better), as scikit-learn's ``KMeans.score``.
        """
        self._check_fitted()
        Xv = self._validate(X)
        w = self._check_weight(sample_weight, Xv.shape[0])
        d2 = self._assign(Xv, want_scores=False)[1]
        return -float(np.dot(w, d2))

    def anomaly_score(self, X: Any) -> np.ndarray:
        """How anomalous each row is under the current model; higher is more anomalous.

        The score is ``min_j ((a_j·‖x − c_j‖² − 1)/σ_j + b_j)``, clipped to ``[0, 1e9]``: the
        squared distance in units of the cluster's mean squared distance ``s_j`` (plus a tenth
        of it in units of the mean spread), as a z-score in the standard deviation ``σ_j`` of
        that ratio over the cluster's rows, plus a rarity term ``b_j`` between 0 and
        ``scoring.RARITY`` (4) that grows as the weight of the centroids around ``c_j`` falls
        below its typical value. A row at its common cluster's mean squared distance scores
        about 0 (closer rows are clipped to 0), a member of a group with half the typical mass
        about 2 more, of an isolated tiny cluster up to 4 more; far points score how many
        standard deviations out they lie. See :mod:`streamkm.model.scoring`. This is the
        number :meth:`step` returns as ``scores``.

        Parameters
        ----------
        X : array-like of shape (n, n_features)

        Returns
        -------
        ndarray of shape (n,), float64
        """
        self._check_fitted()
        return self._assign(self._validate(X), want_scores=True)[2]

    @property
    def cluster_mse_(self) -> np.ndarray:
        """ndarray of shape (n_clusters,): the per-cluster spread ``s_j`` of the anomaly score."""
        self._check_fitted()
        return 1.0 / self._inv_scale()

    def nbytes(self) -> int:
        """Bytes the model's state takes once its sample is full (centroids, statistics, sample)."""
        self._check_fitted()
        k, d = self.cluster_centers_.shape
        item = self.cluster_centers_.dtype.itemsize
        return k * d * item + 4 * k * 8 + d * item + self._sample.nbytes()

    # ------------------------------------------------------------------ persistence

    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The whole model as JSON-able metadata plus arrays (see :mod:`~streamkm.model.state`).

        Raises
        ------
        StateError
            If the state is not finite: such a model is refused rather than written.
        """
        self._check_fitted()
        return state.to_state(self)

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> StreamingKMeans:
        """Rebuild a model from :meth:`to_state` output; the round trip is bit-exact.

        Raises
        ------
        StateError
            (a ValueError) if the metadata and arrays do not describe a valid model.
        """
        return state.from_state(cls, meta, arrays)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomically write the model to ``path`` (versioned, checksummed ``.npz``)."""
        meta, arrays = self.to_state()
        fileformat.save(path, {"kind": "model", "model": meta}, arrays)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        n_features: int | None = None,
        n_clusters: int | None = None,
    ) -> StreamingKMeans:
        """Read a model written by :meth:`save`.

        Parameters
        ----------
        path : path-like
        n_features, n_clusters : int, optional
            When given, the file must hold a model of this dimension / number of centroids.

        Raises
        ------
        streamkm.errors.CorruptFileError
            The file is truncated, corrupt or of an unknown format version.
        StateError
            (a ValueError) the file is intact but is not a model, or not the expected one.
        """
        meta, arrays = fileformat.load(path)
        if meta.get("kind") != "model" or "model" not in meta:
            raise StateError(f"{path}: not a streamkm model file (kind={meta.get('kind')!r})")
        model = cls.from_state(meta["model"], arrays)
        if n_features is not None and model.n_features_in_ != n_features:
            raise StateError(
                f"{path}: model has dimension {model.n_features_in_}, expected {n_features}"
            )
        if n_clusters is not None and model.cluster_centers_.shape[0] != n_clusters:
            raise StateError(
                f"{path}: model has {model.cluster_centers_.shape[0]} clusters, "
                f"expected {n_clusters}"
            )
        return model
