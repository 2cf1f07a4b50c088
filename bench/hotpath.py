"""Micro-benchmarks of the daemon's per-record work, without a broker.

Each line is the best of several repeats over 1024-row bulks (µs per record), the way the
daemon sees them; the alternatives compared are the ones its hot path chose between:

* reading a consumed bulk: the previous per-message loop (``error``/``value``/``topic``/
  ``partition``/``offset``/``key``/``timestamp`` per message, a dict update per message)
  against :class:`streamkm.source.Source` (one C-level ``map`` per field, no ``topic()``);
* decoding: :meth:`VectorDecoder.decode_many` on a bulk of valid float32 vectors;
* encoding the assignments: the ``%``-template encoder per record against the compiled batch
  encoder of :mod:`streamkm.records`;
* producing: one ``produce`` call per record, the same through a per-record wrapper with its
  own ``try``/``while`` (the previous code), and confluent-kafka's ``produce_batch`` (which
  needs a dict per record, and takes no headers).

The producer points at an address where no broker listens: ``produce`` only queues locally,
which is the Python-side cost the daemon pays per record.

    python bench/hotpath.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Message, Producer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamkm.batcher import Batcher  # noqa: E402
from streamkm.codec import VectorDecoder  # noqa: E402
from streamkm.records import encode_assignment, encode_assignments  # noqa: E402
from streamkm.source import Source  # noqa: E402

N = 1024
D = 16
TOPIC = "vectors"


def per_record_template(labels, distances, scores, version, topic, partitions, offsets):
    """The previous encoder: one bytes ``%`` template per record (what records replaced)."""
    template = (
        b'{"cluster":%d,"distance":%.9g,"score":%.9g,"model_version":'
        + str(int(version)).encode()
        + b',"topic":"'
        + topic.encode()
        + b'","partition":%d,"offset":%d}'
    )
    rows = zip(
        labels.tolist(), distances.tolist(), scores.tolist(), partitions.tolist(),
        offsets.tolist(), strict=True,
    )  # fmt: skip
    return [template % row for row in rows]


def messages(partitions: int, seed: int = 0) -> list[Message]:
    rng = np.random.default_rng(seed)
    return [
        Message(
            topic=TOPIC, partition=i % partitions, offset=1000 + i, key=None,
            value=rng.normal(size=D).astype("<f4").tobytes(), timestamp=(1, 1_700_000_000_000 + i),
        )
        for i in range(N)
    ]  # fmt: skip


def per_message_ingest(msgs: list[Any], decoder: VectorDecoder) -> None:
    """The previous ingest: per-message accessor calls and bookkeeping."""
    batcher = Batcher(N, 0.1, dtype=np.float32)
    first: dict[tuple[str, int], int] = {}
    after: dict[tuple[str, int], int] = {}
    values, kept = [], []
    for m in msgs:
        if m.error() is not None:
            continue
        kept.append(m)
        values.append(m.value())
    X, ok, _ = decoder.decode_many(values)
    topics = [m.topic() for m in kept]
    parts = [m.partition() for m in kept]
    offs = [m.offset() for m in kept]
    for t, p, o in zip(topics, parts, offs, strict=True):
        first.setdefault((t, p), o)
        after[(t, p)] = o + 1
    idx = ok.tolist()
    batcher.add(
        X, [topics[i] for i in idx], [parts[i] for i in idx], [offs[i] for i in idx],
        [kept[i].key() for i in idx], [kept[i].timestamp()[1] for i in idx],
    )  # fmt: skip


class _Bulks:
    def __init__(self, msgs: list[Message]) -> None:
        self.msgs = msgs

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        return self.msgs


def bulk_ingest(source: Source) -> None:
    batcher = Batcher(N, 0.1, dtype=np.float32)
    bulk = source.consume(N, 0.1)
    assert bulk is not None
    batcher.add(bulk.X, TOPIC, bulk.partitions, bulk.offsets, bulk.keys)


def best(fn: Any, repeats: int, number: int) -> float:
    """Best time per record in µs."""
    return min(timeit.repeat(fn, number=number, repeat=repeats)) / number / N * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    r = args.repeats
    rows: list[tuple[str, float]] = []

    decoder = VectorDecoder("float32", dim=D, dtype=np.float32)
    for parts in (1, 3):
        msgs = messages(parts)
        source = Source(_Bulks(msgs), TOPIC, decoder)
        rows.append(
            (
                f"ingest, {parts} partition(s): per-message loop",
                best(lambda msgs=msgs: per_message_ingest(msgs, decoder), r, 50),
            )
        )
        rows.append(
            (
                f"ingest, {parts} partition(s): Source bulk",
                best(lambda source=source: bulk_ingest(source), r, 50),
            )
        )
    values = [m.value() for m in messages(1)]
    rows.append(("decode_many, float32, d=16", best(lambda: decoder.decode_many(values), r, 100)))

    rng = np.random.default_rng(1)
    labels, dist, score = rng.integers(0, 8, N), rng.random(N) * 3, rng.random(N)
    parts_a, offs = np.zeros(N, np.int64), np.arange(10**6, 10**6 + N)
    args_enc = (labels, dist, score, 12, TOPIC, parts_a, offs)
    reference = [
        encode_assignment(*row) for row in zip(labels, dist, score, [12] * N, [TOPIC] * N, parts_a, offs, strict=True)
    ]  # fmt: skip
    assert encode_assignments(*args_enc) == reference == per_record_template(*args_enc)
    rows.append(
        ("encode: %-template per record", best(lambda: per_record_template(*args_enc), r, 50))
    )
    rows.append(
        ("encode: compiled batch encoder", best(lambda: encode_assignments(*args_enc), r, 200))
    )

    producer = Producer(
        {
            "bootstrap.servers": "127.0.0.1:9", "linger.ms": 5, "enable.idempotence": True,
            "acks": "all", "delivery.report.only.error": True, "on_delivery": lambda e, m: None,
            "queue.buffering.max.messages": 10_000_000, "queue.buffering.max.kbytes": 2**30,
            "message.timeout.ms": 600_000, "log_level": 0,
        }
    )  # fmt: skip
    records = encode_assignments(*args_enc)
    keys = [None] * N
    produce = producer.produce

    def plain() -> None:
        for v, k in zip(records, keys, strict=True):
            produce("out", v, k)

    def wrapped_one(v: bytes, k: Any) -> None:
        while True:
            try:
                produce("out", v, k)
                return
            except BufferError:
                producer.poll(0.05)

    def wrapped() -> None:
        for v, k in zip(records, keys, strict=True):
            wrapped_one(v, k)

    def batch() -> None:
        producer.produce_batch(
            "out", [{"value": v, "key": k} for v, k in zip(records, keys, strict=True)]
        )

    for name, fn in (
        ("produce per record", plain),
        ("produce through a per-record wrapper", wrapped),
        ("produce_batch with a dict per record", batch),
    ):
        producer.purge()
        rows.append((name, best(fn, r, 20)))
    producer.purge()

    width = max(len(name) for name, _ in rows)
    print(f"{'µs per record (best of ' + str(r) + ', bulks of 1024)':{width}}")
    for name, us in rows:
        print(f"{name:{width}}  {us:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
