"""Small helpers the integration tests share: topics, producing and draining."""

from __future__ import annotations

import time
import uuid
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def create_topic(
    bootstrap: str, name: str, partitions: int = 1, config: dict[str, str] | None = None
) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})]
    )
    futures[name].result(timeout=30)
    # Wait until every partition has a leader, so the first produce does not race it.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        md = admin.list_topics(topic=name, timeout=5).topics.get(name)
        if (
            md is not None
            and md.error is None
            and len(md.partitions) == partitions
            and all(p.leader >= 0 for p in md.partitions.values())
        ):
            return
        time.sleep(0.1)
    raise TimeoutError(f"topic {name} has no leaders after 30s")


def produce_values(
    bootstrap: str,
    topic: str,
    values: list[bytes | None],
    keys: list[bytes | None] | None = None,
    partition: int | None = None,
) -> list[tuple[int, int]]:
    """Produce ``values`` in order; return their (partition, offset), checked delivered."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True}
    )
    delivered: list[tuple[int, int] | None] = [None] * len(values)
    failures: list[str] = []

    def report(index: int) -> Any:
        def cb(err: Any, msg: Message) -> None:
            if err is not None:
                failures.append(str(err))
            else:
                delivered[index] = (msg.partition(), msg.offset())

        return cb

    for i, value in enumerate(values):
        kwargs: dict[str, Any] = {"value": value, "on_delivery": report(i)}
        if keys is not None:
            kwargs["key"] = keys[i]
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                producer.produce(topic, **kwargs)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    remaining = producer.flush(60)
    assert remaining == 0 and not failures, f"undelivered: {remaining}, errors: {failures[:3]}"
    return [d for d in delivered if d is not None]


def drain(
    bootstrap: str,
    topic: str,
    expected: int | None = None,
    timeout_s: float = 60.0,
    isolation: str = "read_committed",
    idle_s: float = 3.0,
) -> list[Message]:
    """Read a topic from the beginning until ``expected`` records (or ``idle_s`` of silence)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"drain-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": isolation,
        }
    )
    md = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, 0) for p in md.partitions])
    out: list[Message] = []
    deadline = time.monotonic() + timeout_s
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            if expected is not None and len(out) >= expected:
                # Keep reading briefly so that extra (duplicate) records would be seen too.
                if time.monotonic() - last > 1.0:
                    break
            elif expected is None and time.monotonic() - last > idle_s:
                break
            for msg in consumer.consume(1000, 0.2):
                if msg.error() is not None:
                    if msg.error().code() == -191:  # _PARTITION_EOF
                        continue
                    raise KafkaException(msg.error())
                out.append(msg)
                last = time.monotonic()
    finally:
        consumer.close()
    return out
