"""Relocation: rescue starved centroids, and find groups the centroids miss.

Three rules, each where it is cheap and cannot cost quality:

* **Starved centroids, on every batch.** A centroid whose recent weight and whose overall
  weight both fall below ``reassignment_ratio`` times the largest moves to where it removes the
  most error of the batch: a candidate drawn like k-means++ against the live centroids, which
  must take at least ``MIN_ROWS`` rows (a lone outlier never attracts a centroid). The rule
  waits until that threshold stands for ``MIN_ROWS`` rows of the recent window: with small
  batches and many centroids, a centroid no row has reached yet is not starved.
* **A swap, on the batch, every ``SWAP_EVERY`` steps**, for groups that appear mid-stream: the
  centroid whose removal costs least (its rows' extra error at their second nearest centroid)
  moves when the best place found removes more than ``BATCH_SWAP_MARGIN`` times that cost *and*
  at least ``BATCH_SWAP_MIN_GAIN`` of the batch's whole error, on batches that hold
  ``BATCH_SWAP_MIN_ROWS`` rows per centroid — a new group far from every
  centroid clears that bar at once, while the small, noisy gains a batch shows on continuous
  data never do (a sample of a long stream holds too few rows of a new group to see it soon).
* **A swap, on the sample, at refinement time.** The centroid whose removal costs least (its
  rows' extra error at their second nearest centroid) is offered the best of the k-means++
  candidates; the move is kept only if, after two Lloyd passes, the sample's total error is
  lower than without it (:func:`streamkm.model.refine.refine`). Empty centroids of the sample,
  and those holding less than a moved centroid must take (``MIN_ROWS`` rows' weight and
  ``MIN_SHARE`` of an average cluster's), are moved whatever the error says, to candidates
  drawn with clipped squared distances (``DRAW_CLIP``): drawn by plain squared distance, the
  candidates near a few scattered far rows would all be those rows, which may not be taken.
  This is how a group that appears mid-stream, or that the initialisation missed, gets a
  centroid although none is starved — and, measured on a sample of tens of thousands of rows
  rather than one batch, it never trades a good configuration for a worse one on continuous
  data.
"""

from __future__ import annotations

import logging

import numpy as np

from streamkm import kernel
from streamkm.model import scoring

__all__ = [
    "MIN_ROWS",
    "SWAP_EVERY",
    "SWAP_MARGIN",
    "min_weight",
    "relocate_on_batch",
    "swap_on_sample",
]

logger = logging.getLogger(__name__)

#: Least number of rows' worth of weight a moved centroid must take.
MIN_ROWS = 3.0
#: On the sample, a moved centroid must also take this share of an average cluster's weight
#: (a few scattered outliers never hold a centroid).
MIN_SHARE = 0.005
#: On the sample, a centroid that serves no group draws its candidates with squared
#: distances clipped at this many times the sample's mean squared distance.
DRAW_CLIP = 4.0
#: A swap candidate must remove this many times the error the removal adds.
SWAP_MARGIN = 1.0
#: Steps between two swap attempts on the batch.
SWAP_EVERY = 4
#: A batch swap must remove this many times the error the removal adds...
BATCH_SWAP_MARGIN = 2.0
#: ...and this fraction of the batch's error.
BATCH_SWAP_MIN_GAIN = 0.1
#: A batch swap is tried only when the batch holds this many rows per centroid: with fewer,
#: the least useful centroid often has no row in the batch, its removal looks free, and noise
#: moves centroids that serve real groups (the sample's swap covers small batches).
BATCH_SWAP_MIN_ROWS = 20


