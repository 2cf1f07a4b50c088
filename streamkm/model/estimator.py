"""Streaming mini-batch k-means: :class:`StreamingKMeans`.

The model keeps, for every centroid, a weight sum (``counts_``) and moves the centroid by the
streaming average of the points assigned to it: over a batch,
``c_j ← (c_j·W_j + Σ w·x) / (W_j + Σ w)``. Centroids that receive (almost) nothing are moved to
where they cut the most error of the current batch; with ``half_life`` the weight of old
samples decays so that the model follows a drifting stream.

The estimator follows the scikit-learn API (``fit``, ``partial_fit``, ``predict``,
``transform``, ``score``, ``get_params``/``set_params``, ``clone``) without depending on
scikit-learn. The streaming entry point is :meth:`StreamingKMeans.step`, which labels and scores
a batch with the current model and then learns from it, in one assignment pass.

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

import inspect
import logging
import math
import os
import sys
from typing import Any, NamedTuple

import numpy as np

from streamkm import fileformat, kernel
from streamkm.errors import StreamkmError

__all__ = ["NotFittedError", "StateError", "StepResult", "StreamingKMeans"]

logger = logging.getLogger(__name__)

#: Version of the layout written by :meth:`StreamingKMeans.to_state`.
STATE_VERSION = 1

# A row adds at most this many times its cluster's mean squared distance to the spread
# estimate, so that outliers do not widen the cluster they land in (for a Gaussian cluster
# in d ≥ 2 dimensions, fewer than 1 row in 10⁴ is clipped).
_SCORE_CLIP = 9.0
# Pseudo-weight of the global mean squared distance in each cluster's spread estimate:
# keeps the score sane for clusters that have seen only a few rows.
_SCALE_PRIOR_WEIGHT = 1.0
# Half-life, in batches of ``batch_size`` rows, of the recent weight used to detect starved
# centroids.
_RECENT_HALF_LIFE_BATCHES = 4.0
# Every _SWAP_EVERY steps the least useful centroid is offered a better place; it moves if
# the batch error it would remove there exceeds _SWAP_MARGIN times the error its removal adds
# (and _SWAP_MIN_GAIN of the batch error). Any moved centroid must take at least _MIN_ROWS
# rows' worth of weight, so that single outliers do not attract centroids.
_SWAP_EVERY = 4
_SWAP_MARGIN = 2.0
_SWAP_MIN_GAIN = 0.005
_MIN_ROWS = 3.0
# Half-life, in batches of ``batch_size`` rows, of ``inertia_ewma_``.
_EWMA_HALF_LIFE_BATCHES = 10.0


_EMPTY = np.empty(0, dtype=np.float64)
_NO_SCORES = np.empty((0, 0), dtype=np.float64)


class NotFittedError(StreamkmError, ValueError, AttributeError):
    """The model is used before it has seen any data."""


_COMPAT_NOT_FITTED: dict[str, type[NotFittedError]] = {}


def _not_fitted_error(message: str) -> NotFittedError:
    """A NotFittedError that is also scikit-learn's when scikit-learn is already loaded.

    Code running the model inside scikit-learn tooling catches
    ``sklearn.exceptions.NotFittedError``; scikit-learn is never imported for this.
    """
    sk = sys.modules.get("sklearn.exceptions")
    base = getattr(sk, "NotFittedError", None) if sk is not None else None
    if base is None:
        return NotFittedError(message)
    cls = _COMPAT_NOT_FITTED.get("cls")
    if cls is None:
        cls = type("NotFittedError", (NotFittedError, base), {"__module__": __name__})
        _COMPAT_NOT_FITTED["cls"] = cls
    return cls(message)


class StateError(StreamkmError, ValueError):
    """A saved state does not describe a valid model, or not the one expected."""


class _NonNumericError(ValueError, TypeError):
    """Input that cannot be read as numbers (a ValueError, and a TypeError like float())."""


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


def _resolve_dtype(dtype: Any) -> np.dtype:
    try:
        resolved = np.dtype(dtype)
    except TypeError as exc:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}") from exc
    if resolved not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return resolved


def _new_rng(random_state: Any) -> np.random.Generator:
    """A private PCG64 generator: reproducible from an int, fresh from None."""
    if random_state is None or isinstance(random_state, (int, np.integer)):
        return np.random.Generator(np.random.PCG64(random_state))
    if isinstance(random_state, np.random.Generator):
        return np.random.Generator(np.random.PCG64(random_state.integers(2**63)))
    if isinstance(random_state, np.random.RandomState):
        return np.random.Generator(np.random.PCG64(random_state.randint(2**31)))
    raise ValueError(
        f"random_state must be None, an int, a numpy Generator or RandomState, got {random_state!r}"
    )


class StreamingKMeans:
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
        ``half_life`` further samples. None keeps every sample at full weight.
    reassignment_ratio : float, default=0.01
        A centroid whose recent weight is below ``reassignment_ratio`` times the largest one is
        starved and is moved to where it removes the most error of the current batch (a
        candidate drawn like k-means++ against the live centroids). Every 4th step, in
        addition, the centroid whose removal costs least is moved when the best place found
        removes more than twice that cost: groups that appear mid-stream or that the
        initialisation missed get a centroid even when none is starved. 0 turns both off.
    random_state : int, numpy Generator or RandomState, optional
        Seed of the initialisation and relocation draws; an int gives reproducible models.
    dtype : {numpy.float32, numpy.float64}, default=numpy.float32
        Precision of the centroids and of the distance computations. Weight sums and reported
        distances are always float64.
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
        self.random_state = random_state
        self.dtype = dtype
        self.n_epochs = n_epochs

    # ------------------------------------------------------------------ parameters

    @classmethod
    def _get_param_names(cls) -> list[str]:
        """Names of the constructor parameters, sorted (scikit-learn's convention)."""
        signature = inspect.signature(cls.__init__)
        names = [
            p.name
            for p in signature.parameters.values()
            if p.name != "self" and p.kind != p.VAR_KEYWORD
        ]
        for p in signature.parameters.values():
            if p.kind == p.VAR_POSITIONAL:
                raise RuntimeError(f"{cls.__name__} must not take *args in __init__")
        return sorted(names)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor parameters of this model.

        Parameters
        ----------
        deep : bool, default=True
            Also return the parameters of nested estimators (``name__param``).

        Returns
        -------
        dict
        """
        out: dict[str, Any] = {}
        for name in self._get_param_names():
            value = getattr(self, name)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                for sub, sub_value in value.get_params().items():
                    out[f"{name}__{sub}"] = sub_value
            out[name] = value
        return out

    def set_params(self, **params: Any) -> StreamingKMeans:
        """Set constructor parameters; returns ``self``.

        Raises
        ------
        ValueError
            For a name that is not a parameter.
        """
        valid = set(self._get_param_names())
        for name, value in params.items():
            if name not in valid:
                raise ValueError(
                    f"Invalid parameter {name!r} for estimator {type(self).__name__}. "
                    f"Valid parameters are: {sorted(valid)!r}."
                )
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {
            name: p.default
            for name, p in inspect.signature(type(self).__init__).parameters.items()
            if name != "self"
        }
        shown = []
        for name, value in self.get_params(deep=False).items():
            default = defaults.get(name, inspect.Parameter.empty)
            if isinstance(value, np.ndarray) or isinstance(default, np.ndarray):
                if isinstance(value, np.ndarray):
                    shown.append(f"{name}=array(shape={value.shape})")
                continue
            if value is default or value == default:
                continue
            shown.append(f"{name}={getattr(value, '__name__', None) or repr(value)}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def __sklearn_tags__(self) -> Any:
        # Imported here: scikit-learn is only needed by the tools that ask for the tags.
        from sklearn.utils import InputTags, Tags, TargetTags, TransformerTags

        return Tags(
            estimator_type="clusterer",
            target_tags=TargetTags(required=False),
            transformer_tags=TransformerTags(preserves_dtype=["float64"]),
            input_tags=InputTags(),
        )

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "cluster_centers_")

    def _check_params(self, n_features: int) -> None:
        if not isinstance(self.n_clusters, (int, np.integer)) or self.n_clusters < 1:
            raise ValueError(f"n_clusters must be an int >= 1, got {self.n_clusters!r}")
        if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if not isinstance(self.n_epochs, (int, np.integer)) or self.n_epochs < 1:
            raise ValueError(f"n_epochs must be an int >= 1, got {self.n_epochs!r}")
        if self.init_size is not None and (
            not isinstance(self.init_size, (int, np.integer)) or self.init_size < 1
        ):
            raise ValueError(f"init_size must be None or an int >= 1, got {self.init_size!r}")
        if self.half_life is not None and not (
            isinstance(self.half_life, (int, float, np.number))
            and math.isfinite(self.half_life)
            and self.half_life > 0
        ):
            raise ValueError(f"half_life must be None or > 0, got {self.half_life!r}")
        ratio = self.reassignment_ratio
        if not (isinstance(ratio, (int, float, np.number)) and 0 <= ratio <= 1):
            raise ValueError(f"reassignment_ratio must be in [0, 1], got {ratio!r}")
        _resolve_dtype(self.dtype)
        if isinstance(self.init, str):
            if self.init not in ("k-means++", "random"):
                raise ValueError(
                    f"init must be 'k-means++', 'random' or an array, got {self.init!r}"
                )
        else:
            init = np.asarray(self.init)
            if init.shape != (self.n_clusters, n_features):
                raise ValueError(
                    f"init array has shape {init.shape}, expected "
                    f"(n_clusters, n_features) = ({self.n_clusters}, {n_features})"
                )
            if init.dtype.kind not in "biuf" or not np.isfinite(init).all():
                raise ValueError("init array must be finite numbers")
        if not (
            self.random_state is None
            or isinstance(
                self.random_state,
                (int, np.integer, np.random.Generator, np.random.RandomState),
            )
        ):
            raise ValueError(
                "random_state must be None, an int, a numpy Generator or RandomState, "
                f"got {self.random_state!r}"
            )

    # ------------------------------------------------------------------ validation

    def _validate(self, X: Any, reset: bool = False) -> np.ndarray:
        """Check a batch and return it as a C-contiguous array of the model's dtype.

        Parameters
        ----------
        X : array-like of shape (n, d)
            The batch.
        reset : bool
            True when the batch (re)defines the dimension; otherwise it must match
            ``n_features_in_``.

        Returns
        -------
        ndarray of shape (n, d)

        Raises
        ------
        ValueError
            Not 2-D, no features, wrong dimension, non-numeric or complex values, NaN or
            infinity (naming the first bad row).
        """
        dtype = _resolve_dtype(self.dtype)
        if type(X).__module__.startswith("scipy.sparse"):
            raise TypeError("sparse input is not supported: pass a dense array (e.g. X.toarray())")
        try:
            arr = np.asarray(X)
        except (TypeError, ValueError) as exc:
            raise _NonNumericError(f"X cannot be read as a numeric array: {exc}") from exc
        if arr.dtype.kind == "O":
            try:
                arr = arr.astype(np.float64)
            except (TypeError, ValueError) as exc:
                raise _NonNumericError(f"X holds non-numeric values: {exc}") from exc
        elif arr.dtype.kind == "c":
            raise ValueError("Complex data not supported: X has a complex dtype")
        elif arr.dtype.kind not in "biuf":
            raise ValueError(f"X must hold numbers, got an array of dtype {arr.dtype}")
        if arr.ndim != 2:
            raise ValueError(
                f"Expected a 2-D array of shape (n_samples, n_features), got {arr.ndim}-D "
                f"shape {arr.shape}. Reshape your data, e.g. with X.reshape(1, -1) for one "
                "sample or X.reshape(-1, 1) for one feature."
            )
        n, d = arr.shape
        if d == 0:
            raise ValueError(f"0 feature(s) (shape=({n}, 0)) while a minimum of 1 is required.")
        expected = getattr(self, "n_features_in_", None)
        if not reset and expected is not None and d != expected:
            raise ValueError(
                f"X has {d} features, but {type(self).__name__} is expecting {expected} "
                "features as input."
            )
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.ascontiguousarray(arr, dtype=dtype)
            # one reduction is enough when everything is finite; look row by row otherwise
            total = float(np.sum(out, dtype=np.float64)) if n else 0.0
        if not math.isfinite(total):
            finite = np.isfinite(out)
            bad_rows = np.flatnonzero(~finite.all(axis=1))
            if bad_rows.size:
                row = int(bad_rows[0])
                if np.isnan(out[row]).any():
                    what = "NaN"
                elif np.isfinite(np.asarray(arr[row], dtype=np.float64)).all():
                    what = f"a value too large for {dtype.name}"
                else:
                    what = "infinity"
                raise ValueError(
                    f"X contains {what} at row {row} ({bad_rows.size} bad row(s) of {n}); "
                    "NaN and infinity are not allowed."
                )
        return out

    def _check_weight(self, sample_weight: Any, n: int, cache: bool = False) -> np.ndarray:
        if sample_weight is None:
            if not cache:
                return np.ones(n, dtype=np.float64)
            # the kernels only read the weights: one array of ones serves every batch
            ones = self.__dict__.get("_ones")
            if ones is None or ones.shape[0] < n:
                ones = np.ones(max(n, 1), dtype=np.float64)
                self._ones = ones
            return ones[:n]
        try:
            w = np.asarray(sample_weight, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"sample_weight must be numbers: {exc}") from exc
        if w.ndim == 0:
            w = np.full(n, float(w))
        if w.shape != (n,):
            raise ValueError(f"sample_weight.shape == {w.shape}, expected ({n},)!")
        if n and not (np.isfinite(w).all() and (w >= 0).all()):
            row = int(np.flatnonzero(~(np.isfinite(w) & (w >= 0)))[0])
            raise ValueError(f"sample_weight must be finite and >= 0; row {row} has {w[row]!r}")
        return np.ascontiguousarray(w)

    def _check_fitted(self) -> None:
        if not hasattr(self, "cluster_centers_"):
            raise _not_fitted_error(
                f"This {type(self).__name__} instance is not fitted yet: call fit, "
                "partial_fit or step first."
            )

    # ------------------------------------------------------------------ initialisation

    def _initialise(self, X: np.ndarray, w: np.ndarray) -> None:
        """Set up a fresh model from the rows of ``X`` (an init buffer is drawn from them)."""
        n, d = X.shape
        self._check_params(d)
        k = int(self.n_clusters)
        if n < k:
            raise ValueError(
                f"n_samples={n} should be >= n_clusters={k}: the first batch must hold at "
                "least one row per centroid."
            )
        if not w.sum() > 0:
            raise ValueError("the rows used for initialisation all have zero sample_weight")
        dtype = _resolve_dtype(self.dtype)
        self._rng = _new_rng(self.random_state)
        rng = self._rng
        size = 3 * int(self.batch_size) if self.init_size is None else int(self.init_size)
        size = min(max(size, k), n)
        if size < n:
            idx = np.sort(rng.choice(n, size=size, replace=False))
            X_init = np.ascontiguousarray(X[idx])
            w_init = np.ascontiguousarray(w[idx])
            if not w_init.sum() > 0:
                X_init, w_init = X, w
        else:
            X_init, w_init = X, w
        m = X_init.shape[0]
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
        self.n_features_in_ = d
        self.cluster_centers_ = np.ascontiguousarray(C, dtype=dtype)
        self.counts_ = np.zeros(k, dtype=np.float64)
        self._sse = np.zeros(k, dtype=np.float64)
        self._recent = np.zeros(k, dtype=np.float64)
        if scale0 is None:
            d2 = self._assign(X_init, want_scores=False)[1]
            scale0 = float(np.dot(w_init, d2) / w_init.sum())
        self._scale0 = scale0
        self.n_samples_seen_ = 0
        self.n_steps_ = 0
        self.inertia_ = float("nan")
        self.inertia_ewma_ = float("nan")
        self.last_shift_ = 0.0
        self._work: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ core

    def _workspace(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A cached scratch array (grown on demand), so that steady streams do not allocate."""
        work = self.__dict__.setdefault("_work", {})
        buf = work.get(name)
        size = math.prod(shape)
        if buf is None or buf.size < size or buf.dtype != np.dtype(dtype):
            buf = np.empty(max(size, 1), dtype=dtype)
            work[name] = buf
        return buf[:size].reshape(shape)

    def _inv_scale(self) -> np.ndarray:
        """``1 / s_j``: inverse of each cluster's (shrunk) mean squared distance."""
        total_w = float(self.counts_.sum())
        g = (float(self._sse.sum()) + _SCALE_PRIOR_WEIGHT * self._scale0) / (
            total_w + _SCALE_PRIOR_WEIGHT
        )
        s = (self._sse + _SCALE_PRIOR_WEIGHT * g) / (self.counts_ + _SCALE_PRIOR_WEIGHT)
        floor = max(1e-12 * g, 1e-300)
        return 1.0 / np.maximum(s, floor)

    def _score_coef(self, inv_scale: np.ndarray) -> np.ndarray:
        """Coefficients ``(a_j, b_j)`` of the anomaly score ``min_j a_j·‖x − c_j‖² + b_j``.

        ``a_j = 1/s_j`` normalises by each cluster's spread. ``b_j = (2/d)·ln(π_max/π_j)``,
        with ``π_j`` the cluster's share of the weight, is the prior term of a Gaussian
        mixture's log-likelihood per dimension: a rare cluster explains a far point less
        readily than a common one, so a centroid that ends up among scattered outliers (little
        weight) does not make them look normal. The spread's own log term is left out on
        purpose: it would let every member of a wide cluster outscore a point well outside a
        tight one.
        """
        k = inv_scale.shape[0]
        d = float(self.n_features_in_)
        pi = (self.counts_ + 1.0) / (float(self.counts_.sum()) + k)
        bias = (2.0 / d) * np.log(float(pi.max()) / pi)
        return np.stack([inv_scale, bias])

    def _assign(
        self,
        X: np.ndarray,
        want_scores: bool,
        out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        score_coef: np.ndarray | None = None,
        scratch: bool = False,
        d2_second: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Labels, squared distances and (optionally) scores of ``X`` under the current model."""
        n = X.shape[0]
        C = self.cluster_centers_
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
        c_sq = np.einsum("ij,ij->i", C, C)
        if scratch:
            work = self._workspace("assign", (kernel.work_size(k),), C.dtype)
        else:
            work = np.empty(kernel.work_size(k), dtype=C.dtype)
        kernel.assign(X, C, c_sq, coef, labels, d2, scores, work, d2_second=d2_second)
        return labels, d2, scores

    def _swap_due(self, n: int) -> bool:
        """Whether this step also tries to move the least useful centroid (every few steps)."""
        return (
            float(self.reassignment_ratio) > 0
            and self.cluster_centers_.shape[0] >= 2
            and n >= 2
            and (self.n_steps_ + 1) % _SWAP_EVERY == 0
        )

    def _learn(
        self,
        X: np.ndarray,
        w: np.ndarray,
        labels: np.ndarray,
        d2: np.ndarray,
        inv_scale: np.ndarray,
        d2_second: np.ndarray | None = None,
    ) -> None:
        """Update the model with a batch already assigned with the current centroids."""
        n, d = X.shape
        k = self.cluster_centers_.shape[0]
        if self.half_life is not None:
            decay = 0.5 ** (n / float(self.half_life))
            self.counts_ *= decay
            self._sse *= decay
        self._recent *= 0.5 ** (n / (_RECENT_HALF_LIFE_BATCHES * float(self.batch_size)))
        total_w = float(w.sum())
        inertia = float(np.dot(w, d2)) / total_w if total_w > 0 else 0.0
        sums = self._workspace("sums", (k, d), np.float64)
        wsum = self._workspace("wsum", (k,), np.float64)
        shift = kernel.update_centroids(
            X,
            w,
            labels,
            d2,
            inv_scale,
            _SCORE_CLIP,
            self.cluster_centers_,
            self.counts_,
            self._sse,
            self._recent,
            sums,
            wsum,
        )
        shift += self._relocate(X, w, labels, d2, d2_second) / k
        self.n_samples_seen_ += n
        self.n_steps_ += 1
        self.inertia_ = inertia
        if math.isnan(self.inertia_ewma_):
            self.inertia_ewma_ = inertia
        else:
            alpha = 1.0 - 0.5 ** (n / (_EWMA_HALF_LIFE_BATCHES * float(self.batch_size)))
            self.inertia_ewma_ += alpha * (inertia - self.inertia_ewma_)
        self.last_shift_ = float(shift)

    def _relocate(
        self,
        X: np.ndarray,
        w: np.ndarray,
        labels: np.ndarray,
        d2: np.ndarray,
        d2_second: np.ndarray | None,
    ) -> float:
        """Move starved centroids, and on swap steps the least useful one if that pays.

        Starved centroids (recent weight below ``reassignment_ratio`` times the largest) move
        to where they remove the most error of the batch. On swap steps (``d2_second`` given),
        the centroid whose removal costs least — its rows' extra error if they went to their
        second nearest centroid — moves too when the best candidate place removes more than
        ``_SWAP_MARGIN`` times that cost: this is how a group that appears in the middle of the
        stream, or that the initialisation missed, gets a centroid although none is starved.

        Returns
        -------
        float
            Sum of the Euclidean distances the moved centroids travelled.
        """
        ratio = float(self.reassignment_ratio)
        n = X.shape[0]
        if ratio <= 0 or n < 2:
            return 0.0
        k = self.cluster_centers_.shape[0]
        recent = self._recent
        threshold = ratio * float(recent.max())
        if d2_second is None and float(recent.min()) >= threshold:
            return 0.0  # the common case: nobody starved, no swap due
        starved = np.flatnonzero(recent < threshold)
        starved = starved[np.argsort(recent[starved], kind="stable")][: n // 2]
        targets = [int(j) for j in starved]
        min_gain = [0.0] * len(targets)
        if d2_second is not None and len(targets) < k - 1:
            # cost of dropping each centroid: its rows' extra error at their second choice
            extra = w * (d2_second - d2)
            cost = np.bincount(labels, weights=extra, minlength=k)
            cost[starved] = np.inf
            j = int(np.argmin(cost))
            if math.isfinite(cost[j]):
                floor = _SWAP_MIN_GAIN * float(np.dot(w, d2))
                targets.append(j)
                min_gain.append(max(_SWAP_MARGIN * float(cost[j]), floor))
        if not targets:
            return 0.0
        idx = np.array(targets, dtype=np.int64)
        trials = kernel.n_local_trials(k)
        u = self._rng.random((idx.size, trials))
        d2_work = self._workspace("reloc_d2", (n,), np.float64)
        d2_work[:] = d2
        gain = np.empty(idx.size)
        captured = np.empty(idx.size)
        cand, best, cum = (self._workspace(f"reloc_{i}", (n,), np.float64) for i in range(3))
        old = self.cluster_centers_[idx].astype(np.float64)
        # a place must take a few rows: a centroid parked on a lone outlier helps no one
        min_captured = _MIN_ROWS * float(w.sum()) / n
        moved = kernel.relocate(
            X,
            w,
            d2_work,
            idx,
            u,
            np.array(min_gain),
            min_captured,
            self.cluster_centers_,
            gain,
            captured,
            cand,
            best,
            cum,
        )
        if moved == 0:
            return 0.0
        hit = gain > 0
        moved_idx = idx[hit]
        g = float(np.median(1.0 / self._inv_scale()))
        per_batch = 1.0 - 0.5 ** (n / (_RECENT_HALF_LIFE_BATCHES * float(self.batch_size)))
        # A moved centroid starts afresh with the weight of the rows it now takes. Weight is
        # conserved: the others give up that weight (and what the moved one held) in
        # proportion, so counts_ still sums to the weight seen (decayed by half_life).
        total = float(self.counts_.sum())
        self.counts_[moved_idx] = captured[hit]
        self._sse[moved_idx] = captured[hit] * g
        rest = np.ones(k, dtype=bool)
        rest[moved_idx] = False
        held = float(self.counts_[rest].sum())
        if held > 0:
            factor = max(total - float(captured[hit].sum()), 0.0) / held
            self.counts_[rest] *= factor
            self._sse[rest] *= factor
        self._recent[moved_idx] = captured[hit] / per_batch
        logger.debug("moved centroid(s) %s", moved_idx.tolist())
        diff = self.cluster_centers_[moved_idx].astype(np.float64) - old[hit]
        return float(np.sqrt((diff * diff).sum(axis=1)).sum())

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
        w = self._check_weight(sample_weight, n, cache=True)
        if n == 0:
            empty = np.empty(0)
            return StepResult(np.empty(0, dtype=np.int64), empty, empty.copy())
        if not fitted:
            self._initialise(Xv, w)
        else:
            self._check_consistent()
        inv_scale = self._inv_scale()
        d2_second = self._workspace("d2_second", (n,), np.float64) if self._swap_due(n) else None
        if want_result:
            labels, d2, scores = self._assign(
                Xv,
                want_scores=True,
                score_coef=self._score_coef(inv_scale),
                scratch=True,
                d2_second=d2_second,
            )
        else:
            out = (
                self._workspace("labels", (n,), np.int64),
                self._workspace("d2", (n,), np.float64),
                _EMPTY,
            )
            labels, d2, scores = self._assign(
                Xv, want_scores=False, out=out, scratch=True, d2_second=d2_second
            )
        distances = np.sqrt(d2) if want_result else d2
        self._learn(Xv, w, labels, d2, inv_scale, d2_second)
        return StepResult(labels, distances, scores)

    def _check_consistent(self) -> None:
        k = self.cluster_centers_.shape[0]
        if self.n_clusters != k:
            raise ValueError(
                f"n_clusters was changed to {self.n_clusters} after the model was built "
                f"with {k}; call fit to start again"
            )
        if _resolve_dtype(self.dtype) != self.cluster_centers_.dtype:
            raise ValueError(
                f"dtype was changed to {self.dtype!r} after the model was built with "
                f"{self.cluster_centers_.dtype}; call fit to start again"
            )

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
        w = self._check_weight(sample_weight, n)
        for name in ("cluster_centers_", "labels_", "_work", "_ones"):
            self.__dict__.pop(name, None)
        self._initialise(Xv, w)
        bs = int(self.batch_size)
        for _ in range(int(self.n_epochs)):
            for start in range(0, n, bs):
                self._step(Xv[start : start + bs], w[start : start + bs], want_result=False)
        self.labels_ = self._assign(Xv, want_scores=False)[0]
        return self

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
        Xv = self._validate(X).astype(np.float64, copy=False)
        C = self.cluster_centers_.astype(np.float64)
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

        The score is ``min_j ‖x − c_j‖² / s_j + (2/d)·ln(π_max / π_j)``, where ``s_j`` is a
        streaming estimate of the mean squared distance of cluster j's rows to its centroid
        (outliers clipped, shrunk towards the global mean for small clusters) and ``π_j`` the
        cluster's share of the weight. Dividing by each cluster's own spread makes a point that
        is far for a tight cluster stand out even when a wide, heavy cluster sits at a similar
        Euclidean distance; the weight term keeps rare clusters (such as a centroid among
        scattered outliers) from excusing far points. An ordinary member of the largest
        cluster scores about 1, of a cluster 100 times rarer about ``1 + 9.2/d``.
        This is the number :meth:`step` returns as ``scores``.

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

    # ------------------------------------------------------------------ persistence

    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The whole model as JSON-able metadata plus arrays (see :meth:`from_state`).

        Returns
        -------
        meta : dict
            Class, state version, constructor parameters, ``n_clusters``, ``dim``, ``dtype``,
            ``n_samples_seen``, ``n_steps``, inertia figures, the generator state.
        arrays : dict of str to ndarray
            ``centroids`` (k, d), ``counts`` (k,), ``sse`` (k,), ``recent`` (k,) and ``init``
            when the initialisation was given as an array.
        """
        self._check_fitted()
        params: dict[str, Any] = {}
        arrays: dict[str, np.ndarray] = {
            "centroids": self.cluster_centers_.copy(),
            "counts": self.counts_.copy(),
            "sse": self._sse.copy(),
            "recent": self._recent.copy(),
        }
        for name, value in self.get_params(deep=False).items():
            if name == "init" and not isinstance(value, str):
                params[name] = None
                arrays["init"] = np.asarray(value).copy()
            elif name == "dtype":
                params[name] = _resolve_dtype(value).name
            elif name == "random_state" and not (
                value is None or isinstance(value, (int, np.integer))
            ):
                params[name] = None  # a generator object: its draws live on in rng_state
            elif isinstance(value, np.integer):
                params[name] = int(value)
            elif isinstance(value, np.floating):
                params[name] = float(value)
            else:
                params[name] = value
        meta = {
            "class": type(self).__name__,
            "state_version": STATE_VERSION,
            "params": params,
            "n_clusters": int(self.cluster_centers_.shape[0]),
            "dim": int(self.n_features_in_),
            "dtype": self.cluster_centers_.dtype.name,
            "n_samples_seen": int(self.n_samples_seen_),
            "n_steps": int(self.n_steps_),
            "inertia": None if math.isnan(self.inertia_) else float(self.inertia_),
            "inertia_ewma": None if math.isnan(self.inertia_ewma_) else float(self.inertia_ewma_),
            "last_shift": float(self.last_shift_),
            "scale0": float(self._scale0),
            "rng_state": self._rng.bit_generator.state,
        }
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> StreamingKMeans:
        """Rebuild a model from :meth:`to_state` output; the round trip is bit-exact.

        Raises
        ------
        StateError
            (a ValueError) if the metadata and arrays do not describe a valid model.
        """
        try:
            if meta.get("class") != cls.__name__:
                raise StateError(f"state is for {meta.get('class')!r}, not {cls.__name__}")
            if meta.get("state_version") != STATE_VERSION:
                raise StateError(
                    f"state version {meta.get('state_version')!r} is not supported "
                    f"(expected {STATE_VERSION})"
                )
            params = dict(meta["params"])
            k = int(meta["n_clusters"])
            d = int(meta["dim"])
            dtype = _resolve_dtype(meta["dtype"])
            if params.get("init") is None:
                if "init" not in arrays:
                    raise StateError("state lacks the 'init' array")
                params["init"] = np.array(arrays["init"])
            params["dtype"] = np.dtype(params["dtype"]).type
            model = cls(**params)
            C = np.asarray(arrays["centroids"])
            expected = {
                "centroids": ((k, d), dtype),
                "counts": ((k,), np.dtype(np.float64)),
                "sse": ((k,), np.dtype(np.float64)),
                "recent": ((k,), np.dtype(np.float64)),
            }
            for name, (shape, dt) in expected.items():
                a = np.asarray(arrays[name])
                if a.shape != shape or a.dtype != dt:
                    raise StateError(
                        f"array {name!r} has shape {a.shape} and dtype {a.dtype}, "
                        f"expected {shape} and {dt}"
                    )
                if not np.isfinite(a).all():
                    raise StateError(f"array {name!r} holds NaN or infinity")
            if model.n_clusters != k or np.dtype(model.dtype) != dtype:
                raise StateError("parameters disagree with n_clusters/dtype of the state")
            model.n_features_in_ = d
            model.cluster_centers_ = np.array(C, order="C", copy=True)
            model.counts_ = np.array(arrays["counts"], copy=True)
            model._sse = np.array(arrays["sse"], copy=True)
            model._recent = np.array(arrays["recent"], copy=True)
            model._scale0 = float(meta["scale0"])
            model.n_samples_seen_ = int(meta["n_samples_seen"])
            model.n_steps_ = int(meta["n_steps"])
            inertia, ewma = meta["inertia"], meta["inertia_ewma"]
            model.inertia_ = float("nan") if inertia is None else float(inertia)
            model.inertia_ewma_ = float("nan") if ewma is None else float(ewma)
            model.last_shift_ = float(meta["last_shift"])
            rng = np.random.Generator(np.random.PCG64())
            rng.bit_generator.state = meta["rng_state"]
            model._rng = rng
            model._work = {}
        except StateError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StateError(f"invalid model state: {exc!r}") from exc
        return model

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
