"""Checkpoints: the model together with the next offset of every partition it has absorbed.

A checkpoint is one checksummed ``.npz`` (see :mod:`streamkm.fileformat`) named
``ckpt-<model_version:012d>-<unix_ms>.npz``, written atomically (temporary file, fsync, rename),
so a crash leaves either the previous checkpoint or the new one, never half of one. A model
whose state holds NaN or infinity is refused, never written; every written file is read back
before older ones are pruned. The store keeps the newest ``keep`` files and, whatever they are,
never deletes the newest one that reads back; on read, a corrupt newest file is skipped with a
warning in favour of the one before.

:meth:`CheckpointStore.write` is :meth:`~CheckpointStore.prepare` (a copy of the model's state,
cheap) followed by :meth:`~CheckpointStore.commit` (serialise, write, fsync, read back, prune:
the slow part), so that the second half can run in another thread
(:class:`~streamkm.checkpointer.Checkpointer`).

Examples
--------
>>> store = CheckpointStore("/var/lib/streamkm", keep=3)       # doctest: +SKIP
>>> store.write(model, {("vectors", 0): 1042})                 # doctest: +SKIP
>>> ckpt = store.latest(expect_dim=16, expect_n_clusters=8)   # doctest: +SKIP
>>> ckpt.offsets                                               # doctest: +SKIP
{('vectors', 0): 1042}
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from streamkm import fileformat
from streamkm.errors import CheckpointError, CorruptFileError, StreamkmError

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "streamkm-checkpoint"
CHECKPOINT_VERSION = 1
_NAME_RE = re.compile(r"^ckpt-(\d{12,})-(\d+)\.npz$")
_TMP_RE = re.compile(r"^\.ckpt-\d{12,}-\d+\.npz\.tmp-(\d+)$")


def checkpoint_name(model_version: int, unix_ms: int) -> str:
    """File name of a checkpoint: ``ckpt-<model_version:012d>-<unix_ms>.npz``."""
    return f"ckpt-{int(model_version):012d}-{int(unix_ms)}.npz"


def _default_model_cls() -> Any:
    # Imported on use: the model pulls in numba, which `checkpoint show` does not need to pay for
    # until it actually reads a file.
    from streamkm.model import StreamingKMeans

    return StreamingKMeans


@dataclass(frozen=True)
class PreparedCheckpoint:
    """A checkpoint ready to be written (:meth:`CheckpointStore.prepare`).

    Attributes
    ----------
    path : Path
        The file it becomes.
    meta : dict
        The metadata, JSON-able.
    arrays : dict of str to ndarray
        The model's arrays, copies of its own.
    """

    path: Path
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back from disk.

    Attributes
    ----------
    path : Path
        The file.
    model : StreamingKMeans
        The restored model.
    offsets : dict of (str, int) to int
        Next offset to consume for each (topic, partition) the model has absorbed.
    meta : dict
        The stored metadata (``model``, ``offsets``, ``created_at``, ``extra`` …).
    """

    path: Path
    model: Any
    offsets: dict[tuple[str, int], int]
    meta: dict[str, Any]


