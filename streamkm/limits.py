"""The range rule: which finite vectors the model can take without its arithmetic overflowing.

A centroid is a weighted mean of the rows it absorbed, so ``‖c‖ ≤ max ‖x‖``; a squared
distance is at most ``(‖x‖ + ‖c‖)² ≤ 4 · max ‖x‖²``. Admitting only rows with
``‖x‖² ≤ finfo(dtype).max / 16`` therefore keeps every norm, distance and centroid finite in
the model's dtype with a factor of four to spare. Sums over many rows (inertia, per-cluster
error) are kept in float64. The codec dead-letters rows beyond the bound as ``out_of_range``;
the estimator refuses them with a ``ValueError``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Headroom factor: 4 for (‖x‖ + ‖c‖)² and 4 more to spare.
_HEADROOM = 16.0


def max_sq_norm(dtype: Any) -> float:
    """Largest squared Euclidean norm a row may have for a model of ``dtype``.

    Parameters
    ----------
    dtype : numpy floating dtype
        The model's dtype (float32 or float64).

    Returns
    -------
    float
        ``finfo(dtype).max / 16``.
    """
    return float(np.finfo(np.dtype(dtype)).max) / _HEADROOM


def out_of_range(X: np.ndarray, dtype: Any) -> np.ndarray:
    """Rows of ``X`` whose squared norm exceeds :func:`max_sq_norm`.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        Finite rows (NaN/Inf are checked elsewhere).
    dtype : numpy floating dtype
        The model's dtype.

    Returns
    -------
    ndarray of shape (n_samples,), bool
        True where the row is out of range. The norm is taken in float64 on rows scaled by
        their largest magnitude, so it cannot overflow itself.
    """
    X64 = np.asarray(X, dtype=np.float64)
    if X64.size == 0:
        return np.zeros(X64.shape[0], dtype=bool)
    peak = np.max(np.abs(X64), axis=1)
    safe = np.where(peak > 0, peak, 1.0)
    scaled_sq = np.einsum("ij,ij->i", X64 / safe[:, None], X64 / safe[:, None])
    # log-space comparison: peak² · scaled_sq > bound, without forming peak² when it overflows.
    with np.errstate(divide="ignore"):
        lhs = 2.0 * np.log(safe) + np.log(np.maximum(scaled_sq, 1e-300))
    return (peak > 0) & (lhs > np.log(max_sq_norm(dtype)))
