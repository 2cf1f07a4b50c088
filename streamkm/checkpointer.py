"""When a checkpoint is due, and writing it: the checkpoint policy in one place.

A checkpoint is due when ``checkpoint.interval_s`` has passed since the last one, or after
``every_batches`` batches (when set); the conductor also writes one on revoke and on shutdown.
How is :class:`~streamkm.checkpoint.CheckpointStore`'s (atomic file, keep N, fall back on
corruption). The checkpointer also keeps the per-batch history ``streamkm report`` draws.

Examples
--------
>>> now = [0.0]
>>> cp = Checkpointer(None, interval_s=30, every_batches=2, clock=lambda: now[0])
>>> cp.due(), cp.batch_done(None), cp.due(), cp.batch_done(None), cp.due()
(False, None, False, None, True)
>>> cp.reset(); now[0] = 30.0; cp.due()
True
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from streamkm import __version__
from streamkm.checkpoint import Checkpoint, CheckpointStore

log = logging.getLogger(__name__)

TopicPart = tuple[str, int]
HISTORY_POINTS = 2000


class Checkpointer:
    """The checkpoint policy and its store.

    Parameters
    ----------
    store : CheckpointStore or None
        Where checkpoints go (None only in tests of the policy).
    interval_s : float
        A checkpoint is due this long after the previous one.
    every_batches : int, optional
        ... or after this many batches, whichever comes first.
    clock : callable, default time.monotonic
        Injectable for tests.
    """

    def __init__(
        self,
        store: CheckpointStore | None,
        interval_s: float,
        every_batches: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        if every_batches is not None and every_batches < 1:
            raise ValueError(f"every_batches must be at least 1, got {every_batches}")
        self.store = store
        self.interval_s = float(interval_s)
        self.every_batches = every_batches
        self._clock = clock
        self._last = clock()
        self._batches = 0  # since the last checkpoint
        self._rate_window = (clock(), 0)
        # Per batch: (unix time, samples seen, inertia, inertia moving average).
        self.history: deque[tuple[float, float, float, float]] = deque(maxlen=HISTORY_POINTS)

    # -- when --------------------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        """Whether a batch was processed since the last checkpoint."""
        return self._batches > 0

    def due(self) -> bool:
        """Whether the interval has passed, or ``every_batches`` batches were processed."""
        if self.every_batches is not None and self._batches >= self.every_batches:
            return True
        return self._clock() - self._last >= self.interval_s

    def batch_done(self, estimator: Any) -> None:
        """Count a processed batch and note the model's progress in the history."""
        self._batches += 1
        if estimator is None:
            return
        inertia = getattr(estimator, "inertia_", None)
        if inertia is None:
            return
        self.history.append(
            (
                time.time(),
                float(estimator.n_samples_seen_),
                float(inertia),
                float(getattr(estimator, "inertia_ewma_", inertia)),
            )
        )

    def reset(self) -> None:
        """Start a new interval and count (after a checkpoint, or when there was nothing to write)."""
        self._last = self._clock()
        self._batches = 0

    # -- how ---------------------------------------------------------------------------------

    def restore(
        self, expect_dim: int | None = None, expect_n_clusters: int | None = None
    ) -> Checkpoint | None:
        """The newest usable checkpoint (see :meth:`CheckpointStore.latest`), history included."""
        assert self.store is not None
        ckpt = self.store.latest(expect_dim=expect_dim, expect_n_clusters=expect_n_clusters)
        if ckpt is not None:
            self.history.extend(tuple(h) for h in ckpt.meta.get("extra", {}).get("history", []))
        return ckpt

    def write(self, estimator: Any, offsets: Mapping[TopicPart, int]) -> Path:
        """Write the model and offsets durably; start a new interval."""
        assert self.store is not None
        extra = {"streamkm_version": __version__, "history": [list(h) for h in self.history]}
        path = self.store.write(estimator, offsets, extra)
        self.reset()
        return path

    def move_aside(self, also: Iterable[Path] = ()) -> Path | None:
        """Move every checkpoint (and the files ``also`` names) to ``replaced-<time>/``."""
        assert self.store is not None
        paths = self.store.paths()
        extra = [p for p in also if p.exists()]
        if not paths and not extra:
            return None
        aside = self.store.dir / f"replaced-{int(time.time())}"
        aside.mkdir(parents=True, exist_ok=True)
        for p in [*paths, *extra]:
            if p.exists():
                p.rename(aside / p.name)
        log.warning("--reset-model: moved %d old checkpoints to %s", len(paths), aside)
        return aside

    def log_written(self, path: Path, duration_s: float, estimator: Any, lag: float | None) -> None:
        """One INFO line per checkpoint: version, samples, rate since the last, lag, inertia."""
        now = self._clock()
        since, seen_before = self._rate_window
        seen = int(getattr(estimator, "n_samples_seen_", 0))
        rate = (seen - seen_before) / max(now - since, 1e-9)
        self._rate_window = (now, seen)
        log.info(
            "checkpoint %s in %.0f ms: version %d, %d samples, %.0f vectors/s, lag %s, inertia %.4g (avg %.4g)",
            path.name, duration_s * 1000, getattr(estimator, "n_steps_", 0), seen, rate,
            "?" if lag is None else f"{lag:.0f}", getattr(estimator, "inertia_", float("nan")),
            getattr(estimator, "inertia_ewma_", float("nan")),
        )  # fmt: skip


__all__ = ["HISTORY_POINTS", "Checkpointer"]
