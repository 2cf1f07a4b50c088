"""Tests of streamkm.metrics: metric names, model and lag helpers, the HTTP endpoints."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from streamkm import __version__
from streamkm.metrics import Metrics

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def clock() -> Clock:
    return Clock(1000.0)


@pytest.fixture
def metrics(registry: CollectorRegistry, clock: Clock) -> Iterator[Metrics]:
    m = Metrics(registry, clock=clock, wall_clock=lambda: 1_700_000_000.0)
    yield m
    m.close()


EXPECTED_FAMILIES = {
    "streamkm_messages_consumed": "counter",
    "streamkm_messages_assigned": "counter",
    "streamkm_messages_dead_lettered": "counter",
    "streamkm_batches": "counter",
    "streamkm_batch_duration_seconds": "histogram",
    "streamkm_inertia": "gauge",
    "streamkm_inertia_ewma": "gauge",
    "streamkm_samples_seen": "gauge",
    "streamkm_model_version": "gauge",
    "streamkm_cluster_size": "gauge",
    "streamkm_centroid_shift": "gauge",
    "streamkm_consumer_lag": "gauge",
    "streamkm_checkpoints": "counter",
    "streamkm_checkpoint_duration_seconds": "histogram",
    "streamkm_last_checkpoint_timestamp_seconds": "gauge",
    "streamkm_checkpoint_age_seconds": "gauge",
    "streamkm_checkpoint_interval_seconds": "gauge",
    "streamkm_produce_errors": "counter",
    "streamkm_group_members": "gauge",
    "streamkm_ready": "gauge",
    "streamkm_shared_model": "gauge",
    "streamkm_consumer_lag_seconds": "gauge",
    "streamkm_rows_held": "gauge",
    "streamkm_sync_lag_records": "gauge",
    "streamkm_sync_staleness_seconds": "gauge",
    "streamkm_sync_deltas_produced": "counter",
    "streamkm_sync_records_applied": "counter",
    "streamkm_sync_records_rejected": "counter",
    "streamkm_sync_sent_bytes": "counter",
    "streamkm_sync_read_bytes": "counter",
    "streamkm_info": "gauge",
}


def test_every_metric_exists_with_its_type(metrics: Metrics, registry: CollectorRegistry) -> None:
    families = {f.name: f.type for f in registry.collect()}
    assert families == EXPECTED_FAMILIES


def test_counters_are_exposed_with_total_suffix(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.messages_consumed.inc(5)
    metrics.messages_assigned.inc(4)
    metrics.batches.inc()
    metrics.produce_errors.inc(2)
    metrics.record_dead_letter("wrong_dim")
    metrics.record_dead_letter("wrong_dim", 2)
    get = registry.get_sample_value
    assert get("streamkm_messages_consumed_total") == 5
    assert get("streamkm_messages_assigned_total") == 4
    assert get("streamkm_batches_total") == 1
    assert get("streamkm_produce_errors_total") == 2
    assert get("streamkm_messages_dead_lettered_total", {"reason": "wrong_dim"}) == 3
    # Known reasons exist at zero before any event, so alerts on rate() see them.
    assert get("streamkm_messages_dead_lettered_total", {"reason": "non_finite"}) == 0
    assert get("streamkm_info", {"version": __version__}) == 1


def test_stage_histogram_buckets(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.observe_stage("model", 0.003)
    get = registry.get_sample_value
    assert get("streamkm_batch_duration_seconds_count", {"stage": "model"}) == 1
    assert get("streamkm_batch_duration_seconds_bucket", {"stage": "model", "le": "0.0025"}) == 0
    assert get("streamkm_batch_duration_seconds_bucket", {"stage": "model", "le": "0.005"}) == 1
    assert get("streamkm_batch_duration_seconds_bucket", {"stage": "model", "le": "0.0005"}) == 0
    assert get("streamkm_batch_duration_seconds_bucket", {"stage": "model", "le": "10.0"}) == 1
    assert get("streamkm_batch_duration_seconds_count", {"stage": "decode"}) == 0


def test_record_model_sets_gauges(metrics: Metrics, registry: CollectorRegistry) -> None:
    model = SimpleNamespace(
        inertia_=2.5,
        inertia_ewma_=3.0,
        n_samples_seen_=1234.0,
        n_steps_=17,
        counts_=np.array([10.0, 20.0, 5.5]),
        last_shift_=0.125,
    )
    metrics.record_model(model)
    get = registry.get_sample_value
    assert get("streamkm_inertia") == 2.5
    assert get("streamkm_inertia_ewma") == 3.0
    assert get("streamkm_samples_seen") == 1234
    assert get("streamkm_model_version") == 17
    assert get("streamkm_centroid_shift") == 0.125
    assert [get("streamkm_cluster_size", {"cluster": str(j)}) for j in range(3)] == [10, 20, 5.5]
    # A model with fewer clusters drops the stale series.
    model.counts_ = np.array([1.0, 2.0])
    metrics.record_model(model)
    assert get("streamkm_cluster_size", {"cluster": "2"}) is None
    assert get("streamkm_cluster_size", {"cluster": "1"}) == 2


def test_record_model_skips_missing_attributes(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.record_model(SimpleNamespace(n_steps_=3, inertia_=None))
    assert registry.get_sample_value("streamkm_model_version") == 3
    assert registry.get_sample_value("streamkm_inertia") == 0


def stats(partitions: dict[str, int]) -> str:
    parts = {pid: {"partition": int(pid), "consumer_lag": lag} for pid, lag in partitions.items()}
    return json.dumps({"name": "rdkafka#consumer-1", "topics": {"in": {"partitions": parts}}})


def test_lag_from_librdkafka_statistics(metrics: Metrics, registry: CollectorRegistry) -> None:
    get = registry.get_sample_value
    assert metrics.update_lag_from_stats(stats({"0": 12, "1": 0, "2": -1, "-1": 99})) == 2
    assert get("streamkm_consumer_lag", {"topic": "in", "partition": "0"}) == 12
    assert get("streamkm_consumer_lag", {"topic": "in", "partition": "1"}) == 0
    assert get("streamkm_consumer_lag", {"topic": "in", "partition": "2"}) is None
    assert get("streamkm_consumer_lag", {"topic": "in", "partition": "-1"}) is None
    # Partition 0 revoked: its series goes away rather than freezing at its last value.
    metrics.update_lag_from_stats(stats({"1": 4}))
    assert get("streamkm_consumer_lag", {"topic": "in", "partition": "0"}) is None
    assert get("streamkm_consumer_lag", {"topic": "in", "partition": "1"}) == 4


@pytest.mark.parametrize("bad", ["", "not json", "[]", '{"topics": {"in": 3}}'])
def test_malformed_statistics_are_ignored(metrics: Metrics, bad: str) -> None:
    assert metrics.update_lag_from_stats(bad) == 0


def test_checkpoint_age_and_interval(
    metrics: Metrics, registry: CollectorRegistry, clock: Clock
) -> None:
    get = registry.get_sample_value
    metrics.set_checkpoint_interval(30)
    assert get("streamkm_checkpoint_interval_seconds") == 30
    clock.now += 7
    assert get("streamkm_checkpoint_age_seconds") == 7  # since start, no checkpoint yet
    metrics.record_checkpoint(0.02)
    assert get("streamkm_checkpoint_age_seconds") == 0
    assert get("streamkm_checkpoints_total") == 1
    assert get("streamkm_checkpoint_duration_seconds_count") == 1
    assert get("streamkm_last_checkpoint_timestamp_seconds") == 1_700_000_000.0
    clock.now += 4.5
    assert get("streamkm_checkpoint_age_seconds") == 4.5


def fetch(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def test_http_endpoints(metrics: Metrics) -> None:
    state = {"healthy": (True, ""), "ready": (False, "no partitions assigned")}
    server = metrics.serve(
        "127.0.0.1", 0, health=lambda: state["healthy"], ready=lambda: state["ready"]
    )
    assert server.port > 0
    metrics.messages_consumed.inc(3)

    status, ctype, body = fetch(f"{server.url}/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert "streamkm_messages_consumed_total 3.0" in body
    assert "# TYPE streamkm_batch_duration_seconds histogram" in body

    assert fetch(f"{server.url}/healthz")[::2] == (200, "ok\n")
    assert fetch(f"{server.url}/readyz")[::2] == (503, "no partitions assigned\n")
    state["ready"] = (True, "")
    state["healthy"] = (False, "loop stuck for 120 s")
    assert fetch(f"{server.url}/readyz")[::2] == (200, "ok\n")
    assert fetch(f"{server.url}/healthz")[::2] == (503, "loop stuck for 120 s\n")
    assert fetch(f"{server.url}/nope")[0] == 404

    with pytest.raises(RuntimeError):
        metrics.serve("127.0.0.1", 0, health=lambda: (True, ""), ready=lambda: (True, ""))
    metrics.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{server.url}/healthz", timeout=2)


def test_failing_check_is_a_503(metrics: Metrics) -> None:
    def boom() -> tuple[bool, str]:
        raise RuntimeError("kaput")

    server = metrics.serve("127.0.0.1", 0, health=boom, ready=boom)
    status, _, body = fetch(f"{server.url}/healthz")
    assert status == 503 and "kaput" in body


def test_default_registry_includes_process_metrics() -> None:
    m = Metrics()
    names = {f.name for f in m.registry.collect()}
    assert "streamkm_inertia" in names
    assert "process_resident_memory_bytes" in names or "python_info" in names


def test_idle_connections_hold_a_bounded_number_of_threads(metrics: Metrics) -> None:
    import socket
    import threading
    import time

    from streamkm.metrics import IDLE_TIMEOUT_S, MAX_CONNECTIONS

    server = metrics.serve("127.0.0.1", 0, health=lambda: (True, ""), ready=lambda: (True, ""))
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(400)]
    try:
        # Let the server accept what it will; the thread count must never pass the bound.
        deadline = time.monotonic() + 2.0
        peak = before
        while time.monotonic() < deadline:
            peak = max(peak, threading.active_count())
            time.sleep(0.05)
        assert peak <= before + MAX_CONNECTIONS
        # Idle connections are dropped after IDLE_TIMEOUT_S, so a scrape gets through.
        deadline = time.monotonic() + IDLE_TIMEOUT_S + 10
        status = None
        while time.monotonic() < deadline and status != 200:
            try:
                status = fetch(f"{server.url}/metrics")[0]
            except OSError:
                time.sleep(0.2)
        assert status == 200
    finally:
        for s in idle:
            s.close()


def test_metrics_speak_gzip_openmetrics_and_head(metrics: Metrics) -> None:
    import gzip

    server = metrics.serve("127.0.0.1", 0, health=lambda: (True, ""), ready=lambda: (True, ""))
    metrics.batches.inc(2)
    url = f"{server.url}/metrics"

    req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert b"streamkm_batches_total 2.0" in gzip.decompress(resp.read())

    req = urllib.request.Request(url, headers={"Accept": "application/openmetrics-text"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        assert resp.read().rstrip().endswith(b"# EOF")

    for path in ("/metrics", "/healthz", "/readyz"):
        req = urllib.request.Request(f"{server.url}{path}", method="HEAD")
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200 and resp.read() == b""
            assert int(resp.headers["Content-Length"]) > 0
    metrics.close()
