"""Shared-model mode: what this instance learnt, on its way to the sync log.

After every batch :class:`DeltaOutbox` turns the labelled rows into one delta per input
partition (:class:`~streamkm.shared.sync.DeltaBuilder`, which leaves out rows the log has
absorbed already) and sends them:

* exactly-once, at once, inside the batch's transaction (with its assignments and offsets);
* at-least-once, held and merged, and sent every ``kafka.sync_interval_ms`` — and always
  before the group's offsets are committed (:meth:`DeltaOutbox.flush`): a committed input must
  be in the log.

A delta the log refused (another instance's delta for the same offsets came first) means the
partition is read again from where the log stands: :meth:`DeltaOutbox.refused` says where.

Examples
--------
>>> outbox = DeltaOutbox("instance-a", "vectors", sync_interval_s=0.2)   # doctest: +SKIP
>>> outbox.batch(sync, replica, batch, result, first, after, in_transaction=False)  # doctest: +SKIP
>>> outbox.send_if_due(sync)                                         # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from streamkm.shared.sync import DeltaBuilder, SyncLog

log = logging.getLogger(__name__)

TopicPart = tuple[str, int]


class DeltaOutbox:
    """This instance's deltas: built per batch, held or sent, rewound when refused.

    Parameters
    ----------
    instance : str
        ``delivery.instance_id``: the deltas' author.
    topic : str
        The input topic.
    sync_interval_s : float
        At-least-once: held deltas go out this often (``kafka.sync_interval_ms``).
    clock : callable, default time.monotonic
        Injectable for tests.
    """

    def __init__(
        self,
        instance: str,
        topic: str,
        sync_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.builder = DeltaBuilder(instance)
        self.topic = topic
        self.sync_interval_s = sync_interval_s
        self.clock = clock
        self._next_send = 0.0

    def batch(
        self,
        sync: SyncLog,
        replica: Any,
        batch: Any,
        result: Any,
        first: Mapping[TopicPart, int],
        after: Mapping[TopicPart, int],
        in_transaction: bool,
    ) -> None:
        """The deltas of a labelled batch (``result`` None: dead letters only): sent now in
        the open transaction, else held."""
        labels = None if result is None else result.labels
        d2 = None if result is None else result.distances**2
        deltas = self.builder.build(
            replica, self.topic, batch.X, batch.partitions, batch.offsets, labels, d2,
            first, after,
        )  # fmt: skip
        if in_transaction:
            sync.send(deltas)
        else:
            self.builder.hold(deltas)

    def send_if_due(self, sync: SyncLog | None) -> None:
        """At-least-once: send the held deltas every ``sync_interval_s``."""
        if sync is not None and self.builder.holding and self.clock() >= self._next_send:
            self.flush(sync)

    def flush(self, sync: SyncLog | None) -> None:
        """Send every held delta now (before offsets are committed)."""
        if sync is None or not self.builder.holding:
            return
        self._next_send = self.clock() + self.sync_interval_s
        sync.send(self.builder.take())

    def aborted(self, first: Mapping[TopicPart, int]) -> None:
        """The transaction holding deltas from ``first`` on was aborted: they never reached
        the log, and the batches are redone."""
        for key, o in first.items():
            self.builder.sent_until[key] = o

    def refused(
        self, sync: SyncLog, absorbed: Mapping[TopicPart, int], assigned: Iterable[TopicPart]
    ) -> dict[TopicPart, int]:
        """The partitions whose delta the log refused, and where to read each again.

        ``absorbed``: how far the log's model has absorbed each partition. Deltas of
        partitions no longer owned, or of an older reading, are ignored.
        """
        if not sync.rejected_own:
            return {}
        rejected, sync.rejected_own = sync.rejected_own, []
        owned = set(assigned)
        again: dict[TopicPart, int] = {}
        for delta in rejected:
            key = (delta.topic, delta.partition)
            if key not in owned or delta.epoch != self.builder.epoch.get(key, 0):
                continue
            to = absorbed.get(key, delta.first)
            log.warning(
                "the sync log refused a delta of %s[%d] (offsets %d..%d; it holds up to %d): "
                "reading the partition again from %d", *key, delta.first, delta.after - 1,
                to - 1, to,
            )  # fmt: skip
            self.builder.rewind(key, to)
            again[key] = to
        return again

    def forget(self, partitions: Iterable[TopicPart]) -> None:
        """The partitions are another member's now."""
        for key in partitions:
            self.builder.forget(key)


__all__ = ["DeltaOutbox"]
