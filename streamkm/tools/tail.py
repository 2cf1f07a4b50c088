"""``streamkm tail``: print the newest records of a topic (assignments, dead letters, the model).

Each record is one JSON line: its partition, offset, timestamp and key, then the value (parsed
when it is JSON, else its length) and, for dead letters, the ``streamkm.`` headers that say
where the input came from and why it was refused. ``--follow`` keeps printing new records.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any, TextIO

from confluent_kafka import Consumer, KafkaException, TopicPartition

from streamkm.config import Settings
from streamkm.errors import StreamkmError
from streamkm.kafka import admin_config, to_error

_META_TIMEOUT_S = 10.0


def record_line(msg: Any) -> str:
    """One record as a JSON line."""
    value = msg.value()
    out: dict[str, Any] = {
        "partition": msg.partition(),
        "offset": msg.offset(),
        "timestamp_ms": msg.timestamp()[1],
        "key": None if msg.key() is None else msg.key().decode("utf-8", "replace"),
    }
    try:
        out["value"] = json.loads(value) if value else None
    except (ValueError, UnicodeDecodeError):
        out["value_bytes"] = len(value)
    try:
        headers = msg.headers() or []
    except (UnicodeDecodeError, SystemError, ValueError, TypeError):
        headers = []
    own = {
        n: (v or b"").decode("utf-8", "replace") for n, v in headers if n.startswith("streamkm.")
    }
    if own:
        out["headers"] = own
    return json.dumps(out, separators=(",", ":"))


def tail(
    settings: Settings,
    topic: str,
    count: int = 10,
    follow: bool = False,
    out: TextIO = sys.stdout,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Print the last ``count`` records of each partition of ``topic`` (then new ones with
    ``follow``); return how many were printed."""
    conf = {
        **admin_config(settings),
        "group.id": f"streamkm-tail-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
    }
    consumer = Consumer(conf)
    printed = 0
    try:
        try:
            md = consumer.list_topics(topic, timeout=_META_TIMEOUT_S).topics.get(topic)
        except KafkaException as exc:
            raise to_error(exc, f"reading the metadata of {topic}") from None
        if md is None or md.error is not None or not md.partitions:
            raise StreamkmError(f"topic {topic} does not exist (or is not readable)")
        tps, ends = [], {}
        for p in sorted(md.partitions):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=_META_TIMEOUT_S
            )
            tps.append(TopicPartition(topic, p, max(low, high - count)))
            ends[p] = high
        consumer.assign(tps)
        done = {p for p, tp in zip(sorted(md.partitions), tps, strict=True) if tp.offset >= ends[p]}
        idle_since = time.monotonic()
        while not stop():
            msgs = consumer.consume(500, 0.2)
            for m in msgs:
                if m.error() is not None:
                    continue
                print(record_line(m), file=out, flush=True)
                printed += 1
                partition, offset = m.partition(), m.offset()
                if partition is not None and offset is not None and offset + 1 >= ends[partition]:
                    done.add(partition)
            if msgs:
                idle_since = time.monotonic()
            caught_up = len(done) == len(ends)
            # Transaction markers leave the last offsets without records: give up after 2 s.
            if not follow and (caught_up or time.monotonic() - idle_since > 2.0):
                break
    finally:
        consumer.close()
    return printed


__all__ = ["record_line", "tail"]
