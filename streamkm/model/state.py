"""The state format of :class:`StreamingKMeans`: JSON-able metadata plus named arrays.

Each array of the state is listed once, in :data:`ARRAYS`, with its attribute, shape and dtype;
:func:`to_state` and :func:`from_state` both read that table. A state holds everything the
model needs to continue exactly as if it had never stopped: centroids and their statistics,
the centring shift, the sample with its priorities and free slots, the refinement schedule and
the generator state. Version 1 states (before the sample) still load: the model continues with
an empty sample; states before version 3 lack ``sse2`` (the squared distances' second moments
behind the anomaly score's dispersion) and get the values of Gaussian clusters of their
spreads.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from streamkm.errors import StateError
from streamkm.model import scoring
from streamkm.model._validation import resolve_dtype

if TYPE_CHECKING:
    from streamkm.model.estimator import StreamingKMeans

__all__ = ["ARRAYS", "STATE_VERSION", "from_state", "to_state"]

#: Version of the layout written by :func:`to_state`.
STATE_VERSION = 3

# name in the state -> (attribute of the model, shape from (k, d, used, n_free), dtype or
# None for the model's dtype, whether -inf is allowed)
ARRAYS: dict[str, tuple[str, str, str | None, bool]] = {
    "centroids": ("cluster_centers_", "k,d", None, False),
    "counts": ("counts_", "k", "float64", False),
    "sse": ("_sse", "k", "float64", False),
    "sse2": ("_sse2", "k", "float64", False),
    "recent": ("_recent", "k", "float64", False),
    "shift": ("_shift", "d", None, False),
    "sample_rows": ("", "used,d", None, False),
    "sample_lw": ("", "used", "float64", False),
    "sample_lq": ("", "used", "float64", True),  # -inf in states written before 0.1.1
    "sample_free": ("", "n_free", "int64", False),
}


def _shape(spec: str, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(sizes[s] for s in spec.split(","))


def _params(model: StreamingKMeans, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, value in model.get_params(deep=False).items():
        if name == "init" and not isinstance(value, str):
            params[name] = None
            arrays["init"] = np.asarray(value).copy()
        elif name == "dtype":
            params[name] = resolve_dtype(value).name
        elif name == "random_state" and not (value is None or isinstance(value, (int, np.integer))):
            params[name] = None  # a generator object: its draws live on in rng_state
        elif isinstance(value, np.integer):
            params[name] = int(value)
        elif isinstance(value, np.floating):
            params[name] = float(value)
        else:
            params[name] = value
    return params


def _check_finite(name: str, a: np.ndarray, allow_neg_inf: bool) -> None:
    if a.dtype.kind != "f":
        return
    bad = np.isnan(a) | (a == np.inf) if allow_neg_inf else ~np.isfinite(a)
    if bad.any():
        raise StateError(f"array {name!r} holds NaN or infinity")


def _nullable(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def to_state(model: StreamingKMeans) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The whole model as JSON-able metadata plus arrays.

    Raises
    ------
    StateError
        If any part of the state is not finite (the model refuses to persist it).
    """
    sample_meta, sample_arrays = model._sample.state()
    arrays: dict[str, np.ndarray] = {}
    for name, (attr, _, _, allow) in ARRAYS.items():
        a = sample_arrays[name] if not attr else np.array(getattr(model, attr), copy=True)
        _check_finite(name, a, allow)
        arrays[name] = a
    scalars: dict[str, Any] = {
        "n_samples_seen": int(model.n_samples_seen_),
        "n_steps": int(model.n_steps_),
        "inertia": _nullable(model.inertia_),
        "inertia_ewma": _nullable(model.inertia_ewma_),
        "last_shift": float(model.last_shift_),
        "scale0": float(model._scale0),
        "next_refine": int(model._next_refine),
        "n_refines": int(model.n_refines_),
    }
    for key in ("last_shift", "scale0"):
        if not math.isfinite(scalars[key]):
            raise StateError(f"model state {key!r} is not finite")
    for key in ("inertia", "inertia_ewma"):
        v = scalars[key]
        if v is not None and not math.isfinite(v):
            raise StateError(f"model state {key!r} is not finite")
    meta = {
        "class": type(model).__name__,
        "state_version": STATE_VERSION,
        "params": _params(model, arrays),
        "n_clusters": int(model.cluster_centers_.shape[0]),
        "dim": int(model.n_features_in_),
        "dtype": model.cluster_centers_.dtype.name,
        **scalars,
        "sample": sample_meta,
        "rng_state": model._rng.bit_generator.state,
    }
    return meta, arrays


