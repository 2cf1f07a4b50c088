"""Test harness: one real Kafka broker for the whole session.

The broker is chosen in this order:

1. ``STREAMKM_TEST_BOOTSTRAP=host:port`` — an existing cluster;
2. testcontainers' Kafka module, when a Docker engine answers;
3. the local Apache Kafka that ``streamkm broker start`` runs (Java 17+ and Maven).

If none is possible the integration tests fail with a message listing the three; they never
skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streamkm.errors import StreamkmError

HOW_TO_GET_A_BROKER = (
    "integration tests need a Kafka broker; none could be had. Either\n"
    "  1. set STREAMKM_TEST_BOOTSTRAP=host:port to an existing cluster, or\n"
    "  2. run a Docker engine (testcontainers starts apache/kafka), or\n"
    "  3. install Java 17+ and Maven so the local Apache Kafka can be fetched and started\n"
    "     (apt-get install openjdk-17-jre-headless maven).\n"
)


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a real Kafka broker shared by the session."""
    given = os.environ.get("STREAMKM_TEST_BOOTSTRAP")
    if given:
        yield given
        return
    errors: list[str] = []
    if _docker_answers():
        try:
            from testcontainers.kafka import KafkaContainer

            container = (
                KafkaContainer("apache/kafka:4.1.1")
                .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
                .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
                .with_env("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0")
            )
            with container:
                yield container.get_bootstrap_server()
            return
        except Exception as exc:  # fall through to the local broker
            errors.append(f"testcontainers: {exc}")
    from streamkm.tools.broker import LocalBroker, free_port

    broker = LocalBroker(dir=tmp_path_factory.mktemp("broker"), port=free_port())
    try:
        broker.start()
    except (StreamkmError, OSError) as exc:
        errors.append(f"local Apache Kafka: {exc}")
        pytest.fail(HOW_TO_GET_A_BROKER + "\n".join(errors), pytrace=False)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def make_topic(kafka_bootstrap: str) -> Callable[..., str]:
    """Create a uniquely named topic: ``make_topic(partitions=1, prefix="t", **config)``."""
    from tests.kafka_util import create_topic

    def make(partitions: int = 1, prefix: str = "t", **config: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        create_topic(kafka_bootstrap, name, partitions, config)
        return name

    return make


@pytest.fixture
def group_id() -> str:
    return f"g-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