def _offsets_to_json(offsets: Mapping[tuple[str, int], int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (topic, partition), offset in sorted(offsets.items()):
        out.setdefault(str(topic), {})[str(int(partition))] = int(offset)
    return out


def _offsets_from_json(data: Any) -> dict[tuple[str, int], int]:
    if not isinstance(data, dict):
        raise ValueError("offsets are not an object")
    return {
        (str(topic), int(partition)): int(offset)
        for topic, parts in data.items()
        for partition, offset in parts.items()
    }


def _model_int(model: Any, name: str) -> int | None:
    value = getattr(model, name, None)
    return None if value is None else int(value)


def _model_cls_for(model_meta: Any, default: Any) -> Any:
    """The class that rebuilds this model: a shared-model replica says so in its ``kind``."""
    from streamkm.shared.replica import KIND as SHARED_KIND
    from streamkm.shared.replica import Replica

    if isinstance(model_meta, dict) and model_meta.get("kind") == SHARED_KIND:
        return Replica
    return default


def _parse(path: Path, model_cls: Any) -> Checkpoint:
    """Load and rebuild one checkpoint; raise CorruptFileError if anything is off."""
    meta, arrays = fileformat.load(path)
    if meta.get("kind") != CHECKPOINT_KIND:
        raise CorruptFileError(f"{path}: not a streamkm checkpoint")
    try:
        offsets = _offsets_from_json(meta.get("offsets", {}))
        model = _model_cls_for(meta["model"], model_cls).from_state(meta["model"], arrays)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptFileError(f"{path}: inconsistent checkpoint ({exc})") from exc
    return Checkpoint(path=path, model=model, offsets=offsets, meta=meta)


class CheckpointStore:
    """A directory of checkpoints.

    Parameters
    ----------
    dir : str or PathLike
        Where checkpoints live; created (with parents) on the first write.
    keep : int, default 3
        How many of the newest checkpoints to keep.
    model_cls : type, optional
        Class whose ``from_state(meta, arrays)`` rebuilds the model; default
        :class:`streamkm.model.StreamingKMeans`.
    wall_clock : callable, default time.time
        Source of the ``unix_ms`` in file names and of ``created_at``.
    """

    def __init__(
        self,
        dir: str | os.PathLike[str],
        keep: int = 3,
        model_cls: Any = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.dir = Path(dir)
        self.keep = int(keep)
        self._model_cls = model_cls
        self._wall_clock = wall_clock

    @property
    def model_cls(self) -> Any:
        """The class used to rebuild models."""
        if self._model_cls is None:
            self._model_cls = _default_model_cls()
        return self._model_cls

    def paths(self) -> list[Path]:
        """Checkpoint files in the directory, newest first (by model version, then time)."""
        try:
            entries = list(os.scandir(self.dir))
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = []
        for entry in entries:
            m = _NAME_RE.match(entry.name)
            if m and entry.is_file():
                found.append(((int(m.group(1)), int(m.group(2))), Path(entry.path)))
        found.sort(reverse=True)
        return [p for _, p in found]

    def ensure_writable(self) -> None:
        """Create the directory and prove a file can be written there.

        Raises
        ------
        CheckpointError
            If the directory cannot be created or written.
        """
        probe = self.dir / f".probe-{os.getpid()}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fileformat.write_atomic(probe, b"")
            probe.unlink()
        except OSError as exc:
            raise CheckpointError(
                f"checkpoint directory {self.dir} is not writable: {_os_reason(exc)}"
            ) from exc

    def write(
        self,
        model: Any,
        offsets: Mapping[tuple[str, int], int],
        extra_meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """Atomically write a checkpoint and prune old ones.

        Parameters
        ----------
        model : StreamingKMeans
            The model; saved through ``model.to_state()``.
        offsets : mapping of (topic, partition) to int
            Next offset to consume for every partition the model has absorbed.
        extra_meta : mapping, optional
            JSON-able metadata stored under ``meta["extra"]``.

        Returns
        -------
        Path
            The new checkpoint file.

        Raises
        ------
        CheckpointError
            If the model's state is not finite or cannot be serialised, the directory cannot
            be created or the file cannot be written (permissions, disk full …), or the file
            does not read back. No partial file is left and earlier checkpoints are untouched.
        """
        return self.commit(self.prepare(model, offsets, extra_meta))

    def prepare(
        self,
        model: Any,
        offsets: Mapping[tuple[str, int], int],
        extra_meta: Mapping[str, Any] | None = None,
    ) -> PreparedCheckpoint:
        """The first half of :meth:`write`: a copy of the model's state and the metadata.

        The copy shares nothing with the model, so :meth:`commit` may run in another thread
        while the model goes on learning.

        Raises
        ------
        CheckpointError
            If the model's state is not finite or cannot be taken.
        """
        try:
            model_meta, state = model.to_state()
        except (StreamkmError, ValueError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"refusing to write a checkpoint: {exc}") from exc
        # to_state may hand out live arrays (the shared replica does): the writer needs its own.
        arrays = {name: np.array(a, copy=True) for name, a in state.items()}
        bad = sorted(
            name for name, a in arrays.items() if a.dtype.kind in "fc" and not np.isfinite(a).all()
        )
        if bad:
            raise CheckpointError(
                "refusing to write a checkpoint of a model that is not finite "
                f"(NaN or infinity in {', '.join(bad)}); the previous checkpoints are kept"
            )
        version = _model_int(model, "n_steps_") or 0
        now = self._wall_clock()
        unix_ms = int(now * 1000)
        meta: dict[str, Any] = {
            "kind": CHECKPOINT_KIND,
            "checkpoint_version": CHECKPOINT_VERSION,
            "model_version": version,
            "n_samples_seen": _as_json_number(getattr(model, "n_samples_seen_", None)),
            "n_clusters": _model_int(model, "n_clusters"),
            "dim": _model_int(model, "n_features_in_"),
            "created_at": datetime.fromtimestamp(now, UTC).isoformat(),
            "created_at_ms": unix_ms,
            "offsets": _offsets_to_json(offsets),
            "model": model_meta,
            "extra": dict(extra_meta or {}),
        }
        # The metadata is small; a deep copy keeps the writer off anything the model may change.
        meta = copy.deepcopy(meta)
        return PreparedCheckpoint(self.dir / checkpoint_name(version, unix_ms), meta, arrays)

    def commit(self, prepared: PreparedCheckpoint) -> Path:
        """The second half of :meth:`write`: serialise, write atomically, read back, prune.

        Raises
        ------
        CheckpointError
            As :meth:`write`.
        """
        path = prepared.path
        try:
            data = fileformat.dumps(prepared.meta, prepared.arrays)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"cannot serialise checkpoint: {exc}") from exc
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fileformat.write_atomic(path, data)
        except OSError as exc:
            raise CheckpointError(f"cannot write checkpoint {path}: {_os_reason(exc)}") from exc
        del data
        try:
            _parse(path, self.model_cls)
        except (CorruptFileError, OSError) as exc:
            with contextlib.suppress(OSError):
                path.unlink()
            raise CheckpointError(
                f"checkpoint {path.name} does not read back ({exc}); removed it and kept the "
                "previous ones"
            ) from exc
        self._prune(keep_path=path)
        return path

    def _prune(self, keep_path: Path) -> None:
        """Delete all but the newest ``keep`` checkpoints, and stale temporary files.

        ``keep_path`` (just written and read back) stays, and so does the newest checkpoint
        that reads back, however many unreadable files are newer than it.
        """
        ordered = self.paths()
        old = [p for p in ordered if p != keep_path][self.keep - 1 :]
        for path in ordered:  # the newest readable one: keep_path unless a newer one reads
            if path == keep_path or self._reads(path):
                if path in old:
                    old.remove(path)
                break
        for path in old:
            try:
                path.unlink()
            except OSError as exc:
                logger.warning("could not delete old checkpoint %s: %s", path, _os_reason(exc))
        # A writer killed mid-write leaves its temporary file; ours are cleaned by write_atomic.
        pid = str(os.getpid())
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for name in names:
            m = _TMP_RE.match(name)
            if m and m.group(1) != pid:
                with contextlib.suppress(OSError):
                    (self.dir / name).unlink()

    def _reads(self, path: Path) -> bool:
        try:
            _parse(path, self.model_cls)
        except (CorruptFileError, OSError):
            return False
        return True

    def latest(
        self, expect_dim: int | None = None, expect_n_clusters: int | None = None
    ) -> Checkpoint | None:
        """The newest readable checkpoint, or None if there is none.

        A newest file that is corrupt, truncated or unreadable is skipped with a warning naming
        it, and the one before is tried.

        Parameters
        ----------
        expect_dim, expect_n_clusters : int, optional
            When given, the checkpoint's model must match.

        Raises
        ------
        CheckpointError
            If the newest readable checkpoint's dimension or number of clusters differs from
            the expected one. Older checkpoints are not tried then: they are out of date.
        """
        paths = self.paths()
        for i, path in enumerate(paths):
            try:
                ckpt = _parse(path, self.model_cls)
            except (CorruptFileError, OSError) as exc:
                older = "falling back to the previous one" if i + 1 < len(paths) else "none left"
                logger.warning("skipping unreadable checkpoint %s (%s); %s", path, exc, older)
                continue
            _check_shape(ckpt, expect_dim, expect_n_clusters)
            return ckpt
        if paths:
            logger.error(
                "none of the %d checkpoints in %s is readable; starting without one",
                len(paths),
                self.dir,
            )
        return None


def _check_shape(ckpt: Checkpoint, dim: int | None, n_clusters: int | None) -> None:
    got_dim = _model_int(ckpt.model, "n_features_in_")
    got_k = _model_int(ckpt.model, "n_clusters")
    problems = []
    if dim is not None and got_dim is not None and got_dim != dim:
        problems.append(f"dim {got_dim} but {dim} is configured")
    if n_clusters is not None and got_k is not None and got_k != n_clusters:
        problems.append(f"n_clusters {got_k} but {n_clusters} is configured")
    if problems:
        raise CheckpointError(f"checkpoint {ckpt.path} has " + " and ".join(problems))


def read(path: str | os.PathLike[str], model_cls: Any = None) -> Checkpoint:
    """Read a checkpoint file, or the newest readable one in a directory.

    Parameters
    ----------
    path : str or PathLike
        A checkpoint file or a checkpoint directory.
    model_cls : type, optional
        As for :class:`CheckpointStore`.

    Raises
    ------
    CheckpointError
        If the path does not exist or the directory holds no readable checkpoint.
    CorruptFileError
        If the given file is not a valid checkpoint.
    """
    p = Path(path)
    if p.is_dir():
        ckpt = CheckpointStore(p, model_cls=model_cls).latest()
        if ckpt is None:
            raise CheckpointError(f"no readable checkpoint in {p}")
        return ckpt
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    return _parse(p, model_cls or _default_model_cls())


def checkpoint_summary(ckpt: Checkpoint) -> dict[str, Any]:
    """The ``checkpoint show --json`` view of a checkpoint.

    Returns
    -------
    dict
        Exactly ``file``, ``created_at`` (ISO 8601, UTC), ``model_version``,
        ``n_samples_seen``, ``n_clusters``, ``dim``, ``counts`` (list), ``centroids`` (list of
        lists), ``sync_offset`` (the sync-log offset a shared model stands for; None for an
        instance's own model) and ``offsets`` (``{topic: {partition: next_offset}}``,
        partitions as strings).
    """
    model = ckpt.model
    counts = getattr(model, "counts_", None)
    centroids = getattr(model, "cluster_centers_", None)
    sync_offset = getattr(model, "sync_offset", None)
    return {
        "file": str(ckpt.path),
        "created_at": ckpt.meta.get("created_at"),
        "model_version": _model_int(model, "n_steps_") or 0,
        "n_samples_seen": _as_json_number(getattr(model, "n_samples_seen_", None)),
        "n_clusters": _model_int(model, "n_clusters"),
        "dim": _model_int(model, "n_features_in_"),
        "counts": [] if counts is None else np.asarray(counts).tolist(),
        "centroids": [] if centroids is None else np.asarray(centroids, np.float64).tolist(),
        "sync_offset": None if sync_offset is None else int(sync_offset),
        "offsets": _offsets_to_json(ckpt.offsets),
    }


def _as_json_number(value: Any) -> int | float | None:
    # Sample weights make n_samples_seen a float; keep whole numbers as ints.
    if value is None:
        return None
    f = float(value)
    return int(f) if f.is_integer() else f


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


class CheckpointTimer:
    """Says when a checkpoint is due: every ``interval_s`` on a monotonic clock.

    Parameters
    ----------
    interval_s : float
        Seconds between checkpoints.
    clock : callable, default time.monotonic
        Injectable for tests.

    Examples
    --------
    >>> now = [0.0]
    >>> t = CheckpointTimer(10, clock=lambda: now[0])
    >>> t.due()
    False
    >>> now[0] = 10.0
    >>> t.due()
    True
    >>> t.reset(); t.due()
    False
    """

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.interval_s = float(interval_s)
        self._clock = clock
        self._last = clock()

    def due(self) -> bool:
        """Whether ``interval_s`` has passed since the start or the last :meth:`reset`."""
        return self._clock() - self._last >= self.interval_s

    def remaining(self) -> float:
        """Seconds until :meth:`due`, 0.0 if it already is."""
        return max(0.0, self.interval_s - (self._clock() - self._last))

    def reset(self) -> None:
        """Start a new interval now (call after each checkpoint)."""
        self._last = self._clock()
