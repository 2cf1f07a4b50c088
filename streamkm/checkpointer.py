"""When a checkpoint is due, and writing it: the checkpoint policy in one place.

A checkpoint is due when ``checkpoint.interval_s`` has passed since the last one, or after
``every_batches`` batches (when set); the conductor also writes one on revoke and on shutdown.
How is :class:`~streamkm.checkpoint.CheckpointStore`'s (atomic file, keep N, fall back on
corruption). The checkpointer also keeps the per-batch history ``streamkm report`` draws.

Writes run off the loop's thread: :meth:`Checkpointer.start` copies the model's state (in the
caller's thread, a few milliseconds) and a background thread serialises, writes, fsyncs, reads
back and prunes, one write at a time. :meth:`Checkpointer.done` hands the finished write back
to the loop (which only then treats its offsets as durable) or raises its error;
:meth:`Checkpointer.wait` blocks until it is durable (revoke, shutdown).

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
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamkm import __version__
from streamkm.checkpoint import Checkpoint, CheckpointStore

log = logging.getLogger(__name__)

TopicPart = tuple[str, int]
HISTORY_POINTS = 2000


@dataclass
class Written:
    """A durable checkpoint, as :meth:`Checkpointer.done` hands it back.

    Attributes
    ----------
    path : Path
        The file.
    offsets : dict of (topic, partition) to int
        The offsets it holds.
    seconds : float
        From the copy of the state to the file being durable.
    model : dict
        ``n_steps``, ``n_samples_seen``, ``inertia``, ``inertia_ewma`` of the model written.
    context : object
        What the caller passed to :meth:`Checkpointer.start`.
    """

    path: Path
    offsets: dict[TopicPart, int]
    seconds: float
    model: dict[str, float]
    context: Any = None


@dataclass
class _Job:
    offsets: dict[TopicPart, int]
    model: dict[str, float]
    context: Any
    started: float
    thread: threading.Thread | None = None
    path: Path | None = None
    seconds: float = 0.0
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


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
        self._job: _Job | None = None  # the write in flight, or finished and not handed back
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
        """Write the model and offsets durably, in this thread; start a new interval."""
        self.start(estimator, offsets, background=False)
        written = self.wait()
        assert written is not None
        return written.path

    @property
    def busy(self) -> bool:
        """Whether a write was started and not handed back yet (:meth:`done`, :meth:`wait`)."""
        return self._job is not None

    def start(
        self,
        estimator: Any,
        offsets: Mapping[TopicPart, int],
        context: Any = None,
        background: bool = True,
    ) -> None:
        """Copy the model's state and write it in a background thread; start a new interval.

        Parameters
        ----------
        estimator : object
            The model (``to_state()``); it may go on learning as soon as this returns.
        offsets : mapping of (topic, partition) to int
            The offsets the checkpoint holds.
        context : object, optional
            Handed back with the :class:`Written` (what to do once it is durable).
        background : bool, default True
            False writes in this thread (before returning).

        Raises
        ------
        CheckpointError
            The state cannot be taken (not finite …); nothing is written.
        RuntimeError
            The previous write has not been handed back.
        """
        assert self.store is not None
        if self._job is not None:
            raise RuntimeError("the previous checkpoint write has not been handed back")
        started = time.perf_counter()
        extra = {"streamkm_version": __version__, "history": [list(h) for h in self.history]}
        prepared = self.store.prepare(estimator, offsets, extra)
        job = _Job(dict(offsets), _summary(estimator), context, started)
        self._job = job
        self.reset()
        if not background:
            self._run(job, prepared)
            return
        job.thread = threading.Thread(
            target=self._run, args=(job, prepared), name="streamkm-checkpoint", daemon=True
        )
        job.thread.start()

    def _run(self, job: _Job, prepared: Any) -> None:
        assert self.store is not None
        try:
            job.path = self.store.commit(prepared)
        except BaseException as exc:  # handed to the loop's thread by done()
            job.error = exc
        finally:
            job.seconds = time.perf_counter() - job.started
            job.done.set()

    def done(self) -> Written | None:
        """The write started last once it is durable (handed back once); None while it runs
        or when there is none.

        Raises
        ------
        CheckpointError
            The write failed (no partial file is left; earlier checkpoints are kept).
        """
        job = self._job
        if job is None or not job.done.is_set():
            return None
        self._job = None
        if job.thread is not None:
            job.thread.join()
        if job.error is not None:
            raise job.error
        assert job.path is not None
        return Written(job.path, job.offsets, job.seconds, job.model, job.context)

    def wait(self, timeout: float | None = None) -> Written | None:
        """Block until the write in flight (if any) is durable, then as :meth:`done`."""
        job = self._job
        if job is not None:
            job.done.wait(timeout)
        return self.done()

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

    def log_written(self, written: Written, lag: float | None) -> None:
        """One INFO line per checkpoint: version, samples, rate since the last, lag, inertia."""
        now = self._clock()
        since, seen_before = self._rate_window
        m = written.model
        seen = int(m["n_samples_seen"])
        rate = (seen - seen_before) / max(now - since, 1e-9)
        self._rate_window = (now, seen)
        log.info(
            "checkpoint %s in %.0f ms: version %d, %d samples, %.0f vectors/s, lag %s, inertia %.4g (avg %.4g)",
            written.path.name, written.seconds * 1000, int(m["n_steps"]), seen, rate,
            "?" if lag is None else f"{lag:.0f}", m["inertia"], m["inertia_ewma"],
        )  # fmt: skip


def _summary(estimator: Any) -> dict[str, float]:
    """What the checkpoint log line says of the model, as it is when the state is copied."""

    def number(name: str, default: float = float("nan")) -> float:
        value = getattr(estimator, name, None)
        return default if value is None else float(value)

    return {
        "n_steps": number("n_steps_", 0.0),
        "n_samples_seen": number("n_samples_seen_", 0.0),
        "inertia": number("inertia_"),
        "inertia_ewma": number("inertia_ewma_"),
    }


__all__ = ["HISTORY_POINTS", "Checkpointer", "Written"]
