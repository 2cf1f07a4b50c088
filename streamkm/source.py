"""The input side: the consumer, one bulk of messages at a time.

:class:`Source` subscribes to the input topic, turns each consumed bulk into a :class:`Bulk` —
the decoded rows with arrays of their partitions, offsets and keys, the dead letters, and the
first and next offset of every partition the bulk touched — and forwards the group's
assignment callbacks to an :class:`AssignmentListener`. It never encodes outputs or touches the
model.

The hot path reads each message's fields with one C-level pass per field
(``list(map(Message.value, messages))``), not a Python loop per message, and calls
``topic()`` on no message: there is one input topic.

Examples
--------
>>> from confluent_kafka import Message
>>> import numpy as np
>>> from streamkm.codec import VectorDecoder
>>> class OneBulk:                      # a stand-in for confluent_kafka.Consumer
...     def consume(self, num_messages, timeout):
...         v = np.ones(2, "<f4").tobytes()
...         return [Message(topic="in", partition=0, offset=o, value=v) for o in (5, 6)]
>>> bulk = Source(OneBulk(), "in", VectorDecoder("float32")).consume(2, 0.1)
>>> bulk.X.shape, bulk.offsets.tolist(), bulk.first, bulk.next
((2, 2), [5, 6], {('in', 0): 5}, {('in', 0): 7})
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from confluent_kafka import KafkaError as _CKafkaError
from confluent_kafka import KafkaException, Message, TopicPartition

from streamkm.codec import VectorDecoder
from streamkm.errors import StreamkmError
from streamkm.kafka import RateLimitedLog, to_error
from streamkm.records import DeadLetter

log = logging.getLogger(__name__)

TopicPart = tuple[str, int]

# Unbound accessors: map() calls them in C, with no Python frame per message.
_error = Message.error
_value = Message.value
_key = Message.key
_partition = Message.partition
_offset = Message.offset
_timestamp = Message.timestamp

_COMMITTED_TIMEOUT_S = 30.0


class AssignmentListener(Protocol):
    """What the group's rebalances are told to (the conductor implements it)."""

    def on_assigned(
        self, partitions: list[TopicPart], committed: Mapping[TopicPart, int]
    ) -> Mapping[TopicPart, int]:
        """Partitions were assigned; return the offset to start each at (absent: the group's).

        ``committed`` holds the group's committed offsets when the source reads them
        (``read_committed_offsets``), else it is empty.
        """
        ...

    def on_revoked(self, partitions: list[TopicPart]) -> None:
        """Partitions are about to be taken away; finish what is held for them now."""
        ...

    def on_lost(self, partitions: list[TopicPart]) -> None:
        """Partitions were lost (another member may own them already); drop their work."""
        ...


@dataclass
class Bulk:
    """What one ``consume`` call brought.

    Attributes
    ----------
    X : ndarray of shape (n, dim)
        The valid vectors, in arrival order.
    partitions : ndarray of int32, shape (n,)
        Partition of each row.
    offsets : ndarray of int64, shape (n,)
        Offset of each row.
    keys : list of (bytes or None), length n
        Key of each row.
    timestamps : ndarray of int64, shape (n,), or None
        Timestamp (ms) of each row; None unless the source was asked for them.
    dead : list of DeadLetter
        The messages refused by the decoder, in arrival order.
    first, next : dict of (topic, partition) to int
        First offset, and one past the last, of every partition in the bulk (valid and dead).
    n_messages : int
        Messages consumed (rows plus dead letters).
    seconds : float
        Time spent turning the messages into this bulk (decoding above all).
    """

    X: np.ndarray
    partitions: np.ndarray
    offsets: np.ndarray
    keys: list[bytes | None]
    timestamps: np.ndarray | None
    dead: list[DeadLetter]
    first: dict[TopicPart, int] = field(default_factory=dict)
    next: dict[TopicPart, int] = field(default_factory=dict)
    n_messages: int = 0
    seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.X.shape[0])


