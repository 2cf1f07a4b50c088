"""``streamkm produce``: feed vectors from a file, stdin or a synthetic stream to a topic.

CSV input: one vector per row, comma-separated. The first row is a **header** when any of its
fields is not a number; a header names the columns. :func:`produce_command` also reads
``args.header`` (True or False forces either reading; None, the default, detects) and
``args.key_column`` (a header name, or a 0-based column number: that column is sent as each
message's key and the other columns as the vector) when the command line provides them.

Before sending, the brokers must answer a metadata request within ``CONNECT_TIMEOUT_S``;
otherwise the command stops with the cause librdkafka reported (connection refused, name not
resolved, authentication failed …) instead of waiting on a queue nobody drains.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np
from confluent_kafka import KafkaException, Producer

from streamkm.codec import encode_vectors
from streamkm.config import Settings
from streamkm.errors import KafkaError, StreamkmError
from streamkm.kafka import to_error
from streamkm.tools.synthetic import DriftingBlobs

log = logging.getLogger(__name__)

#: How long the brokers have to answer before ``produce`` gives up with the cause.
CONNECT_TIMEOUT_S = 10.0
#: How long queued records may wait for delivery before they count as failed.
DELIVERY_TIMEOUT_S = 30.0


@dataclass
class Vectors:
    """Rows to send: the vectors, and each row's key when a key column was chosen."""

    X: np.ndarray
    keys: list[bytes] | None = None
    columns: list[str] | None = None  # the vector's column names, from a CSV header


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def read_csv(
    lines: Iterable[str],
    source: str = "CSV",
    header: bool | None = None,
    key_column: str | None = None,
) -> Vectors:
    """Vectors (and keys) from CSV text.

    Parameters
    ----------
    lines : iterable of str
        The CSV text; blank lines are skipped.
    header : bool or None
        Whether the first row names the columns; None: it does when any of its fields is not
        a number.
    key_column : str, optional
        The column sent as the message key: a header name, or a 0-based column number.
    """
    rows = [(n, row) for n, row in enumerate(csv.reader(lines), start=1) if row and any(row)]
    if not rows:
        raise StreamkmError(f"{source}: no rows")
    names: list[str] | None = None
    first = [field.strip() for field in rows[0][1]]
    if header is None:
        header = not all(_is_number(field) for field in first)
    if header:
        names = first
        rows = rows[1:]
        if not rows:
            raise StreamkmError(f"{source}: a header row and no vectors")
    width = len(names) if names is not None else len(rows[0][1])
    key_index: int | None = None
    if key_column is not None:
        if names is not None and key_column in names:
            key_index = names.index(key_column)
        elif key_column.isdigit() and int(key_column) < width:
            key_index = int(key_column)
        else:
            known = f"; the header has {', '.join(names)}" if names else ""
            raise StreamkmError(f"{source}: no key column {key_column!r}{known}")
    if width - (key_index is not None) < 1:
        raise StreamkmError(f"{source}: no vector columns besides the key")
    values: list[list[float]] = []
    keys: list[bytes] | None = [] if key_index is not None else None
    for line, row in rows:
        if len(row) != width:
            raise StreamkmError(f"{source}, line {line}: {len(row)} fields, expected {width}")
        vector = []
        for i, field in enumerate(row):
            if i == key_index:
                assert keys is not None
                keys.append(field.strip().encode("utf-8"))
                continue
            try:
                vector.append(float(field))
            except ValueError:
                column = names[i] if names else f"column {i}"
                hint = " (a header row? header detection was turned off)" if line == 1 else ""
                raise StreamkmError(
                    f"{source}, line {line}, {column}: {field.strip()!r} is not a number{hint}"
                ) from None
        values.append(vector)
    columns = None if names is None else [c for i, c in enumerate(names) if i != key_index]
    return Vectors(np.asarray(values, dtype=np.float64), keys, columns)


