"""The topics are the daemon's job: it creates the missing ones, refuses a model topic that is
not compacted, and waits for a missing input topic with a readiness reason that says so."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from tests.daemon import Daemon
from tests.kafka_util import create_topic, drain, produce_values

pytestmark = pytest.mark.integration

DIM = 4


def topic_config(bootstrap: str, topic: str) -> tuple[int, dict[str, str]]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    md = admin.list_topics(topic=topic, timeout=10).topics[topic]
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    entries = next(iter(admin.describe_configs([resource]).values())).result(timeout=10)
    return len(md.partitions), {k: str(v.value) for k, v in entries.items()}


def test_missing_output_topics_are_created_and_the_model_topic_compacted(
    tmp_path: Path, kafka_bootstrap: str, make_topic
) -> None:
    src = make_topic(partitions=3)
    out, dead, model = (f"{p}-{uuid.uuid4().hex[:8]}" for p in ("out", "dead", "model"))
    rows = np.random.default_rng(0).normal(size=(300, DIM)).astype("<f4")
    produce_values(kafka_bootstrap, src, [r.tobytes() for r in rows])
    with Daemon(
        tmp_path / "d", kafka_bootstrap, src, out, input={"dim": DIM},
        kafka={"dead_letter_topic": dead, "model_topic": model},
        topics={"dead_letter": {"retention.ms": "86400000"}},
    ) as d:  # fmt: skip
        d.start()
        d.wait_http("/readyz", status=200)  # the topics exist before the first batch
        assert len(drain(kafka_bootstrap, out, expected=300, timeout_s=120)) == 300
        assert d.stop() == 0
    assert d.log_path.read_text().count("created topics") == 1
    n, cfg = topic_config(kafka_bootstrap, model)
    assert cfg["cleanup.policy"] == "compact" and n == 3  # as many partitions as the input
    assert topic_config(kafka_bootstrap, dead)[1]["retention.ms"] == "86400000"
    assert topic_config(kafka_bootstrap, out)[0] == 3


def test_a_model_topic_that_is_not_compacted_is_refused(
    tmp_path: Path, kafka_bootstrap: str, make_topic
) -> None:
    src, out, model = make_topic(), make_topic(), make_topic(**{"cleanup.policy": "delete"})
    with Daemon(tmp_path / "d", kafka_bootstrap, src, out, input={"dim": DIM},
                kafka={"model_topic": model}) as d:  # fmt: skip
        d.start()
        assert d.wait_exit(timeout_s=90) == 1
    assert f"kafka.model_topic {model} has cleanup.policy=delete" in d.log_path.read_text()


def test_a_missing_input_topic_is_waited_for_with_a_readiness_reason(
    tmp_path: Path, kafka_bootstrap: str, make_topic
) -> None:
    src, out = f"later-{uuid.uuid4().hex[:8]}", make_topic()
    with Daemon(tmp_path / "d", kafka_bootstrap, src, out, input={"dim": DIM}) as d:
        d.start()
        body = d.wait_http("/readyz", status=503, timeout_s=90)
        while "does not exist" not in body:
            body = d.wait_http("/readyz", status=503, timeout_s=30)
        assert f"input topic {src} does not exist; waiting for it" in body
        create_topic(kafka_bootstrap, src)
        rows = np.random.default_rng(1).normal(size=(300, DIM)).astype("<f4")
        produce_values(kafka_bootstrap, src, [r.tobytes() for r in rows])
        assert len(drain(kafka_bootstrap, out, expected=300, timeout_s=120)) == 300
        d.wait_http("/readyz", status=200, timeout_s=30)
        assert d.stop() == 0
