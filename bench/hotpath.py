"""Micro-benchmarks of the daemon's per-record work, without a broker.

Each line is the best of several repeats over 1024-row bulks (µs per record), the way the
daemon sees them; the alternatives compared are the ones its hot path chose between:

* reading a consumed bulk: the previous per-message loop (``error``/``value``/``topic``/
  ``partition``/``offset``/``key``/``timestamp`` per message, a dict update per message)
  against :class:`streamkm.source.Source` (one C-level ``map`` per field, no ``topic()``);
* decoding: :meth:`VectorDecoder.decode_many` on a bulk of valid float32 vectors;
* encoding the assignments: the ``%``-template encoder per record against the compiled batch
  encoder of :mod:`streamkm.records`, and that encoder with its previous kernel (digit pairs
  from a table, digits counted by repeated division), checked to write the same bytes;
* the keys' copy in ``Batcher.add``: element by element (previous) against its bulk copy;
* producing: one ``produce`` call per record from a Python loop (the previous ``Sink``), what
  :meth:`Sink._produce_all` does now (a ``map`` of ``produce`` drained in C, without a key
  argument when no record has a key), the same through a per-record wrapper with its own
  ``try``/``while`` (older code), and confluent-kafka's ``produce_batch`` (which needs a dict
  per record, and takes no headers).

The producer points at an address where no broker listens: ``produce`` only queues locally,
which is the Python-side cost the daemon pays per record.

    python bench/hotpath.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import math
import sys
import timeit
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Message, Producer
from numba import njit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamkm import records  # noqa: E402
from streamkm import records as records_mod  # noqa: E402
from streamkm.batcher import Batcher  # noqa: E402
from streamkm.codec import VectorDecoder  # noqa: E402
from streamkm.records import encode_assignment, encode_assignments  # noqa: E402
from streamkm.sink import DeliveryReports, Sink  # noqa: E402
from streamkm.source import Source  # noqa: E402

N = 1024
D = 16
TOPIC = "vectors"


# -- the previous kernel, for comparison ------------------------------------------------------
#
# records._write_assignments as it was before its digits were written by divisions by the
# constant 10 of unsigned integers: digit pairs from a table, digits counted by repeated
# division, a division by a variable power of ten in _put_digits. The same bytes (checked in
# main).

_PREV_PAIRS = np.frombuffer(b"".join(b"%02d" % i for i in range(100)), dtype=np.uint8).copy()


@njit(cache=False, nogil=True)
def _prev_put(buf, pos, src):
    for j in range(src.shape[0]):
        buf[pos + j] = src[j]
    return pos + src.shape[0]


@njit(cache=False, nogil=True)
def _prev_n_digits(v: int) -> int:
    n = 1
    while v >= 10000:
        v //= 10000
        n += 4
    if v >= 100:
        v //= 100
        n += 2
    if v >= 10:
        n += 1
    return n


@njit(cache=False, nogil=True)
def _prev_put_uint(buf, pos, v, n, pairs):
    """Write the ``n`` decimal digits of ``v >= 0`` at ``pos``; return the end.

    buf : uint8 (m,) OUT; pairs : uint8 (200,) IN, the digit pairs "00".."99".
    """
    i = pos + n
    while v >= 100:
        r = (v % 100) * 2
        v //= 100
        i -= 2
        buf[i] = pairs[r]
        buf[i + 1] = pairs[r + 1]
    if v >= 10:
        buf[i - 2] = pairs[2 * v]
        buf[i - 1] = pairs[2 * v + 1]
    else:
        buf[i - 1] = 48 + v
    return pos + n


@njit(cache=False, nogil=True)
def _prev_put_int(buf, pos, v, pairs):
    """Write ``"%d" % v`` at ``pos``; return the end. buf : uint8 (m,) OUT."""
    if v < 0:
        buf[pos] = 45  # "-"
        pos += 1
        if v == -9223372036854775808:  # no positive counterpart in int64
            for j, c in enumerate(b"9223372036854775808"):
                buf[pos + j] = c
            return pos + 19
        v = -v
    return _prev_put_uint(buf, pos, v, _prev_n_digits(v), pairs)


@njit(cache=False, nogil=True)
def _prev_put_digits(buf, pos, d, nd, dot, pairs):
    """Write the ``nd`` digits of ``d`` with a "." after the first ``dot`` (none if dot >= nd)."""
    if dot >= nd:
        return _prev_put_uint(buf, pos, d, nd, pairs)
    low_n = nd - dot
    p10 = 1
    for _ in range(low_n):
        p10 *= 10
    end = _prev_put_uint(buf, pos, d // p10, dot, pairs)
    buf[end] = 46  # "."
    low = d % p10
    # The low digits keep their leading zeros: write them right-aligned over "0"s.
    for j in range(low_n):
        buf[end + 1 + j] = 48
    ln = _prev_n_digits(low)
    _prev_put_uint(buf, end + 1 + low_n - ln, low, ln, pairs)
    return end + 1 + low_n


@njit(cache=False, nogil=True)
def _prev_put_g9(buf, pos, x, pow10, pairs):
    """Write ``"%.9g" % x`` (``null`` if not finite) at ``pos``; return the end, or -1.

    -1 means the ninth digit is too close to a rounding tie to be decided in float64 (or x is
    outside 1e-14..1e30): the caller formats x exactly instead. Otherwise the digits are those
    of Python's correctly rounded ``%.9g``: ``y = |x| * 10**(8 - e)`` is one correctly rounded
    operation on exact powers of ten, so it is within 2**-23 of the true value, and rounding it
    is exact unless its fraction is within 5e-7 of one half.
    """
    if x != x or x - x != 0.0:
        buf[pos] = 110  # "null"
        buf[pos + 1] = 117
        buf[pos + 2] = 108
        buf[pos + 3] = 108
        return pos + 4
    if x == 0.0:
        if math.copysign(1.0, x) < 0:
            buf[pos] = 45
            pos += 1
        buf[pos] = 48
        return pos + 1
    if x < 0:
        buf[pos] = 45
        pos += 1
        x = -x
    if x < 1e-14 or x >= 1e30:
        return -1
    e = int(math.floor(math.log10(x)))  # noqa: RUF046 - an int in compiled code too
    k = 8 - e
    y = x * pow10[k] if k >= 0 else x / pow10[-k]
    if y < 1e8:
        e -= 1
        k += 1
        y = x * pow10[k] if k >= 0 else x / pow10[-k]
    elif y >= 1e9:
        e += 1
        k -= 1
        y = x * pow10[k] if k >= 0 else x / pow10[-k]
    f = math.floor(y)
    frac = y - f
    if abs(frac - 0.5) < 5e-7:
        return -1
    d = int(f)
    if frac > 0.5:
        d += 1
    if d == 1000000000:
        d = 100000000
        e += 1
    if d < 100000000 or d >= 1000000000:
        return -1
    nd = 9
    while d % 10 == 0:
        d //= 10
        nd -= 1
    if -4 <= e < 9:  # fixed notation
        if e >= 0:
            if nd <= e + 1:
                pos = _prev_put_uint(buf, pos, d, nd, pairs)
                for _ in range(e + 1 - nd):
                    buf[pos] = 48
                    pos += 1
                return pos
            return _prev_put_digits(buf, pos, d, nd, e + 1, pairs)
        buf[pos] = 48  # "0."
        buf[pos + 1] = 46
        pos += 2
        for _ in range(-e - 1):
            buf[pos] = 48
            pos += 1
        return _prev_put_uint(buf, pos, d, nd, pairs)
    pos = _prev_put_digits(buf, pos, d, nd, 1, pairs)  # exponent notation: d.dddde+XX
    buf[pos] = 101
    buf[pos + 1] = 45 if e < 0 else 43
    pos += 2
    if e < 0:
        e = -e
    if e < 10:
        buf[pos] = 48
        pos += 1
    return _prev_put_uint(buf, pos, e, _prev_n_digits(e), pairs)


@njit(cache=False, nogil=True)
def previous_write_assignments(
    labels, distances, scores, partitions, offsets, middle, buf, slow, pow10, pairs
):
    """Write the JSON records of a batch, each followed by "\\n", into ``buf``.

    labels, partitions, offsets : int64 (n,) IN
    distances, scores : float64 (n,) IN
    middle : uint8 (m,) IN — ``,"model_version":V,"topic":"T","partition":``
    buf : uint8 (capacity,) OUT — room for the longest possible records
    slow : bool (n,) OUT — rows with a value to format exactly in Python (left empty here)
    pow10 : float64 (23,) IN; pairs : uint8 (200,) IN

    Returns the number of bytes written.
    """
    pos = 0
    for i in range(labels.shape[0]):
        pos = _prev_put(buf, pos, records._HEAD)
        pos = _prev_put_int(buf, pos, labels[i], pairs)
        pos = _prev_put(buf, pos, records._DISTANCE)
        q = _prev_put_g9(buf, pos, distances[i], pow10, pairs)
        if q < 0:
            slow[i] = True
            q = pos
        pos = _prev_put(buf, q, records._SCORE)
        q = _prev_put_g9(buf, pos, scores[i], pow10, pairs)
        if q < 0:
            slow[i] = True
            q = pos
        pos = _prev_put(buf, q, middle)
        pos = _prev_put_int(buf, pos, partitions[i], pairs)
        pos = _prev_put(buf, pos, records._OFFSET)
        pos = _prev_put_int(buf, pos, offsets[i], pairs)
        pos = _prev_put(buf, pos, records._TAIL)
    return pos


def previous_encode(*args: Any) -> list[bytes]:
    """encode_assignments with the previous kernel in place of records._write_assignments."""
    current = records._write_assignments

    def kernel(*a: Any) -> int:
        return int(previous_write_assignments(*a, _PREV_PAIRS))

    records._write_assignments = kernel
    try:
        return encode_assignments(*args)
    finally:
        records._write_assignments = current


def edge_cases(seed: int = 0, n: int = 20_000) -> tuple[Any, ...]:
    """Encoder inputs over every magnitude and sign, round values, non-finite, int64 limits."""
    rng = np.random.default_rng(seed)
    dist = 10.0 ** rng.uniform(-16, 31, n) * rng.choice([1.0, -1.0], n)
    dist[::89] = np.round(dist[::89] * 1e3) / 1e3
    score = rng.random(n) * 10.0 ** rng.integers(-5, 12, n)
    score[::97] = score[::97].astype(np.float32)
    score[:8] = [0.0, -0.0, np.nan, np.inf, 1e9, 123456789.0, 1e-5, 100.0]
    labels = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    labels[:2] = [-(2**63), 2**63 - 1]
    offsets = rng.integers(0, 2**62, n)
    offsets[:3] = [0, 10**18, 9_999_999_999]
    return labels, dist, score, 3, "t", rng.integers(0, 1000, n), offsets


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
    edge = edge_cases()
    assert previous_encode(*args_enc) == reference
    assert previous_encode(*edge) == encode_assignments(*edge)
    # Interleaved, so that both see the same load.
    prev_us, now_us = [], []
    for _ in range(3):
        prev_us.append(best(lambda: previous_encode(*args_enc), r, 200))
        now_us.append(best(lambda: encode_assignments(*args_enc), r, 200))
    rows.append(("encode: previous compiled kernel (digit pairs)", min(prev_us)))
    rows.append(("encode: compiled kernel now (constant divisors)", min(now_us)))
    # The kernels alone (no split into records), 15 interleaved repeats, medians.
    middle = np.frombuffer(b',"model_version":12,"topic":"vectors","partition":', np.uint8)
    out_buf, slow = np.empty(N * 200, np.uint8), np.zeros(N, np.bool_)
    lab64, offs64 = labels.astype(np.int64), offs.astype(np.int64)
    kargs = (lab64, dist, score, parts_a, offs64, middle, out_buf, slow, records_mod._POW10)
    prev_k, now_k = [], []
    for _ in range(15):
        prev_k.append(best(lambda: previous_write_assignments(*kargs, _PREV_PAIRS), 3, 200))
        now_k.append(best(lambda: records_mod._write_assignments(*kargs), 3, 200))
    rows.append(("encode kernel alone: previous, median", float(np.median(prev_k))))
    rows.append(("encode kernel alone: now, median", float(np.median(now_k))))

    # Batcher.add's keys: the previous element-wise copy (a list of equal-length bytes must not
    # become a 2-D array) against what it does now: one slice when all are None, else one
    # np.fromiter.
    held = np.empty(2 * N, dtype=object)
    no_keys: list[bytes | None] = [None] * N
    some_keys: list[bytes | None] = [b"k%07d" % i for i in range(N)]

    def keys_loop(keys: list[bytes | None]) -> None:
        for j, k in enumerate(keys):
            held[j] = k

    def keys_bulk(keys: list[bytes | None]) -> None:
        if keys.count(None) == len(keys):
            held[: len(keys)] = None
        else:
            held[: len(keys)] = np.fromiter(keys, dtype=object, count=len(keys))

    for label, keys in (("no keys", no_keys), ("bytes keys", some_keys)):
        rows.append(
            (
                f"Batcher.add keys, {label}: element-wise (previous)",
                best(lambda k=keys: keys_loop(k), r, 500),
            )
        )
        rows.append(
            (f"Batcher.add keys, {label}: bulk (now)", best(lambda k=keys: keys_bulk(k), r, 500))
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

    out = Sink(producer, DeliveryReports(transactional=False), "out")
    some = [None if i % 2 else b"k%d" % i for i in range(N)]

    def sink_keyless() -> None:
        out._produce_all("out", records, keys)

    def sink_keyed() -> None:
        out._produce_all("out", records, some)

    def plain_keyed() -> None:
        for v, k in zip(records, some, strict=True):
            produce("out", v, k)

    cases = (
        ("produce per record, Python loop (previous Sink)", plain),
        ("produce, Sink now: map in C, no key argument", sink_keyless),
        ("produce per record, half keyed, Python loop", plain_keyed),
        ("produce, half keyed, Sink now: map in C", sink_keyed),
        ("produce through a per-record wrapper", wrapped),
        ("produce_batch with a dict per record", batch),
    )
    # Interleaved rounds, the best of each kept: the machine's load moves every figure.
    best_of: dict[str, float] = {}
    for _ in range(3):
        for name, fn in cases:
            producer.purge()
            us = best(fn, r, 20)
            best_of[name] = min(best_of.get(name, us), us)
    producer.purge()
    rows += list(best_of.items())
    # The produce call itself dominates and the machine's load moves it by more than the loop
    # costs: the previous loop and Sink's against each other in 21 adjacent pairs.
    pairs = []
    for _ in range(21):
        producer.purge()
        before = best(plain, 3, 5)
        producer.purge()
        pairs.append((before, best(sink_keyless, 3, 5)))
    producer.purge()
    ratio = float(np.median([b for _, b in pairs]) / np.median([a for a, _ in pairs]))
    wins = sum(b < a for a, b in pairs)
    paired = f"produce, keyless: Sink now / previous loop, {wins} of 21 pairs faster (ratio)"
    rows.append((paired, ratio))

    width = max(len(name) for name, _ in rows)
    print(f"{'µs per record (best of ' + str(r) + ', bulks of 1024)':{width}}")
    for name, us in rows:
        print(f"{name:{width}}  {us:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
