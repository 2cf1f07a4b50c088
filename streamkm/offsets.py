"""Every offset the daemon knows, and the delivery rules over them, in one place.

The rules (README, "Delivery guarantees"):

* A batch is everything consumed and not yet processed; once processed, the next offset of a
  partition is one past the last message seen there (:meth:`OffsetTracker.batch_done`).
* On assignment a partition starts where the model stopped (:attr:`~OffsetTracker.positions`,
  from the checkpoint); a partition the model never absorbed starts at the first offset its
  lineage consumed (:attr:`~OffsetTracker.origins`, kept in ``origins.json`` next to the
  checkpoints and written before any of its offsets can be committed), else at the group's.
* Exactly-once: inputs between the checkpoint and the group's committed offset were published
  before a crash; they are absorbed into the model again but not published
  (:meth:`~OffsetTracker.emit_mask`), and a transaction never moves a committed offset back
  (:meth:`~OffsetTracker.transaction_offsets`).
* At-least-once: the group's offsets are committed after a durable checkpoint, and are that
  checkpoint's (:meth:`~OffsetTracker.group_offsets`).

This module makes no Kafka call.

Examples
--------
>>> t = OffsetTracker(None)
>>> t.restore({("in", 0): 10})
>>> t.on_assigned([("in", 0)], committed={("in", 0): 12})
{('in', 0): 10}
>>> t.consumed({("in", 0): 10}, {("in", 0): 14})
>>> t.emit_mask("in", np.array([0, 0, 0, 0]), np.array([10, 11, 12, 13])).tolist()
[False, False, True, True]
>>> first, after = t.take_pending()
>>> t.transaction_offsets(after), t.batch_done(after), t.positions
({('in', 0): 14}, None, {('in', 0): 14})
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from streamkm.errors import CheckpointError
from streamkm.fileformat import write_atomic

log = logging.getLogger(__name__)

TopicPart = tuple[str, int]
ORIGINS_FILE = "origins.json"


class OffsetTracker:
    """Consumed, processed, checkpointed and replayed offsets of every partition.

    Parameters
    ----------
    origins_path : Path or None
        Where the lineage origins are kept (``<checkpoint dir>/origins.json``); None keeps
        them in memory only.

    Attributes
    ----------
    positions : dict of (topic, partition) to int
        Next offset after the last input the model absorbed.
    checkpointed : dict of (topic, partition) to int
        The positions in the newest checkpoint.
    origins : dict of (topic, partition) to int
        First offset a model lineage consumed of each partition.
    replay_until : dict of (topic, partition) to int
        Exactly-once: inputs below this offset are absorbed but not published.
    assigned : set of (topic, partition)
        Partitions this instance owns now.
    """

    def __init__(self, origins_path: Path | None) -> None:
        self.origins_path = origins_path
        self.positions: dict[TopicPart, int] = {}
        self.checkpointed: dict[TopicPart, int] = {}
        self.origins: dict[TopicPart, int] = {}
        self.replay_until: dict[TopicPart, int] = {}
        self.assigned: set[TopicPart] = set()
        self._first: dict[TopicPart, int] = {}  # consumed since the last batch: rewind target
        self._next: dict[TopicPart, int] = {}  # ... and the positions once it is processed

    # -- start-up ----------------------------------------------------------------------------

    def restore(self, offsets: Mapping[TopicPart, int]) -> None:
        """Start from a checkpoint's offsets."""
        self.positions = dict(offsets)
        self.checkpointed = dict(offsets)

    def load_origins(self) -> None:
        """Read ``origins.json`` (a missing or unreadable file means no origins)."""
        path = self.origins_path
        if path is None:
            return
        try:
            raw = json.loads(path.read_text())
            self.origins = {
                (t, int(p)): int(o) for t, parts in raw.items() for p, o in parts.items()
            }
        except FileNotFoundError:
            self.origins = {}
        except (ValueError, AttributeError, OSError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            self.origins = {}

    def _write_origins(self) -> None:
        if self.origins_path is None:
            return
        out: dict[str, dict[str, int]] = {}
        for (t, p), o in sorted(self.origins.items()):
            out.setdefault(t, {})[str(p)] = o
        try:
            write_atomic(self.origins_path, json.dumps(out).encode())
        except OSError as exc:
            raise CheckpointError(f"cannot write {self.origins_path}: {exc.strerror}") from exc

    # -- assignment --------------------------------------------------------------------------

    def on_assigned(
        self, partitions: Iterable[TopicPart], committed: Mapping[TopicPart, int]
    ) -> dict[TopicPart, int]:
        """Take partitions on; return where each known one starts.

        ``committed``: the group's committed offsets (exactly-once); those above the start
        mark inputs to replay into the model without publishing them.
        """
        starts: dict[TopicPart, int] = {}
        for key in partitions:
            start = self.positions.get(key, self.origins.get(key))
            if start is not None:
                starts[key] = start
                done = committed.get(key)
                if done is not None and done > start:
                    self.replay_until[key] = done
                    log.info(
                        "replaying %s[%d] offsets %d..%d into the model", *key, start, done - 1
                    )
            self.assigned.add(key)
        return starts

    def on_assigned_shared(
        self,
        partitions: Iterable[TopicPart],
        committed: Mapping[TopicPart, int],
        absorbed: Mapping[TopicPart, int],
    ) -> dict[TopicPart, int]:
        """Shared-model mode: take partitions on where the group left them.

        The model is the sync log's, not this instance's: a partition starts at the group's
        committed offset (exactly-once: where the last transaction of its previous owner
        ended, which the log has absorbed), else where the log's model stopped, else at its
        lineage origin. Inputs repeated below what the log absorbed are published again
        (at-least-once) but never learnt twice (the deltas leave them out).
        """
        starts: dict[TopicPart, int] = {}
        for key in partitions:
            start = committed.get(key, absorbed.get(key, self.origins.get(key)))
            if start is not None:
                starts[key] = start
                self.positions[key] = start
            self.assigned.add(key)
        return starts

    def rewind_to(self, key: TopicPart, offset: int) -> None:
        """Read ``key`` again from ``offset`` without publishing what was published before."""
        published = self.positions.get(key, offset)
        if published > offset:
            self.replay_until[key] = max(self.replay_until.get(key, 0), published)
        self.positions[key] = offset
        self._first.pop(key, None)
        self._next.pop(key, None)

    def let_go(self, partitions: Iterable[TopicPart]) -> None:
        """The partitions are no longer this instance's."""
        for key in partitions:
            self.assigned.discard(key)
            self.replay_until.pop(key, None)

    def forget(self, partitions: Iterable[TopicPart]) -> None:
        """Drop what was consumed of these partitions and not processed."""
        for key in partitions:
            self._first.pop(key, None)
            self._next.pop(key, None)

    # -- the loop ----------------------------------------------------------------------------

    def consumed(self, first: Mapping[TopicPart, int], after: Mapping[TopicPart, int]) -> None:
        """Note a consumed bulk: its first offset and one past its last, per partition.

        A partition no model has absorbed gets its lineage origin here, written to disk before
        the bulk goes any further (a restart without a checkpoint replays from it).
        """
        new_origin = False
        for key, o in first.items():
            if key not in self._first:
                self._first[key] = o
                if key not in self.positions and key not in self.origins:
                    self.origins[key] = o
                    new_origin = True
        self._next.update(after)
        if new_origin:
            self._write_origins()

    @property
    def pending(self) -> bool:
        """Whether anything was consumed since the last batch."""
        return bool(self._next)

    def take_pending(self) -> tuple[dict[TopicPart, int], dict[TopicPart, int]]:
        """Hand over the pending batch's (first, after) offsets and start a new one."""
        first, after = self._first, self._next
        self._first, self._next = {}, {}
        return first, after

    def rewind_targets(self, first: Mapping[TopicPart, int]) -> dict[TopicPart, int]:
        """Where to seek to read a dropped batch again: its first offsets, owned partitions only."""
        return {key: o for key, o in first.items() if key in self.assigned}

    def batch_done(self, after: Mapping[TopicPart, int]) -> None:
        """A batch is absorbed (and published): advance the positions, end finished replays."""
        self.positions.update(after)
        for key, until in list(self.replay_until.items()):
            if after.get(key, 0) >= until:
                del self.replay_until[key]

    def emit_mask(
        self, topic: str, partitions: np.ndarray, offsets: np.ndarray
    ) -> np.ndarray | None:
        """Rows to publish (bool of shape (n,)); None means all of them.

        Exactly-once only: rows below a partition's replay bound were published before.
        """
        if not self.replay_until or not len(offsets):
            return None
        limit = np.full(len(offsets), -1, dtype=np.int64)
        for (t, p), until in self.replay_until.items():
            if t == topic:
                limit[partitions == p] = until
        return np.asarray(offsets >= limit)

    def replayed(self, topic: str, partition: int, offset: int) -> bool:
        """Whether this input was published before a crash (exactly-once replay)."""
        return offset < self.replay_until.get((topic, partition), -1)

    def transaction_offsets(self, after: Mapping[TopicPart, int]) -> dict[TopicPart, int]:
        """The input offsets a batch's transaction commits.

        A partition still replaying keeps its committed offset: that offset says which
        assignments were already published, and moving it back would publish them again.
        """
        return {
            key: o
            for key, o in after.items()
            if key in self.assigned and o >= self.replay_until.get(key, 0)
        }

    def group_offsets(
        self, checkpointed: Mapping[TopicPart, int] | None = None
    ) -> dict[TopicPart, int]:
        """At-least-once: the offsets to commit to the group after a durable checkpoint.

        ``checkpointed``: the offsets that checkpoint holds (by default the positions now);
        only partitions this instance still owns are committed.
        """
        offsets = self.positions if checkpointed is None else checkpointed
        return {key: o for key, o in offsets.items() if key in self.assigned}

    def checkpointed_now(self, offsets: Mapping[TopicPart, int] | None = None) -> None:
        """A checkpoint holding ``offsets`` (by default the positions now) is durable."""
        self.checkpointed = dict(self.positions if offsets is None else offsets)


def format_offsets(offsets: Mapping[TopicPart, int]) -> str:
    """``topic[p]=offset, …`` for log lines."""
    return ", ".join(f"{t}[{p}]={o}" for (t, p), o in sorted(offsets.items())) or "none"


__all__ = ["ORIGINS_FILE", "OffsetTracker", "TopicPart", "format_offsets"]
