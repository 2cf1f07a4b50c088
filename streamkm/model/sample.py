"""The bounded weighted sample of the stream that the model refines its centroids on.

Every row offered gets a priority ``q = w·2^{t/h} / u`` (``u`` uniform in (0, 1), ``t`` the
row's position in the stream, ``h`` the half-life; no ``2^{t/h}`` without forgetting), kept as
``log q``. The sample holds the rows whose priority beats a threshold ``τ``: the largest priority
ever evicted (threshold priority sampling, Duffield, Lund and Thorup 2007). A row stands for
the weight ``max(w·2^{t/h}, τ) · 2^{−now/h}``, an unbiased estimate of its share of the
(decayed) stream, so the sample is a small weighted picture of the whole stream — or, with
``half_life``, of its recent part.

The sample keeps between ``size`` and ``1.25·size`` rows: when it is full, the rows of lowest
priority are evicted down to ``size`` at once and their slots reused, so that one offer costs
``O(rows accepted)`` and the eviction ``O(size)`` every ``size/4`` accepted rows. Rows never move
once written, which is what lets :meth:`Sample.begin_log` keep an undo log of only the slots a
step overwrites (the exactly-once snapshot).

Memory: ``1.25 · size · (d · itemsize + 24)`` bytes (rows, two float64 priorities, one slot
index), e.g. 3.2 MB at d = 16 and 63 MB at d = 384 for the default 32,768 rows in float32.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from streamkm import kernel

__all__ = ["Sample"]

_LN2 = math.log(2.0)
_NO_WEIGHTS = np.empty(0, dtype=np.float64)
_NO_SLOTS = np.empty(0, dtype=np.int64)


class Sample:
    """Bounded weighted sample of the stream (see the module docstring).

    Parameters
    ----------
    size : int
        Rows kept (between ``size`` and ``1.25·size`` at any time).
    n_features : int
        Dimension of the rows.
    dtype : numpy dtype
        dtype of the rows (the model's).
    half_life : float or None
        Forgetting, in rows; None keeps every row's full weight.
    """

    def __init__(self, size: int, n_features: int, dtype: Any, half_life: float | None) -> None:
        self.size = int(size)
        self.capacity = self.size + max(self.size // 4, 1) if self.size > 0 else 0
        self.rate = 0.0 if half_life is None else _LN2 / float(half_life)
        alloc = min(self.capacity, 1024)
        self.rows = np.empty((alloc, n_features), dtype=dtype)
        self.lw = np.empty(alloc, dtype=np.float64)  # log(w·2^{t/h})
        self.lq = np.empty(alloc, dtype=np.float64)  # log priority; -inf marks a free slot
        self.free = np.empty(alloc, dtype=np.int64)  # stack of free slots below ``used``
        self.used = 0  # slots written so far (live or free)
        self.n_free = 0
        self.tau = -math.inf  # log of the largest priority evicted
        self._state = np.zeros(3, dtype=np.int64)  # (used, n_free, capacity) for the kernel
        self._log: list[tuple[str, np.ndarray, np.ndarray]] | None = None

    # ------------------------------------------------------------------ queries

    @property
    def n_live(self) -> int:
        """Rows currently in the sample."""
        return self.used - self.n_free

    def nbytes(self) -> int:
        """Bytes the sample holds when full."""
        per_row = self.rows.shape[1] * self.rows.dtype.itemsize + 3 * 8
        return self.capacity * per_row

    def weights(self, now: float) -> np.ndarray:
        """Weight each slot stands for at stream position ``now`` (0 for free slots).

        Returns
        -------
        ndarray of shape (used,), float64
            ``max(w·2^{t/h}, τ)·2^{−now/h}``, rescaled by a common factor so that the largest
            is 1 (only ratios matter to the refinement).
        """
        lw = np.maximum(self.lw[: self.used], self.tau)
        lw[self.lq[: self.used] == -math.inf] = -math.inf
        top = float(lw.max()) if self.used else 0.0
        if not math.isfinite(top):
            return np.zeros(self.used)
        return np.exp(lw - top)

    def live_rows(self) -> np.ndarray:
        """The written slots, live or free (free slots must be weighed 0): shape (used, d)."""
        return self.rows[: self.used]

    # ------------------------------------------------------------------ updates

    def offer(self, X: np.ndarray, w: np.ndarray | None, e: np.ndarray, t0: int) -> None:
        """Offer a batch of rows.

        Parameters
        ----------
        X : ndarray of shape (n, d)
            Rows, in stream order.
        w : ndarray of shape (n,), float64, or None
            Their weights; None when all are 1.
        e : ndarray of shape (n,), float64
            Standard exponential draws, one per row (``−ln u``).
        t0 : int
            Stream position of the first row.
        """
        n = X.shape[0]
        if self.size <= 0 or n == 0:
            return
        self._grow(min(self.capacity, self.used + n))
        w_arr = _NO_WEIGHTS if w is None else w
        logging = self._log is not None
        if logging:
            log = (
                np.empty(n, dtype=np.int64),
                np.empty((n, self.rows.shape[1]), dtype=self.rows.dtype),
                np.empty(n),
                np.empty(n),
            )
        else:
            log = (_NO_SLOTS, self.rows[:0], _NO_WEIGHTS, _NO_WEIGHTS)
        state = self._state
        start = 0
        while True:
            state[0], state[1], state[2] = self.used, self.n_free, self.capacity
            stop, n_logged = kernel.sample_offer(
                X,
                w_arr,
                e,
                t0,
                self.rate,
                self.tau,
                start,
                self.rows,
                self.lw,
                self.lq,
                self.free,
                state,
                *log,
            )
            self.used, self.n_free = int(state[0]), int(state[1])
            if logging and n_logged:
                assert self._log is not None
                slots = log[0][:n_logged].copy()
                self._log.append(("rows", slots, log[1][:n_logged].copy()))
                self._log.append(("lw", slots, log[2][:n_logged].copy()))
                self._log.append(("lq", slots, log[3][:n_logged].copy()))
            if stop >= n:
                return
            self._evict_for(X, w, e, t0, stop)
            start = stop

    def _grow(self, need: int) -> None:
        """Make room for ``need`` slots (never beyond the capacity); slots never move."""
        alloc = self.rows.shape[0]
        if need <= alloc:
            return
        new = min(self.capacity, max(need, 2 * alloc))
        for name in ("rows", "lw", "lq", "free"):
            old = getattr(self, name)
            arr = np.empty((new, *old.shape[1:]), dtype=old.dtype)
            arr[: old.shape[0]] = old
            setattr(self, name, arr)

    def _evict_for(
        self, X: np.ndarray, w: np.ndarray | None, e: np.ndarray, t0: int, start: int
    ) -> None:
        """Evict down to ``size`` rows among the sample and the rows ``start:`` still to come."""
        idx = np.arange(start, X.shape[0])
        lw = (t0 + idx) * self.rate
        if w is not None:
            with np.errstate(divide="ignore"):
                lw = lw + np.log(w[start:])
        lq = lw + e[start:]
        self._evict(lq[lq > self.tau])

    def _evict(self, lq_new: np.ndarray) -> None:
        """Evict down to ``size`` rows among the sample and candidates of priority ``lq_new``.

        Raises the threshold ``τ`` to the largest priority dropped; frees the slots of the
        sample rows dropped.
        """
        live = np.flatnonzero(self.lq[: self.used] > -math.inf)
        pool = np.concatenate([self.lq[live], lq_new])
        if pool.size <= self.size:
            return
        # the (size)-th largest priority is the lowest one kept
        cut = pool.size - self.size
        dropped_max = float(np.partition(pool, cut - 1)[cut - 1])
        self.tau = max(self.tau, dropped_max)
        out = live[self.lq[live] <= dropped_max]
        if out.size:
            if self._log is not None:
                self._record_free(out)
            self.lq[out] = -math.inf
            self.free[self.n_free : self.n_free + out.size] = out
            self.n_free += out.size

    # ------------------------------------------------------------------ undo log

    def begin_log(self) -> tuple[int, int, float]:
        """Start recording what the next offers overwrite; returns the scalars to restore."""
        self._log = []
        return self.used, self.n_free, self.tau

    def _record_free(self, out: np.ndarray) -> None:
        assert self._log is not None
        self._log.append(("lq", out, self.lq[out].copy()))
        pos = np.arange(self.n_free, self.n_free + out.size)
        self._log.append(("free", pos, self.free[pos].copy()))

    def rollback(self, scalars: tuple[int, int, float]) -> None:
        """Undo every write since :meth:`begin_log` and restore its scalars."""
        if self._log is None:
            raise RuntimeError("no undo log is open")
        for name, idx, old in reversed(self._log):
            getattr(self, name)[idx] = old
        self._log = []
        self.used, self.n_free, self.tau = scalars

    # ------------------------------------------------------------------ state

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-able scalars and the arrays that rebuild this sample exactly."""
        meta = {
            "used": self.used,
            "n_free": self.n_free,
            "tau": None if self.tau == -math.inf else self.tau,
        }
        arrays = {
            "sample_rows": self.rows[: self.used].copy(),
            "sample_lw": self.lw[: self.used].copy(),
            # free slots are marked by sample_free; -inf is not written (states are finite)
            "sample_lq": np.where(self.lq[: self.used] == -math.inf, 0.0, self.lq[: self.used]),
            "sample_free": self.free[: self.n_free].copy(),
        }
        return meta, arrays

    def set_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Load :meth:`state` output (shapes and dtypes checked by the caller)."""
        used, n_free = int(meta["used"]), int(meta["n_free"])
        if not (0 <= n_free <= used <= self.capacity):
            raise ValueError(f"sample of {used} slots ({n_free} free) exceeds {self.capacity}")
        tau = meta["tau"]
        self.tau = -math.inf if tau is None else float(tau)
        self._grow(max(used, 1))
        self.rows[:used] = arrays["sample_rows"]
        self.lw[:used] = arrays["sample_lw"]
        self.lq[:used] = arrays["sample_lq"]
        self.free[:n_free] = arrays["sample_free"]
        if n_free and not (self.free[:n_free].min() >= 0 and self.free[:n_free].max() < used):
            raise ValueError("sample_free names slots outside the sample")
        self.lq[self.free[:n_free]] = -math.inf
        self.used, self.n_free = used, n_free
