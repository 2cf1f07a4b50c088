"""Input and parameter checks of :class:`StreamingKMeans`, and its scikit-learn shims.

scikit-learn is never imported here: the shims give the estimator ``get_params``/``set_params``,
``clone``-compatible construction, the repr and the tags that scikit-learn's tooling reads.
"""

from __future__ import annotations

import inspect
import math
import sys
from typing import Any

import numpy as np

from streamkm import kernel, limits
from streamkm.errors import NotFittedError

__all__ = [
    "EstimatorShims",
    "NonNumericError",
    "check_params",
    "check_weight",
    "new_rng",
    "not_fitted_error",
    "resolve_dtype",
    "validate",
]

#: Largest sample weight: with the range rule it keeps ``w·‖x − c‖²`` far inside float64, so
#: sums over any stream stay finite.
MAX_WEIGHT = 1e15

_COMPAT_NOT_FITTED: dict[str, type[NotFittedError]] = {}


class NonNumericError(ValueError, TypeError):
    """Input that cannot be read as numbers (a ValueError, and a TypeError like float())."""


def not_fitted_error(message: str) -> NotFittedError:
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


def resolve_dtype(dtype: Any) -> np.dtype:
    """``dtype`` as a NumPy dtype, which must be float32 or float64."""
    try:
        resolved = np.dtype(dtype)
    except TypeError as exc:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}") from exc
    if resolved not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return resolved


def new_rng(random_state: Any) -> np.random.Generator:
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


def _is_int(value: Any, low: int) -> bool:
    return bool(
        isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low
    )


def check_params(est: Any, n_features: int) -> None:
    """Check the constructor parameters of ``est`` for data of ``n_features`` features.

    Raises
    ------
    ValueError
        Naming the first bad parameter.
    """
    for name in ("n_clusters", "batch_size", "n_epochs"):
        if not _is_int(getattr(est, name), 1):
            raise ValueError(f"{name} must be an int >= 1, got {getattr(est, name)!r}")
    if not _is_int(est.sample_size, 0):
        raise ValueError(f"sample_size must be an int >= 0, got {est.sample_size!r}")
    if est.init_size is not None and not _is_int(est.init_size, 1):
        raise ValueError(f"init_size must be None or an int >= 1, got {est.init_size!r}")
    if est.half_life is not None and not (
        isinstance(est.half_life, (int, float, np.number))
        and math.isfinite(est.half_life)
        and est.half_life > 0
    ):
        raise ValueError(f"half_life must be None or > 0, got {est.half_life!r}")
    ratio = est.reassignment_ratio
    if not (isinstance(ratio, (int, float, np.number)) and 0 <= ratio <= 1):
        raise ValueError(f"reassignment_ratio must be in [0, 1], got {ratio!r}")
    resolve_dtype(est.dtype)
    if isinstance(est.init, str):
        if est.init not in ("k-means++", "random"):
            raise ValueError(f"init must be 'k-means++', 'random' or an array, got {est.init!r}")
    else:
        init = np.asarray(est.init)
        if init.shape != (est.n_clusters, n_features):
            raise ValueError(
                f"init array has shape {init.shape}, expected "
                f"(n_clusters, n_features) = ({est.n_clusters}, {n_features})"
            )
        if init.dtype.kind not in "biuf" or not np.isfinite(init).all():
            raise ValueError("init array must be finite numbers")
        if limits.out_of_range(init.reshape(init.shape[0], -1), resolve_dtype(est.dtype)).any():
            raise ValueError("init array holds vectors beyond the range rule of the dtype")
    if not (
        est.random_state is None
        or isinstance(
            est.random_state, (int, np.integer, np.random.Generator, np.random.RandomState)
        )
    ):
        raise ValueError(
            "random_state must be None, an int, a numpy Generator or RandomState, "
            f"got {est.random_state!r}"
        )


