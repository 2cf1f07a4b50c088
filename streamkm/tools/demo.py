"""``streamkm demo``: a realistic workload streamed through the daemon, with live progress.

Drifting clusters of unequal size and spread, a few percent of far-away outliers and a slice
of malformed messages go into a local Apache Kafka (started here unless a bootstrap server
is configured); the daemon runs in this process and the demo prints what it does.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from streamkm.config import Settings
from streamkm.errors import StreamkmError
from streamkm.tools.synthetic import DriftingBlobs

DIM = 16
N_CLUSTERS = 8
RATE = 10_000  # vectors per second fed to the input topic
MALFORMED_EVERY = 200  # one in 200 messages is malformed (0.5%)
MAX_SECONDS = 100.0


@dataclass
class DemoRun:
    """What the demo feeds and what it sees."""

    messages: int
    sent: int = 0
    outliers: set[int] = field(default_factory=set)
    malformed: int = 0
    feed_error: BaseException | None = None
    history: list[tuple[float, float, float]] = field(default_factory=list)


def _malformed(i: int) -> bytes:
    kinds = (
        b"",  # empty
        b"\x00\x01\x02",  # truncated float
        np.zeros(DIM + 3, "<f4").tobytes(),  # wrong dimension
        np.full(DIM, np.nan, "<f4").tobytes(),  # NaN
    )
    return kinds[(i // MALFORMED_EVERY) % len(kinds)]


def _feed(conf: dict[str, Any], topic: str, run: DemoRun, stop: threading.Event) -> None:
    from streamkm.tools.produce import VectorProducer

    try:
        out = VectorProducer(conf, topic, "float32")
        stream = DriftingBlobs(
            DIM, N_CLUSTERS, outlier_fraction=0.01, drift_per_sample=3e-5, seed=7
        )
        chunk = RATE // 20
        start = time.monotonic()
        while run.sent < run.messages and not stop.is_set():
            n = min(chunk, run.messages - run.sent)
            X, is_outlier = stream.sample(n)
            for j in range(n):
                i = run.sent
                if i % MALFORMED_EVERY == MALFORMED_EVERY - 1:
                    out.send_raw(_malformed(i), key=str(i).encode())
                    run.malformed += 1
                else:
                    out.send_raw(X[j].astype("<f4").tobytes(), key=str(i).encode())
                    if is_outlier[j]:
                        run.outliers.add(i)
                run.sent += 1
            ahead = run.sent / RATE - (time.monotonic() - start)
            if ahead > 0:
                stop.wait(ahead)
        out.flush()
    except BaseException as exc:
        run.feed_error = exc


def _value(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    return registry.get_sample_value(name, labels or {}) or 0.0


def _dead_total(registry: CollectorRegistry) -> float:
    from streamkm.codec import REASONS

    return sum(
        _value(registry, "streamkm_messages_dead_lettered_total", {"reason": r}) for r in REASONS
    )


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC-AUC by ranks (the Mann-Whitney statistic); tied scores (the many 0s) share a rank."""
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    # each run of equal scores gets the mean of the ranks it spans
    first = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    last = np.r_[first[1:], len(scores)]
    mid = (first + last + 1) / 2.0
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.repeat(mid, last - first)
    n_pos = int(positive.sum())
    n_neg = len(scores) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _demo_settings(base: Settings, bootstrap: str, workdir: Path, config_given: bool) -> Settings:
    if config_given:
        return base
    from streamkm.tools.broker import free_port

    data: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": "streamkm-demo",
            "input_topic": "demo-vectors",
            "output_topic": "demo-assignments",
            "dead_letter_topic": "demo-dead-letters",
            "model_topic": "demo-model",
        },
        "input": {"format": "float32", "dim": DIM},
        "model": {
            "n_clusters": N_CLUSTERS,
            "batch_size": 1024,
            "max_batch_wait_ms": 200,
            "half_life": 100_000,
            "seed": 0,
        },
        "checkpoint": {"dir": str(workdir / "checkpoints"), "interval_s": 5.0, "keep": 3},
        "metrics": {"host": "127.0.0.1", "port": free_port()},
        "log": {"level": "WARNING"},
    }
    return Settings.model_validate(data)