def read_input(source: str, header: bool | None = None, key_column: str | None = None) -> Vectors:
    """Vectors from a ``.npy`` file, a CSV file, or ``-`` (CSV on stdin), one per row."""
    if source.endswith(".npy"):
        if key_column is not None:
            raise StreamkmError(f"{source}: --key-column needs CSV input")
        return Vectors(read_vectors(source))
    try:
        if source == "-":
            return read_csv(_lines(sys.stdin), "stdin", header, key_column)
        with open(source, encoding="utf-8", newline="") as fh:
            return read_csv(_lines(fh), source, header, key_column)
    except (OSError, UnicodeDecodeError) as exc:
        raise StreamkmError(f"cannot read vectors from {source}: {exc}") from None


def _lines(fh: TextIO) -> io.StringIO:
    return io.StringIO(fh.read(), newline="")


def read_vectors(source: str) -> np.ndarray:
    """Vectors from a ``.npy`` file, a ``.csv`` file, or ``-`` (CSV on stdin), one per row.

    A CSV header row (a first row that is not all numbers) is skipped.
    """
    if not source.endswith(".npy"):
        return read_input(source).X
    try:
        X = np.load(source, allow_pickle=False)
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
        self.errors: list[str] = []  # librdkafka's client errors, in order
        self.sent = 0
        self.bootstrap = str(conf.get("bootstrap.servers", ""))
        self._producer = Producer(
            {
                "enable.idempotence": True,
                "linger.ms": 20,
                "logger": logging.getLogger("streamkm.librdkafka"),
                **conf,
                "error_cb": self._error,
                "on_delivery": self._report,
            }
        )

    def _report(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failures.append(err.str())

    def _error(self, err: Any) -> None:
        # "... (after 3ms in state CONNECT)" differs between retries of the same failure.
        self.errors.append(re.sub(r" \(after \d+ms in state \w+\)$", "", err.str()))

    def _cause(self) -> str:
        """The distinct client errors seen so far (the first is usually the root cause)."""
        distinct = list(dict.fromkeys(self.errors))
        return ": " + "; ".join(distinct[:2]) if distinct else ""

    def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Wait until the brokers answer a metadata request; raise with the cause if not."""
        try:
            md = self._producer.list_topics(timeout=timeout_s)
            answered = bool(md.brokers)
        except KafkaException as exc:
            answered = False
            self._producer.poll(0)  # serve the error callbacks: they hold the root cause
            self.errors.append(exc.args[0].str())
        if not answered:
            raise KafkaError(
                f"the brokers at {self.bootstrap} did not answer within {timeout_s:.0f} s"
                + self._cause()
            )

    def send(self, X: np.ndarray, keys: Sequence[bytes] | None = None) -> None:
        values = encode_vectors(X, self.fmt, self.json_field)
        if keys is None:
            for value in values:
                self.send_raw(value)
        else:
            for value, key in zip(values, keys, strict=True):
                self.send_raw(value, key)

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
            first = f" (first error: {self.failures[0]})" if self.failures else ""
            raise KafkaError(
                f"{left + len(self.failures)} of {self.sent} records not delivered to "
                f"{self.topic} at {self.bootstrap}{first}{self._cause()}"
            )


def produce_command(settings: Settings, args: argparse.Namespace) -> int:
    conf = settings.librdkafka()
    # Bounded: records the brokers do not take within this time fail with their cause.
    conf.setdefault("message.timeout.ms", int(DELIVERY_TIMEOUT_S * 1000))
    if args.bootstrap:
        conf["bootstrap.servers"] = args.bootstrap
    topic = args.topic or settings.kafka.input_topic
    fmt = args.format or settings.input.format
    header = getattr(args, "header", None)
    key_column = getattr(args, "key_column", None)
    data = read_input(args.source, header, key_column) if args.synthetic_rate is None else None
    out = VectorProducer(conf, topic, fmt, settings.input.json_field)
    out.connect()
    if data is not None:
        out.send(data.X, data.keys)
        out.flush(DELIVERY_TIMEOUT_S + 5.0)
        keyed = f", keyed by {key_column}" if data.keys is not None else ""
        print(f"sent {out.sent} vectors of dimension {data.X.shape[1]} to {topic}{keyed}")
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
    out.flush(DELIVERY_TIMEOUT_S + 5.0)
    print(f"sent {out.sent} vectors to {topic}")
    return 0


__all__ = ["VectorProducer", "Vectors", "produce_command", "read_csv", "read_input", "read_vectors"]
