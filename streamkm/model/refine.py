"""Refinement: weighted Lloyd iterations on the sample, from the current centroids.

Streaming averages converge to a k-means fixed point only slowly and can stay in a poor one on
continuous data; every so often the model therefore runs weighted Lloyd iterations on its
sample (:mod:`streamkm.model.sample`), starting from the live centroids, until a pass lowers
the sample's error by less than ``LLOYD_TOL`` (at most ``LLOYD_PASSES``), followed by up to
``SWAP_TRIES`` swaps of the least useful centroid, each kept only if it lowers the sample's
error (:func:`streamkm.model.relocation.swap_on_sample`). While the sample still holds the
whole stream, each refinement also tries fresh k-means++ seedings of the sample (up to
``RESTARTS`` while they cost less than ``RESTART_WORK``, at least one), run through Lloyd and
kept only if they end lower (StreamKM++, Ackermann et al. 2012, solves its coreset the same
way; BICO, Fichtenberger et al. 2013, likewise); the winner's centroids are matched to the old
ones so that cluster ids move as little as possible. On a sample of a few thousand rows this
is ``KMeans(n_init=RESTARTS)`` warm-started by the previous solution.

Schedule: while the sample holds the whole stream (``n`` rows of its ``size``), the next
refinement comes after ``(EARLY_FACTOR - 1)·n·n/size`` further rows (at least one): every
doubling of the stream then costs about ``ln 2 / (EARLY_FACTOR - 1)`` refinements of the full
sample, paid once, and a short stream is refined on every call (while that gap is below a
batch) — on a small table with many centroids, the rows that arrive after the last refinement
are what an offline solution gains on the stream. Once the sample is full, a refinement that
cost ``p`` passes over ``m`` sample rows is followed by the next one after
``max(batch_size, p·m / REFINE_BUDGET)`` further rows: refinement then never costs more than
``ρ = REFINE_BUDGET`` times the assignment work of the stream itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from streamkm import kernel
from streamkm.model import relocation

__all__ = [
    "LLOYD_PASSES",
    "REFINE_BUDGET",
    "Refined",
    "lloyd",
    "match_centroids",
    "next_refine",
    "refine",
    "seed_on_sample",
]

#: Most assignment passes over the sample per refinement (the last one measures the result).
LLOYD_PASSES = 30
#: Lloyd stops early when a pass lowers the sample's error by less than this fraction.
LLOYD_TOL = 1e-4
#: While the sample is not full, the stream grows by a factor ``1 + (EARLY_FACTOR - 1)·fill``
#: between two refinements, ``fill`` the sample's share of its size (None: the budget rule from
#: the start).
EARLY_FACTOR: float | None = 3.0
#: Refinement work allowed per unit of stream assignment work.
REFINE_BUDGET = 0.2
#: Swaps tried per refinement (each kept only if it lowers the sample's error; the first that
#: does not ends the search).
SWAP_TRIES = 4
#: Lloyd passes after a swap, before its error is compared.
SWAP_PASSES = 2
#: Most multiply-adds one refinement may spend (a pass costs rows·k·d): about 0.2 s on
#: two cores; beyond it swaps and restarts are skipped and Lloyd stops early.
MAX_WORK = 2e10
#: Fresh k-means++ seedings tried on the sample per refinement while it still holds the whole
#: stream (each run through Lloyd and kept only if it ends lower than the live centroids).
RESTARTS = 10
#: Restarts beyond the first are tried only while all of them (``LLOYD_PASSES + 1`` passes
#: each) fit in this many multiply-adds: on small samples a refinement runs like ``KMeans``
#: with ``n_init = RESTARTS``, on large ones it tries one.
RESTART_WORK = 1e8

#: assign(X, C, d2_second) -> (labels, d2): nearest centroid under the model's centring.
AssignFn = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], tuple[np.ndarray, np.ndarray]]


class Refined(NamedTuple):
    """Outcome of :func:`refine`.

    Attributes
    ----------
    centroids : ndarray of shape (k, d), the model's dtype
    wsum : ndarray of shape (k,), float64
        Sample weight each centroid takes.
    wsse : ndarray of shape (k,), float64
        Weighted sum of squared distances of those rows.
    labels, d2 : ndarray of shape (m,)
        Nearest centroid of every sample row and the squared distance to it.
    passes : int
        Assignment passes made over the sample.
    swapped : bool
        Whether a centroid was moved by the swap step.
    """

    centroids: np.ndarray
    wsum: np.ndarray
    wsse: np.ndarray
    labels: np.ndarray
    d2: np.ndarray
    passes: int
    swapped: bool


def next_refine(n_seen: int, passes: int, rows: int, size: int, batch_size: int) -> int:
    """Stream position of the next refinement after one at ``n_seen`` (see module docstring).

    Parameters
    ----------
    n_seen : int
        Rows seen so far.
    passes : int
        Assignment passes the refinement made.
    rows : int
        Rows in the sample.
    size : int
        The sample's target size.
    batch_size : int
        The model's batch size (the shortest gap).
    """
    if EARLY_FACTOR is not None and rows < size:  # the sample holds the whole stream
        # a refinement costs ~n row-passes: gaps of (F - 1)·n²/size rows spend about
        # ln 2 / (F - 1) refinements of the full sample per doubling of the stream, whatever
        # its length, and refine a short stream on every call
        return n_seen + max(1, int((EARLY_FACTOR - 1.0) * n_seen * rows / size))
    gap = math.ceil(passes * rows / REFINE_BUDGET)
    return n_seen + max(int(batch_size), gap)


def lloyd(
    X: np.ndarray, w: np.ndarray, C: np.ndarray, passes: int, assign: AssignFn
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, int]:
    """Weighted Lloyd iterations from ``C``; stops early when no label changes.

    Returns
    -------
    C, labels, d2, d2_second, wsum, wsse, total, passes_made
        The statistics are those of the last assignment, made with the returned ``C``.
    """
    k, d = C.shape
    sums = np.empty((k, d))
    wsum = np.empty(k)
    wsse = np.empty(k)
    C = C.copy()
    prev: np.ndarray | None = None
    made = 0
    last = math.inf
    while True:
        d2_second = np.empty(X.shape[0])
        labels, d2 = assign(X, C, d2_second)
        made += 1
        total = float(kernel.weighted_sums(X, w, labels, d2, sums, wsum, wsse))
        stalled = total >= last * (1.0 - LLOYD_TOL)
        last = total
        if made >= passes or stalled or (prev is not None and np.array_equal(prev, labels)):
            return C, labels, d2, d2_second, wsum, wsse, total, made
        hit = wsum > 0
        C[hit] = (sums[hit] / wsum[hit, None]).astype(C.dtype)
        prev = labels.copy()


def refine(
    X: np.ndarray,
    w: np.ndarray,
    C: np.ndarray,
    assign: AssignFn,
    rng: np.random.Generator,
    swap: bool,
    restarts: int = 0,
) -> Refined:
    """Lloyd iterations on the weighted sample, then swaps and restarts kept only if they pay.

    At most ``MAX_WORK`` multiply-adds are spent: passes over the sample are counted against
    it, and a swap or restart that would not fit is not started.

    Parameters
    ----------
    X : ndarray of shape (m, d)
        Sample rows (the model's dtype).
    w : ndarray of shape (m,), float64
        Their weights (0 for free slots).
    C : ndarray of shape (k, d)
        Current centroids (not modified).
    assign : callable
        Nearest-centroid function of the model.
    rng : numpy Generator
        The model's generator (draws for the swap candidates).
    swap : bool
        Whether to try relocating centroids (``reassignment_ratio > 0``).
    restarts : int
        Most fresh k-means++ seedings of the sample to try after the swaps (beyond the first,
        only as many as fit in ``RESTART_WORK``); one that ends with a lower error replaces
        the centroids, matched to the old ones so that cluster ids move as little as possible.
    """
    # every pass costs m·k·d multiply-adds: at large sizes the pass count is capped so that
    # one refinement never stalls the stream for long (deterministic: no clocks involved)
    budget = max(2, int(MAX_WORK // max(X.shape[0] * C.shape[0] * C.shape[1], 1)))
    C1, labels, d2, d2s, wsum, wsse, total, passes = lloyd(
        X, w, C, min(LLOYD_PASSES, budget), assign
    )
    swapped = False
    tries = SWAP_TRIES if swap and C.shape[0] >= 2 else 0
    for _ in range(tries):
        if passes + SWAP_PASSES > budget:
            break
        proposal = relocation.swap_on_sample(X, w, C1, labels, d2, d2s, wsum, rng)
        if proposal is None:
            break
        moved, forced = proposal
        C2, labels2, d22, d2s2, wsum2, wsse2, total2, p2 = lloyd(X, w, moved, SWAP_PASSES, assign)
        passes += p2
        if not (forced or total2 < total):
            break
        C1, labels, d2, d2s, wsum, wsse, total = C2, labels2, d22, d2s2, wsum2, wsse2, total2
        swapped = True
    # "a few outliers": less than MIN_SHARE of an average cluster's weight
    floor = relocation.MIN_SHARE * float(w.sum()) / C.shape[0]
    pass_work = max(X.shape[0] * C.shape[0] * C.shape[1], 1)
    restart_budget = max(1, int(RESTART_WORK // (pass_work * (LLOYD_PASSES + 1))))
    for _ in range(min(restarts, restart_budget) if C.shape[0] >= 2 else 0):
        if passes + LLOYD_PASSES + 1 > budget:  # a restart needs a whole Lloyd run to compete
            break
        seeds = seed_on_sample(X, w, C.shape[0], rng)
        C2, labels2, d22, _, wsum2, wsse2, total2, p2 = lloyd(X, w, seeds, LLOYD_PASSES, assign)
        passes += p2 + 1
        # a fresh seeding may not park more centroids on a few outliers than there are now
        # (k-means++ favours far rows; the error alone would welcome them)
        if not total2 < total or int((wsum2 < floor).sum()) > int((wsum < floor).sum()):
            continue
        order = match_centroids(C2, C1)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        C1, labels, d2, total = C2[order], inverse[labels2], d22, total2
        wsum, wsse = wsum2[order], wsse2[order]
        swapped = True
    return Refined(C1, wsum, wsse, labels, d2, passes, swapped)


def seed_on_sample(X: np.ndarray, w: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding of ``k`` centroids on the weighted sample.

    Returns
    -------
    ndarray of shape (k, d), the dtype of ``X``
    """
    m = X.shape[0]
    u = rng.random(1 + (k - 1) * kernel.n_local_trials(k))
    centers = np.empty(k, dtype=np.int64)
    closest, cand, best, cum = (np.empty(m) for _ in range(4))
    kernel.kmeans_plusplus(X, w, u, centers, closest, cand, best, cum)
    return X[centers].copy()


def match_centroids(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Order of ``new`` that puts each of its centroids in the slot of a near old one.

    Greedy matching on squared distances (closest pair first): cluster ids stay where the
    clusters stay, so a replaced set of centroids relabels as little as it can.

    Returns
    -------
    order : ndarray of shape (k,), int64
        ``new[order][j]`` takes the place of ``old[j]``.
    """
    a, b = new.astype(np.float64), old.astype(np.float64)
    d2 = (a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None, :]
    k = a.shape[0]
    order = np.full(k, -1, dtype=np.int64)
    taken = np.zeros(k, dtype=bool)
    for flat in np.argsort(d2, axis=None, kind="stable"):
        i, j = divmod(int(flat), k)
        if not taken[i] and order[j] < 0:
            order[j] = i
            taken[i] = True
    return order
