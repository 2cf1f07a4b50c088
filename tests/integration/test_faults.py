"""Faults around the daemon: an abort in exactly-once mode, a broker not there at start, a topic
that grows partitions, a second instance in the group."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, TopicPartition

from streamkm.tools.broker import free_port
from tests.daemon import Daemon
from tests.kafka_util import TcpProxy, add_partitions, drain, produce_values, set_topic_config

pytestmark = pytest.mark.integration

DIM = 4
EOS = {"guarantee": "exactly-once"}


def good(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 10, size=(3, DIM))
    X = centers[rng.integers(0, 3, n)] + rng.normal(0, 1, (n, DIM))
    return [row.astype("<f4").tobytes() for row in X]


def offsets_by_partition(bootstrap: str, topic: str, expected: int) -> Counter:
    msgs = drain(bootstrap, topic, expected=expected, timeout_s=120)
    return Counter(
        (json.loads(m.value() or b"")["partition"], json.loads(m.value() or b"")["offset"])
        for m in msgs
    )


def test_an_aborted_transaction_is_rewound_and_redone(
    tmp_path: Path, kafka_bootstrap: str, make_topic
) -> None:
    src, out, dlq = make_topic(), make_topic(), make_topic()
    with Daemon(
        tmp_path / "d", kafka_bootstrap, src, out, delivery=EOS,
        kafka={"dead_letter_topic": dlq}, input={"dim": DIM},
        model={"n_clusters": 3, "batch_size": 32, "max_batch_wait_ms": 100},
    ) as d:  # fmt: skip
        d.start()
        produce_values(kafka_bootstrap, src, good(200, 1))
        assert len(offsets_by_partition(kafka_bootstrap, out, 200)) == 200
        # The dead-letter topic now refuses records of this size (the daemon read its limit
        # at start): the broker fails the dead letter, the transaction must be aborted, and
        # the batch redone until the topic takes it again.
        set_topic_config(kafka_bootstrap, dlq, **{"max.message.bytes": "2000"})
        produce_values(kafka_bootstrap, src, [*good(50, 2), b"\x07" * 5001, *good(50, 3)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            d.assert_running()  # an abort used to end the process 21 ms later
            if d.log_path.read_text().count("rewinding and redoing its batches") >= 3:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"no repeated abort and redo in 60 s\n{d.tail()}")
        set_topic_config(kafka_bootstrap, dlq, **{"max.message.bytes": "1048588"})
        assigned = offsets_by_partition(kafka_bootstrap, out, 300)
        dead = drain(kafka_bootstrap, dlq, expected=1, timeout_s=60)
        d.assert_running()
        assert d.stop() == 0
    # Every good input exactly once, the bad one dead-lettered once: nothing lost, nothing twice.
    assert set(assigned) == {(0, o) for o in range(301) if o != 250}
    assert max(assigned.values()) == 1
    assert len(dead) == 1 and dict(dead[0].headers() or [])["streamkm.source.offset"] == b"250"


def test_exactly_once_waits_for_a_broker_that_is_not_there_at_start(
    tmp_path: Path, kafka_bootstrap: str, make_topic
) -> None:
    src, out = make_topic(), make_topic()
    produce_values(kafka_bootstrap, src, good(100, 4))
    proxy = TcpProxy(kafka_bootstrap, free_port())
    with Daemon(
        tmp_path / "d", f"127.0.0.1:{proxy.port}", src, out, delivery=EOS, input={"dim": DIM},
        model={"n_clusters": 3, "batch_size": 32, "max_batch_wait_ms": 100},
    ) as d:  # fmt: skip
        d.start()
        try:
            # init_transactions times out after 30 s; the daemon must retry, not exit.
            d.wait_log(r"initialising transactions: .*retrying", timeout_s=90)
            d.assert_running()
            proxy.open()
            assigned = offsets_by_partition(kafka_bootstrap, out, 100)
            assert d.stop() == 0
        finally:
            proxy.close()
    assert set(assigned) == {(0, o) for o in range(100)} and max(assigned.values()) == 1


def test_new_input_partitions_are_consumed_within_seconds(
    tmp_path: Path, kafka_bootstrap: str, make_topic
) -> None:
    src, out = make_topic(), make_topic()
    with Daemon(
        tmp_path / "d", kafka_bootstrap, src, out, input={"dim": DIM},
        model={"n_clusters": 3, "batch_size": 32, "max_batch_wait_ms": 100},
    ) as d:  # fmt: skip
        d.start()
        produce_values(kafka_bootstrap, src, good(100, 5))
        assert len(offsets_by_partition(kafka_bootstrap, out, 100)) == 100
        add_partitions(kafka_bootstrap, src, 2)
        t0 = time.monotonic()
        produce_values(kafka_bootstrap, src, good(50, 6), partition=1)
        consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": "watch",
                             "enable.auto.commit": False})  # fmt: skip
        consumer.assign([TopicPartition(out, 0, 0)])
        seen: set[int] = set()
        try:
            while len(seen) < 50 and time.monotonic() - t0 < 30:
                d.assert_running()
                for m in consumer.consume(500, 0.5):
                    if m.error() is None:
                        a = json.loads(m.value() or b"")
                        if a["partition"] == 1:
                            seen.add(a["offset"])
        finally:
            consumer.close()
        elapsed = time.monotonic() - t0
        assert d.stop() == 0
    assert seen == set(range(50)), f"{len(seen)} of 50 assigned after {elapsed:.0f} s"


def test_a_second_instance_in_the_group_is_reported(
    tmp_path: Path, kafka_bootstrap: str, make_topic, group_id: str
) -> None:
    src, out = make_topic(partitions=2), make_topic()
    common = {
        "input": {"dim": DIM},
        "model": {"n_clusters": 3, "batch_size": 32, "max_batch_wait_ms": 100},
    }
    with (
        Daemon(tmp_path / "a", kafka_bootstrap, src, out, **common,
               kafka={"group_id": group_id}, delivery={"instance_id": "a"}) as a,
        Daemon(tmp_path / "b", kafka_bootstrap, src, out, **common,
               kafka={"group_id": group_id}, delivery={"instance_id": "b"}) as b,
    ):  # fmt: skip
        a.start()
        a.wait_log(r"assigned .*\[0\]")
        assert a.metric("streamkm_group_members") in (None, 0.0, 1.0)
        b.start()
        for d in (a, b):
            d.wait_metric("streamkm_group_members", 2, timeout_s=60)
            d.wait_log(r"consumer group \S+ has 2 members: each instance keeps its own model")
        assert a.stop() == 0 and b.stop() == 0
