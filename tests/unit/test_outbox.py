"""Shared-model mode: this instance's deltas on their way to the sync log (streamkm.shared.outbox)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from streamkm.shared.outbox import DeltaOutbox
from streamkm.shared.replica import Replica

pytestmark = pytest.mark.unit

D = 2


class FakeSync:
    def __init__(self) -> None:
        self.sent: list[list[Any]] = []
        self.rejected_own: list[Any] = []

    def send(self, deltas: list[Any]) -> None:
        self.sent.append(list(deltas))


def labelled(replica: Replica, partition: int, start: int, n: int) -> tuple[Any, Any]:
    X = np.random.default_rng(start).normal(size=(n, D)).astype(np.float32)
    labels, d2, _ = replica.assign(X)
    batch = SimpleNamespace(
        X=X, partitions=np.full(n, partition), offsets=np.arange(start, start + n)
    )
    return batch, SimpleNamespace(labels=labels, distances=np.sqrt(d2))


def test_at_least_once_holds_and_merges_until_the_interval_or_a_flush() -> None:
    now = [0.0]
    replica = Replica.from_centroids(np.array([[0.0, 0.0], [5.0, 5.0]]))
    outbox = DeltaOutbox("a", "in", sync_interval_s=1.0, clock=lambda: now[0])
    sync = FakeSync()
    for start in (0, 4):
        batch, result = labelled(replica, 0, start, 4)
        outbox.batch(
            sync, replica, batch, result, {("in", 0): start}, {("in", 0): start + 4}, False
        )
    assert sync.sent == []
    outbox.send_if_due(sync)
    (sent,) = sync.sent
    assert [(d.first, d.after, d.n) for d in sent] == [(0, 8, 8)]  # two batches, one delta
    batch, result = labelled(replica, 0, 8, 4)
    outbox.batch(sync, replica, batch, result, {("in", 0): 8}, {("in", 0): 12}, False)
    now[0] = 0.5
    outbox.send_if_due(sync)
    assert len(sync.sent) == 1  # the interval has not passed
    outbox.flush(sync)  # before offsets are committed: now
    assert [(d.first, d.after) for d in sync.sent[-1]] == [(8, 12)]


def test_in_a_transaction_deltas_go_at_once_and_an_abort_voids_them() -> None:
    replica = Replica.from_centroids(np.array([[0.0, 0.0], [5.0, 5.0]]))
    outbox = DeltaOutbox("a", "in", sync_interval_s=1.0)
    sync = FakeSync()
    batch, result = labelled(replica, 1, 20, 4)
    outbox.batch(sync, replica, batch, result, {("in", 1): 20}, {("in", 1): 24}, True)
    assert [(d.first, d.after) for d in sync.sent[0]] == [(20, 24)]
    outbox.aborted({("in", 1): 20})  # the transaction never reached the log
    outbox.batch(sync, replica, batch, result, {("in", 1): 20}, {("in", 1): 24}, True)
    assert [(d.first, d.after) for d in sync.sent[1]] == [(20, 24)]  # the redo sends it again


def test_a_refused_delta_of_an_owned_partition_is_read_again_from_where_the_log_stands() -> None:
    replica = Replica.from_centroids(np.array([[0.0, 0.0], [5.0, 5.0]]))
    outbox = DeltaOutbox("a", "in", sync_interval_s=1.0)
    sync = FakeSync()
    batch, result = labelled(replica, 0, 4, 4)
    outbox.batch(sync, replica, batch, result, {("in", 0): 4}, {("in", 0): 8}, True)
    other, result1 = labelled(replica, 1, 0, 4)
    outbox.batch(sync, replica, other, result1, {("in", 1): 0}, {("in", 1): 4}, True)
    sync.rejected_own = [*sync.sent[0], *sync.sent[1]]
    again = outbox.refused(sync, {("in", 0): 10}, assigned=[("in", 0)])
    assert again == {("in", 0): 10}  # partition 1 is not ours any more: ignored
    assert sync.rejected_own == []
    sync.rejected_own = list(sync.sent[0])  # the same refusal again: an older reading
    assert outbox.refused(sync, {("in", 0): 10}, assigned=[("in", 0)]) == {}
    assert outbox.refused(sync, {}, assigned=[]) == {}
