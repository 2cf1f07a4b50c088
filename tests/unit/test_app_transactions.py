"""The loop's transaction handling, driven without a broker.

Abortable errors are hard to provoke on a healthy broker, so these tests give the loop a
producer that fails on cue. (Everything that needs Kafka itself runs in tests/integration.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import KafkaError, KafkaException

from streamkm.app import App
from streamkm.batcher import Batcher
from streamkm.config import Settings
from streamkm.errors import FencedError

pytestmark = pytest.mark.unit

DIM = 3


class FakeMessage:
    def __init__(self, topic: str, partition: int, offset: int, value: bytes) -> None:
        self._t, self._p, self._o, self._v = topic, partition, offset, value

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def value(self) -> bytes:
        return self._v

    def key(self) -> bytes:
        return str(self._o).encode()

    def timestamp(self) -> tuple[int, int]:
        return (1, 0)

    def headers(self) -> None:
        return None

    def error(self) -> None:
        return None


class FakeProducer:
    """Records calls; ``fail`` holds errors to raise from commit_transaction, in order."""

    def __init__(self, fail: list[KafkaError]) -> None:
        self.fail = fail
        self.calls: list[str] = []
        self.produced: list[bytes] = []
        self.pending: list[bytes] = []

    def begin_transaction(self) -> None:
        self.calls.append("begin")
        self.pending = []

    def produce(self, topic: str, value: bytes, key: Any = None, headers: Any = None) -> None:
        self.pending.append(value)

    def poll(self, timeout: float = 0) -> int:
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


class FakeConsumer:
    def __init__(self) -> None:
        self.seeks: list[tuple[int, int]] = []

    def seek(self, tp: Any) -> None:
        self.seeks.append((tp.partition, tp.offset))

    def consumer_group_metadata(self) -> object:
        return object()


def make_app(tmp_path: Path, fail: list[KafkaError]) -> App:
    settings = Settings.model_validate(
        {
            "kafka": {"input_topic": "in", "output_topic": "out"},
            "input": {"format": "float32", "dim": DIM},
            "model": {"n_clusters": 2, "batch_size": 4, "init_size": 4, "seed": 0},
            "checkpoint": {"dir": str(tmp_path / "ckpt")},
            "delivery": {"guarantee": "exactly-once"},
        }
    )
    app = App(settings)
    app.store.ensure_writable()  # what run() does first
    app.producer = FakeProducer(fail)  # type: ignore[assignment]
    app.consumer = FakeConsumer()  # type: ignore[assignment]
    app.batcher = Batcher(4, 0.5, dtype=np.float32)
    app.assigned = {("in", 0)}
    return app


def messages(start: int, n: int) -> list[FakeMessage]:
    rng = np.random.default_rng(start)
    return [
        FakeMessage("in", 0, start + i, rng.normal(size=DIM).astype("<f4").tobytes())
        for i in range(n)
    ]


def test_abortable_commit_aborts_restores_the_model_and_rewinds(tmp_path: Path) -> None:
    abortable = KafkaError(KafkaError._STATE, "abortable on cue", txn_requires_abort=True)
    app = make_app(tmp_path, [])
    app._ingest(messages(0, 4))
    app._process(force=True)  # the first batch seeds the model
    app.producer.fail = [abortable]
    model_before = app.model.cluster_centers_.copy()
    steps_before = app.model.n_steps_
    producer, consumer = app.producer, app.consumer

    app._ingest(messages(4, 4))
    app._process(force=True)  # its commit fails with an abortable error
    assert producer.calls[-1] == "abort"
    assert app.model.n_steps_ == steps_before  # the model is as before the batch
    np.testing.assert_array_equal(app.model.cluster_centers_, model_before)
    assert app.positions == {("in", 0): 4}  # nothing of the batch counts as done
    assert consumer.seeks == [(0, 4)]  # the batch is read again from its first offset
    assert len(producer.produced) == 4  # its records were never committed

    app._ingest(messages(4, 4))  # the redo
    app._process(force=True)
    assert producer.calls[-2:] == ["offsets 0:8", "commit"]
    assert app.positions == {("in", 0): 8}
    assert app.model.n_samples_seen_ == 8
    assert len(producer.produced) == 8


def test_retriable_commit_is_retried_and_fencing_is_fatal(tmp_path: Path) -> None:
    retriable = KafkaError(KafkaError.REQUEST_TIMED_OUT, "slow", retriable=True)
    app = make_app(tmp_path, [retriable, retriable])
    app._ingest(messages(0, 4))
    app._process(force=True)
    assert app.producer.calls.count("commit") == 1 and "abort" not in app.producer.calls

    fenced = KafkaError(KafkaError._FENCED, "fenced", fatal=True)
    app.producer.fail = [fenced]
    app._ingest(messages(4, 4))
    with pytest.raises(FencedError, match="another instance"):
        app._process(force=True)


def test_replayed_inputs_are_absorbed_but_not_published(tmp_path: Path) -> None:
    app = make_app(tmp_path, [])
    app.replay_until = {("in", 0): 6}  # offsets 0..5 were published before a crash
    app._ingest(messages(0, 4))
    app._process(force=True)
    # Nothing re-published, and the committed offset is not moved back below 6.
    assert app.producer.produced == [] and app.producer.calls[-1] == "commit"
    assert not any(c.startswith("offsets") for c in app.producer.calls)
    app._ingest(messages(4, 4))
    app._process(force=True)
    assert app.producer.calls[-2] == "offsets 0:8"
    assert [int(v.split(b'"offset":')[1].rstrip(b"}")) for v in app.producer.produced] == [6, 7]
    assert app.model.n_samples_seen_ == 8 and ("in", 0) not in app.replay_until
