"""The conductor (streamkm.app.App) driven through its parts, without a broker.

The clients come from a factory that wraps stand-ins for confluent-kafka's consumer and producer
in the real Source, Sink and Transactions, so what is tested is the loop's own logic: the
order of batch, publish, commit and checkpoint, the redo after an abort, replays, rebalances.
Abortable errors are hard to provoke on a healthy broker, hence a producer that fails on cue.
(Everything that needs Kafka itself runs in tests/integration.)
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import CollectorRegistry

from streamkm.app import App
from streamkm.clients import Clients
from streamkm.codec import REASONS
from streamkm.config import Settings
from streamkm.errors import CheckpointError, FencedError
from streamkm.learner import learner_from_settings
from streamkm.sink import DeliveryReports, Sink, Transactions
from streamkm.source import Source
from tests.unit.gated_store import GatedStore

pytestmark = pytest.mark.unit

DIM = 3


class FakeProducer:
    """Records calls; ``fail`` holds errors to raise from commit_transaction, in order."""

    def __init__(self, fail: list[KafkaError] | None = None) -> None:
        self.fail = fail or []
        self.calls: list[str] = []
        self.produced: list[tuple[str, bytes]] = []
        self.pending: list[tuple[str, bytes]] = []
        self.transactional = False

    def init_transactions(self, timeout: float) -> None:
        self.transactional = True

    def begin_transaction(self) -> None:
        self.calls.append("begin")
        self.pending = []

    def produce(self, topic: str, value: bytes, key: Any = None, headers: Any = None) -> None:
        (self.pending if self.transactional else self.produced).append((topic, value))

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        self.calls.append("flush")
        return 0

    def send_offsets_to_transaction(self, offsets: Any, metadata: Any, timeout: float) -> None:
        self.calls.append("offsets " + ",".join(f"{tp.partition}:{tp.offset}" for tp in offsets))

    def commit_transaction(self, timeout: float) -> None:
        if self.fail:
            raise KafkaException(self.fail.pop(0))
        self.calls.append("commit")
        self.produced += self.pending

    def abort_transaction(self, timeout: float) -> None:
        self.calls.append("abort")
        self.pending = []

    def values(self, topic: str = "out") -> list[bytes]:
        return [v for t, v in self.produced if t == topic]


class FakeConsumer:
    """Hands out queued messages; the test plays the group coordinator through ``assign``."""

    def __init__(self, committed: dict[int, int] | None = None) -> None:
        self.queue: list[Any] = []
        self.seeks: list[tuple[int, int]] = []
        self.commits: list[list[tuple[int, int]]] = []
        self.committed_offsets = committed or {}
        self.callbacks: dict[str, Any] = {}
        self.closed = False
        self.pos: dict[int, int] = {}
        self.high: dict[int, int] = {}  # end offset of each partition, as the broker says
        self.paused: set[int] = set()

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.callbacks = callbacks

    def assign(self, *partitions: int) -> list[TopicPartition]:
        tps = [TopicPartition("in", p) for p in partitions]
        self.callbacks["on_assign"](self, tps)
        return tps

    def revoke(self, *partitions: int) -> None:
        self.callbacks["on_revoke"](self, [TopicPartition("in", p) for p in partitions])

    def lose(self, *partitions: int) -> None:
        self.callbacks["on_lost"](self, [TopicPartition("in", p) for p in partitions])

    def incremental_assign(self, partitions: Any) -> None:
        pass

    def incremental_unassign(self, partitions: Any) -> None:
        pass

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [
            TopicPartition(tp.topic, tp.partition, self.committed_offsets.get(tp.partition, -1001))
            for tp in partitions
        ]

    def pause(self, tps: list[TopicPartition]) -> None:
        self.paused |= {tp.partition for tp in tps}

    def resume(self, tps: list[TopicPartition]) -> None:
        self.paused -= {tp.partition for tp in tps}

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        if self.paused:  # paused partitions bring nothing
            return []
        out, self.queue = self.queue[:num_messages], self.queue[num_messages:]
        for m in out:
            self.pos[m.partition()] = m.offset() + 1
        return out

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.pos.get(tp.partition, -1001))
                for tp in tps]  # fmt: skip

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool = False) -> tuple[int, int]:
        return 0, self.high.get(tp.partition, -1001)

    def seek(self, tp: Any) -> None:
        self.seeks.append((tp.partition, tp.offset))

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.commits.append([(tp.partition, tp.offset) for tp in offsets])

    def consumer_group_metadata(self) -> object:
        return object()

    def close(self) -> None:
        self.closed = True


def make_app(
    tmp_path: Path,
    producer: FakeProducer,
    consumer: FakeConsumer,
    guarantee: str = "exactly-once",
    own_registry: bool = True,
    transaction_ms: int = 0,
    dim: int | None = DIM,
    when_lost: str = "new-model",
    model_reader: Any = None,
    reset_model: bool = False,
) -> App:
    settings = Settings.model_validate(
        {
            "kafka": {
                "input_topic": "in",
                "output_topic": "out",
                "dead_letter_topic": "dead",
                "model_topic": "models" if model_reader is not None else None,
            },
            "input": {"format": "float32", "dim": dim},
            "model": {"n_clusters": 2, "batch_size": 4, "init_size": 4, "seed": 0},
            "checkpoint": {"dir": str(tmp_path / "ckpt"), "when_lost": when_lost},
            "delivery": {"guarantee": guarantee, "transaction_ms": transaction_ms},
        }
    )

    @contextlib.contextmanager
    def clients(settings, decoder, health, metrics, stopping) -> Iterator[Clients]:  # type: ignore[no-untyped-def]
        exactly_once = guarantee == "exactly-once"
        reports = DeliveryReports(exactly_once)
        txn = Transactions(producer, reports, stopping) if exactly_once else None
        if txn is not None:
            txn.init()
        sink = Sink(producer, reports, "out", dead_letter_topic="dead", transactions=txn)
        source = Source(consumer, "in", decoder, read_committed_offsets=True)
        with sink, source:
            yield Clients(source, sink, txn, model_reader=model_reader)

    registry = CollectorRegistry() if own_registry else None
    app = App(settings, reset_model=reset_model, registry=registry, clients=clients)
    app.start()
    return app


def messages(start: int, n: int, partition: int = 0) -> list[Message]:
    rng = np.random.default_rng(start)
    return [
        Message(
            topic="in",
            partition=partition,
            offset=start + i,
            key=str(start + i).encode(),
            value=rng.normal(size=DIM).astype("<f4").tobytes(),
        )
        for i in range(n)
    ]


def offsets_of(values: list[bytes]) -> list[int]:
    return [int(v.split(b'"offset":')[1].rstrip(b"}")) for v in values]


def test_abortable_commit_aborts_restores_the_model_and_rewinds(tmp_path: Path) -> None:
    producer, consumer = FakeProducer(), FakeConsumer()
    app = make_app(tmp_path, producer, consumer)
    with app.connected():
        consumer.assign(0)
        consumer.queue = messages(0, 4)
        app.turn()  # the first batch seeds the model
        model_before = app.model.cluster_centers_.copy()
        steps_before = app.model.n_steps_
        producer.fail = [KafkaError(KafkaError._STATE, "abortable", txn_requires_abort=True)]

        consumer.queue = messages(4, 4)
        app.turn()  # its commit fails with an abortable error
        assert producer.calls[-1] == "abort"
        assert app.model.n_steps_ == steps_before  # the model is as before the batch
        np.testing.assert_array_equal(app.model.cluster_centers_, model_before)
        assert app.offsets.positions == {("in", 0): 4}  # nothing of the batch counts as done
        assert consumer.seeks == [(0, 4)]  # the batch is read again from its first offset
        assert offsets_of(producer.values()) == [0, 1, 2, 3]  # its records never committed

        consumer.queue = messages(4, 4)  # the redo
        app.turn()
        assert producer.calls[-2:] == ["offsets 0:8", "commit"]
        assert app.offsets.positions == {("in", 0): 8}
        assert app.model.n_samples_seen_ == 8
        assert offsets_of(producer.values()) == list(range(8))


def test_a_transaction_spans_batches_and_an_abort_redoes_them_all(tmp_path: Path) -> None:
    producer, consumer = FakeProducer(), FakeConsumer()
    app = make_app(tmp_path, producer, consumer, transaction_ms=60_000)
    with app.connected():
        consumer.assign(0)
        consumer.queue = messages(0, 4)
        app.turn()  # seeds; its transaction stays open (60 s window)
        app.checkpoint()  # a checkpoint commits it first: it holds committed input only
        assert producer.calls[-3:] == ["offsets 0:4", "commit", "flush"]
        centres, steps = app.model.cluster_centers_.copy(), app.model.n_steps_
        consumer.queue = messages(4, 8)
        app.turn()
        app.turn()  # two batches in one open transaction
        assert producer.calls.count("begin") == 2 and producer.calls[-1] == "begin"
        assert app.offsets.positions == {("in", 0): 4}  # nothing counts until the commit
        producer.fail = [KafkaError(KafkaError._STATE, "abortable", txn_requires_abort=True)]
        app.checkpoint()  # the commit fails: both batches are undone and read again
        assert producer.calls[-2:] == ["abort", "flush"] and consumer.seeks == [(0, 4)]
        assert app.model.n_steps_ == steps
        np.testing.assert_array_equal(app.model.cluster_centers_, centres)
        consumer.queue = messages(4, 8)
        app.turn()
        app.turn()
        app.checkpoint()
        assert producer.calls[-3:] == ["offsets 0:12", "commit", "flush"]
        assert offsets_of(producer.values()) == list(range(12))
        assert app.model.n_samples_seen_ == 12


def test_retriable_commit_is_retried_and_fencing_is_fatal(tmp_path: Path) -> None:
    retriable = KafkaError(KafkaError.REQUEST_TIMED_OUT, "slow", retriable=True)
    producer, consumer = FakeProducer([retriable, retriable]), FakeConsumer()
    app = make_app(tmp_path, producer, consumer)
    with app.connected():
        consumer.assign(0)
        consumer.queue = messages(0, 4)
        app.turn()
        assert producer.calls.count("commit") == 1 and "abort" not in producer.calls

        producer.fail = [KafkaError(KafkaError._FENCED, "fenced", fatal=True)]
        consumer.queue = messages(4, 4)
        with pytest.raises(FencedError, match="another instance"):
            app.turn()


def test_replayed_inputs_are_absorbed_but_not_published(tmp_path: Path) -> None:
    producer = FakeProducer()
    consumer = FakeConsumer(committed={0: 6})  # offsets 0..5 were published before a crash
    app = make_app(tmp_path, producer, consumer)
    app.offsets.origins[("in", 0)] = 0  # the lineage began at 0 (origins.json), no checkpoint
    with app.connected():
        consumer.assign(0)
        assert app.offsets.replay_until == {("in", 0): 6}
        consumer.queue = messages(0, 4)
        app.turn()
        # Nothing re-published, and the committed offset is not moved back below 6.
        assert producer.values() == [] and producer.calls[-1] == "commit"
        assert not any(c.startswith("offsets") for c in producer.calls)
        consumer.queue = messages(4, 4)
        app.turn()
        assert producer.calls[-2] == "offsets 0:8"
        assert offsets_of(producer.values()) == [6, 7]
        assert app.model.n_samples_seen_ == 8 and ("in", 0) not in app.offsets.replay_until


def test_dead_letters_are_published_in_order_with_their_batch(tmp_path: Path) -> None:
    producer, consumer = FakeProducer(), FakeConsumer()
    app = make_app(tmp_path, producer, consumer, guarantee="at-least-once")
    with app.connected():
        consumer.assign(0)
        bad = Message(topic="in", partition=0, offset=4, key=b"bad", value=b"\x00")
        consumer.queue = [*messages(0, 4), bad, *messages(5, 4)]
        app.turn()  # the first four seed the model
        assert producer.values("dead") == []
        app.turn()  # the dead letter and three rows: it waits with them for the batch
        assert producer.values("dead") == [] and len(app.batcher) == 3
        app.turn()  # the fourth row: the batch and its dead letter go out
        assert len(producer.values("dead")) == 1
        assert offsets_of(producer.values()) == [0, 1, 2, 3, 5, 6, 7, 8]
        assert app.offsets.positions == {("in", 0): 9}
        sample = app.metrics.registry.get_sample_value
        counted = {
            r: sample("streamkm_messages_dead_lettered_total", {"reason": r}) for r in REASONS
        }
        assert sum(counted.values()) == 1, counted


def test_checkpoint_flushes_then_writes_then_commits_the_group_offsets(tmp_path: Path) -> None:
    producer, consumer = FakeProducer(), FakeConsumer()
    app = make_app(tmp_path, producer, consumer, guarantee="at-least-once")
    with app.connected():
        consumer.assign(0)
        consumer.queue = messages(0, 4)
        app.turn()
        assert consumer.commits == [] and app.checkpointer.dirty
        app.checkpoint()
        assert producer.calls[-1] == "flush"
        assert consumer.commits == [[(0, 4)]]
        assert app.offsets.checkpointed == {("in", 0): 4}
        assert not app.checkpointer.dirty
    restarted = make_app(tmp_path, FakeProducer(), FakeConsumer(), guarantee="at-least-once")
    assert restarted.model is not None and restarted.model.n_samples_seen_ == 4
    assert restarted.offsets.positions == {("in", 0): 4}


def test_revoke_finishes_the_batch_and_lost_partitions_are_dropped(tmp_path: Path) -> None:
    producer, consumer = FakeProducer(), FakeConsumer()
    app = make_app(tmp_path, producer, consumer, guarantee="at-least-once")
    with app.connected():
        consumer.assign(0, 1)
        consumer.queue = messages(0, 4)
        app.turn()  # seeds
        consumer.queue = [*messages(4, 1, partition=0), *messages(10, 2, partition=1)]
        app.turn()  # three rows wait for the batch (or its timeout)
        assert len(app.batcher) == 3
        consumer.lose(1)  # partition 1's rows are another member's now
        assert len(app.batcher) == 1 and ("in", 1) not in app.offsets.assigned
        consumer.revoke(0)  # partition 0's row is processed and checkpointed before it goes
        assert len(app.batcher) == 0
        assert offsets_of(producer.values()) == [0, 1, 2, 3, 4]
        assert consumer.commits[-1] == [(0, 5)]
        assert app.offsets.assigned == set()


def test_lag_comes_from_the_position_from_the_first_batch(tmp_path: Path) -> None:
    producer, consumer = FakeProducer(), FakeConsumer()
    app = make_app(tmp_path, producer, consumer, guarantee="exactly-once")
    sample = app.metrics.registry.get_sample_value
    with app.connected():
        consumer.assign(0)
        consumer.high = {0: 1000}  # 1000 inputs wait in partition 0
        consumer.queue = messages(0, 4)
        app.turn()
        # Exactly-once commits through transactions, so librdkafka's statistics never had it.
        assert sample("streamkm_consumer_lag", {"topic": "in", "partition": "0"}) == 996
        assert sample("streamkm_rows_held") == 0


def test_a_lost_checkpoint_volume_is_said_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = FakeConsumer(committed={0: 500})  # the group went on; no checkpoint here
    app = make_app(tmp_path, FakeProducer(), consumer, guarantee="at-least-once")
    with app.connected(), caplog.at_level("ERROR"):
        consumer.assign(0)
    assert "no checkpoint in" in caplog.text and "in[0]@500" in caplog.text


def published_model(version: int = 7) -> tuple[bytes, Any]:
    """A model record as the daemon publishes it, and the model it was taken from."""
    from streamkm.learner import KMeansLearner
    from streamkm.records import model_record

    learner = learner_from_settings(
        Settings.model_validate({"model": {"n_clusters": 2, "batch_size": 4, "seed": 0}})
    )
    rng = np.random.default_rng(5)
    for _ in range(version):
        learner.step(np.concatenate([rng.normal(0, 1, (2, DIM)), rng.normal(9, 1, (2, DIM))]))
    assert isinstance(learner, KMeansLearner) and learner.version == version
    return model_record(learner.version, learner.public_state()), learner.estimator


def test_a_lost_volume_stops_the_daemon_when_asked(tmp_path: Path) -> None:
    producer, consumer = FakeProducer(), FakeConsumer(committed={0: 500})
    app = make_app(tmp_path, producer, consumer, "at-least-once", when_lost="stop")
    with app.connected():
        consumer.assign(0)
        consumer.queue = messages(500, 4)
        with pytest.raises(CheckpointError, match=r'in\[0\]@500.*when_lost = "stop": exiting'):
            app.turn()
    assert app.model is None and producer.values() == []  # nothing learnt, nothing published
    assert len(app.batcher) == 0 and app.offsets.positions == {}
    assert not (tmp_path / "ckpt" / "origins.json").exists()  # the next start stops again


def test_reset_model_starts_a_new_model_whatever_when_lost_says(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = FakeConsumer(committed={0: 500})
    app = make_app(
        tmp_path, FakeProducer(), consumer, "at-least-once", when_lost="stop", reset_model=True
    )
    with app.connected(), caplog.at_level("WARNING"):
        consumer.assign(0)
        consumer.queue = messages(500, 4)
        app.turn()  # no exit: the operator asked for a new model
    assert app.model is not None and app.model.n_samples_seen_ == 4
    assert "--reset-model: a new model starts" in caplog.text and "in[0]@500" in caplog.text


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_a_lost_volume_restores_the_newest_published_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, guarantee: str
) -> None:
    record, published = published_model(version=7)
    producer, consumer = FakeProducer(), FakeConsumer(committed={0: 500})
    app = make_app(
        tmp_path, producer, consumer, guarantee, dim=None,
        when_lost="restore-from-model-topic", model_reader=lambda: record,
    )  # fmt: skip
    with app.connected(), caplog.at_level("WARNING"):
        consumer.assign(0)
        # Before any input: the model is the published one, and the dimension is its own.
        assert app.model is not None and app.model.n_steps_ == 7
        assert app.model.n_samples_seen_ == published.n_samples_seen_ == 28
        np.testing.assert_array_equal(app.model.cluster_centers_, published.cluster_centers_)
        np.testing.assert_array_equal(app.model.counts_, published.counts_)
        assert app.decoder.dim == DIM and app._ready() == (True, "ok")
        consumer.queue = messages(500, 4)
        app.turn()
        app.checkpoint()
    assert "restored model version 7 (28 samples" in caplog.text and "in[0]@500" in caplog.text
    assert "Not restored: the sample" in caplog.text
    out = [json.loads(v) for v in producer.values()]
    assert [a["offset"] for a in out] == [500, 501, 502, 503]
    assert {a["model_version"] for a in out} == {8}  # labelled by the model it went on with
    assert app.model.n_samples_seen_ == 32
    assert app.model.counts_.sum() == pytest.approx(published.counts_.sum() + 4)
    # Its spreads come from that first batch: an ordinary input scores near 1, not 1e9.
    assert max(a["score"] for a in out) < 100
    # From now on it is checkpointed like any model, and a restart goes on from there.
    restarted = make_app(tmp_path, FakeProducer(), FakeConsumer(), guarantee, dim=None)
    assert restarted.model.n_steps_ == 8 and restarted.offsets.positions == {("in", 0): 504}


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (None, "holds no model of this group"),
        (b"{not json", "not JSON"),
        ("k", "has 3 clusters but model.n_clusters is 2"),
        ("d", f"has dimension 5 but input.dim is {DIM}"),
    ],
)
def test_a_restore_that_cannot_be_done_holds_the_input_and_is_retried(
    tmp_path: Path, record: Any, reason: str
) -> None:
    good, _ = published_model(version=3)
    if record in ("k", "d"):
        rec = json.loads(good)
        shape = (3, DIM) if record == "k" else (2, 5)
        rec.update(n_clusters=shape[0], dim=shape[1], centroids=np.zeros(shape).tolist(),
                   counts=[1.0] * shape[0])  # fmt: skip
        record = json.dumps(rec).encode()
    topic = {"value": record}
    producer, consumer = FakeProducer(), FakeConsumer(committed={0: 500})
    app = make_app(
        tmp_path, producer, consumer, "at-least-once",
        when_lost="restore-from-model-topic", model_reader=lambda: topic["value"],
    )  # fmt: skip
    with app.connected():
        consumer.assign(0)
        consumer.queue = messages(500, 8)
        for _ in range(3):
            app.turn()  # alive and turning, but the input waits
        ready, why = app._ready()
        assert not ready and reason in why and "checkpoint.when_lost" in why
        assert app.model is None and producer.values() == [] and consumer.paused == {0}
        assert app.metrics.registry.get_sample_value("streamkm_ready") == 0.0
        assert not (tmp_path / "ckpt" / "origins.json").exists()
        topic["value"] = good  # the model topic holds a fitting model now
        later = app.lost.clock() + app.lost.retry_s
        app.lost.clock = lambda: later  # the retry is due
        app.turn()  # restores, resumes and reads from the group's offsets
        assert app.model is not None and app.model.n_steps_ == 3
        assert consumer.paused == set() and consumer.seeks == [(0, 500)]
        app.turn()
        app.turn()
    assert offsets_of(producer.values()) == list(range(500, 508))


def test_one_stray_message_cannot_fix_the_inferred_dimension(tmp_path: Path) -> None:
    from streamkm.app import DIM_QUORUM

    producer, consumer = FakeProducer(), FakeConsumer()
    app = make_app(tmp_path, producer, consumer, guarantee="at-least-once", dim=None)
    stray = Message(topic="in", partition=0, offset=0, key=b"s", value=b"\0" * 8)  # 2 values
    good = [
        Message(topic="in", partition=0, offset=1 + i, key=b"k", value=m.value())
        for i, m in enumerate(messages(0, DIM_QUORUM + 2))
    ]
    stream = [stray, *good]
    with app.connected():
        consumer.assign(0)
        consumer.queue = list(stream)
        for _ in range(5):
            app.turn()
            if app.decoder.dim is not None:
                break
        assert app.decoder.dim == DIM  # the quorum of valid messages, not the first one
        assert consumer.seeks[-1] == (0, 0)  # everything is read again from the start
        consumer.queue = list(stream)
        for _ in range(6):
            app.turn()
        app.process(force=True)  # the last rows would wait for max_batch_wait_ms
    assert len(producer.values("dead")) == 1  # the stray one, as wrong_dim
    assert offsets_of(producer.values()) == list(range(1, DIM_QUORUM + 3))


def test_readiness_gauge_and_process_metrics(tmp_path: Path) -> None:
    producer, consumer = FakeProducer(), FakeConsumer()
    app = make_app(tmp_path, producer, consumer, guarantee="at-least-once", own_registry=False)
    sample = app.metrics.registry.get_sample_value
    assert sample("process_resident_memory_bytes") is not None  # no registry given: exported
    with app.connected():
        app.turn()
        assert sample("streamkm_ready") == 0.0  # nothing assigned yet
        consumer.assign(0)
        app.turn()
        assert sample("streamkm_ready") == 0.0  # assigned, no model yet
        consumer.queue = messages(0, 4)
        app.turn()
        assert sample("streamkm_ready") == 1.0


# -- shared-model mode -------------------------------------------------------------------------


class FakeSyncTopic:
    """One partition in memory: the producer appends, the reader consumes in order."""

    def __init__(self) -> None:
        self.records: list[bytes] = []
        self.pos = 0

    # the producer side (wrapped around FakeProducer.produce by SharedProducer)
    def append(self, value: bytes) -> None:
        self.records.append(value)

    # the consumer side
    def assign(self, tps: list[TopicPartition]) -> None:
        self.pos = max(0, tps[0].offset)

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        out = []
        while self.pos < len(self.records) and len(out) < num_messages:
            out.append(Message(topic="sync", partition=0, offset=self.pos,
                               value=self.records[self.pos], timestamp=(1, 1000)))  # fmt: skip
            self.pos += 1
        return out

    def get_watermark_offsets(self, tp: Any, timeout: float, cached: bool) -> tuple[int, int]:
        return 0, len(self.records)

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition("sync", 0, self.pos)]

    def close(self) -> None:
        pass


class SharedProducer(FakeProducer):
    def __init__(self, log: FakeSyncTopic) -> None:
        super().__init__()
        self.log = log

    def produce(self, topic: str, value: bytes, key: Any = None, headers: Any = None,
                partition: int = -1) -> None:  # fmt: skip
        if topic == "sync":
            self.log.append(value)
        else:
            super().produce(topic, value, key, headers)


def make_shared_app(tmp_path: Path, log: FakeSyncTopic, consumer: FakeConsumer) -> App:
    from streamkm.shared.sync import SyncLog

    producer = SharedProducer(log)
    settings = Settings.model_validate(
        {
            "kafka": {
                "input_topic": "in",
                "output_topic": "out",
                "sync_topic": "sync",
                "sync_interval_ms": 0,
            },
            "input": {"format": "float32", "dim": DIM},
            "model": {"n_clusters": 2, "batch_size": 4, "init_size": 4, "seed": 0},
            "checkpoint": {"dir": str(tmp_path / "ckpt")},
            "delivery": {"instance_id": "a"},
        }
    )

    @contextlib.contextmanager
    def clients(settings, decoder, health, metrics, stopping) -> Iterator[Clients]:  # type: ignore[no-untyped-def]
        reports = DeliveryReports(False)
        sink = Sink(producer, reports, "out")
        source = Source(consumer, "in", decoder, read_committed_offsets=True)
        sync = SyncLog(log, producer, "sync", "a", metrics=metrics)
        with sink, source:
            yield Clients(source, sink, None, sync)

    app = App(settings, registry=CollectorRegistry(), clients=clients)
    app.start()
    return app


def test_shared_mode_seeds_from_the_log_and_rewinds_a_refused_delta(tmp_path: Path) -> None:
    from streamkm.shared import wire
    from streamkm.shared.replica import Replica

    log, consumer = FakeSyncTopic(), FakeConsumer()
    app = make_shared_app(tmp_path, log, consumer)
    with app.connected():
        consumer.assign(0)
        consumer.queue = messages(0, 4)
        app.turn()  # proposes an init, adopts the log's first one, labels, sends a delta
        assert [wire.decode(v)[0] for v in log.records] == ["init", "delta"]
        app.turn()  # folds its own delta
        assert app.model.n_samples_seen_ == 4 and app.model.absorbed == {("in", 0): 4}

        # A delta another instance sent for offsets 4..9 (a rebalance overlap) lands in the log
        # just before this instance's delta for 4..7, which the log must then refuse.
        other = Replica.from_state(*app.model.to_state())
        X = np.random.default_rng(1).normal(size=(6, DIM)).astype(np.float32)
        labels, d2, _ = other.assign(X)
        consumer.queue = messages(4, 4)
        app.turn()  # labels 4..7 and sends their delta
        log.records.insert(len(log.records) - 1, wire.encode_delta(
            other.delta("b", "in", 0, 4, 10, X, labels, d2)))  # fmt: skip
        app.turn()  # folds b's delta, refuses its own, reads partition 0 again from 10
        assert app.model.absorbed == {("in", 0): 10} and app.model.n_samples_seen_ == 10
        assert consumer.seeks[-1] == (0, 10)
        assert app.offsets.positions[("in", 0)] == 10
        sample = app.metrics.registry.get_sample_value
        assert sample("streamkm_sync_records_rejected_total") == 1


@contextlib.contextmanager
def checkpoint_in_flight(
    tmp_path: Path, guarantee: str, fail: bool = False
) -> Iterator[tuple[App, FakeProducer, FakeConsumer, GatedStore]]:
    """A connected app on a slow checkpoint disk, having learnt inputs 0-3 of partition 0 and
    started writing their checkpoint (as the loop's timer does)."""
    producer, consumer = FakeProducer(), FakeConsumer()
    app = make_app(tmp_path, producer, consumer, guarantee=guarantee)
    store = GatedStore(tmp_path / "ckpt", fail=fail)
    app.checkpointer.store = store
    with app.connected():
        consumer.assign(0)
        consumer.queue = messages(0, 4)
        app.turn()
        app.checkpoint(wait=False)
        yield app, producer, consumer, store


def test_the_loop_goes_on_while_a_checkpoint_is_written_and_commits_its_offsets_after(
    tmp_path: Path,
) -> None:
    with checkpoint_in_flight(tmp_path, "at-least-once") as (app, producer, consumer, store):
        assert app.checkpointer.busy and consumer.commits == []
        consumer.queue = messages(4, 4)
        app.turn()  # the loop consumes, learns and publishes while the file is written
        assert offsets_of(producer.values()) == list(range(8))
        assert consumer.commits == [] and store.paths() == []
        assert app.offsets.checkpointed == {}  # nothing durable yet
        store.gate.set()
        app.checkpoint()  # waits for the write in flight first, then writes the next one
        # Each commit is a durable checkpoint's offsets, never positions beyond it.
        assert consumer.commits == [[(0, 4)], [(0, 8)]]
        assert app.offsets.checkpointed == {("in", 0): 8}
        assert len(store.paths()) == 2


def test_a_revoke_waits_for_the_write_in_flight(tmp_path: Path) -> None:
    with checkpoint_in_flight(tmp_path, "at-least-once") as (app, _, consumer, store):
        opener = threading.Timer(0.2, store.gate.set)  # the disk answers later
        opener.start()
        consumer.revoke(0)  # returns only once the checkpoint is durable
        assert not app.checkpointer.busy and len(store.paths()) == 1
        assert consumer.commits == [[(0, 4)]] and app.offsets.assigned == set()
        opener.join()


def test_a_failed_background_write_stops_the_loop(tmp_path: Path) -> None:
    with checkpoint_in_flight(tmp_path, "exactly-once", fail=True) as (app, producer, _, store):
        # exactly-once: the transaction is committed before the checkpoint is written
        assert producer.calls[-2:] == ["commit", "flush"]
        store.gate.set()
        with pytest.raises(CheckpointError, match="No space left"):
            for _ in range(1000):  # the failure surfaces on the first turn after the write
                app.turn()
                time.sleep(0.01)
        assert not app.checkpointer.busy and store.paths() == []
