"""The Source over a stand-in consumer: bulks, dead letters, consumer errors and rebalances."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from streamkm.codec import VectorDecoder
from streamkm.errors import KafkaClientError as StreamkmKafkaError
from streamkm.errors import StreamkmError
from streamkm.source import Source

pytestmark = pytest.mark.unit

DIM = 3


def vec(seed: int) -> bytes:
    return np.random.default_rng(seed).normal(size=DIM).astype("<f4").tobytes()


def msg(partition: int, offset: int, value: bytes | None = None, **kw: Any) -> Message:
    value = vec(offset) if value is None else value
    return Message(
        topic="in", partition=partition, offset=offset, value=value, timestamp=(1, 1000 + offset),
        **kw,
    )  # fmt: skip


class BadHeaders(Message):
    """A message whose header names are not UTF-8, as librdkafka can hand them over."""

    def headers(self) -> Any:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")


class FakeConsumer:
    def __init__(self, bulks: list[list[Message]] | None = None) -> None:
        self.bulks = list(bulks or [])
        self.calls: list[Any] = []
        self.callbacks: dict[str, Any] = {}
        self.committed_offsets: dict[tuple[str, int], int] = {}
        self.fail_commit = False
        self.during_consume: list[Any] = []  # callbacks to run inside the next consume()

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.calls.append(("subscribe", topics))
        self.callbacks = callbacks

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        self.calls.append(("consume", num_messages))
        for run in self.during_consume:
            run()
        self.during_consume = []
        return self.bulks.pop(0) if self.bulks else []

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [
            TopicPartition(tp.topic, tp.partition, self.committed_offsets.get((tp.topic, tp.partition), -1001))
            for tp in partitions
        ]  # fmt: skip

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        self.calls.append(("assign", [(tp.partition, tp.offset) for tp in partitions]))

    def incremental_unassign(self, partitions: list[TopicPartition]) -> None:
        self.calls.append(("unassign", [tp.partition for tp in partitions]))

    def seek(self, tp: TopicPartition) -> None:
        self.calls.append(("seek", tp.partition, tp.offset))

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        if self.fail_commit:
            raise KafkaException(KafkaError(KafkaError.REQUEST_TIMED_OUT, "slow", retriable=True))
        self.calls.append(("commit", [(tp.partition, tp.offset) for tp in offsets]))

    def close(self) -> None:
        self.calls.append(("close",))


class Listener:
    def __init__(self, starts: Mapping[tuple[str, int], int] | None = None) -> None:
        self.starts = dict(starts or {})
        self.events: list[Any] = []
        self.raise_on_revoke: StreamkmError | None = None

    def on_assigned(self, partitions: Any, committed: Any) -> Mapping[tuple[str, int], int]:
        self.events.append(("assigned", list(partitions), dict(committed)))
        return self.starts

    def on_revoked(self, partitions: Any) -> None:
        self.events.append(("revoked", list(partitions)))
        if self.raise_on_revoke is not None:
            raise self.raise_on_revoke

    def on_lost(self, partitions: Any) -> None:
        self.events.append(("lost", list(partitions)))


def source(consumer: FakeConsumer, **kw: Any) -> Source:
    return Source(consumer, "in", VectorDecoder("float32", dim=DIM, dtype=np.float32), **kw)


def test_a_bulk_of_two_partitions_gives_rows_arrays_and_the_span_of_each_partition() -> None:
    bulk_in = [msg(0, 10), msg(1, 3), msg(0, 11, key=b"k"), msg(1, 4)]
    bulk = source(FakeConsumer([bulk_in])).consume(100, 0.1)
    assert bulk is not None and len(bulk) == 4 and bulk.n_messages == 4 and bulk.seconds > 0
    assert bulk.X.dtype == np.float32 and bulk.X.shape == (4, DIM)
    np.testing.assert_array_equal(bulk.X[1], np.frombuffer(vec(3), "<f4"))
    assert bulk.partitions.tolist() == [0, 1, 0, 1]
    assert bulk.offsets.tolist() == [10, 3, 11, 4]
    assert bulk.keys == [None, None, b"k", None]
    assert bulk.timestamps is None  # not asked for
    assert bulk.first == {("in", 0): 10, ("in", 1): 3}
    assert bulk.next == {("in", 0): 12, ("in", 1): 5}


def test_timestamps_are_gathered_when_asked_for() -> None:
    bulk = source(FakeConsumer([[msg(0, 5), msg(0, 6)]]), timestamps=True).consume(10, 0.1)
    assert bulk is not None and bulk.timestamps is not None
    assert bulk.timestamps.tolist() == [1005, 1006]


def test_refused_messages_become_dead_letters_and_still_count_in_the_span() -> None:
    bad = BadHeaders(topic="in", partition=0, offset=21, value=b"abc")
    consumer = FakeConsumer(
        [[msg(0, 20), bad, msg(0, 22, b"", headers=[("trace", b"1")], key=b"e"), msg(0, 23)]]
    )
    bulk = source(consumer).consume(10, 0.1)
    assert bulk is not None
    assert bulk.offsets.tolist() == [20, 23] and bulk.keys == [None, None]
    assert [(d.offset, d.error.reason, d.headers_unreadable) for d in bulk.dead] == [
        (21, "undecodable", True),
        (22, "empty", False),
    ]
    assert bulk.dead[1].headers == [("trace", b"1")] and bulk.dead[1].key == b"e"
    assert bulk.dead[0].value == b"abc" and bulk.dead[0].topic == "in"
    assert bulk.first == {("in", 0): 20} and bulk.next == {("in", 0): 24}


def test_end_of_partition_is_no_error_and_a_fatal_one_raises() -> None:
    eof = Message(topic="in", partition=0, offset=5, error=KafkaError(KafkaError._PARTITION_EOF))
    consumer = FakeConsumer([[eof], [msg(0, 5), eof]])
    src = source(consumer)
    assert src.consume(10, 0.1) is None
    bulk = src.consume(10, 0.1)
    assert bulk is not None and bulk.offsets.tolist() == [5]

    fatal = Message(
        topic="in", partition=0, offset=5, error=KafkaError(KafkaError._FATAL, "x", fatal=True)
    )
    with pytest.raises(StreamkmKafkaError):
        source(FakeConsumer([[msg(0, 1), fatal]])).consume(10, 0.1)


def test_assignment_starts_partitions_where_the_listener_says_with_committed_offsets() -> None:
    consumer = FakeConsumer()
    consumer.committed_offsets = {("in", 0): 40}
    listener = Listener(starts={("in", 0): 30})
    src = source(consumer, read_committed_offsets=True)
    src.subscribe(listener)
    assert consumer.calls[0] == ("subscribe", ["in"])
    consumer.callbacks["on_assign"](consumer, [TopicPartition("in", 0), TopicPartition("in", 1)])
    assert listener.events == [("assigned", [("in", 0), ("in", 1)], {("in", 0): 40})]
    # Partition 0 starts at 30; partition 1, unknown to the listener, where the group says.
    assert consumer.calls[-1] == ("assign", [(0, 30), (1, -1001)])


def test_revoke_tells_the_listener_then_lets_go_and_its_failure_surfaces_in_consume() -> None:
    consumer = FakeConsumer()
    listener = Listener()
    listener.raise_on_revoke = StreamkmError("checkpoint failed")
    src = source(consumer)
    src.subscribe(listener)
    consumer.during_consume = [
        lambda: consumer.callbacks["on_revoke"](consumer, [TopicPartition("in", 2)])
    ]
    with pytest.raises(StreamkmError, match="checkpoint failed"):
        src.consume(10, 0.1)
    assert listener.events == [("revoked", [("in", 2)])]
    assert consumer.calls[-1] == ("unassign", [2])  # let go even so
    consumer.callbacks["on_lost"](consumer, [TopicPartition("in", 3)])
    assert listener.events[-1] == ("lost", [("in", 3)])


def test_closing_does_not_process_revoked_partitions_and_happens_once() -> None:
    consumer = FakeConsumer()
    listener = Listener()
    with source(consumer) as src:
        src.subscribe(listener)
    consumer.callbacks["on_revoke"](consumer, [TopicPartition("in", 0)])  # as close() does
    assert listener.events == [] and consumer.calls.count(("close",)) == 1
    src.close()
    assert consumer.calls.count(("close",)) == 1


def test_seek_and_commit_reach_the_consumer_and_a_failed_commit_is_only_a_warning() -> None:
    consumer = FakeConsumer()
    src = source(consumer)
    src.seek({("in", 0): 7})
    assert src.commit({("in", 0): 9}) is True
    assert consumer.calls[-2:] == [("seek", 0, 7), ("commit", [(0, 9)])]
    consumer.fail_commit = True
    assert src.commit({("in", 0): 10}) is False
    assert src.commit({}) is True
    assert src.group_members() is None
    assert source(consumer, members=lambda: 2).group_members() == 2
