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

Two assignment paths compute the squared distances:

* :func:`assign_direct` — a direct loop summing ``(x − c)²`` over the features, two rows at a
  time so that every centroid element loaded serves both (the sums vectorised under
  reassociation, the nearest centroid tracked with selects rather than branches). Differences
  lose nothing to cancellation, so data far from the origin need no centring; best when
  ``d·k`` is small;
* a chunked BLAS GEMM (NumPy's ``np.dot`` on ``CHUNK_ROWS`` rows at a time, as scikit-learn
  does with 256) followed by :func:`argmin_from_dots`, with ``‖x‖² − 2 x·c + ‖c‖²`` clamped
  at 0 on rows centred by a shift vector the model keeps (the weighted mean of its sample), so
  that data far from the origin keep their precision; best when ``d·k`` is large. The GEMM is
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
    "learn_batch",
    "max_magnitude_bits",
    "n_local_trials",
    "relocate",
    "relocate_clipped",
    "row_sq_norms",
    "sample_candidates",
    "scatter_rows",
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
    """Nearest centroid of one row from its dot products (GEMM path).

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
    X, shift, C, score_coef, labels, d2, scores, d2_second, work
):  # pragma: no cover - compiled
    """Nearest centroid of every row by a direct loop over differences (small ``d·k``).

    Squared distances are summed from the differences ``x − c`` themselves, so they lose
    nothing to cancellation wherever the data lie; with a ``shift`` the rows are first
    centred on it (for centroids given in that frame).

    Parameters
    ----------
    X : ndarray of shape (n, d)
        IN. Rows to assign.
    shift : ndarray of shape (d,) or (0,), same dtype as X
        IN. Centre subtracted from every row; empty for none.
    C : ndarray of shape (k, d), same dtype as X
        IN. Centroids (in the frame centred on ``shift`` when it is given).
    score_coef : ndarray of shape (2, k) or (0, k), float64
        IN. Anomaly score coefficients: row 0 holds ``a_j``, row 1 ``b_j``; empty to skip the
        scores.
    labels : ndarray of shape (n,), int64
        OUT. Index of the nearest centroid.
    d2 : ndarray of shape (n,), float64
        OUT. Squared distance to the nearest centroid.
    scores : ndarray of shape (n,) or (0,), float64
        OUT. ``min_j (a_j·‖x − c_j‖² + b_j)`` when ``score_coef`` is given.
    d2_second : ndarray of shape (n,) or (0,), float64
        OUT. Squared distance to the second nearest centroid (``inf`` if k = 1); empty to
        skip.
    work : ndarray of shape (2·d,) or more, same dtype as X (unused without ``shift``)
        WORK. The current pair of rows, centred.
    """
    n, d = X.shape
    if shift.shape[0] > 0:
        xc = work[: 2 * d].reshape(2, d)
        i = 0
        while i < n:
            m = min(2, n - i)
            for r in range(m):
                for t in range(d):
                    xc[r, t] = X[i + r, t] - shift[t]
            _assign_rows(xc[:m], 0, m, i, C, score_coef, labels, d2, scores, d2_second)
            i += m
    else:
        _assign_rows(X, 0, n, 0, C, score_coef, labels, d2, scores, d2_second)


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _assign_rows(
    X, start, stop, out0, C, score_coef, labels, d2, scores, d2_second
):  # pragma: no cover - compiled
    """:func:`assign_direct` on rows ``start:stop`` of ``X``, written from ``out0`` on.

    Rows go two at a time, read in place, so that every centroid element loaded serves
    both (copying rows to scratch space first made the loop sensitive to where the arrays
    sit in memory: up to 2× slower for some placements).
    """
    d = X.shape[1]
    k = C.shape[0]
    want_scores = score_coef.shape[0] > 0
    want_second = d2_second.shape[0] > 0
    zero = X.dtype.type(0.0)
    i = start
    while i < stop:
        i1 = i + 1 if i + 1 < stop else i
        best0 = np.inf
        best1 = np.inf
        second0 = np.inf
        second1 = np.inf
        score0 = np.inf
        score1 = np.inf
        j0 = 0
        j1 = 0
        for j in range(k):
            s0 = zero
            s1 = zero
            for t in range(d):
                c = C[j, t]
                a = X[i, t] - c
                b = X[i1, t] - c
                s0 += a * a
                s1 += b * b
            v0 = float(s0)
            v1 = float(s1)
            if want_scores:
                a_j = score_coef[0, j]
                b_j = score_coef[1, j]
                score0 = min(score0, v0 * a_j + b_j)
                score1 = min(score1, v1 * a_j + b_j)
            # selects rather than branches: which centroid wins is data, not a pattern
            if want_second:
                second0 = min(second0, max(best0, v0))
                second1 = min(second1, max(best1, v1))
            j0 = j if v0 < best0 else j0
            j1 = j if v1 < best1 else j1
            best0 = min(best0, v0)
            best1 = min(best1, v1)
        o = out0 + i - start
        labels[o] = j0
        d2[o] = best0
        if want_scores:
            scores[o] = score0
        if want_second:
            d2_second[o] = second0
        if i1 != i:
            labels[o + 1] = j1
            d2[o + 1] = best1
            if want_scores:
                scores[o + 1] = score1
            if want_second:
                d2_second[o + 1] = second1
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
        assign_direct(X, sh, C, score_coef, labels, d2, scores, second, work)
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
    X, w, labels, d2, inv_scale, clip, C, counts, sse, sse2, recent, sums, wsum
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
    sse2 : ndarray of shape (k,), float64
        INOUT. Weighted sums of their squares (the squared distances' dispersion).
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
        if e * inv_scale[j] > clip:  # (a multiplication: no division on every row)
            e = clip / inv_scale[j]
        sse[j] += wi * e
        sse2[j] += wi * e * e
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


@njit(cache=True, nogil=True)
def max_magnitude_bits(bits, mask):  # pragma: no cover - compiled
    """Largest ``bits & mask`` over a flat array of float bit patterns.

    With ``mask`` clearing the sign bit, the result is the bit pattern of ``max |x|``: IEEE
    magnitudes order like their bit patterns, and NaN and infinity sort above every finite
    value. Integer arithmetic keeps the loop vectorised without any fast-math assumption.

    Parameters
    ----------
    bits : ndarray of shape (m,), uint32 or uint64
        IN. The values, viewed as unsigned integers of their width.
    mask : uint32 or uint64
        IN. All bits but the sign bit.

    Returns
    -------
    peak : same type as ``bits``
    """
    peak = bits.dtype.type(0)
    for i in range(bits.shape[0]):
        v = bits[i] & mask
        if v > peak:
            peak = v
    return peak


@njit(cache=True, nogil=True)
def sample_candidates(w, u, t0, rate, tau, idx, lw, lq):  # pragma: no cover - compiled
    """Rows of a batch whose sampling priority beats the threshold.

    Row i has the log priority ``lq = log w_i + (t0 + i)·rate − log(1 − u_i)`` (see
    :mod:`streamkm.model.sample`) and is a candidate when ``lq > tau``. The test is first
    made without logarithms, ``1 − u_i < w_i·e^{(t0+i)·rate − tau}`` with a margin, so
    that only the rows that pass it (few, once the sample is full) pay for the exact one.

    Parameters
    ----------
    w : ndarray of shape (n,), float64
        IN. Weights (≥ 0).
    u : ndarray of shape (n,), float64
        IN. Uniform draws in [0, 1).
    t0 : int
        IN. Stream position of row 0.
    rate : float
        IN. ``ln 2 / half_life``, or 0 without forgetting.
    tau : float
        IN. Log threshold (``-inf`` while nothing was evicted).
    idx : ndarray of shape (n,), int64
        OUT. Candidate rows, in stream order, in ``idx[:m]``.
    lw, lq : ndarray of shape (n,), float64
        OUT. ``log w + t·rate`` and the log priority of each candidate, in ``[:m]``.

    Returns
    -------
    m : int
        Number of candidates.
    """
    n = w.shape[0]
    m = 0
    open_ = tau == -np.inf
    # e^{(t0+i)·rate − tau}: one constant without forgetting; with it, advanced by a factor
    # per row and recomputed every 64 rows (and whenever it nears under- or overflow, where
    # it is taken exactly), which keeps its relative error far below the margin
    factor = 0.0 if open_ else np.exp(-tau)
    step = np.exp(rate)
    for i in range(n):
        if rate != 0.0 and not open_:
            if i % 64 == 0 or not (1e-300 < factor < 1e300):
                factor = np.exp((t0 + i) * rate - tau)
            else:
                factor *= step
        wi = w[i]
        if not wi > 0.0:
            continue
        if not open_ and not (1.0 - u[i]) < wi * factor * (1.0 + 1e-9):
            continue
        lwi = np.log(wi) + (t0 + i) * rate
        lqi = lwi - np.log1p(-u[i])
        if lqi > tau:
            idx[m] = i
            lw[m] = lwi
            lq[m] = lqi
            m += 1
    return m


@njit(cache=True, nogil=True)
def scatter_rows(X, idx, lw_new, lq_new, slots, rows, lw, lq):  # pragma: no cover - compiled
    """Write rows ``X[idx[r]]`` and their log weights and priorities into ``slots[r]``.

    Parameters
    ----------
    X : ndarray of shape (n, d)
        IN. The batch.
    idx : ndarray of shape (m,), int64
        IN. Rows of ``X`` to write.
    lw_new, lq_new : ndarray of shape (m,), float64
        IN. Their log weights and log priorities.
    slots : ndarray of shape (m,), int64
        IN. Destination slot of each.
    rows : ndarray of shape (capacity, d), same dtype as X
        INOUT. The sample's rows.
    lw, lq : ndarray of shape (capacity,), float64
        INOUT. The sample's log weights and log priorities.
    """
    d = X.shape[1]
    for r in range(idx.shape[0]):
        i = idx[r]
        s = slots[r]
        for t in range(d):
            rows[s, t] = X[i, t]
        lw[s] = lw_new[r]
        lq[s] = lq_new[r]


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def learn_batch(
    X,
    w,
    labels,
    d2,
    inv_scale,
    clip,
    decay,
    recent_keep,
    C,
    counts,
    sse,
    sse2,
    recent,
    sums,
    wsum,
    totals,
):  # pragma: no cover - compiled
    """One streaming step's bookkeeping and update: forgetting, then :func:`update_centroids`.

    Parameters
    ----------
    X, w, labels, d2, inv_scale, clip, C, counts, sse, sse2, recent, sums, wsum
        As in :func:`update_centroids`; ``counts``, ``sse``, ``sse2`` and ``recent`` are
        decayed here rather than by the caller.
    decay : float
        IN. Factor applied to ``counts``, ``sse`` and ``sse2`` before the batch (1 without
        forgetting).
    recent_keep : float
        IN. Factor applied to ``recent`` before the batch.
    totals : ndarray of shape (2,), float64
        OUT. ``Σ w`` and ``Σ w·d²`` over the batch.

    Returns
    -------
    shift : float
        Mean over the k centroids of the Euclidean distance each one moved.
    """
    k = C.shape[0]
    for j in range(k):
        counts[j] *= decay
        sse[j] *= decay
        sse2[j] *= decay
        recent[j] *= recent_keep
    total_w = 0.0
    total_e = 0.0
    for i in range(w.shape[0]):
        total_w += w[i]
        total_e += w[i] * d2[i]
    totals[0] = total_w
    totals[1] = total_e
    return update_centroids(
        X, w, labels, d2, inv_scale, clip, C, counts, sse, sse2, recent, sums, wsum
    )


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
    return relocate_clipped(
        X, w, d2, np.inf, targets, u, min_gain, min_captured, C, gain, captured, cand, best, cum
    )


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
