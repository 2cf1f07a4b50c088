"""The sync topic's records: an init proposal, or a delta.

A record value is one line of JSON (the header), a newline, then the arrays as little-endian
float64 / int64 bytes, in the order the header lists them. Decoding is exact: every replica
folds the same numbers.

* ``{"type": "init", "instance", "k", "d"}`` + centroids (k·d float64). The first init in the
  log seeds the model; later ones are ignored.
* ``{"type": "delta", "instance", "topic", "partition", "first", "after", "n", "m", "d",
  "epoch", "err"}`` + index (m int64) + sums (m·d float64) + weights (m) + sse (m) + sse2 (m):
  only the m centroids the delta touches travel. ``err`` (the rows' unclipped squared error)
  and ``sse2`` are absent from records written before the anomaly score's second moments
  travelled.
* ``{"type": "snapshot", "instance", "meta", "arrays": [[name, shape], …]}`` + each array
  (float64): a replica's whole state as it stood at ``meta["sync_offset"]``, so a reader can
  start there instead of at the beginning of the log.

Examples
--------
>>> import numpy as np
>>> kind, body = decode(encode_init("a", np.zeros((2, 3))))
>>> kind, body.shape
('init', (2, 3))
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from streamkm.errors import StateError
from streamkm.shared.replica import Delta

_F8 = np.dtype("<f8")
_I8 = np.dtype("<i8")


def encode_init(instance: str, centroids: np.ndarray) -> bytes:
    """An init proposal: the sender's seeding of the model."""
    C = np.ascontiguousarray(centroids, dtype=_F8)
    k, d = C.shape
    head = {"type": "init", "instance": instance, "k": int(k), "d": int(d)}
    return json.dumps(head, separators=(",", ":")).encode() + b"\n" + C.tobytes()


def encode_delta(delta: Delta) -> bytes:
    """A delta's bytes (sparse: only the centroids it touches)."""
    m = int(delta.index.size)
    d = int(delta.sums.shape[1]) if delta.sums.ndim == 2 else 0
    head = {
        "type": "delta", "instance": delta.instance, "topic": delta.topic,
        "partition": delta.partition, "first": delta.first, "after": delta.after,
        "n": delta.n, "m": m, "d": d, "epoch": delta.epoch,
    }  # fmt: skip
    if delta.err is not None:
        head["err"] = float(delta.err)
    parts = [
        json.dumps(head, separators=(",", ":")).encode(),
        b"\n",
        np.ascontiguousarray(delta.index, dtype=_I8).tobytes(),
        np.ascontiguousarray(delta.sums, dtype=_F8).tobytes(),
        np.ascontiguousarray(delta.weights, dtype=_F8).tobytes(),
        np.ascontiguousarray(delta.sse, dtype=_F8).tobytes(),
    ]
    if delta.sse2 is not None:
        parts.append(np.ascontiguousarray(delta.sse2, dtype=_F8).tobytes())
    return b"".join(parts)


def encode_snapshot(instance: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """A replica's state (:meth:`Replica.to_state`) as a sync record."""
    names = sorted(arrays)
    head = {
        "type": "snapshot",
        "instance": instance,
        "meta": meta,
        "arrays": [[n, list(np.shape(arrays[n]))] for n in names],
    }
    body = b"".join(np.ascontiguousarray(arrays[n], dtype=_F8).tobytes() for n in names)
    return json.dumps(head, separators=(",", ":")).encode() + b"\n" + body


def decode(value: bytes) -> tuple[str, Any]:
    """``("init", centroids)``, ``("delta", Delta)`` or ``("snapshot", (meta, arrays))``.

    Raises
    ------
    StateError
        If the record is not one streamkm writes (the sync topic is streamkm's own).
    """
    try:
        nl = value.index(b"\n")
        head = json.loads(value[:nl])
        body = memoryview(value)[nl + 1 :]
        if head["type"] == "init":
            k, d = int(head["k"]), int(head["d"])
            C = np.frombuffer(body, dtype=_F8, count=k * d).reshape(k, d).copy()
            return "init", C
        if head["type"] == "delta":
            m, d = int(head["m"]), int(head["d"])
            pos = 0

            def take(dtype: np.dtype, count: int) -> np.ndarray:
                nonlocal pos
                out = np.frombuffer(body, dtype=dtype, count=count, offset=pos).copy()
                pos += count * dtype.itemsize
                return out

            index = take(_I8, m)
            sums = take(_F8, m * d).reshape(m, d)
            weights = take(_F8, m)
            sse = take(_F8, m)
            sse2 = take(_F8, m) if len(body) - pos == m * _F8.itemsize and m else None
            if pos != len(body):
                raise ValueError(f"{len(body) - pos} trailing bytes")
            delta = Delta(
                str(head["instance"]), str(head["topic"]), int(head["partition"]),
                int(head["first"]), int(head["after"]), int(head["n"]),
                index, sums, weights, sse, int(head.get("epoch", 0)), sse2,
                None if head.get("err") is None else float(head["err"]),
            )  # fmt: skip
            return "delta", delta
        if head["type"] == "snapshot":
            arrays: dict[str, np.ndarray] = {}
            pos = 0
            for name, shape in head["arrays"]:
                count = int(np.prod(shape))
                arrays[str(name)] = (
                    np.frombuffer(body, dtype=_F8, count=count, offset=pos).reshape(shape).copy()
                )
                pos += count * 8
            if pos != len(body):
                raise ValueError(f"{len(body) - pos} trailing bytes")
            return "snapshot", (dict(head["meta"]), arrays)
        raise ValueError(f"unknown record type {head['type']!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"not a streamkm sync record: {exc}") from exc


__all__ = ["decode", "encode_delta", "encode_init", "encode_snapshot"]
