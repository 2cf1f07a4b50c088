"""Numba kernels of the streaming k-means model.

Every kernel is compiled in nopython mode with ``cache=True`` and ``nogil=True`` and does no
I/O. Array arguments are marked in comments:

* **IN** — read only;
* **OUT** — written, previous content ignored;
* **INOUT** — read and updated in place;
* **WORK** — scratch space owned by the caller, content ignored on entry and undefined on exit.

Outputs and scratch space are preallocated by the caller, so a stream of batches of the same
size allocates nothing inside the kernels. Data arrays ``X`` may be float32 or float64; the
centroids have the same dtype as ``X``; weights, counts and distances are float64.

Squared distances use ``‖x‖² − 2 x·c + ‖c‖²`` clamped at 0, on rows centred by a shift vector
the model keeps (the weighted mean of its sample), so that data far from the origin keep their
precision. Two assignment paths compute them:

* :func:`assign_direct` — a direct loop, two rows at a time so that every centroid element
  loaded serves both, with the dot products reduced over the features (vectorised under
  reassociation); best when ``d·k`` is small;
* a chunked BLAS GEMM (NumPy's ``np.dot`` on ``CHUNK_ROWS`` rows at a time, as scikit-learn
  does with 256) followed by :func:`argmin_from_dots`; best when ``d·k`` is large. The GEMM is
  called from Python rather than inside Numba so that no SciPy is needed at run time.

:func:`assign` picks the path from ``d·k`` (crossover measured with
``bench/bench_speed.py --crossover``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = [
    "CHUNK_ROWS",
    "GEMM_MIN_DK",
    "argmin_from_dots",
    "assign",
    "assign_direct",
    "kmeans_plusplus",
    "n_local_trials",
    "relocate",
    "relocate_clipped",
    "row_sq_norms",
    "update_centroids",
    "weighted_sums",
    "work_size",
]

#: Rows per GEMM chunk. One GEMM over a whole 1024-row batch ran faster on 2 threads than four
#: of 256 rows (fewer, larger BLAS calls); the (CHUNK_ROWS, k) block still fits in L2 for k ≤ 256.
CHUNK_ROWS = 1024

#: ``d·k`` from which the GEMM path is faster than the direct loop (measured on 2 cores,
#: float32 and float64; see docs/benchmarks-model.md).
GEMM_MIN_DK = 192

# Reassociation lets Numba vectorise the reductions; NaN/Inf are never assumed away because
# the model validates its inputs, and a clamp on a NaN must still behave.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

_EMPTY = np.empty(0, dtype=np.float64)


def n_local_trials(n_clusters: int) -> int:
    """Number of candidates tried per greedy k-means++ step: ``2 + floor(ln k)``."""
    return 2 + int(np.log(max(n_clusters, 1)))


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def row_sq_norms(X, out):  # pragma: no cover - compiled
    """Squared Euclidean norm of every row.

    Parameters
    ----------
    X : ndarray of shape (n, d)
        IN. Rows.
    out : ndarray of shape (n,), float64
        OUT. ``‖X[i]‖²``.
    """
    n, d = X.shape
    for i in range(n):
        s = X.dtype.type(0.0)
        for t in range(d):
            s += X[i, t] * X[i, t]
        out[i] = s


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _nearest_row(x_sq, row_dots, c_sq, score_coef, want_scores, want_second):  # pragma: no cover
    """Nearest centroid of one row from its dot products.

    Returns ``(j, d², second d², score)``; the last two are 0 unless asked for.
    """
    k = c_sq.shape[0]
    two = c_sq.dtype.type(2.0)
    best = c_sq.dtype.type(np.inf)
    second = best
    best_j = 0
    # ‖x‖² is the same for every centroid: leave it out of the comparisons
    if want_second:
        for j in range(k):
            v = c_sq[j] - two * row_dots[j]
            if v < best:
                second = best
                best = v
                best_j = j
            elif v < second:
                second = v
    else:
        for j in range(k):
            v = c_sq[j] - two * row_dots[j]
            if v < best:
                best = v
                best_j = j
    dist = max(float(best + x_sq), 0.0)
    dist2 = max(float(second + x_sq), 0.0) if want_second else 0.0
    score = 0.0
    if want_scores:
        score = np.inf
        xs = float(x_sq)
        for j in range(k):
            v = xs + float(c_sq[j]) - 2.0 * float(row_dots[j])
            if v < 0.0:
                v = 0.0
            s = v * score_coef[0, j] + score_coef[1, j]
            if s < score:
                score = s
    return best_j, dist, dist2, score


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def assign_direct(
    X, shift, C, c_sq, score_coef, labels, d2, scores, d2_second, work
):  # pragma: no cover - compiled
    """Nearest centroid of every row by a direct loop (small ``d·k``).

    Rows are taken two at a time so that each centroid element loaded serves both. With a
    ``shift`` the distances are computed between ``x − shift`` and centroids given in that
    centred frame, so that a common offset of the data does not cancel the precision away.

    Parameters
    ----------
    X : ndarray of shape (n, d)
        IN. Rows to assign.
    shift : ndarray of shape (d,) or (0,), same dtype as X
        IN. Centre subtracted from every row; empty for none.
    C : ndarray of shape (k, d), same dtype as X
        IN. Centroids, in the frame centred on ``shift``.
    c_sq : ndarray of shape (k,), same dtype as X
        IN. ``‖c_j‖²`` (centred frame).
    score_coef : ndarray of shape (2, k) or (0, k), float64
        IN. Anomaly score coefficients: row 0 holds ``a_j``, row 1 ``b_j``; empty to skip the
        scores.
    labels : ndarray of shape (n,), int64
        OUT. Index of the nearest centroid.
    d2 : ndarray of shape (n,), float64
        OUT. Squared distance to the nearest centroid, clamped at 0.
    scores : ndarray of shape (n,) or (0,), float64
        OUT. ``min_j (a_j·‖x − c_j‖² + b_j)`` when ``score_coef`` is given.
    d2_second : ndarray of shape (n,) or (0,), float64
        OUT. Squared distance to the second nearest centroid (``inf`` if k = 1); empty to
        skip.
    work : ndarray of shape (2·k + 2·d,) or more, same dtype as X
        WORK. Dot products and centred copies of the current pair of rows.
    """
    n, d = X.shape
    k = C.shape[0]
    want_scores = score_coef.shape[0] > 0
    want_second = d2_second.shape[0] > 0
    centred = shift.shape[0] > 0
    zero = X.dtype.type(0.0)
    dots0 = work[:k]
    dots1 = work[k : 2 * k]
    xa = work[2 * k : 2 * k + d]
    xb = work[2 * k + d : 2 * k + 2 * d]
    i = 0
    while i < n:
        pair = i + 1 < n
        i1 = i + 1 if pair else i
        x0 = zero
        x1 = zero
        for t in range(d):
            a = X[i, t]
            b = X[i1, t]
            if centred:
                a -= shift[t]
                b -= shift[t]
            xa[t] = a
            xb[t] = b
            x0 += a * a
            x1 += b * b
        for j in range(k):
            s0 = zero
            s1 = zero
            for t in range(d):
                c = C[j, t]
                s0 += xa[t] * c
                s1 += xb[t] * c
            dots0[j] = s0
            dots1[j] = s1
        j0, e0, f0, sc0 = _nearest_row(x0, dots0, c_sq, score_coef, want_scores, want_second)
        labels[i] = j0
        d2[i] = e0
        if want_scores:
            scores[i] = sc0
        if want_second:
            d2_second[i] = f0
        if pair:
            j1, e1, f1, sc1 = _nearest_row(x1, dots1, c_sq, score_coef, want_scores, want_second)
            labels[i1] = j1
            d2[i1] = e1
            if want_scores:
                scores[i1] = sc1
            if want_second:
                d2_second[i1] = f1
        i += 2


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def argmin_from_dots(dots, X, c_sq, score_coef, labels, d2, scores, d2_second):  # pragma: no cover
    """Nearest centroid of every row given the dot products ``X·Cᵀ`` (GEMM path).

    Parameters
    ----------
    dots : ndarray of shape (m, k), same dtype as X
        IN. ``X[i]·c_j`` for the m rows of this chunk.
    X : ndarray of shape (m, d)
        IN. The rows of this chunk (for ``‖x‖²``).
    c_sq : ndarray of shape (k,), same dtype as X
        IN. ``‖c_j‖²``.
    score_coef : ndarray of shape (2, k) or (0, k), float64
        IN. See :func:`assign_direct`; empty to skip the scores.
    labels : ndarray of shape (m,), int64
        OUT.
    d2 : ndarray of shape (m,), float64
        OUT.
    scores : ndarray of shape (m,) or (0,), float64
        OUT.
    d2_second : ndarray of shape (m,) or (0,), float64
        OUT. Squared distance to the second nearest centroid; empty to skip.
    """
    m, d = X.shape
    want_scores = score_coef.shape[0] > 0
    want_second = d2_second.shape[0] > 0
    for i in range(m):
        xsq = X.dtype.type(0.0)
        for t in range(d):
            xsq += X[i, t] * X[i, t]
        j, e, f, sc = _nearest_row(xsq, dots[i], c_sq, score_coef, want_scores, want_second)
        labels[i] = j
        d2[i] = e
        if want_scores:
            scores[i] = sc
        if want_second:
            d2_second[i] = f


def assign(
    X: np.ndarray,
    C: np.ndarray,
    c_sq: np.ndarray,
    score_coef: np.ndarray,
    labels: np.ndarray,
    d2: np.ndarray,
    scores: np.ndarray,
    work: np.ndarray,
    gemm_min_dk: int | None = None,
    d2_second: np.ndarray | None = None,
    shift: np.ndarray | None = None,
) -> None:
    """Nearest centroid of every row, through the faster of the two paths.

    With ``shift``, distances are those between ``x − shift`` and centroids given in the frame
    centred on ``shift``: the expanded form ``‖x‖² − 2x·c + ‖c‖²`` then loses only
    ``eps·‖x − shift‖²`` instead of ``eps·‖x‖²`` to cancellation, which keeps labels exact for
    data far from the origin.

    Parameters
    ----------
    X : ndarray of shape (n, d), C-contiguous float32 or float64
        IN.
    C : ndarray of shape (k, d), same dtype as X, C-contiguous
        IN. Centroids (in the frame centred on ``shift`` when it is given).
    c_sq : ndarray of shape (k,), same dtype as X
        IN. ``‖c_j‖²``.
    score_coef : ndarray of shape (2, k) or (0, k), float64
        IN. Score coefficients ``(a_j, b_j)`` (see :func:`assign_direct`), or empty.
    labels : ndarray of shape (n,), int64
        OUT.
    d2 : ndarray of shape (n,), float64
        OUT.
    scores : ndarray of shape (n,) or (0,), float64
        OUT (only when ``score_coef`` is not empty).
    work : ndarray of shape (work_size(k, d),), same dtype as X
        WORK. One chunk of dot products and centred rows (GEMM path) or one pair of rows of
        them (direct path).
    gemm_min_dk : int, optional
        Override of :data:`GEMM_MIN_DK` (for benchmarks and tests).
    d2_second : ndarray of shape (n,), float64, optional
        OUT. Squared distance to the second nearest centroid (``inf`` if k = 1).
    shift : ndarray of shape (d,), same dtype as X, optional
        IN. Centre subtracted from the rows before the distances are taken.
    """
    n, d = X.shape
    second = _EMPTY if d2_second is None else d2_second
    k = C.shape[0]
    threshold = GEMM_MIN_DK if gemm_min_dk is None else gemm_min_dk
    want_scores = score_coef.shape[0] > 0
    if d * k < threshold:
        sh = shift if shift is not None else work[:0]
        assign_direct(X, sh, C, c_sq, score_coef, labels, d2, scores, second, work)
        return
    dots_all = work[: CHUNK_ROWS * k].reshape(CHUNK_ROWS, k)
    C_T = C.T  # a view: BLAS reads the transposed operand in place
    for start in range(0, n, CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, n)
        dots = dots_all[: stop - start]
        if shift is not None:
            rows = work[CHUNK_ROWS * k : CHUNK_ROWS * k + (stop - start) * d]
            rows = rows.reshape(stop - start, d)
            np.subtract(X[start:stop], shift, out=rows)
        else:
            rows = X[start:stop]
        np.dot(rows, C_T, out=dots)
        argmin_from_dots(
            dots,
            rows,
            c_sq,
            score_coef,
            labels[start:stop],
            d2[start:stop],
            scores[start:stop] if want_scores else scores,
            second[start:stop] if d2_second is not None else second,
        )


def work_size(n_clusters: int, n_features: int = 0) -> int:
    """Length of the ``work`` array :func:`assign` needs (``n_features`` for a ``shift``)."""
    return CHUNK_ROWS * (n_clusters + n_features) + 2 * n_features


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def update_centroids(
    X, w, labels, d2, inv_scale, clip, C, counts, sse, recent, sums, wsum
):  # pragma: no cover - compiled
    """Weighted streaming-average update of the centroids with one batch.

    For every centroid j hit by the batch, with ``W`` its weight sum before the batch,
    ``c_j ← (c_j·W + Σ w·x) / (W + Σ w)`` — the per-sample streaming average
    ``c_j ← c_j + w·(x − c_j) / W_j`` applied over the batch — and ``W ← W + Σ w``.

    Parameters
    ----------
    X : ndarray of shape (n, d)
        IN. The batch.
    w : ndarray of shape (n,), float64
        IN. Sample weights (≥ 0).
    labels : ndarray of shape (n,), int64
        IN. Nearest centroid of every row (before the update).
    d2 : ndarray of shape (n,), float64
        IN. Squared distance to it.
    inv_scale : ndarray of shape (k,), float64
        IN. ``1 / s_j``; a row adds at most ``clip · s_j`` to ``sse[j]`` so that outliers do
        not inflate the spread estimate.
    clip : float
        IN. See ``inv_scale``; ``inf`` disables the clipping.
    C : ndarray of shape (k, d), same dtype as X
        INOUT. Centroids.
    counts : ndarray of shape (k,), float64
        INOUT. Weight sums (already decayed by the caller when forgetting).
    sse : ndarray of shape (k,), float64
        INOUT. Weighted sums of (clipped) squared distances of the rows each centroid took.
    recent : ndarray of shape (k,), float64
        INOUT. Recent weight per centroid (already decayed); the batch's weight is added.
    sums : ndarray of shape (k, d), float64
        WORK.
    wsum : ndarray of shape (k,), float64
        WORK.

    Returns
    -------
    shift : float
        Mean over the k centroids of the Euclidean distance each one moved.
    """
    n, d = X.shape
    k = C.shape[0]
    for j in range(k):
        wsum[j] = 0.0
        for t in range(d):
            sums[j, t] = 0.0
    for i in range(n):
        wi = w[i]
        if wi == 0.0:
            continue
        j = labels[i]
        wsum[j] += wi
        e = d2[i]
        cap = clip / inv_scale[j] if inv_scale[j] > 0.0 else np.inf
        if e > cap:
            e = cap
        sse[j] += wi * e
        for t in range(d):
            sums[j, t] += wi * X[i, t]
    shift = 0.0
    for j in range(k):
        if wsum[j] <= 0.0:
            continue
        old = counts[j]
        new = old + wsum[j]
        moved = 0.0
        for t in range(d):
            c_old = float(C[j, t])
            c_new = (c_old * old + sums[j, t]) / new
            C[j, t] = c_new
            diff = float(C[j, t]) - c_old
            moved += diff * diff
        counts[j] = new
        recent[j] += wsum[j]
        shift += np.sqrt(moved)
    return shift / k


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def weighted_sums(X, w, labels, d2, sums, wsum, wsse):  # pragma: no cover - compiled
    """Per-centroid weighted sums of the rows, of their weights and of their squared distances.

    One Lloyd step on a weighted sample is ``c_j ← sums[j] / wsum[j]`` for every ``wsum[j] > 0``.

    Parameters
    ----------
    X : ndarray of shape (n, d)
        IN. Rows.
    w : ndarray of shape (n,), float64
        IN. Weights (rows of weight 0 are skipped).
    labels : ndarray of shape (n,), int64
        IN. Nearest centroid of every row.
    d2 : ndarray of shape (n,), float64
        IN. Squared distance to it.
    sums : ndarray of shape (k, d), float64
        OUT. ``Σ w·x`` over the rows of each centroid.
    wsum : ndarray of shape (k,), float64
        OUT. ``Σ w``.
    wsse : ndarray of shape (k,), float64
        OUT. ``Σ w·d²``.

    Returns
    -------
    total : float
        ``Σ w·d²`` over all rows.
    """
    n, d = X.shape
    k = sums.shape[0]
    for j in range(k):
        wsum[j] = 0.0
        wsse[j] = 0.0
        for t in range(d):
            sums[j, t] = 0.0
    total = 0.0
    for i in range(n):
        wi = w[i]
        if wi == 0.0:
            continue
        j = labels[i]
        wsum[j] += wi
        e = wi * d2[i]
        wsse[j] += e
        total += e
        for t in range(d):
            sums[j, t] += wi * X[i, t]
    return total


@njit(cache=True, nogil=True)
def _draw(cum, r):  # pragma: no cover - compiled
    """Index i with cum[i-1] <= r < cum[i] (rows of zero mass are never drawn)."""
    i = np.searchsorted(cum, r, side="right")
    n = cum.shape[0]
    if i >= n:
        # r rounded onto the total: take the last row with mass
        i = n - 1
        while i > 0 and cum[i] == cum[i - 1]:
            i -= 1
    return i


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _sq_dist_to_row(X, r, out):  # pragma: no cover - compiled
    """out[i] = ‖X[i] − X[r]‖² computed from differences (exact, no cancellation)."""
    n, d = X.shape
    for i in range(n):
        s = 0.0
        for t in range(d):
            diff = float(X[i, t]) - float(X[r, t])
            s += diff * diff
        out[i] = s


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def kmeans_plusplus(X, w, u, centers, closest, cand, best, cum):  # pragma: no cover
    """Greedy k-means++ seeding on an init buffer.

    The first centre is drawn with probability proportional to ``w``; each next one is the best
    of ``n_trials`` candidates drawn proportionally to ``w·D²`` (D the distance to the closest
    chosen centre), "best" meaning the lowest resulting potential ``Σ w·D²``.

    Parameters
    ----------
    X : ndarray of shape (n, d)
        IN. Init buffer.
    w : ndarray of shape (n,), float64
        IN. Sample weights, with a positive sum.
    u : ndarray of shape (1 + (k-1)·n_trials,), float64
        IN. Uniform draws in [0, 1); ``n_trials = (u.size - 1) // (k - 1)``.
    centers : ndarray of shape (k,), int64
        OUT. Row index of each chosen centre; the indices are distinct.
    closest : ndarray of shape (n,), float64
        WORK. (On exit: squared distance of each row to its closest centre.)
    cand, best, cum : ndarray of shape (n,), float64
        WORK.

    Returns
    -------
    pot : float
        Final potential ``Σ w·D²``.
    """
    n = X.shape[0]
    k = centers.shape[0]
    n_trials = (u.shape[0] - 1) // (k - 1) if k > 1 else 0
    total = 0.0
    for i in range(n):
        total += w[i]
        cum[i] = total
    first = _draw(cum, u[0] * total)
    centers[0] = first
    _sq_dist_to_row(X, first, closest)
    pot = 0.0
    for i in range(n):
        pot += w[i] * closest[i]
    for c in range(1, k):
        acc = 0.0
        for i in range(n):
            acc += w[i] * closest[i]
            cum[i] = acc
        chosen = -1
        if acc > 0.0:
            best_pot = np.inf
            for r in range(n_trials):
                idx = _draw(cum, u[1 + (c - 1) * n_trials + r] * acc)
                _sq_dist_to_row(X, idx, cand)
                p = 0.0
                for i in range(n):
                    m = cand[i] if cand[i] < closest[i] else closest[i]
                    cand[i] = m
                    p += w[i] * m
                if p < best_pot:
                    best_pot = p
                    chosen = idx
                    for i in range(n):
                        best[i] = cand[i]
        if chosen < 0 or closest[chosen] == 0.0:
            # every remaining row coincides with a centre: take the first unused row so
            # that the chosen rows stay distinct
            chosen = 0
            while True:
                used = False
                for q in range(c):
                    if centers[q] == chosen:
                        used = True
                        break
                if not used:
                    break
                chosen += 1
            _sq_dist_to_row(X, chosen, best)
            best_pot = 0.0
            for i in range(n):
                m = best[i] if best[i] < closest[i] else closest[i]
                best[i] = m
                best_pot += w[i] * m
        centers[c] = chosen
        for i in range(n):
            closest[i] = best[i]
        pot = best_pot
    return pot


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def relocate(
    X, w, d2, targets, u, min_gain, min_captured, C, gain, captured, cand, best, cum
):  # pragma: no cover - compiled
    """Move centroids to where they cut the most error of the batch.

    For each target centroid in turn, ``n_trials`` rows are drawn with probability proportional
    to ``w·D²`` (D the distance to the current model) and the centroid moves onto the candidate
    that removes the most batch error ``Σ w·max(0, D² − ‖x − candidate‖²)``, provided that
    error exceeds ``min_gain`` and the candidate takes at least ``min_captured`` weight of rows
    (so a lone outlier does not pull a centroid away). ``D²`` is then updated, so the next
    target goes where error remains. This is greedy k-means++ conditioned on the live
    centroids: rare far-away groups are found where a uniform draw of a row would almost
    always land in a big cluster.

    Parameters
    ----------
    X : ndarray of shape (n, d)
        IN. The batch.
    w : ndarray of shape (n,), float64
        IN. Sample weights.
    d2 : ndarray of shape (n,), float64
        INOUT. Squared distance of each row to the model; lowered as centroids move in.
    targets : ndarray of shape (m,), int64
        IN. Indices of the centroids to move, in order of priority.
    u : ndarray of shape (m, n_trials), float64
        IN. Uniform draws in [0, 1).
    min_gain : ndarray of shape (m,), float64
        IN. A target moves only if the move removes more batch error than this.
    min_captured : float
        IN. Least weight of rows a candidate must take.
    C : ndarray of shape (k, d), same dtype as X
        INOUT. Centroids.
    gain : ndarray of shape (m,), float64
        OUT. Error removed by each move (0 where the centroid stayed).
    captured : ndarray of shape (m,), float64
        OUT. Weight of the batch rows now closer to the moved centroid than to the model.
    cand, best, cum : ndarray of shape (n,), float64
        WORK.

    Returns
    -------
    n_moved : int
        Number of centroids moved (those with ``gain > 0``).
    """
    n, d = X.shape
    m = targets.shape[0]
    n_trials = u.shape[1]
    n_moved = 0
    for s in range(m):
        gain[s] = 0.0
        captured[s] = 0.0
    for s in range(m):
        acc = 0.0
        for i in range(n):
            acc += w[i] * d2[i]
            cum[i] = acc
        if not acc > 0.0:
            break
        best_gain = min_gain[s] if min_gain[s] > 0.0 else 0.0
        best_idx = -1
        best_cap = 0.0
        for r in range(n_trials):
            idx = _draw(cum, u[s, r] * acc)
            _sq_dist_to_row(X, idx, cand)
            g = 0.0
            cap = 0.0
            for i in range(n):
                diff = d2[i] - cand[i]
                if diff > 0.0:
                    g += w[i] * diff
                    cap += w[i]
            if g > best_gain and cap >= min_captured:
                best_gain = g
                best_idx = idx
                best_cap = cap
                for i in range(n):
                    best[i] = cand[i]
        if best_idx < 0:
            continue
        j = targets[s]
        for t in range(d):
            C[j, t] = X[best_idx, t]
        for i in range(n):
            if best[i] < d2[i]:
                d2[i] = best[i]
        gain[s] = best_gain
        captured[s] = best_cap
        n_moved += 1
    return n_moved


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def relocate_clipped(
    X, w, d2, cap, targets, u, min_gain, min_captured, C, gain, captured, cand, best, cum
):  # pragma: no cover - compiled
    """:func:`relocate` with candidates drawn proportionally to ``w·min(D², cap)``.

    Gains are measured on the full ``D²`` as in :func:`relocate`; only the draw is clipped, so
    that a few scattered far rows (which a centroid may not take) do not crowd out candidates
    in dense regions. Groups whose rows are all beyond ``cap`` keep a draw mass proportional
    to their weight.

    Parameters
    ----------
    X, w, d2, targets, u, min_gain, min_captured, C, gain, captured, cand, best, cum
        As in :func:`relocate`.
    cap : float
        IN. Largest squared distance a row's draw mass counts.

    Returns
    -------
    n_moved : int
        Number of centroids moved (those with ``gain > 0``).
    """
    n, d = X.shape
    m = targets.shape[0]
    n_trials = u.shape[1]
    n_moved = 0
    for s in range(m):
        gain[s] = 0.0
        captured[s] = 0.0
    for s in range(m):
        acc = 0.0
        for i in range(n):
            acc += w[i] * (d2[i] if d2[i] < cap else cap)
            cum[i] = acc
        if not acc > 0.0:
            break
        best_gain = min_gain[s] if min_gain[s] > 0.0 else 0.0
        best_idx = -1
        best_cap = 0.0
        for r in range(n_trials):
            idx = _draw(cum, u[s, r] * acc)
            _sq_dist_to_row(X, idx, cand)
            g = 0.0
            cap_w = 0.0
            for i in range(n):
                diff = d2[i] - cand[i]
                if diff > 0.0:
                    g += w[i] * diff
                    cap_w += w[i]
            if g > best_gain and cap_w >= min_captured:
                best_gain = g
                best_idx = idx
                best_cap = cap_w
                for i in range(n):
                    best[i] = cand[i]
        if best_idx < 0:
            continue
        j = targets[s]
        for t in range(d):
            C[j, t] = X[best_idx, t]
        for i in range(n):
            if best[i] < d2[i]:
                d2[i] = best[i]
        gain[s] = best_gain
        captured[s] = best_cap
        n_moved += 1
    return n_moved