def from_state(
    cls: type[StreamingKMeans], meta: dict[str, Any], arrays: dict[str, np.ndarray]
) -> StreamingKMeans:
    """Rebuild a model from :func:`to_state` output; the round trip is bit-exact.

    Raises
    ------
    StateError
        If the metadata and arrays do not describe a valid model.
    """
    try:
        if meta.get("class") != cls.__name__:
            raise StateError(f"state is for {meta.get('class')!r}, not {cls.__name__}")
        version = meta.get("state_version")
        if version not in (1, 2, STATE_VERSION):
            raise StateError(
                f"state version {version!r} is not supported (expected {STATE_VERSION})"
            )
        params = dict(meta["params"])
        k, d = int(meta["n_clusters"]), int(meta["dim"])
        dtype = resolve_dtype(meta["dtype"])
        if params.get("init") is None:
            if "init" not in arrays:
                raise StateError("state lacks the 'init' array")
            params["init"] = np.array(arrays["init"])
        params["dtype"] = np.dtype(params["dtype"]).type
        model = cls(**params)
        if model.n_clusters != k or np.dtype(model.dtype) != dtype:
            raise StateError("parameters disagree with n_clusters/dtype of the state")
        sample = model._new_sample(d, dtype)
        sample_meta: dict[str, Any]
        if version == 1:
            sample_meta = {"used": 0, "n_free": 0, "tau": None}
            arrays = {
                **arrays,
                "shift": np.zeros(d, dtype=dtype),
                "sample_rows": np.empty((0, d), dtype=dtype),
                "sample_lw": np.empty(0),
                "sample_lq": np.empty(0),
                "sample_free": np.empty(0, dtype=np.int64),
            }
        else:
            sample_meta = dict(meta["sample"])
        if "sse2" not in arrays:  # written before version 3
            arrays = {**arrays, "sse2": scoring.gaussian_sse2(arrays["counts"], arrays["sse"], d)}
        sizes = {
            "k": k,
            "d": d,
            "used": int(sample_meta["used"]),
            "n_free": int(sample_meta["n_free"]),
        }
        for name, (attr, spec, dt, allow) in ARRAYS.items():
            a = np.asarray(arrays[name])
            shape = _shape(spec, sizes)
            want = dtype if dt is None else np.dtype(dt)
            if a.shape != shape or a.dtype != want:
                raise StateError(
                    f"array {name!r} has shape {a.shape} and dtype {a.dtype}, "
                    f"expected {shape} and {want}"
                )
            _check_finite(name, a, allow)
            if attr:
                setattr(model, attr, np.array(a, order="C", copy=True))
        sample.set_state(sample_meta, arrays)
        model._sample = sample
        model.n_features_in_ = d
        model._scale0 = float(meta["scale0"])
        model.n_samples_seen_ = int(meta["n_samples_seen"])
        model.n_steps_ = int(meta["n_steps"])
        inertia, ewma = meta["inertia"], meta["inertia_ewma"]
        model.inertia_ = float("nan") if inertia is None else float(inertia)
        model.inertia_ewma_ = float("nan") if ewma is None else float(ewma)
        model.last_shift_ = float(meta["last_shift"])
        model._next_refine = int(
            meta.get("next_refine", model.n_samples_seen_ + int(model.batch_size))
        )
        model.n_refines_ = int(meta.get("n_refines", 0))
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = meta["rng_state"]
        model._rng = rng
    except StateError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateError(f"invalid model state: {exc!r}") from exc
    return model
