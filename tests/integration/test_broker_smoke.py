"""The session broker is real Kafka: consumer groups and transactions behave as Kafka's do."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Consumer, Producer

from tests.kafka_util import drain, produce_values

pytestmark = pytest.mark.integration


def _group_consumer(bootstrap: str, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )


def _read(consumer: Consumer, n: int, timeout_s: float = 30.0) -> list[bytes]:
    got: list[bytes] = []
    import time

    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        for msg in consumer.consume(n - len(got), 0.5):
            assert msg.error() is None, msg.error()
            got.append(msg.value())
    return got


def test_committed_offsets_survive_a_consumer_restart(kafka_bootstrap, make_topic, group_id):
    topic = make_topic()
    produce_values(kafka_bootstrap, topic, [f"a{i}".encode() for i in range(10)])

    first = _group_consumer(kafka_bootstrap, group_id)
    first.subscribe([topic])
    assert _read(first, 10) == [f"a{i}".encode() for i in range(10)]
    first.commit(asynchronous=False)
    first.close()

    produce_values(kafka_bootstrap, topic, [f"b{i}".encode() for i in range(5)])
    second = _group_consumer(kafka_bootstrap, group_id)
    second.subscribe([topic])
    # Only what came after the committed offset: the group remembered where it was.
    assert _read(second, 5) == [f"b{i}".encode() for i in range(5)]
    second.close()


def test_aborted_transaction_is_invisible_to_read_committed(kafka_bootstrap, make_topic):
    topic = make_topic()
    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "transactional.id": f"smoke-{uuid.uuid4().hex}"}
    )
    producer.init_transactions(30)

    producer.begin_transaction()
    producer.produce(topic, b"aborted")
    producer.flush(30)
    producer.abort_transaction(30)

    producer.begin_transaction()
    producer.produce(topic, b"committed")
    producer.commit_transaction(30)

    committed = [m.value() for m in drain(kafka_bootstrap, topic, isolation="read_committed")]
    uncommitted = [m.value() for m in drain(kafka_bootstrap, topic, isolation="read_uncommitted")]
    assert committed == [b"committed"]
    # The aborted record really reached the log: only the isolation level hides it.
    assert uncommitted == [b"aborted", b"committed"]
