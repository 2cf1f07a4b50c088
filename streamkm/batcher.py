"""Accumulate decoded vectors and where they came from into fixed-size mini-batches.

A batch is due when it is full, or when its oldest row has waited ``max_wait_s`` (a timed
flush, so latency stays bounded at low traffic). Rows leave in arrival order.

Examples
--------
>>> import numpy as np
>>> now = [0.0]
>>> b = Batcher(batch_size=2, max_wait_s=0.5, clock=lambda: now[0])
>>> b.add(np.zeros((3, 4)), "vectors", [0, 0, 1], [10, 11, 5])
>>> b.ready(), len(b)
(True, 3)
>>> batch = b.take()
>>> batch.len, batch.offsets.tolist()
(2, [10, 11])
>>> b.ready(), b.time_until_due()
(False, 0.5)
>>> now[0] = 0.5
>>> b.ready(), b.take().partitions.tolist()
(True, [1])
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Batch:
    """Rows taken from a :class:`Batcher`, aligned by index.

    Attributes
    ----------
    X : ndarray of shape (n, dim)
        The vectors.
    topics : ndarray of object (str), shape (n,)
        Source topic of each row.
    partitions : ndarray of int32, shape (n,)
        Source partition of each row.
    offsets : ndarray of int64, shape (n,)
        Source offset of each row.
    keys : ndarray of object (bytes or None), shape (n,)
        Message key of each row.
    timestamps : ndarray of int64, shape (n,)
        Message timestamp in ms since the epoch, -1 when unknown.
    """

    X: np.ndarray
    topics: np.ndarray
    partitions: np.ndarray
    offsets: np.ndarray
    keys: np.ndarray
    timestamps: np.ndarray

    @property
    def topic(self) -> str:
        """The input topic of the rows (the daemon reads one); "" for an empty batch."""
        return str(self.topics[0]) if len(self.topics) else ""

    @property
    def len(self) -> int:
        """Number of rows."""
        return int(self.X.shape[0])

    def __len__(self) -> int:
        return int(self.X.shape[0])


class Batcher:
    """FIFO buffer of decoded rows that hands out mini-batches.

    Parameters
    ----------
    batch_size : int
        Rows per batch; every batch has exactly this many rows except a timed flush.
    max_wait_s : float
        A non-empty buffer is due once its oldest row has waited this long.
    clock : callable, default time.monotonic
        Monotonic time source in seconds; injectable for tests.
    dim : int, optional
        Number of features; when None, the first :meth:`add` fixes it.
    dtype : numpy dtype, optional
        Dtype of the vector buffer; when None, that of the first :meth:`add`.

    Notes
    -----
    Buffers are preallocated for ``2 * batch_size`` rows and grow (doubling) only when a single
    bulk does not fit; taken rows are copied out, so a :class:`Batch` stays valid after later
    :meth:`add` calls.
    """

    def __init__(
        self,
        batch_size: int,
        max_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
        dim: int | None = None,
        dtype: Any = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be non-negative, got {max_wait_s}")
        self.batch_size = int(batch_size)
        self.max_wait_s = float(max_wait_s)
        self._clock = clock
        self._dim = dim
        self._dtype = None if dtype is None else np.dtype(dtype)
        self._start = 0  # first live row
        self._end = 0  # one past the last live row
        self._capacity = 2 * self.batch_size
        self._X: np.ndarray | None = None
        self._topics = np.empty(self._capacity, dtype=object)
        self._partitions = np.empty(self._capacity, dtype=np.int32)
        self._offsets = np.empty(self._capacity, dtype=np.int64)
        self._keys = np.empty(self._capacity, dtype=object)
        self._timestamps = np.empty(self._capacity, dtype=np.int64)
        self._arrived = np.empty(self._capacity, dtype=np.float64)
        if dim is not None:
            self._X = np.empty((self._capacity, dim), dtype=self._dtype or np.float64)

    @property
    def dim(self) -> int | None:
        """Number of features, or None before the first :meth:`add`."""
        return self._dim

    def __len__(self) -> int:
        return self._end - self._start

    def add(
        self,
        X: np.ndarray,
        topics: Sequence[str] | np.ndarray | str,
        partitions: Sequence[int] | np.ndarray | int,
        offsets: Sequence[int] | np.ndarray,
        keys: Sequence[bytes | None] | np.ndarray | None = None,
        timestamps: Sequence[int] | np.ndarray | None = None,
        arrived: float | None = None,
    ) -> None:
        """Append rows with their source.

        Parameters
        ----------
        X : ndarray of shape (n, dim)
            Decoded vectors.
        topics : str or sequence of str
            Source topic per row, or one for all.
        partitions : int or sequence of int
            Source partition per row, or one for all.
        offsets : sequence of int
            Source offset per row.
        keys : sequence of bytes or None, optional
            Message key per row; None means no keys.
        timestamps : sequence of int, optional
            Message timestamps in ms; None means unknown (-1).
        arrived : float, optional
            When the rows arrived, on the batcher's clock (default: now). The daemon passes
            the moment its consume call began, so a wait inside that call counts too.
        """
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-dimensional, got shape {X.shape}")
        n = X.shape[0]
        if n == 0:
            return
        if self._dim is None:
            self._dim = X.shape[1]
        elif X.shape[1] != self._dim:
            raise ValueError(f"X has {X.shape[1]} features, the batcher holds {self._dim}")
        if self._X is None:
            self._X = np.empty((self._capacity, self._dim), dtype=self._dtype or X.dtype)
        for name, seq in (("offsets", offsets), ("keys", keys), ("timestamps", timestamps)):
            if seq is not None and len(seq) != n:
                raise ValueError(f"{len(seq)} {name} for {n} rows")
        self._reserve(n)
        lo, hi = self._end, self._end + n
        self._X[lo:hi] = X
        self._topics[lo:hi] = topics
        self._partitions[lo:hi] = partitions
        self._offsets[lo:hi] = offsets
        if keys is None:
            self._keys[lo:hi] = None
        elif isinstance(keys, np.ndarray) and keys.dtype == object and keys.ndim == 1:
            self._keys[lo:hi] = keys
        else:
            keys = keys if isinstance(keys, list) else list(keys)
            if keys.count(None) == n:  # the usual case: no keys, one slice
                self._keys[lo:hi] = None
            else:
                # Through a 1-D object array: a list of equal-length bytes assigned as it is
                # would be read as a 2-D array.
                self._keys[lo:hi] = np.fromiter(keys, dtype=object, count=n)
        self._timestamps[lo:hi] = -1 if timestamps is None else timestamps
        self._arrived[lo:hi] = self._clock() if arrived is None else arrived
        self._end = hi

    def _reserve(self, n: int) -> None:
        """Make room for ``n`` more rows at the end: compact first, grow only if needed."""
        if self._end + n <= self._capacity:
            return
        live = len(self)
        need = live + n
        cap = self._capacity
        while cap < need:
            cap *= 2
        names = ("_X", "_topics", "_partitions", "_offsets", "_keys", "_timestamps", "_arrived")
        for name in names:
            old = getattr(self, name)
            new = old if cap == self._capacity else np.empty((cap, *old.shape[1:]), old.dtype)
            # Copy via a temporary: the source and destination may overlap when compacting.
            new[:live] = old[self._start : self._end].copy()
            setattr(self, name, new)
        self._capacity = cap
        self._start, self._end = 0, live

    def oldest_wait(self) -> float:
        """Seconds the oldest row has waited, 0.0 when empty."""
        if not len(self):
            return 0.0
        return max(0.0, self._clock() - float(self._arrived[self._start]))

    def ready(self) -> bool:
        """Whether a batch is due: full, or non-empty with the oldest row waited ``max_wait_s``."""
        n = len(self)
        return n >= self.batch_size or (n > 0 and self.oldest_wait() >= self.max_wait_s)

    def time_until_due(self) -> float | None:
        """Seconds until :meth:`ready` turns true, 0.0 if it is, None when empty.

        Meant as the consumer's poll timeout (the caller's default applies when None).
        """
        n = len(self)
        if n == 0:
            return None
        if n >= self.batch_size:
            return 0.0
        return max(0.0, self.max_wait_s - self.oldest_wait())

    def take(self, max_rows: int | None = None) -> Batch:
        """Remove and return the oldest rows.

        Parameters
        ----------
        max_rows : int, optional
            Upper bound on the rows taken; default ``batch_size``.

        Returns
        -------
        Batch
            ``min(len(self), max_rows)`` rows, copied out, in arrival order (empty if none).
        """
        limit = self.batch_size if max_rows is None else int(max_rows)
        if limit < 0:
            raise ValueError(f"max_rows must be non-negative, got {max_rows}")
        m = min(len(self), limit)
        lo, hi = self._start, self._start + m
        if self._X is None:
            X = np.empty((0, self._dim or 0), dtype=self._dtype or np.float64)
        else:
            X = self._X[lo:hi].copy()
        batch = Batch(
            X=X,
            topics=self._topics[lo:hi].copy(),
            partitions=self._partitions[lo:hi].copy(),
            offsets=self._offsets[lo:hi].copy(),
            keys=self._keys[lo:hi].copy(),
            timestamps=self._timestamps[lo:hi].copy(),
        )
        # Drop references so taken keys and topics can be freed.
        self._topics[lo:hi] = None
        self._keys[lo:hi] = None
        self._start = hi
        if self._start == self._end:
            self._start = self._end = 0
        return batch

    def drop(self, topic: str, partitions: Iterable[int]) -> None:
        """Drop the rows of these partitions of ``topic``; the others stay, in order."""
        gone = list(partitions)
        if not len(self) or not gone:
            return
        batch = self.take(max_rows=len(self))
        keep = ~((batch.topics == topic) & np.isin(batch.partitions, gone))
        if keep.any():
            self.add(
                batch.X[keep], batch.topics[keep], batch.partitions[keep],
                batch.offsets[keep], batch.keys[keep], batch.timestamps[keep],
            )  # fmt: skip
