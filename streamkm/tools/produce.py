"""``streamkm produce``: feed vectors from a file, stdin or a synthetic stream to a topic."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import numpy as np
from confluent_kafka import KafkaException, Producer

from streamkm.codec import encode_vectors
from streamkm.config import Settings
from streamkm.errors import KafkaError, StreamkmError
from streamkm.kafka import to_error
from streamkm.tools.synthetic import DriftingBlobs

log = logging.getLogger(__name__)


def read_vectors(source: str) -> np.ndarray:
    """Vectors from a ``.npy`` file, a ``.csv`` file, or ``-`` (CSV on stdin), one per row."""
    try:
        if source == "-":
            X = np.loadtxt(sys.stdin, delimiter=",", ndmin=2)
        elif source.endswith(".npy"):
            X = np.load(source, allow_pickle=False)
        else:
            X = np.loadtxt(source, delimiter=",", ndmin=2)
    except (OSError, ValueError) as exc:
        raise StreamkmError(f"cannot read vectors from {source}: {exc}") from None
    X = np.asarray(X)
    if X.ndim == 1:
        X = X[None, :]
    if X.ndim != 2:
        raise StreamkmError(f"{source}: expected a 2-D array of vectors, got shape {X.shape}")
    return X


class VectorProducer:
    """An idempotent producer that counts delivery failures instead of losing them."""

    def __init__(
        self, conf: dict[str, Any], topic: str, fmt: str, json_field: str | None = None
    ) -> None:
        self.topic = topic
        self.fmt = fmt
        self.json_field = json_field
        self.failures: list[str] = []
        self.sent = 0
        self._producer = Producer(
            {
                "enable.idempotence": True,
                "linger.ms": 20,
                "logger": logging.getLogger("streamkm.librdkafka"),
                **conf,
                "on_delivery": self._report,
            }
        )

    def _report(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failures.append(err.str())

    def send(self, X: np.ndarray) -> None:
        for value in encode_vectors(X, self.fmt, self.json_field):
            self.send_raw(value)

    def send_raw(self, value: bytes | None, key: bytes | None = None) -> None:
        while True:
            try:
                self._producer.produce(self.topic, value, key)
                break
            except BufferError:
                self._producer.poll(0.05)
            except KafkaException as exc:
                raise to_error(exc, f"producing to {self.topic}") from None
        self.sent += 1
        self._producer.poll(0)

    def flush(self, timeout_s: float = 60.0) -> None:
        left = self._producer.flush(timeout_s)
        if left or self.failures:
            raise KafkaError(
                f"{left + len(self.failures)} of {self.sent} records not delivered"
                + (f" (first error: {self.failures[0]})" if self.failures else "")
            )


def produce_command(settings: Settings, args: argparse.Namespace) -> int:
    conf = settings.librdkafka()
    if args.bootstrap:
        conf["bootstrap.servers"] = args.bootstrap
    topic = args.topic or settings.kafka.input_topic
    fmt = args.format or settings.input.format
    out = VectorProducer(conf, topic, fmt, settings.input.json_field)
    if args.synthetic_rate is None:
        X = read_vectors(args.source)
        out.send(X)
        out.flush()
        print(f"sent {out.sent} vectors of dimension {X.shape[1]} to {topic}")
        return 0
    stream = DriftingBlobs(args.dim, seed=int(time.time()))
    rate = max(args.synthetic_rate, 1.0)
    chunk = max(1, int(rate / 10))
    start = time.monotonic()
    try:
        while args.count is None or out.sent < args.count:
            n = chunk if args.count is None else min(chunk, args.count - out.sent)
            X, _ = stream.sample(n)
            out.send(X)
            # Pace to the requested rate.
            ahead = out.sent / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
    except KeyboardInterrupt:
        pass
    out.flush()
    print(f"sent {out.sent} vectors to {topic}")
    return 0


__all__ = ["VectorProducer", "produce_command", "read_vectors"]
