"""The records streamkm writes: assignments, dead letters and the published model.

Everything a reader of the output topics sees is written here, so the output contract changes
in this one file:

* :func:`encode_assignments` — one JSON record per input, a whole batch at a time in compiled
  code (:func:`_write_assignments`), byte for byte what :func:`encode_assignment` writes per row;
* :func:`dead_letter_record` — an input that will not reach the model, with the headers naming
  where it came from and why it was refused, sized to fit the dead-letter topic;
* :func:`model_record` — the model's public state, published on every checkpoint.

Examples
--------
>>> import numpy as np
>>> encode_assignments(np.array([2]), np.array([0.5]), np.array([0.1]), 7, "vectors",
...                    np.array([0]), np.array([42]))
[b'{"cluster":2,"distance":0.5,"score":0.1,"model_version":7,"topic":"vectors","partition":0,"offset":42}']
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, SupportsFloat, SupportsInt

import numpy as np
from numba import njit

from streamkm.errors import DecodeError

# -- assignments -------------------------------------------------------------------------------

# Distances and scores carry 9 significant digits (``%.9g``): every float32 round-trips exactly.
_FLOAT_FMT = "%.9g"
# Records are joined with this byte in one buffer and split apart in one call; JSON text and
# Kafka topic names never contain it.
_SEP = b"\n"
_POW10 = np.array([10.0**i for i in range(23)])  # exact in float64
_HEAD = np.frombuffer(b'{"cluster":', dtype=np.uint8)
_DISTANCE = np.frombuffer(b',"distance":', dtype=np.uint8)
_SCORE = np.frombuffer(b',"score":', dtype=np.uint8)
_OFFSET = np.frombuffer(b',"offset":', dtype=np.uint8)
_TAIL = np.frombuffer(b"}" + _SEP, dtype=np.uint8)
# The longest a record can be beyond its constant parts: three int64 (20 characters each with
# a sign) and two floats ("-1.23456789e-300" is 16).
_MAX_VARIABLE = 3 * 20 + 2 * 16


def _float_json(x: float) -> str:
    # JSON has no NaN/Infinity; null keeps the payload parseable by any consumer.
    return _FLOAT_FMT % x if x - x == 0.0 else "null"


def encode_assignment(
    cluster: SupportsInt,
    distance: SupportsFloat,
    score: SupportsFloat,
    model_version: SupportsInt,
    topic: str,
    partition: SupportsInt,
    offset: SupportsInt,
) -> bytes:
    """Encode one assignment as compact JSON: the reference for :func:`encode_assignments`.

    Returns
    -------
    bytes
        ``{"cluster":…,"distance":…,"score":…,"model_version":…,"topic":…,"partition":…,
        "offset":…}``; distance and score with 9 significant digits, ``null`` when not finite.
    """
    return (
        f'{{"cluster":{int(cluster)},"distance":{_float_json(float(distance))},'
        f'"score":{_float_json(float(score))},"model_version":{int(model_version)},'
        f'"topic":{json.dumps(str(topic))},"partition":{int(partition)},"offset":{int(offset)}}}'
    ).encode()


def encode_assignments(
    labels: Any,
    distances: Any,
    scores: Any,
    model_version: int,
    topic: str,
    partitions: Any,
    offsets: Any,
) -> list[bytes]:
    """Encode a batch of assignments, the same bytes as :func:`encode_assignment` per row.

    The records are written into one buffer by compiled code and split apart with one call;
    the few values whose ninth digit the fast formatting cannot decide for sure (a distance
    within 5e-7 of a rounding tie, or outside 1e-14..1e30) are formatted by Python instead.

    Parameters
    ----------
    labels : array-like of int, shape (n,)
        Cluster of each row.
    distances, scores : array-like of float, shape (n,)
        Distance and anomaly score of each row.
    model_version : int
        Model version, shared by the batch.
    topic : str
        Source topic, shared by the batch.
    partitions, offsets : array-like of int, shape (n,) or scalar
        Source partition and offset of each row (a scalar is shared by all rows).

    Returns
    -------
    list of bytes
        One JSON payload per row.
    """
    lab = np.ascontiguousarray(labels, dtype=np.int64)
    n = lab.shape[0]
    dist = np.ascontiguousarray(distances, dtype=np.float64)
    score = np.ascontiguousarray(scores, dtype=np.float64)
    part = np.ascontiguousarray(np.broadcast_to(partitions, (n,)), dtype=np.int64)
    off = np.ascontiguousarray(np.broadcast_to(offsets, (n,)), dtype=np.int64)
    if not (dist.shape == score.shape == (n,)) or lab.ndim != 1:
        raise ValueError("all per-row arguments must have the same length")
    if n == 0:
        return []
    middle = b',"model_version":%d,"topic":%s,"partition":' % (
        int(model_version),
        json.dumps(str(topic)).encode(),
    )
    middle_arr = np.frombuffer(middle, dtype=np.uint8)
    width = len(_HEAD) + len(_DISTANCE) + len(_SCORE) + len(middle) + len(_OFFSET) + len(_TAIL)
    buf = np.empty(n * (width + _MAX_VARIABLE), dtype=np.uint8)
    slow = np.zeros(n, dtype=np.bool_)
    end = _write_assignments(lab, dist, score, part, off, middle_arr, buf, slow, _POW10)
    out = buf[:end].tobytes().split(_SEP)
    out.pop()  # after the last separator
    if slow.any():
        for i in np.flatnonzero(slow).tolist():
            out[i] = encode_assignment(
                lab[i], dist[i], score[i], model_version, topic, part[i], off[i]
            )
    return out


def warm_up() -> None:
    """Compile (or load from Numba's cache) the batch encoder before the first batch needs it."""
    one = np.ones(1)
    encode_assignments(one.astype(np.int64), one, one, 0, "t", 0, one.astype(np.int64))


# Numba's integers are signed, and an expression mixing uint64 and int64 becomes float64: the
# digit writers work on np.uint64 values with np.uint64 constants, so that every division is
# by the constant 10 of an unsigned integer (a multiply and a shift, no division instruction).
_U10 = np.uint64(10)


@njit(cache=True, nogil=True, inline="always")
def _put_uint(buf, pos, v):  # pragma: no cover - compiled
    """Write the decimal digits of ``v`` (uint64) at ``pos``; return the end.

    buf : uint8 (m,) OUT. The digits are counted by comparisons, then written right to left.
    """
    n = 1
    t = _U10
    while v >= t:
        n += 1
        if n == 20:  # 10**20 does not fit in a uint64
            break
        t = t * _U10
    i = pos + n
    while True:
        i -= 1
        buf[i] = 48 + np.uint8(v % _U10)
        v = v // _U10
        if i == pos:
            break
    return pos + n


@njit(cache=True, nogil=True, inline="always")
def _put_int(buf, pos, v):  # pragma: no cover - compiled
    """Write ``"%d" % v`` (int64) at ``pos``; return the end. buf : uint8 (m,) OUT."""
    if v < 0:
        buf[pos] = 45  # "-"
        pos += 1
        if v == -9223372036854775808:  # no positive counterpart in int64
            return _put_uint(buf, pos, np.uint64(9223372036854775808))
        v = -v
    return _put_uint(buf, pos, np.uint64(v))


@njit(cache=True, nogil=True, inline="always")
def _put_digits(buf, pos, d, nd, dot):  # pragma: no cover - compiled
    """Write the ``nd`` digits of ``d`` (uint64, leading zeros kept) with a "." after the first
    ``dot`` of them (none if dot >= nd), right to left; return the end."""
    length = nd + (1 if dot < nd else 0)
    j = nd - 1
    while j >= 0:
        buf[pos + j + (1 if j >= dot else 0)] = 48 + np.uint8(d % _U10)
        d = d // _U10
        j -= 1
    if dot < nd:
        buf[pos + dot] = 46  # "."
    return pos + length


@njit(cache=True, nogil=True, inline="always")
def _put_g9(buf, pos, x, pow10):  # pragma: no cover - compiled
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
    u = np.uint64(d)
    nd = 9
    while u % _U10 == 0:  # trailing zeros are not written
        u = u // _U10
        nd -= 1
    if -4 <= e < 9:  # fixed notation
        if e >= 0:
            if nd <= e + 1:
                pos = _put_digits(buf, pos, u, nd, nd)
                for _ in range(e + 1 - nd):
                    buf[pos] = 48
                    pos += 1
                return pos
            return _put_digits(buf, pos, u, nd, e + 1)
        buf[pos] = 48  # "0."
        buf[pos + 1] = 46
        pos += 2
        for _ in range(-e - 1):
            buf[pos] = 48
            pos += 1
        return _put_digits(buf, pos, u, nd, nd)
    pos = _put_digits(buf, pos, u, nd, 1)  # exponent notation: d.dddde+XX
    buf[pos] = 101
    buf[pos + 1] = 45 if e < 0 else 43
    pos += 2
    if e < 0:
        e = -e
    if e < 10:
        buf[pos] = 48
        pos += 1
    return _put_uint(buf, pos, np.uint64(e))


@njit(cache=True, nogil=True, inline="always")
def _put(buf, pos, src):  # pragma: no cover
    for j in range(src.shape[0]):
        buf[pos + j] = src[j]
    return pos + src.shape[0]


@njit(cache=True, nogil=True)
def _write_assignments(  # pragma: no cover - compiled
    labels, distances, scores, partitions, offsets, middle, buf, slow, pow10
):
    """Write the JSON records of a batch, each followed by "\\n", into ``buf``.

    labels, partitions, offsets : int64 (n,) IN
    distances, scores : float64 (n,) IN
    middle : uint8 (m,) IN — ``,"model_version":V,"topic":"T","partition":``
    buf : uint8 (capacity,) OUT — room for the longest possible records
    slow : bool (n,) OUT — rows with a value to format exactly in Python (left empty here)
    pow10 : float64 (23,) IN

    Returns the number of bytes written.
    """
    pos = 0
    for i in range(labels.shape[0]):
        pos = _put(buf, pos, _HEAD)
        pos = _put_int(buf, pos, labels[i])
        pos = _put(buf, pos, _DISTANCE)
        q = _put_g9(buf, pos, distances[i], pow10)
        if q < 0:
            slow[i] = True
            q = pos
        pos = _put(buf, q, _SCORE)
        q = _put_g9(buf, pos, scores[i], pow10)
        if q < 0:
            slow[i] = True
            q = pos
        pos = _put(buf, q, middle)
        pos = _put_int(buf, pos, partitions[i])
        pos = _put(buf, pos, _OFFSET)
        pos = _put_int(buf, pos, offsets[i])
        pos = _put(buf, pos, _TAIL)
    return pos


# -- dead letters ------------------------------------------------------------------------------


# -- dead letters --------------------------------------------------------------------------------

HEADER_PREFIX = "streamkm."
HEADER_TOPIC = "streamkm.source.topic"
HEADER_PARTITION = "streamkm.source.partition"
HEADER_OFFSET = "streamkm.source.offset"
HEADER_REASON = "streamkm.error.reason"
HEADER_MESSAGE = "streamkm.error.message"
HEADER_TRUNCATED = "streamkm.error.truncated"
HEADER_HEADERS_DROPPED = "streamkm.error.headers_dropped"

# Room for what a record adds to its key, value and headers in a record batch (batch header,
# varints, attributes), with plenty to spare.
RECORD_OVERHEAD = 512
_PER_HEADER_OVERHEAD = 16


def _header_size(headers: Sequence[tuple[str | bytes, bytes | None]]) -> int:
    size = 0
    for name, value in headers:
        raw = name.encode(errors="surrogateescape") if isinstance(name, str) else bytes(name)
        size += len(raw) + len(value or b"") + _PER_HEADER_OVERHEAD
    return size


def dead_letter_record(
    value: bytes | None,
    key: bytes | None,
    headers: Sequence[tuple[str | bytes, bytes | None]] | None,
    source: tuple[str, int, int],
    reason: str,
    message: str,
    max_record_bytes: int,
    headers_unreadable: bool = False,
) -> tuple[bytes | None, list[tuple[str | bytes, bytes | None]]]:
    """The value and headers of the dead letter of one input, sized to fit one record.

    Parameters
    ----------
    value, key : bytes or None
        The input's value and key.
    headers : sequence of (name, value), optional
        The input's headers. Those in the ``streamkm.`` namespace are dropped: the dead
        letter's own headers replace them, so a forged reason never reaches a reader.
    source : (topic, partition, offset)
        Where the input was read.
    reason, message : str
        The :class:`~streamkm.errors.DecodeError`'s reason and message.
    max_record_bytes : int
        The largest record the producer and the dead-letter topic take. When the input would
        not fit, its headers are dropped first (``streamkm.error.headers_dropped``), then its
        value is cut to what fits and ``streamkm.error.truncated`` holds the original length.
    headers_unreadable : bool, default False
        The input's headers could not be read (e.g. a header name that is not UTF-8); they are
        dropped and ``streamkm.error.headers_dropped`` says so.

    Returns
    -------
    value : bytes or None
        The input's value, or its first bytes.
    headers : list of (name, value)
        The input's own headers (outside ``streamkm.``), then the dead letter's.

    Examples
    --------
    >>> value, headers = dead_letter_record(
    ...     b"x" * 2000, None, [("streamkm.error.reason", b"forged"), ("trace", b"1")],
    ...     ("vectors", 0, 7), "oversized", "too long", max_record_bytes=1024)
    >>> len(value), [name for name, _ in headers][:2], dict(headers)["streamkm.error.truncated"]
    (127, ['trace', 'streamkm.source.topic'], b'2000')
    """
    topic, partition, offset = source
    own: list[tuple[str | bytes, bytes | None]] = [
        (HEADER_TOPIC, topic.encode(errors="surrogateescape")),
        (HEADER_PARTITION, str(int(partition)).encode()),
        (HEADER_OFFSET, str(int(offset)).encode()),
        (HEADER_REASON, reason.encode()),
        (HEADER_MESSAGE, message.encode(errors="replace")),
    ]
    kept = [(name, v) for name, v in (headers or []) if not _in_namespace(name)]
    dropped: str | None = "unreadable (not UTF-8)" if headers_unreadable else None
    budget = max_record_bytes - RECORD_OVERHEAD - len(key or b"")
    # Room for the two optional headers, whether or not they are needed.
    reserve = _header_size([(HEADER_TRUNCATED, b"9" * 20), (HEADER_HEADERS_DROPPED, b"x" * 40)])
    if kept and _header_size(kept) + _header_size(own) + reserve > budget:
        dropped = f"{len(kept)} header(s) too large for the dead-letter topic"
        kept = []
    if dropped is not None:
        own.append((HEADER_HEADERS_DROPPED, dropped.encode()))
    room = max(0, budget - _header_size(kept) - _header_size(own) - reserve)
    if value is not None and len(value) > room:
        own.append((HEADER_TRUNCATED, str(len(value)).encode()))
        value = value[:room]
    return value, [*kept, *own]


def _in_namespace(name: str | bytes) -> bool:
    if isinstance(name, bytes):
        return name.lower().startswith(HEADER_PREFIX.encode())
    return name.lower().startswith(HEADER_PREFIX)


@dataclass
class DeadLetter:
    """A consumed message that will not reach the model.

    Attributes
    ----------
    topic, partition, offset : str, int, int
        Where it was read.
    key, value : bytes or None
        Its key and value, as consumed.
    headers : list of (str, bytes) or None
        Its headers; None when it had none or they could not be read.
    error : DecodeError
        Why it was refused.
    headers_unreadable : bool
        Its headers could not be read (e.g. a header name that is not UTF-8).
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None
    error: DecodeError
    headers_unreadable: bool = False

    def record(
        self, max_record_bytes: int
    ) -> tuple[bytes | None, list[tuple[str | bytes, bytes | None]]]:
        """The value and headers of its dead-letter record (see :func:`dead_letter_record`)."""
        return dead_letter_record(
            self.value, self.key, self.headers, (self.topic, self.partition, self.offset),
            self.error.reason, self.error.message, max_record_bytes, self.headers_unreadable,
        )  # fmt: skip


# -- the model ---------------------------------------------------------------------------------


def model_record(version: int, state: Mapping[str, Any], created_at: float | None = None) -> bytes:
    """The JSON value published to ``kafka.model_topic`` on every checkpoint.

    Parameters
    ----------
    version : int
        Model version.
    state : mapping
        The model's public state (JSON-able), e.g. ``n_samples_seen``, ``n_clusters``, ``dim``,
        ``centroids``, ``counts`` for k-means.
    created_at : float, optional
        Unix time; now by default.

    Returns
    -------
    bytes
        ``{"model_version": …, <state>, "created_at": …}``.
    """
    body = {
        "model_version": int(version),
        **state,
        "created_at": time.time() if created_at is None else created_at,
    }
    return json.dumps(body).encode()


__all__ = [
    "HEADER_HEADERS_DROPPED",
    "HEADER_MESSAGE",
    "HEADER_OFFSET",
    "HEADER_PARTITION",
    "HEADER_REASON",
    "HEADER_TOPIC",
    "HEADER_TRUNCATED",
    "RECORD_OVERHEAD",
    "DeadLetter",
    "dead_letter_record",
    "encode_assignment",
    "encode_assignments",
    "model_record",
    "warm_up",
]