def relocate_on_batch(
    X: np.ndarray,
    w: np.ndarray,
    labels: np.ndarray,
    d2: np.ndarray,
    d2_second: np.ndarray | None,
    C: np.ndarray,
    counts: np.ndarray,
    sse: np.ndarray,
    sse2: np.ndarray,
    recent: np.ndarray,
    ratio: float,
    rng: np.random.Generator,
    spread: float,
    per_batch: float,
) -> float:
    """Move the starved centroids, and on swap steps the least useful one, onto the batch.

    Parameters
    ----------
    X, w, labels, d2 : the batch, its weights, labels and squared distances to the model
    d2_second : ndarray of shape (n,) or None
        Squared distance to the second nearest centroid on swap steps; None otherwise.
    C, counts, sse, sse2, recent : INOUT. Centroids and their per-centroid statistics.
    ratio : float
        ``reassignment_ratio``.
    rng : numpy Generator
        Draws of the candidates.
    spread : float
        Typical per-cluster mean squared distance, given to a moved centroid as its spread.
    per_batch : float
        Fraction of ``recent`` one batch adds in steady state (to seed a moved centroid's).

    Returns
    -------
    float
        Sum of the Euclidean distances the moved centroids travelled.
    """
    n = X.shape[0]
    if ratio <= 0 or n < 2:
        return 0.0
    k = C.shape[0]
    threshold = ratio * float(recent.max())
    if d2_second is None and float(recent.min()) >= threshold:
        return 0.0  # the common case: nobody starved, no swap due
    # Starved = little recent weight, little weight overall, and a batch window long enough
    # that the threshold means a few rows: a centroid not hit yet by small batches is not
    # starved, nor one serving a small but real group.
    hungry = recent < threshold
    hungry &= counts < ratio * float(counts.max())
    hungry &= threshold >= MIN_ROWS * float(w.sum()) / n
    starved = np.flatnonzero(hungry)
    starved = starved[np.argsort(recent[starved], kind="stable")][: n // 2]
    targets = [int(j) for j in starved]
    min_gain = [0.0] * len(targets)
    if d2_second is not None and len(targets) < k - 1:
        cost = np.bincount(labels, weights=w * (d2_second - d2), minlength=k)
        cost[starved] = np.inf
        j = int(np.argmin(cost))
        if np.isfinite(cost[j]):
            floor = BATCH_SWAP_MIN_GAIN * float(np.dot(w, d2))
            targets.append(j)
            min_gain.append(max(BATCH_SWAP_MARGIN * float(cost[j]), floor))
    if not targets:
        return 0.0
    idx = np.array(targets, dtype=np.int64)
    u = rng.random((idx.size, kernel.n_local_trials(k)))
    d2_work = d2.copy()
    gain = np.empty(idx.size)
    captured = np.empty(idx.size)
    cand, best, cum = (np.empty(n) for _ in range(3))
    old = C[idx].astype(np.float64)
    # a place must take a few rows: a centroid parked on a lone outlier helps no one
    min_captured = MIN_ROWS * float(w.sum()) / n
    moved = kernel.relocate(
        X, w, d2_work, idx, u, np.array(min_gain), min_captured, C, gain, captured, cand, best, cum
    )
    if moved == 0:
        return 0.0
    hit = gain > 0
    moved_idx = idx[hit]
    # A moved centroid starts afresh with the weight of the rows it now takes. Weight is
    # conserved: the others give up that weight (and what the moved one held) in proportion,
    # so counts still sums to the weight seen (decayed by half_life).
    total = float(counts.sum())
    counts[moved_idx] = captured[hit]
    sse[moved_idx] = captured[hit] * spread
    sse2[moved_idx] = scoring.gaussian_sse2(captured[hit], sse[moved_idx], C.shape[1])
    rest = np.ones(k, dtype=bool)
    rest[moved_idx] = False
    held = float(counts[rest].sum())
    if held > 0:
        factor = max(total - float(captured[hit].sum()), 0.0) / held
        counts[rest] *= factor
        sse[rest] *= factor
        sse2[rest] *= factor
    recent[moved_idx] = captured[hit] / per_batch
    logger.debug("moved centroid(s) %s", moved_idx.tolist())
    diff = C[moved_idx].astype(np.float64) - old[hit]
    return float(np.sqrt((diff * diff).sum(axis=1)).sum())


def min_weight(w: np.ndarray, k: int) -> float:
    """Least sample weight a centroid placed on the sample must take.

    ``MIN_ROWS`` rows' worth and ``MIN_SHARE`` of an average cluster: a few scattered outliers
    never hold a centroid.
    """
    n_live = max(int((w > 0).sum()), 1)
    total = float(w.sum())
    return max(MIN_ROWS * total / n_live, MIN_SHARE * total / k)


def swap_on_sample(
    X: np.ndarray,
    w: np.ndarray,
    C: np.ndarray,
    labels: np.ndarray,
    d2: np.ndarray,
    d2_second: np.ndarray,
    wsum: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, bool] | None:
    """Proposed centroids with the empty ones and the least useful one moved, or None.

    The flag says whether an empty (or nearly empty) centroid was moved: that proposal is
    kept even when it does not lower the sample's error.

    Parameters
    ----------
    X, w : ndarray of shape (m, d) and (m,)
        The weighted sample.
    C : ndarray of shape (k, d)
        Centroids after Lloyd (not modified).
    labels, d2, d2_second : ndarray of shape (m,)
        Nearest centroid, squared distance to it and to the second nearest.
    wsum : ndarray of shape (k,)
        Sample weight per centroid.
    rng : numpy Generator
        Draws of the candidates.
    """
    m = X.shape[0]
    k = C.shape[0]
    live = w > 0
    n_live = int(live.sum())
    if n_live < 2 * MIN_ROWS:
        return None
    min_captured = min_weight(w, k)
    # a centroid holding less weight than a moved one must take (a k-means++ seed that landed
    # on a lone far row, or Lloyd's mean of a few scattered outliers) serves no group: it is
    # moved like an empty one
    empty = np.flatnonzero(wsum < min_captured)
    extra = np.where(live, w * (d2_second - d2), 0.0)
    cost = np.bincount(labels, weights=extra, minlength=k)
    cost[empty] = np.inf
    targets = [int(j) for j in empty]
    min_gain = [0.0] * len(targets)
    j = int(np.argmin(cost))
    if np.isfinite(cost[j]) and len(targets) < k - 1:
        targets.append(j)
        min_gain.append(SWAP_MARGIN * float(cost[j]))
    if not targets:
        return None
    idx = np.array(targets, dtype=np.int64)
    u = rng.random((idx.size, kernel.n_local_trials(k)))
    C_new = C.copy()
    gain = np.empty(idx.size)
    captured = np.empty(idx.size)
    cand, best, cum = (np.empty(m) for _ in range(3))
    d2_work = d2.copy()
    e = empty.size
    # a centroid that serves no group is re-homed among the dense rows: its candidates are
    # drawn with squared distances clipped at a few times the mean error, or scattered far
    # rows (which it may not take) would make up most of them
    cap = DRAW_CLIP * float(np.dot(w, d2)) / float(w.sum()) if DRAW_CLIP else np.inf
    gains = np.array(min_gain)
    moved = 0
    if e:
        moved += kernel.relocate_clipped(
            X,
            w,
            d2_work,
            cap,
            idx[:e],
            u[:e],
            gains[:e],
            min_captured,
            C_new,
            gain[:e],
            captured[:e],
            cand,
            best,
            cum,
        )
    if e < idx.size:
        moved += kernel.relocate(
            X,
            w,
            d2_work,
            idx[e:],
            u[e:],
            gains[e:],
            min_captured,
            C_new,
            gain[e:],
            captured[e:],
            cand,
            best,
            cum,
        )
    if not moved:
        return None
    # moving a centroid that served no group is kept whatever the error says (a centroid on
    # a lone far row "explains" that row's large error, which a comparison would protect)
    forced = bool(empty.size) and bool((gain[: empty.size] > 0).any())
    return C_new, forced
