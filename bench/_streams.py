"""Synthetic streams shared by the benchmarks (reproducible from a seed).

Every generator returns float32 data in stream order, together with the ground truth the
benchmark needs. Cluster centres are drawn in a box and kept apart by a minimum separation
expressed in units of the cluster spread, so "well separated" means the same thing in every
dimension.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = [
    "anomaly_stream",
    "batches",
    "blobs",
    "drifting",
    "emerging_groups",
    "heavy_tailed",
    "imbalanced",
    "overlapping",
    "rare_far_groups",
]


def _centres(rng: np.random.Generator, k: int, d: int, min_sep: float) -> np.ndarray:
    """k centres, pairwise at least ``min_sep`` apart (drawn in a growing box)."""
    side = min_sep * max(k, 2) ** (1.0 / max(min(d, 8), 1)) * 2.0
    out: list[np.ndarray] = []
    tries = 0
    while len(out) < k:
        c = rng.uniform(-side, side, size=d)
        if all(np.linalg.norm(c - o) >= min_sep for o in out):
            out.append(c)
        tries += 1
        if tries > 200 * k:  # box too small for this many: widen it
            side *= 1.5
            tries = 0
    return np.array(out)


def _mix(
    rng: np.random.Generator,
    centres: np.ndarray,
    weights: np.ndarray,
    spreads: np.ndarray,
    n: int,
    noise: str = "normal",
) -> tuple[np.ndarray, np.ndarray]:
    k, d = centres.shape
    y = rng.choice(k, size=n, p=weights / weights.sum())
    if noise == "normal":
        z = rng.standard_normal((n, d))
    else:  # Student t with 2.5 degrees of freedom: heavy tails, finite variance
        z = rng.standard_t(2.5, size=(n, d)) / np.sqrt(2.5 / 0.5)
    X = centres[y] + z * spreads[y, None]
    return X.astype(np.float32), y


def blobs(n: int, d: int, k: int, seed: int = 0, sep: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated isotropic Gaussian clusters of equal size and unit spread.

    ``sep`` is the minimum centre distance in units of the per-coordinate standard deviation
    divided by ``sqrt(d)``-free: clusters are well defined when ``sep`` is several times 1.
    """
    rng = np.random.default_rng(seed)
    centres = _centres(rng, k, d, sep * np.sqrt(2.0) * 2.0)
    return _mix(rng, centres, np.ones(k), np.ones(k), n)


def imbalanced(n: int, d: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Separated clusters where a third of them hold 1% of the points each."""
    rng = np.random.default_rng(seed)
    centres = _centres(rng, k, d, 8.0)
    n_small = max(1, k // 3)
    w = np.ones(k)
    w[:n_small] = 0.01 * (k - n_small) / (1 - 0.01 * n_small)
    return _mix(rng, centres, w, np.ones(k), n)


def rare_far_groups(n: int, d: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k − 2 ordinary clusters plus 2 tight groups (0.5% of points each) far from the rest."""
    rng = np.random.default_rng(seed)
    main = _centres(rng, k - 2, d, 12.0)
    far = np.stack([main.mean(0) + 60.0 * v / np.linalg.norm(v) for v in rng.normal(size=(2, d))])
    centres = np.concatenate([main, far])
    w = np.ones(k)
    w[-2:] = 0.005 * (k - 2) / (1 - 0.01)
    spreads = np.ones(k)
    spreads[-2:] = 0.5
    return _mix(rng, centres, w, spreads, n)


def overlapping(n: int, d: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k unit-spread clusters with centres uniform in a box about 2 spreads apart.

    The clusters touch: k-means has many local optima here and the seeding matters.
    """
    rng = np.random.default_rng(seed)
    side = 2.0 * k ** (1.0 / d)
    centres = rng.uniform(-side, side, size=(k, d))
    return _mix(rng, centres, np.ones(k), np.ones(k), n)


def emerging_groups(n: int, d: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """:func:`rare_far_groups` whose two rare groups only appear after 30% of the stream.

    No centroid is starved when they appear (all k are busy with the k − 2 ordinary
    clusters), so only a model that moves its least useful centroid finds them.
    """
    X, y = rare_far_groups(int(n / (1 - 0.3 * 0.01)) + 1, d, k, seed)
    early = np.arange(X.shape[0]) < 0.3 * X.shape[0]
    keep = ~(early & (y >= k - 2))
    return X[keep][:n], y[keep][:n]


def heavy_tailed(n: int, d: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Separated clusters whose features have Student-t (2.5 d.o.f.) noise."""
    rng = np.random.default_rng(seed)
    centres = _centres(rng, k, d, 16.0)
    return _mix(rng, centres, np.ones(k), np.ones(k), n, noise="t")


def drifting(
    n: int, d: int, k: int, seed: int = 0, n_jumps: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A stream whose clusters jump to new places ``n_jumps`` times.

    Returns
    -------
    X : ndarray of shape (n, d), float32
    y : ndarray of shape (n,)
    segment : ndarray of shape (n,), int
        Index of the regime each row belongs to.
    """
    rng = np.random.default_rng(seed)
    seg_len = n // (n_jumps + 1)
    parts, labels, segs = [], [], []
    centres = _centres(rng, k, d, 12.0)
    for s in range(n_jumps + 1):
        m = seg_len if s < n_jumps else n - seg_len * n_jumps
        Xs, ys = _mix(rng, centres, np.ones(k), np.ones(k), m)
        parts.append(Xs)
        labels.append(ys)
        segs.append(np.full(m, s))
        # half of the clusters move by a few spreads, one moves far
        move = rng.normal(size=(k, d))
        move /= np.linalg.norm(move, axis=1, keepdims=True)
        centres = centres + move * rng.uniform(3.0, 8.0, size=(k, 1)) * (rng.random((k, 1)) < 0.5)
        centres[rng.integers(k)] += 25.0 * move[0]
    return np.concatenate(parts), np.concatenate(labels), np.concatenate(segs)


def anomaly_stream(
    n: int,
    d: int,
    k: int,
    seed: int = 0,
    outlier_rate: float = 0.01,
    radius: tuple[float, float] = (5.0, 8.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced normal clusters of very different spreads, with injected outliers.

    Cluster sizes follow a geometric progression (the largest is ~30 times the smallest) and
    their spreads range from 0.3 to 3 — a wide, heavy cluster next to tight small ones. The
    outliers sit ``radius`` (default 5–8) times the typical member distance ``spread·√d`` away
    from a random cluster: close in absolute terms for a tight cluster, yet far for it.

    Returns
    -------
    X : ndarray of shape (n, d), float32
    is_outlier : ndarray of shape (n,), bool
    """
    rng = np.random.default_rng(seed)
    centres = _centres(rng, k, d, 30.0)
    w = 0.7 ** np.arange(k)
    spreads = np.exp(rng.uniform(np.log(0.3), np.log(3.0), size=k))
    X, _ = _mix(rng, centres, w, spreads, n)
    is_out = rng.random(n) < outlier_rate
    m = int(is_out.sum())
    src = rng.choice(k, size=m, p=w / w.sum())
    direction = rng.normal(size=(m, d))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    radius_ = rng.uniform(radius[0], radius[1], size=(m, 1)) * spreads[src, None] * np.sqrt(d)
    X[is_out] = (centres[src] + direction * radius_).astype(np.float32)
    return X, is_out


def batches(X: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Consecutive batches of ``size`` rows (the last one may be shorter)."""
    for start in range(0, X.shape[0], size):
        yield X[start : start + size]
