"""The anomaly score: distance in units of each cluster's spread, plus how rare the cluster is.

For a row x the score is ``min_j (‖x − c_j‖² / s_j + b_j)``, clipped to ``[0, SCORE_MAX]``:

* ``s_j`` — the cluster's mean squared distance of its rows to the centroid (outliers clipped,
  shrunk towards the global mean for clusters that have seen few rows, and never below a floor
  tied to the global spread and to the float resolution of the centroids, so that a cluster of
  identical vectors does not divide by zero);
* ``b_j = RARITY · ln(π̄ / π_j)`` when cluster j holds less than the share ``π̄ = 1/k`` a
  cluster would hold if all were equal, 0 otherwise (π_j its share of the weight). Following
  the cluster-based local outlier factor (CBLOF, He et al. 2003), a point that only a rare
  cluster explains is an outlier: a centroid that ends up among anomalies (a rare class, a
  burst of faulty readings) does not make them look normal. Measuring rarity against ``1/k``
  rather than against the largest cluster keeps the penalty of a typical cluster at 0 for
  every k, which is what keeps the score useful as k grows.

An ordinary member of a common cluster scores about 1 (its squared distance is about the
cluster's mean squared distance); a member of a cluster 10 times rarer than ``1/k`` about
``1 + RARITY·2.3``; rows far from every centroid score their squared distance in spreads.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CLIP", "RARITY", "SCORE_MAX", "inv_spread", "score_coef"]

#: A row adds at most this many times its cluster's mean squared distance to the spread
#: estimate, so that outliers do not widen the cluster they land in (for a Gaussian cluster
#: in d ≥ 2 dimensions, fewer than 1 row in 10⁴ is clipped).
CLIP = 9.0
#: Pseudo-weight of the global mean squared distance in each cluster's spread estimate.
PRIOR_WEIGHT = 1.0
#: Weight of the rarity term ``ln(π̄/π_j)``.
RARITY = 1.0
#: No spread is taken below this fraction of the global mean squared distance.
SPREAD_FLOOR = 1e-4
#: Largest score reported (a row beyond every cluster's reach).
SCORE_MAX = 1e9


def inv_spread(
    counts: np.ndarray, sse: np.ndarray, scale0: float, centroids: np.ndarray
) -> np.ndarray:
    """``1 / s_j``: inverse of each cluster's (shrunk, floored) mean squared distance.

    Parameters
    ----------
    counts, sse : ndarray of shape (k,), float64
        Weight and clipped squared-error sums per cluster.
    scale0 : float
        Mean squared distance measured at initialisation (the prior).
    centroids : ndarray of shape (k, d)
        For the resolution floor: ``d·(eps·(1 + max|c|))²``.

    Returns
    -------
    ndarray of shape (k,), float64
    """
    total_w = float(counts.sum())
    g = (float(sse.sum()) + PRIOR_WEIGHT * scale0) / (total_w + PRIOR_WEIGHT)
    s = (sse + PRIOR_WEIGHT * g) / (counts + PRIOR_WEIGHT)
    d = centroids.shape[1]
    eps = float(np.finfo(centroids.dtype).eps)
    peak = float(np.abs(centroids).max()) if centroids.size else 0.0
    resolution = d * (eps * (1.0 + peak)) ** 2
    floor = max(SPREAD_FLOOR * g, resolution, 1e-300)
    return 1.0 / np.maximum(s, floor)


def score_coef(counts: np.ndarray, inv_scale: np.ndarray) -> np.ndarray:
    """Coefficients ``(a_j, b_j)`` of the score ``min_j a_j·‖x − c_j‖² + b_j``.

    Parameters
    ----------
    counts : ndarray of shape (k,), float64
        Weight per cluster.
    inv_scale : ndarray of shape (k,), float64
        ``1 / s_j`` from :func:`inv_spread`.

    Returns
    -------
    ndarray of shape (2, k), float64
    """
    k = inv_scale.shape[0]
    pi = (counts + 1.0 / k) / (float(counts.sum()) + 1.0)
    bias = RARITY * np.maximum(np.log((1.0 / k) / pi), 0.0)
    return np.stack([inv_scale, bias])
