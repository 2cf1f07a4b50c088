"""Prometheus metrics of the daemon and the HTTP server exposing them.

Every metric is created once, on the registry given to :class:`Metrics`, with the ``streamkm_``
prefix and base units (seconds, messages). The HTTP server serves ``/metrics``, ``/healthz`` and
``/readyz``.

Examples
--------
>>> from prometheus_client import CollectorRegistry
>>> registry = CollectorRegistry()
>>> m = Metrics(registry)
>>> m.messages_consumed.inc(3)
>>> registry.get_sample_value("streamkm_messages_consumed_total")
3.0
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)

from streamkm import __version__
from streamkm.codec import REASONS

logger = logging.getLogger(__name__)

STAGES = ("decode", "model", "produce")
# Dead-letter reasons are the decoder's; their series exist (at 0) from the start.
DEAD_LETTER_REASONS = REASONS
# Bucket bounds in seconds: 1-2.5-5 steps from 1 ms to 10 s, widened for each histogram.
_STEPS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (0.0005, *_STEPS)
CHECKPOINT_BUCKETS = (*_STEPS, 30.0, 60.0)

HealthCheck = Callable[[], tuple[bool, str]]


class Metrics:
    """All metrics of the daemon.

    Parameters
    ----------
    registry : CollectorRegistry, optional
        Where to register. When None, a new registry is created with the process and platform
        collectors added (``process_resident_memory_bytes`` …).
    clock : callable, default time.monotonic
        Used for the checkpoint age; injectable for tests.
    wall_clock : callable, default time.time
        Used for ``streamkm_last_checkpoint_timestamp_seconds``.

    Notes
    -----
    Labelled series whose label values are known up front (dead-letter reasons, batch stages)
    are created at zero, so rates and alerts see them before the first event.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        self.registry = registry
        self._clock = clock
        self._wall_clock = wall_clock
        self._started = clock()
        self._last_checkpoint: float | None = None
        self._server: MetricsServer | None = None
        self._lag_labels: set[tuple[str, str]] = set()
        self._total_lag: float | None = None
        self._cluster_gauges: list[Any] = []
        self._lock = threading.Lock()
        r = registry

        self.messages_consumed = Counter(
            "streamkm_messages_consumed", "Messages consumed from the input topic.", registry=r
        )
        self.messages_assigned = Counter(
            "streamkm_messages_assigned",
            "Messages assigned to a cluster and produced to the output topic.",
            registry=r,
        )
        self.messages_dead_lettered = Counter(
            "streamkm_messages_dead_lettered",
            "Messages rejected as bad input, by reason.",
            ["reason"],
            registry=r,
        )
        self.batches = Counter("streamkm_batches", "Mini-batches processed.", registry=r)
        self.batch_duration = Histogram(
            "streamkm_batch_duration_seconds",
            "Time spent per mini-batch, by stage.",
            ["stage"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inertia = Gauge(
            "streamkm_inertia",
            "Mean squared distance to the assigned centroid, last batch.",
            registry=r,
        )
        self.inertia_ewma = Gauge(
            "streamkm_inertia_ewma", "Exponential moving average of streamkm_inertia.", registry=r
        )
        self.samples_seen = Gauge(
            "streamkm_samples_seen", "Samples (total weight) absorbed by the model.", registry=r
        )
        self.model_version = Gauge(
            "streamkm_model_version", "Model version (number of update steps).", registry=r
        )
        self.cluster_size = Gauge(
            "streamkm_cluster_size", "Weight of each cluster.", ["cluster"], registry=r
        )
        self.centroid_shift = Gauge(
            "streamkm_centroid_shift", "Mean centroid movement in the last batch.", registry=r
        )
        self.consumer_lag = Gauge(
            "streamkm_consumer_lag",
            "Messages between the consumer's position and the end of each assigned partition.",
            ["topic", "partition"],
            registry=r,
        )
        self.consumer_lag_seconds = Gauge(
            "streamkm_consumer_lag_seconds",
            "Age of the newest consumed input while there is lag (0 when caught up).",
            registry=r,
        )
        self.rows_held = Gauge(
            "streamkm_rows_held",
            "Valid rows consumed and waiting for their batch (for seeding, before the first one).",
            registry=r,
        )
        self.checkpoints = Counter("streamkm_checkpoints", "Checkpoints written.", registry=r)
        self.checkpoint_duration = Histogram(
            "streamkm_checkpoint_duration_seconds",
            "Time from the copy of the state to a durable checkpoint file (background write).",
            buckets=CHECKPOINT_BUCKETS,
            registry=r,
        )
        self.last_checkpoint_timestamp = Gauge(
            "streamkm_last_checkpoint_timestamp_seconds",
            "Unix time of the last checkpoint.",
            registry=r,
        )
        self.checkpoint_age = Gauge(
            "streamkm_checkpoint_age_seconds",
            "Seconds since the last checkpoint (since start before the first).",
            registry=r,
        )
        self.checkpoint_age.set_function(self._checkpoint_age)
        self.checkpoint_interval = Gauge(
            "streamkm_checkpoint_interval_seconds",
            "Configured checkpoint interval.",
            registry=r,
        )
        self.produce_errors = Counter(
            "streamkm_produce_errors", "Failed deliveries to Kafka.", registry=r
        )
        self.group_members = Gauge(
            "streamkm_group_members",
            "Members of the consumer group after the last rebalance; above 1, each instance "
            "keeps its own model (no shared-model mode yet).",
            registry=r,
        )
        self.sync_lag = Gauge(
            "streamkm_sync_lag_records",
            "Shared-model mode: sync-log records not yet folded into this replica.",
            registry=r,
        )
        self.sync_staleness = Gauge(
            "streamkm_sync_staleness_seconds",
            "Shared-model mode: age of the newest folded record while behind the log (0 when caught up).",
            registry=r,
        )
        self.sync_produced = Counter(
            "streamkm_sync_deltas_produced", "Shared-model mode: deltas sent.", registry=r
        )
        self.sync_applied = Counter(
            "streamkm_sync_records_applied",
            "Shared-model mode: sync records folded in.",
            registry=r,
        )
        self.sync_rejected = Counter(
            "streamkm_sync_records_rejected",
            "Shared-model mode: sync records left out (a range already absorbed, a second init).",
            registry=r,
        )
        self.sync_bytes_sent = Counter(
            "streamkm_sync_sent_bytes", "Shared-model mode: bytes of deltas sent.", registry=r
        )
        self.sync_bytes_read = Counter(
            "streamkm_sync_read_bytes", "Shared-model mode: bytes of sync records read.", registry=r
        )
        self.shared_model = Gauge(
            "streamkm_shared_model",
            "1 in shared-model mode (kafka.sync_topic: the group's instances serve one model).",
            registry=r,
        )
        self.ready = Gauge(
            "streamkm_ready",
            "1 when the daemon is ready to label (partitions assigned, model initialised), else 0.",
            registry=r,
        )
        self.info = Gauge("streamkm_info", "Build information.", ["version"], registry=r)
        self.info.labels(version=__version__).set(1)

        for reason in DEAD_LETTER_REASONS:
            self.messages_dead_lettered.labels(reason=reason)
        for stage in STAGES:
            self.batch_duration.labels(stage=stage)

    # -- helpers the loop calls --------------------------------------------------------------

    def _checkpoint_age(self) -> float:
        last = self._last_checkpoint
        return self._clock() - (self._started if last is None else last)

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record the time one batch spent in ``stage`` (decode, model or produce)."""
        self.batch_duration.labels(stage=stage).observe(seconds)

    def record_dead_letter(self, reason: str, n: int = 1) -> None:
        """Count ``n`` messages rejected for ``reason``."""
        self.messages_dead_lettered.labels(reason=reason).inc(n)

    def set_checkpoint_interval(self, seconds: float) -> None:
        """Publish the configured checkpoint interval (for age alerts)."""
        self.checkpoint_interval.set(seconds)

    def record_checkpoint(self, duration_s: float) -> None:
        """Record a durable checkpoint that took ``duration_s`` to write."""
        self.checkpoints.inc()
        self.checkpoint_duration.observe(duration_s)
        self.last_checkpoint_timestamp.set(self._wall_clock())
        self._last_checkpoint = self._clock()

    def record_model(self, model: Any) -> None:
        """Copy the model's statistics into the gauges.

        Reads ``inertia_``, ``inertia_ewma_``, ``n_samples_seen_``, ``n_steps_``, ``counts_``
        and ``last_shift_``; a missing or None attribute leaves its gauge alone.
        """
        for gauge, attr in (
            (self.inertia, "inertia_"),
            (self.inertia_ewma, "inertia_ewma_"),
            (self.samples_seen, "n_samples_seen_"),
            (self.model_version, "n_steps_"),
            (self.centroid_shift, "last_shift_"),
        ):
            value = getattr(model, attr, None)
            if value is not None:
                gauge.set(float(value))
        counts = getattr(model, "counts_", None)
        if counts is not None:
            sizes = np.asarray(counts, dtype=np.float64).tolist()
            if len(sizes) != len(self._cluster_gauges):
                # Another number of clusters than before (a reset model): new series.
                self.cluster_size.clear()
                # The labelled children are kept: .labels() per cluster per batch is costly.
                self._cluster_gauges = [
                    self.cluster_size.labels(cluster=str(j)) for j in range(len(sizes))
                ]
            for gauge, size in zip(self._cluster_gauges, sizes, strict=True):
                gauge.set(size)

    def update_lag_from_stats(self, stats_json: str) -> int:
        """Set ``streamkm_consumer_lag`` from librdkafka's statistics JSON.

        Meant as the consumer's ``stats_cb``. Partitions absent from these statistics, or with
        an unknown lag (-1), lose their series; the internal partition -1 is skipped. Malformed
        input is logged and ignored.

        Returns
        -------
        int
            Number of partitions whose lag was set.
        """
        try:
            stats = json.loads(stats_json)
            seen: dict[tuple[str, str], float] = {}
            for topic, tdata in (stats.get("topics") or {}).items():
                for pid, pdata in (tdata.get("partitions") or {}).items():
                    if int(pid) < 0:
                        continue
                    lag = pdata.get("consumer_lag")
                    if lag is None or lag < 0:
                        continue
                    seen[(str(topic), str(int(pid)))] = float(lag)
        except (ValueError, TypeError, AttributeError) as exc:
            logger.debug("ignoring malformed librdkafka statistics: %s", exc)
            return 0
        self.set_lag(seen)
        return len(seen)

    def set_lag(self, lags: Mapping[tuple[str, str], float], seconds: float | None = None) -> None:
        """Set ``streamkm_consumer_lag`` to ``{(topic, partition): lag}``; others lose their
        series. ``seconds`` sets ``streamkm_consumer_lag_seconds``."""
        with self._lock:
            for labels in self._lag_labels - lags.keys():
                with contextlib.suppress(KeyError):
                    self.consumer_lag.remove(*labels)
            for (topic, partition), lag in lags.items():
                self.consumer_lag.labels(topic=topic, partition=partition).set(lag)
            self._lag_labels = set(lags)
            self._total_lag = sum(lags.values()) if lags else None
        if seconds is not None:
            self.consumer_lag_seconds.set(seconds)

    def total_lag(self) -> float | None:
        """Sum of the last known consumer lag over all partitions (None before any)."""
        return self._total_lag

    # -- HTTP --------------------------------------------------------------------------------

    def serve(self, host: str, port: int, health: HealthCheck, ready: HealthCheck) -> MetricsServer:
        """Start the HTTP server on a daemon thread.

        Parameters
        ----------
        host : str
            Interface to bind.
        port : int
            Port to bind; 0 picks a free one (see :attr:`MetricsServer.port`).
        health, ready : callable returning (bool, str)
            Back ``/healthz`` and ``/readyz``: 200 ``ok`` when true, else 503 with the reason.

        Returns
        -------
        MetricsServer
            The running server; :meth:`close` (here or on it) stops it.
        """
        if self._server is not None:
            raise RuntimeError("the metrics server is already running")
        self._server = MetricsServer(self.registry, host, port, health, ready)
        return self._server

    def close(self) -> None:
        """Stop the HTTP server if it runs."""
        if self._server is not None:
            self._server.close()
            self._server = None


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` over HTTP on a daemon thread.

    ``/metrics`` is prometheus_client's own WSGI app: gzip when the scraper accepts it,
    OpenMetrics when it asks for it (``Accept: application/openmetrics-text``), ``name[]``
    filters; every path also answers ``HEAD``.

    Attributes
    ----------
    host : str
        Bound address.
    port : int
        Bound port (the real one when 0 was asked for).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        health: HealthCheck,
        ready: HealthCheck,
    ) -> None:
        self._httpd = _BoundedWSGIServer((host, port), _QuietHandler)
        self._httpd.set_app(daemon_app(registry, health, ready))
        self.host = str(self._httpd.server_address[0])
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="streamkm-metrics", daemon=True
        )
        self._thread.start()
        logger.info("metrics at %s", self.url)

    @property
    def url(self) -> str:
        """Base URL of the server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def daemon_app(registry: CollectorRegistry, health: HealthCheck, ready: HealthCheck) -> Any:
    """The WSGI app of the metrics port: ``/metrics`` (prometheus_client's app),
    ``/healthz`` and ``/readyz`` (200 ``ok`` or 503 with the reason), 404 elsewhere."""
    metrics_app = make_wsgi_app(registry)
    text = "text/plain; charset=utf-8"

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        head = environ.get("REQUEST_METHOD") == "HEAD"
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            if head:
                environ = {**environ, "REQUEST_METHOD": "GET"}
            captured: list[Any] = []
            body = b"".join(metrics_app(environ, lambda s, h, *a: captured.append((s, h))))
            status, headers = captured[0]
        elif path in ("/healthz", "/readyz"):
            check = health if path == "/healthz" else ready
            try:
                ok, reason = check()
            except Exception as exc:
                ok, reason = False, f"check failed: {exc}"
            body = (("ok" if ok else (reason or "not ok")) + "\n").encode()
            status = "200 OK" if ok else "503 Service Unavailable"
            headers = [("Content-Type", text)]
        else:
            status, headers, body = "404 Not Found", [("Content-Type", text)], b"not found\n"
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [] if head else [body]

    return app


# At most this many connections are served at once, each by its own thread; more are closed
# at once. A connection idle for IDLE_TIMEOUT_S (a slow or silent client) is closed.
MAX_CONNECTIONS = 16
IDLE_TIMEOUT_S = 5.0


class _BoundedWSGIServer(ThreadingMixIn, WSGIServer):
    """A threading WSGI server with a bound on its threads (one per open connection)."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[WSGIRequestHandler]) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.refused = 0
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _QuietHandler(WSGIRequestHandler):
    # Applied to the socket: a client that sends nothing for this long is disconnected.
    timeout = IDLE_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        # Scrapes every few seconds would flood stderr; keep them at debug level.
        logger.debug("%s " + format, self.address_string(), *args)