class Source:
    """The consumer of the input topic.

    Parameters
    ----------
    consumer : confluent_kafka.Consumer
        An open consumer (or anything with its methods); closed by :meth:`close`.
    topic : str
        The input topic.
    decoder : VectorDecoder
        Turns message values into vectors.
    cooperative : bool, default True
        The group uses incremental (cooperative) rebalancing.
    read_committed_offsets : bool, default False
        On assignment, read the group's committed offsets and hand them to the listener
        (exactly-once replays from them).
    timestamps : bool, default False
        Gather each row's timestamp into :attr:`Bulk.timestamps` (one more call per message).
    members : callable, optional
        Tells how many members the consumer group has (None when it cannot be told); see
        :meth:`group_members`.

    Notes
    -----
    Errors in callbacks (reading committed offsets, a listener raising
    :class:`~streamkm.errors.StreamkmError`) are raised from the :meth:`consume` call during
    which the callback ran.
    """

    def __init__(
        self,
        consumer: Any,
        topic: str,
        decoder: VectorDecoder,
        cooperative: bool = True,
        read_committed_offsets: bool = False,
        timestamps: bool = False,
        members: Callable[[], int | None] | None = None,
    ) -> None:
        self.consumer = consumer
        self._members = members
        self.topic = topic
        self.decoder = decoder
        self.cooperative = cooperative
        self.read_committed_offsets = read_committed_offsets
        self.timestamps = timestamps
        self.listener: AssignmentListener | None = None
        self._failure: StreamkmError | None = None
        self._closing = False
        self._closed = False
        self._rate_log = RateLimitedLog(log)
        self.newest_ms: int | None = None  # timestamp of the newest message consumed

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(quiet=exc[0] is not None)

    def subscribe(self, listener: AssignmentListener) -> None:
        """Join the group on the input topic; rebalances are told to ``listener``."""
        self.listener = listener
        self.consumer.subscribe(
            [self.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def close(self, quiet: bool = False) -> None:
        """Leave the group and close the consumer (once). ``quiet``: swallow errors."""
        if self._closed:
            return
        self._closing = True
        self._closed = True
        try:
            self.consumer.close()
        except Exception:
            if not quiet:
                raise
            log.debug("closing the consumer failed", exc_info=True)

    # -- the hot path ----------------------------------------------------------------------

    def consume(self, max_messages: int, timeout: float) -> Bulk | None:
        """Consume up to ``max_messages`` within ``timeout`` seconds; None if nothing came.

        Raises
        ------
        KafkaClientError
            On a fatal consumer error (or a failure in a rebalance callback).
        """
        messages = self.consume_messages(max_messages, timeout)
        if not messages:
            return None
        return self._bulk(messages)

    def consume_messages(self, max_messages: int, timeout: float) -> list[Any]:
        """Consume up to ``max_messages`` and return them undecoded (errors handled)."""
        try:
            messages = self.consumer.consume(num_messages=max_messages, timeout=timeout)
        except KafkaException as exc:
            raise to_error(exc, "consuming") from None
        self._raise_failure()
        if not messages:
            return []
        ts_type, ts = messages[-1].timestamp()
        if ts_type and ts > 0:
            self.newest_ms = ts
        if any(map(_error, messages)):
            messages = self._without_errors(messages)
        return messages

    def _bulk(self, messages: list[Any]) -> Bulk:
        t0 = time.perf_counter()
        n = len(messages)
        X, ok_index, errors = self.decoder.decode_many(list(map(_value, messages)))
        partitions = np.fromiter(map(_partition, messages), dtype=np.int32, count=n)
        offsets = np.fromiter(map(_offset, messages), dtype=np.int64, count=n)
        keys = list(map(_key, messages))
        timestamps = None
        if self.timestamps:
            timestamps = np.fromiter(
                (ts for _, ts in map(_timestamp, messages)), dtype=np.int64, count=n
            )
        first, after = _span(self.topic, partitions, offsets)
        dead: list[DeadLetter] = []
        if errors:
            for i, error in errors:
                m = messages[i]
                headers, unreadable = read_headers(m)
                where = (self.topic, int(partitions[i]), int(offsets[i]))
                dead.append(DeadLetter(*where, keys[i], m.value(), headers, error, unreadable))
            partitions = partitions[ok_index]
            offsets = offsets[ok_index]
            keys = [keys[i] for i in ok_index.tolist()]
            if timestamps is not None:
                timestamps = timestamps[ok_index]
        seconds = time.perf_counter() - t0
        return Bulk(X, partitions, offsets, keys, timestamps, dead, first, after, n, seconds)

    def _without_errors(self, messages: list[Any]) -> list[Any]:
        kept = []
        for m in messages:
            err = m.error()
            if err is None:
                kept.append(m)
            elif err.fatal():
                raise to_error(KafkaException(err), "consuming")
            elif err.code() != _CKafkaError._PARTITION_EOF:
                self._rate_log.warning(f"consume-{err.code()}", "consume: %s", err.str())
        return kept

    # -- offsets ---------------------------------------------------------------------------

    def seek(self, offsets: Mapping[TopicPart, int]) -> None:
        """Move the consumer's position of each partition to the given offset."""
        for (t, p), o in offsets.items():
            try:
                self.consumer.seek(TopicPartition(t, p, o))
            except KafkaException as exc:
                raise to_error(exc, f"seeking {t}[{p}] to {o}") from None

    def commit(self, offsets: Mapping[TopicPart, int]) -> bool:
        """Commit offsets to the group (synchronously); False, with a warning, if that failed.

        The checkpoint holds the offsets that count; the group's copy is for lag tools.
        """
        if not offsets:
            return True
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            self.consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as exc:
            self._rate_log.warning("commit", "committing offsets failed: %s", exc.args[0].str())
            return False
        return True

    def lag(self, partitions: Iterable[TopicPart]) -> dict[TopicPart, int]:
        """Messages between the position and the end of each partition (cached end offsets:
        no broker call); partitions whose position or end is not known yet are left out."""
        tps = [TopicPartition(t, p) for t, p in partitions]
        if not tps:
            return {}
        try:
            positions = self.consumer.position(tps)
        except KafkaException:
            return {}
        out: dict[TopicPart, int] = {}
        for tp in positions:
            if tp.offset < 0:
                continue
            try:
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            if high >= 0:
                out[(tp.topic, tp.partition)] = max(0, high - tp.offset)
        return out

    def group_members(self) -> int | None:
        """How many members the consumer group has now, None when it cannot be told."""
        return None if self._members is None else self._members()

    def group_metadata(self) -> Any:
        """The consumer group metadata a transaction's offsets are sent with."""
        return self.consumer.consumer_group_metadata()

    # -- rebalance callbacks ---------------------------------------------------------------

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        keys = _keys(partitions)
        committed: dict[TopicPart, int] = {}
        if self.read_committed_offsets and partitions:
            try:
                for tp in consumer.committed(partitions, timeout=_COMMITTED_TIMEOUT_S):
                    if tp.offset >= 0:
                        committed[(tp.topic, tp.partition)] = tp.offset
            except KafkaException as exc:
                self._fail(to_error(exc, "reading committed offsets"))
        starts: Mapping[TopicPart, int] = {}
        if self.listener is not None and self._failure is None:
            starts = self._told(lambda: self.listener.on_assigned(keys, committed)) or {}
        for tp in partitions:
            start = starts.get((tp.topic, tp.partition))
            if start is not None:
                tp.offset = start
        log.info("assigned %s", _fmt_tps(partitions))
        if self.cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        log.info("revoked %s", _fmt_tps(partitions))
        if self.listener is not None and not self._closing and self._failure is None:
            self._told(lambda: self.listener.on_revoked(_keys(partitions)))
        self._unassign(consumer, partitions)

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        log.warning("lost %s; dropping work not yet committed", _fmt_tps(partitions))
        if self.listener is not None:
            self._told(lambda: self.listener.on_lost(_keys(partitions)))
        self._unassign(consumer, partitions)

    def _unassign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        if self.cooperative:
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()

    def _told(self, call: Any) -> Any:
        try:
            return call()
        except StreamkmError as exc:
            self._fail(exc)
            return None

    def _fail(self, exc: StreamkmError) -> None:
        if self._failure is None:
            self._failure = exc

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure


def _span(
    topic: str, partitions: np.ndarray, offsets: np.ndarray
) -> tuple[dict[TopicPart, int], dict[TopicPart, int]]:
    """First offset and one past the last of every partition in a bulk (offsets ascend)."""
    p0 = int(partitions[0])
    if (partitions == p0).all():
        return {(topic, p0): int(offsets[0])}, {(topic, p0): int(offsets[-1]) + 1}
    first: dict[TopicPart, int] = {}
    after: dict[TopicPart, int] = {}
    for p in np.unique(partitions).tolist():
        idx = np.flatnonzero(partitions == p)
        first[(topic, p)] = int(offsets[idx[0]])
        after[(topic, p)] = int(offsets[idx[-1]]) + 1
    return first, after


# confluent-kafka's Message.headers() can return a list while a UnicodeDecodeError is set (a
# header name that is not UTF-8). A specialised call site in the interpreter does not check
# for that, and the error then surfaces at some later, unrelated call. operator.methodcaller
# goes through PyObject_Call, which does check, so the error is raised here and handled.
_HEADERS = operator.methodcaller("headers")


def read_headers(msg: Any) -> tuple[list[tuple[str, bytes]] | None, bool]:
    """A message's headers, and whether they were unreadable (a name that is not UTF-8)."""
    try:
        return _HEADERS(msg), False
    except (UnicodeDecodeError, SystemError, ValueError, TypeError):
        return None, True


def _keys(partitions: Iterable[TopicPartition]) -> list[TopicPart]:
    return [(tp.topic, tp.partition) for tp in partitions]


def _fmt_tps(partitions: Iterable[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"


__all__ = ["AssignmentListener", "Bulk", "Source", "TopicPart", "read_headers"]