def validate(X: Any, dtype: np.dtype, expected: int | None, owner: str) -> np.ndarray:
    """Check a batch and return it as a C-contiguous array of ``dtype``.

    Parameters
    ----------
    X : array-like of shape (n, d)
        The batch.
    dtype : numpy dtype
        The model's dtype.
    expected : int or None
        Required number of features (None: any).
    owner : str
        Name of the estimator, for the messages.

    Returns
    -------
    ndarray of shape (n, d)

    Raises
    ------
    ValueError
        Not 2-D, no features, wrong dimension, non-numeric or complex values, NaN or
        infinity, or a row whose squared norm exceeds :func:`streamkm.limits.max_sq_norm`
        (naming the first bad row).
    """
    if (
        type(X) is np.ndarray
        and X.dtype == dtype
        and X.ndim == 2
        and X.flags.c_contiguous
        and X.shape[1] > 0
        and (expected is None or X.shape[1] == expected)
        and _values_pass(X, dtype)
    ):
        return X  # the common case, checked in one pass; anything else gets the full checks
    if type(X).__module__.startswith("scipy.sparse"):
        raise TypeError("sparse input is not supported: pass a dense array (e.g. X.toarray())")
    try:
        arr = np.asarray(X)
    except (TypeError, ValueError) as exc:
        raise NonNumericError(f"X cannot be read as a numeric array: {exc}") from exc
    if arr.dtype.kind == "O":
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise NonNumericError(f"X holds non-numeric values: {exc}") from exc
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
    if expected is not None and d != expected:
        raise ValueError(
            f"X has {d} features, but {owner} is expecting {expected} features as input."
        )
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(arr, dtype=dtype)
    if n == 0:
        return out
    # max and min are NaN or infinite as soon as one value is; their magnitude bounds ‖x‖²
    hi, lo = float(out.max()), float(out.min())
    if not (math.isfinite(hi) and math.isfinite(lo)):
        bad_rows = np.flatnonzero(~np.isfinite(out).all(axis=1))
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
    peak = max(abs(hi), abs(lo))
    bound = limits.max_sq_norm(dtype)
    if peak * peak * d > bound:
        far = np.flatnonzero(limits.out_of_range(out, dtype))
        if far.size:
            raise ValueError(
                f"X has a squared norm above {bound:.3g}, the range {dtype.name} arithmetic "
                f"admits, at row {int(far[0])} ({far.size} such row(s) of {n})"
            )
    return out


# bit patterns of float magnitudes: the sign bit cleared
_MAGNITUDE = {
    np.dtype(np.float32): (np.uint32, np.uint32(0x7FFFFFFF)),
    np.dtype(np.float64): (np.uint64, np.uint64(0x7FFFFFFFFFFFFFFF)),
}
_PEAK_BITS: dict[tuple[np.dtype, int], int] = {}


def _values_pass(X: np.ndarray, dtype: np.dtype) -> bool:
    """Whether every value of a C-contiguous ``X`` of ``dtype`` is finite and within the range
    rule, read in one vectorised pass (False sends the batch to the full checks, which name
    the bad row).

    The test is ``max |x| ≤ sqrt(max_sq_norm / d)``, compared on bit patterns (magnitudes
    order like them, NaN and infinity above all finite values); the bound is lowered by a
    relative 1e-6 so that a rounding here never admits what the exact rule refuses.
    """
    d = X.shape[1]
    if X.size == 0:
        return True
    key = (dtype, d)
    limit = _PEAK_BITS.get(key)
    uint, mask = _MAGNITUDE[dtype]
    if limit is None:
        peak = math.sqrt(limits.max_sq_norm(dtype) / d) * (1.0 - 1e-6)
        limit = _PEAK_BITS[key] = int(np.array(peak, dtype=dtype).view(uint))
    return int(kernel.max_magnitude_bits(X.reshape(-1).view(uint), mask)) <= limit


def check_weight(sample_weight: Any, n: int, ones_cache: dict[str, np.ndarray]) -> np.ndarray:
    """Sample weights as a float64 array of shape (n,) (all ones when None), each in
    ``[0, MAX_WEIGHT]``.

    ``ones_cache`` keeps one array of ones that serves every batch (the kernels only read it).
    """
    if sample_weight is None:
        ones = ones_cache.get("ones")
        if ones is None or ones.shape[0] < n:
            ones = np.ones(max(n, 1), dtype=np.float64)
            ones_cache["ones"] = ones
        return ones[:n]
    try:
        w = np.asarray(sample_weight, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"sample_weight must be numbers: {exc}") from exc
    if w.ndim == 0:
        w = np.full(n, float(w))
    if w.shape != (n,):
        raise ValueError(f"sample_weight.shape == {w.shape}, expected ({n},)!")
    ok = (w >= 0) & (w <= MAX_WEIGHT)  # False for NaN
    if n and not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        raise ValueError(f"sample_weight must be in [0, {MAX_WEIGHT:g}]; row {row} has {w[row]!r}")
    return np.ascontiguousarray(w)


class EstimatorShims:
    """``get_params``/``set_params``, repr and tags, as scikit-learn's BaseEstimator has them."""

    @classmethod
    def _get_param_names(cls) -> list[str]:
        """Names of the constructor parameters, sorted (scikit-learn's convention)."""
        signature = inspect.signature(cls.__init__)
        for p in signature.parameters.values():
            if p.kind == p.VAR_POSITIONAL:
                raise RuntimeError(f"{cls.__name__} must not take *args in __init__")
        return sorted(
            p.name
            for p in signature.parameters.values()
            if p.name != "self" and p.kind != p.VAR_KEYWORD
        )

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

    def set_params(self, **params: Any) -> Any:
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
