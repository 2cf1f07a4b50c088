"""The bounded weighted sample of the stream that the model refines its centroids on.

Every row offered gets a priority ``q = w·2^{t/h} / u`` (``u`` uniform in (0, 1], ``t`` the
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
        self._log: list[tuple[str, np.ndarray, np.ndarray]] | None = None
        # candidate rows of an offer (grown to the largest batch)
        self._scratch = (np.empty(0, np.int64), np.empty(0), np.empty(0))

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

    def offer(self, X: np.ndarray, w: np.ndarray, u: np.ndarray, t0: int) -> None:
        """Offer a batch of rows.

        Parameters
        ----------
        X : ndarray of shape (n, d)
            Rows, in stream order.
        w : ndarray of shape (n,), float64
            Their weights.
        u : ndarray of shape (n,), float64
            Uniform draws in [0, 1), one per row.
        t0 : int
            Stream position of the first row.
        """
        n = X.shape[0]
        if self.size <= 0 or n == 0:
            return
        scratch = self._scratch
        if scratch[0].shape[0] < n:
            scratch = self._scratch = (np.empty(n, np.int64), np.empty(n), np.empty(n))
        idx, lw, lq = scratch
        m = kernel.sample_candidates(w, u, int(t0), self.rate, self.tau, idx, lw, lq)
        if m == 0:
            return
        idx, lw, lq = idx[:m], lw[:m], lq[:m]
        if m > self.n_free + self.capacity - self.used:
            keep = self._evict(lq)
            idx, lw, lq = idx[keep], lw[keep], lq[keep]
        slots = self._take_slots(idx.shape[0])
        if self._log is not None:
            self._record(slots)
        kernel.scatter_rows(X, idx, lw, lq, slots, self.rows, self.lw, self.lq)

    def _take_slots(self, m: int) -> np.ndarray:
        """``m`` slots to write: free ones first, then new ones (growing the arrays)."""
        reuse = min(m, self.n_free)
        parts = [self.free[self.n_free - reuse : self.n_free][::-1].copy()]
        self.n_free -= reuse
        fresh = m - reuse
        if fresh:
            self._grow(self.used + fresh)
            parts.append(np.arange(self.used, self.used + fresh, dtype=np.int64))
            self.used += fresh
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _grow(self, need: int) -> None:
        alloc = self.rows.shape[0]
        if need <= alloc:
            return
        new = min(self.capacity, max(need, 2 * alloc))
        for name in ("rows", "lw", "lq", "free"):
            old = getattr(self, name)
            arr = np.empty((new, *old.shape[1:]), dtype=old.dtype)
            arr[: old.shape[0]] = old
            setattr(self, name, arr)

    def _evict(self, lq_new: np.ndarray) -> np.ndarray:
        """Evict down to ``size`` rows among the sample and the candidates ``lq_new``.

        Returns the mask of the candidates that survive; raises the threshold ``τ`` to the
        largest priority dropped.
        """
        keep = np.ones(lq_new.shape[0], dtype=bool)
        live = np.flatnonzero(self.lq[: self.used] > -math.inf)
        pool = np.concatenate([self.lq[live], lq_new])
        if pool.size <= self.size:
            return keep
        # the (size)-th largest priority is the lowest one kept
        cut = pool.size - self.size
        part = np.partition(pool, cut - 1)
        dropped_max = float(part[cut - 1])
        self.tau = max(self.tau, dropped_max)
        out = live[self.lq[live] <= dropped_max]
        if out.size:
            if self._log is not None:
                self._record_free(out)
            self.lq[out] = -math.inf
            self.free[self.n_free : self.n_free + out.size] = out
            self.n_free += out.size
        return lq_new > dropped_max

    # ------------------------------------------------------------------ undo log

    def begin_log(self) -> tuple[int, int, float]:
        """Start recording what the next offers overwrite; returns the scalars to restore."""
        self._log = []
        return self.used, self.n_free, self.tau

    def _record(self, slots: np.ndarray) -> None:
        assert self._log is not None
        old = slots[slots < self.rows.shape[0]]
        self._log.append(("rows", old, self.rows[old].copy()))
        self._log.append(("lw", old, self.lw[old].copy()))
        self._log.append(("lq", old, self.lq[old].copy()))

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
        free = self.free[: self.n_free].copy()
        lq = self.lq[: self.used].copy()
        # free slots are marked by -inf in memory; the state lists them in sample_free and
        # writes 0 in their place, so that every array of a checkpoint is finite
        lq[free] = 0.0
        arrays = {
            "sample_rows": self.rows[: self.used].copy(),
            "sample_lw": self.lw[: self.used].copy(),
            "sample_lq": lq,
            "sample_free": free,
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
        free = np.asarray(arrays["sample_free"], dtype=np.int64)
        if free.size and (int(free.min()) < 0 or int(free.max()) >= used):
            raise ValueError("sample_free lists slots outside the sample")
        self.free[:n_free] = free
        self.lq[free] = -math.inf
        if not np.isfinite(self.lq[:used][self.lq[:used] != -math.inf]).all():
            raise ValueError("sample priorities are not finite")
        self.used, self.n_free = used, n_free
