"""Liveness, readiness and the clients' error callback."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from streamkm.errors import KafkaClientError as StreamkmKafkaError
from streamkm.health import Health

pytestmark = pytest.mark.unit


def test_a_fatal_client_error_is_recorded_once_and_stops() -> None:
    stops: list[int] = []
    h = Health(stuck_after_s=60, on_fatal=lambda: stops.append(1))
    h.on_client_error(KafkaError(KafkaError._TRANSPORT, "broker down"))
    assert h.fatal is None and h.last_kafka_error == "broker down"
    assert h.ready(assigned=False, fitted=False) == (
        False, "no partitions assigned; last Kafka error: broker down",
    )  # fmt: skip
    h.on_client_error(KafkaError(KafkaError._FATAL, "fenced", fatal=True))
    h.on_client_error(KafkaError(KafkaError._FATAL, "again", fatal=True))
    assert stops == [1]
    assert h.live()[0] is False and "fenced" in h.live()[1]
    h.clear_kafka_error()
    assert h.ready(assigned=False, fitted=False) == (False, "no partitions assigned")
    with pytest.raises(StreamkmKafkaError, match="fenced"):
        h.raise_if_fatal()


def test_ready_needs_partitions_and_a_model_and_live_needs_a_turning_loop() -> None:
    now = [0.0]
    h = Health(stuck_after_s=5, clock=lambda: now[0])
    assert h.ready(assigned=True, fitted=False) == (False, "model not initialised yet")
    assert h.ready(assigned=True, fitted=True) == (True, "ok")
    now[0] = 6.0
    assert h.live() == (False, "loop has not turned for 6s")
    h.beat()
    assert h.live() == (True, "ok")