def run_demo(settings: Settings, messages: int, report: Path | None, config_given: bool) -> int:
    """Run the demo; return the exit status."""
    from streamkm.app import App
    from streamkm.kafka import ensure_topics
    from streamkm.tools.broker import LocalBroker, free_port

    env_bootstrap = os.environ.get("STREAMKM_KAFKA__BOOTSTRAP_SERVERS")
    broker: LocalBroker | None = None
    if report is not None:
        # Found now rather than after the whole run: matplotlib (the `report` extra) and a
        # place to write the picture.
        from streamkm.tools.report import check_output_path, require_matplotlib

        try:
            require_matplotlib()
            check_output_path(report)
        except StreamkmError as exc:
            print(f"streamkm demo: {exc}", file=sys.stderr)
            return 1
    workdir = Path("demo-data") / time.strftime("run-%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if config_given or env_bootstrap:
            bootstrap = settings.kafka.bootstrap_servers
            print(f"using the configured Kafka at {bootstrap}")
        else:
            print("starting a local Apache Kafka (fetched from Maven Central on first use) ...")
            t0 = time.monotonic()
            broker = LocalBroker(
                dir=Path(tempfile.mkdtemp(prefix="streamkm-demo-broker-")), port=free_port()
            )
            bootstrap = broker.start()
            print(f"  Apache Kafka up at {bootstrap} in {time.monotonic() - t0:.1f}s")
        settings = _demo_settings(settings, bootstrap, workdir, config_given)
        conf = settings.librdkafka()
        k = settings.kafka
        topics: dict[str, dict[str, str]] = {k.input_topic: {}, k.output_topic: {}}
        if k.dead_letter_topic:
            topics[k.dead_letter_topic] = {}
        if k.model_topic:
            topics[k.model_topic] = {"cleanup.policy": "compact"}
        ensure_topics(conf, {k.input_topic: {}}, partitions=3)
        ensure_topics(conf, topics)
        return _run(settings, conf, messages, report, workdir, App)
    except StreamkmError as exc:
        print(f"streamkm demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if broker is not None:
            # The broker's data is this run's alone: stop it and remove its directory.
            try:
                broker.stop()
            finally:
                shutil.rmtree(broker.dir, ignore_errors=True)


def _run(
    settings: Settings,
    conf: dict[str, Any],
    messages: int,
    report: Path | None,
    workdir: Path,
    app_cls: Any,
) -> int:
    registry = CollectorRegistry()
    app = app_cls(settings, registry=registry)
    exit_code: list[int] = []
    daemon = threading.Thread(
        target=lambda: exit_code.append(app.run()), name="streamkm", daemon=True
    )
    run = DemoRun(messages=messages)
    stop_feed = threading.Event()
    feeder = threading.Thread(
        target=_feed, args=(conf, settings.kafka.input_topic, run, stop_feed), daemon=True
    )
    m = settings.metrics
    print(
        f"streaming {messages:,} vectors (dim {DIM}, {N_CLUSTERS} drifting clusters, 1% outliers, "
        f"{100 / MALFORMED_EVERY:.1f}% malformed) at {RATE:,}/s"
    )
    logging.getLogger("streamkm.librdkafka").setLevel(logging.ERROR)  # retries are no news here
    print(f"metrics: http://{m.host}:{m.port}/metrics   checkpoints: {settings.checkpoint.dir}")
    daemon.start()
    feeder.start()
    start = time.monotonic()
    last_print, last_in = start, 0.0
    first_inertia: float | None = None
    try:
        while daemon.is_alive():
            time.sleep(0.25)
            now = time.monotonic()
            consumed = _value(registry, "streamkm_messages_consumed_total")
            assigned = _value(registry, "streamkm_messages_assigned_total")
            dead = _dead_total(registry)
            inertia = _value(registry, "streamkm_inertia")
            ewma = _value(registry, "streamkm_inertia_ewma")
            if ewma and first_inertia is None:
                first_inertia = ewma
            if now - last_print >= 2.0:
                rate = (consumed - last_in) / (now - last_print)
                last_print, last_in = now, consumed
                run.history.append((now - start, inertia, ewma))
                trend = (
                    ""
                    if first_inertia is None
                    else f" ({(ewma / first_inertia - 1) * 100:+.0f}% since start)"
                )
                print(
                    f"[{now - start:5.1f}s] in {consumed:>9,.0f}  assigned {assigned:>9,.0f}  dead {dead:>5,.0f}"
                    f"  {rate:>8,.0f}/s  inertia {inertia:7.3f}  avg {ewma:7.3f}{trend}"
                )
            done_feeding = not feeder.is_alive()
            if done_feeding and (run.feed_error is not None or consumed >= run.sent):
                break
            if now - start > MAX_SECONDS:
                print("time limit reached; stopping")
                break
    except KeyboardInterrupt:
        print("interrupted; stopping")
    stop_feed.set()
    app.request_stop()
    daemon.join(timeout=60)
    feeder.join(timeout=10)
    elapsed = time.monotonic() - start
    if run.feed_error is not None:
        print(f"feeding failed: {run.feed_error}", file=sys.stderr)
        return 1
    return _summary(
        settings, registry, app, run, elapsed, report, workdir, exit_code[0] if exit_code else 1
    )


def _summary(
    settings: Settings,
    registry: CollectorRegistry,
    app: Any,
    run: DemoRun,
    elapsed: float,
    report: Path | None,
    workdir: Path,
    code: int,
) -> int:
    from streamkm.codec import REASONS

    model = app.model
    consumed = _value(registry, "streamkm_messages_consumed_total")
    assigned = _value(registry, "streamkm_messages_assigned_total")
    print("\nsummary")
    print(
        f"  vectors sent         {run.sent:,} in {elapsed:.1f}s ({consumed / max(elapsed, 1e-9):,.0f}/s consumed)"
    )
    print(f"  assignments          {assigned:,.0f}")
    dead = {
        r: _value(registry, "streamkm_messages_dead_lettered_total", {"reason": r}) for r in REASONS
    }
    print(
        "  dead letters         "
        + ", ".join(f"{r} {v:,.0f}" for r, v in dead.items() if v)
        + f" (sent {run.malformed:,} malformed)"
    )
    if model is not None:
        sizes = np.asarray(model.counts_)
        print(f"  model version        {model.n_steps_} ({model.n_samples_seen_:,.0f} samples)")
        print(
            f"  inertia              last batch {model.inertia_:.3f}, moving average {model.inertia_ewma_:.3f}"
        )
        print("  cluster weights      " + " ".join(f"{s:,.0f}" for s in sizes))
        auc = _outlier_auc(settings, run)
        if auc is not None:
            print(
                f"  outlier detection    ROC-AUC {auc:.3f} of the published anomaly scores ({len(run.outliers):,} injected outliers)"
            )
    print(
        f"  checkpoints          {settings.checkpoint.dir}  (streamkm checkpoint show {settings.checkpoint.dir})"
    )
    if report is not None and model is not None:
        from streamkm.tools.report import draw_report

        draw_report(settings.checkpoint.dir, report)
        print(f"  picture              {report}")
    if code != 0:
        print("the daemon stopped with an error; see the messages above", file=sys.stderr)
    return code


def _outlier_auc(settings: Settings, run: DemoRun) -> float | None:
    """Read the published assignments back and score how well they flag the injected outliers."""
    import json

    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            **settings.librdkafka(),
            "group.id": f"streamkm-demo-reader-{os.getpid()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    topic = settings.kafka.output_topic
    try:
        md = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, 0) for p in md.partitions])
        keys: list[int] = []
        scores: list[float] = []
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < 2.0:
            msgs = consumer.consume(10_000, 0.5)
            for msg in msgs:
                key, value = msg.key(), msg.value()
                if msg.error() is None and key is not None and value is not None:
                    keys.append(int(key))
                    scores.append(float(json.loads(value)["score"] or 0.0))
            if msgs:
                idle_since = time.monotonic()
    finally:
        consumer.close()
    if not keys:
        return None
    positive = np.fromiter((k in run.outliers for k in keys), dtype=bool, count=len(keys))
    return _auc(np.asarray(scores), positive)
