"""The Sink, its delivery reports and its transactions, over a stand-in producer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from confluent_kafka import KafkaError, KafkaException

from streamkm.errors import DecodeError, FencedError
from streamkm.errors import KafkaClientError as StreamkmKafkaError
from streamkm.records import HEADER_REASON, DeadLetter
from streamkm.sink import DeliveryReports, Sink, TransactionAborted, Transactions

pytestmark = pytest.mark.unit


class FakeProducer:
    """Records produced records; fails on cue."""

    def __init__(self) -> None:
        self.records: list[tuple[str, Any, Any, Any]] = []
        self.calls: list[str] = []
        self.full_at: set[int] = set()  # produce() numbers that raise BufferError once
        self.produce_error: KafkaError | None = None
        self.txn_errors: dict[str, list[KafkaError]] = {}
        self.unflushed = 0
        self.poll_error: KafkaError | None = None
        self._n = 0

    def produce(self, topic: str, value: Any = None, key: Any = None, headers: Any = None) -> None:
        self._n += 1
        if self._n in self.full_at:
            self.full_at.discard(self._n)
            raise BufferError("queue full")
        if self.produce_error is not None:
            raise KafkaException(self.produce_error)
        self.records.append((topic, value, key, headers))

    def poll(self, timeout: float = 0) -> int:
        self.calls.append(f"poll {timeout}")
        if self.poll_error is not None:
            raise KafkaException(self.poll_error)
        return 0

    def flush(self, timeout: float) -> int:
        self.calls.append("flush")
        left, self.unflushed = self.unflushed, max(0, self.unflushed - 1)
        return left

    def _txn(self, name: str) -> None:
        errors = self.txn_errors.get(name)
        if errors:
            raise KafkaException(errors.pop(0))
        self.calls.append(name)

    def init_transactions(self, timeout: float) -> None:
        self._txn("init")

    def begin_transaction(self) -> None:
        self._txn("begin")

    def send_offsets_to_transaction(self, offsets: Any, metadata: Any, timeout: float) -> None:
        self._txn("offsets")
        self.calls[-1] = "offsets " + ",".join(f"{tp.partition}:{tp.offset}" for tp in offsets)

    def commit_transaction(self, timeout: float) -> None:
        self._txn("commit")

    def abort_transaction(self, timeout: float) -> None:
        self._txn("abort")


@dataclass
class Rows:
    topic: str
    partitions: np.ndarray
    offsets: np.ndarray
    keys: list[bytes | None]


@dataclass
class Result:
    labels: np.ndarray
    distances: np.ndarray
    scores: np.ndarray


def batch(n: int, start: int = 0) -> tuple[Rows, Result]:
    offsets = np.arange(start, start + n, dtype=np.int64)
    rows = Rows("in", np.zeros(n, np.int32), offsets, [str(o).encode() for o in offsets.tolist()])
    result = Result(np.arange(n) % 2, np.full(n, 0.5), np.full(n, 1.5))
    return rows, result


def dead(offset: int) -> DeadLetter:
    return DeadLetter("in", 0, offset, b"k", b"junk", None, DecodeError("undecodable", "bad"))


def sink(producer: FakeProducer, **kw: Any) -> Sink:
    reports = kw.pop("reports", DeliveryReports(transactional=False))
    return Sink(producer, reports, "out", **kw)


def test_publish_writes_one_assignment_per_row_in_order_with_the_input_keys() -> None:
    producer = FakeProducer()
    rows, result = batch(3, start=40)
    n = sink(producer).publish(rows, result, version=9)
    assert n == 3
    assert [(t, k) for t, _, k, _ in producer.records] == [
        ("out", b"40"),
        ("out", b"41"),
        ("out", b"42"),
    ]
    first = json.loads(producer.records[0][1])
    assert first == {"cluster": 0, "distance": 0.5, "score": 1.5, "model_version": 9,
                     "topic": "in", "partition": 0, "offset": 40}  # fmt: skip


def test_emit_mask_skips_replayed_rows_and_dead_letters_go_with_their_reason() -> None:
    producer = FakeProducer()
    rows, result = batch(4)
    n = sink(producer, dead_letter_topic="dlq").publish(
        rows, result, [dead(7)], version=1, emit=np.array([False, True, False, True])
    )
    assert n == 2
    assert [json.loads(v)["offset"] for t, v, _, _ in producer.records if t == "out"] == [1, 3]
    (topic, value, key, headers) = producer.records[-1]
    assert (topic, value, key) == ("dlq", b"junk", b"k")
    assert dict(headers)[HEADER_REASON] == b"undecodable"


def test_without_a_dead_letter_topic_dead_letters_are_skipped() -> None:
    producer = FakeProducer()
    assert sink(producer).publish(Rows("in", np.zeros(0), np.zeros(0), []), None, [dead(1)]) == 0
    assert producer.records == []


def test_a_full_queue_is_waited_out_without_losing_or_reordering_records() -> None:
    producer = FakeProducer()
    producer.full_at = {2, 5}  # the 2nd and the 4th record find the queue full
    waited: list[int] = []
    rows, result = batch(5)
    sink(producer, waiting=lambda: waited.append(1)).publish(rows, result, version=1)
    assert [json.loads(v)["offset"] for _, v, _, _ in producer.records] == [0, 1, 2, 3, 4]
    assert len(waited) == 2


def test_keyless_records_go_without_a_key_and_a_queue_full_twice_loses_nothing() -> None:
    producer = FakeProducer()
    producer.full_at = {2, 3, 6}  # the 2nd record twice in a row, then the 4th
    waited: list[int] = []
    rows, result = batch(5)
    rows.keys = [None] * 5
    sink(producer, waiting=lambda: waited.append(1)).publish(rows, result, version=1)
    assert [json.loads(v)["offset"] for _, v, _, _ in producer.records] == [0, 1, 2, 3, 4]
    assert {k for _, _, k, _ in producer.records} == {None}
    assert len(waited) == 3


def test_a_full_queue_with_some_keys_keeps_each_key_with_its_record() -> None:
    producer = FakeProducer()
    producer.full_at = {3}
    rows, result = batch(4)
    rows.keys = [None, b"a", None, b"b"]
    sink(producer).publish(rows, result, version=1)
    got = [(json.loads(v)["offset"], k) for _, v, k, _ in producer.records]
    assert got == [(0, None), (1, b"a"), (2, None), (3, b"b")]


def test_delivery_failures_stop_but_purged_records_of_an_abort_do_not() -> None:
    reports = DeliveryReports(transactional=True)
    counted: list[int] = []
    reports.on_failure = lambda: counted.append(1)

    class Msg:
        def topic(self) -> str:
            return "out"

    reports.on_delivery(None, Msg())
    reports.on_delivery(KafkaError(KafkaError._PURGE_QUEUE), Msg())
    reports.check()  # nothing counts yet
    reports.on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT, "timed out"), Msg())
    assert counted == [1]
    with pytest.raises(StreamkmKafkaError, match="1 record"):
        reports.check()
    with pytest.raises(StreamkmKafkaError):
        Sink(FakeProducer(), reports, "out").flush()


def test_flush_waits_until_everything_is_confirmed() -> None:
    producer = FakeProducer()
    producer.unflushed = 2
    waited: list[int] = []
    sink(producer, waiting=lambda: waited.append(1)).flush()
    assert producer.calls.count("flush") == 3 and len(waited) == 2


def test_abortable_commit_aborts_and_clears_the_purged_failures() -> None:
    producer = FakeProducer()
    reports = DeliveryReports(transactional=True)
    reports.failures.append("out: purged later")
    txn = Transactions(producer, reports)
    producer.txn_errors["commit"] = [
        KafkaError(KafkaError._STATE, "abortable", txn_requires_abort=True)
    ]
    txn.begin()
    with pytest.raises(TransactionAborted, match="committing"):
        txn.commit({("in", 0): 8}, group_metadata=object())
    assert producer.calls[:2] == ["begin", "offsets 0:8"] and "abort" in producer.calls
    assert reports.failures == []


def test_retriable_errors_are_retried_until_stopping_and_fencing_is_fatal() -> None:
    producer = FakeProducer()
    retriable = KafkaError(KafkaError.REQUEST_TIMED_OUT, "slow", retriable=True)
    producer.txn_errors["commit"] = [retriable, retriable]
    txn = Transactions(producer, DeliveryReports(transactional=True))
    txn.commit()
    assert producer.calls.count("commit") == 1 and "abort" not in producer.calls

    producer.txn_errors["commit"] = [retriable]
    stopping = Transactions(producer, DeliveryReports(transactional=True), stopping=lambda: True)
    with pytest.raises(StreamkmKafkaError, match="committing"):
        stopping.commit()

    producer.txn_errors["commit"] = [KafkaError(KafkaError._FENCED, "fenced", fatal=True)]
    with pytest.raises(FencedError, match="another instance"):
        txn.commit()


def test_a_fatal_error_served_by_poll_is_streamkms_error_not_a_traceback() -> None:
    producer = FakeProducer()
    out = sink(producer)
    out.poll()
    producer.poll_error = KafkaError(KafkaError._FENCED, "fenced", fatal=True)
    with pytest.raises(FencedError, match="another instance"):
        out.poll()
    producer.poll_error = KafkaError(KafkaError._FATAL, "broken", fatal=True)
    with pytest.raises(StreamkmKafkaError, match="serving delivery reports"):
        out.poll()


def test_init_transactions_waits_for_an_unreachable_broker() -> None:
    producer = FakeProducer()
    down = KafkaError(KafkaError._TRANSPORT, "broker down", retriable=True)
    producer.txn_errors["init"] = [down, down]
    seen: list[str] = []
    Transactions(producer, DeliveryReports(transactional=True)).init(on_retry=seen.append)
    assert producer.calls.count("init") == 1 and len(seen) == 2
    producer.txn_errors["init"] = [KafkaError(KafkaError._FATAL, "fatal", fatal=True)]
    with pytest.raises(StreamkmKafkaError, match="initialising"):
        Transactions(producer, DeliveryReports(transactional=True)).init()


def test_a_produce_error_in_a_transaction_aborts_it() -> None:
    producer = FakeProducer()
    producer.produce_error = KafkaError(KafkaError._STATE, "not in transaction")
    txn = Transactions(producer, DeliveryReports(transactional=True))
    rows, result = batch(2)
    with pytest.raises(TransactionAborted):
        sink(producer, transactions=txn).publish(rows, result, version=1)
    assert producer.calls[-2:] == ["abort", "poll 0"]
    # Outside a transaction the same error stops the daemon.
    with pytest.raises(StreamkmKafkaError):
        sink(producer).publish(rows, result, version=1)


def test_transactions_know_whether_one_is_open() -> None:
    producer = FakeProducer()
    txn = Transactions(producer, DeliveryReports(transactional=True))
    assert not txn.open
    txn.begin()
    assert txn.open
    txn.commit({("in", 0): 5}, None)
    assert not txn.open
    txn.begin()
    producer.txn_errors["commit"] = [KafkaError(KafkaError._STATE, "x", txn_requires_abort=True)]
    with pytest.raises(TransactionAborted):
        txn.commit()
    assert not txn.open and producer.calls[-2:] == ["abort", "poll 0"]


def test_the_model_is_published_in_its_own_transaction_and_an_abort_skips_it() -> None:
    producer = FakeProducer()
    txn = Transactions(producer, DeliveryReports(transactional=True))
    s = sink(producer, model_topic="models", model_key=b"g", transactions=txn)
    assert s.publish_model(4, {"dim": 2})
    assert producer.calls == ["begin", "commit"]
    topic, value, key, _ = producer.records[0]
    assert (topic, key, json.loads(value)["model_version"]) == ("models", b"g", 4)
    producer.txn_errors["commit"] = [KafkaError(KafkaError._STATE, "x", txn_requires_abort=True)]
    assert s.publish_model(5, {"dim": 2}) is False
    assert sink(FakeProducer()).publish_model(1, {}) is False  # no model topic


def test_closing_flushes_briefly_and_never_raises() -> None:
    producer = FakeProducer()

    def broken(timeout: float) -> int:
        raise RuntimeError("gone")

    producer.flush = broken  # type: ignore[method-assign]
    with sink(producer):
        pass
