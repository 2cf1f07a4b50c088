"""The output side: the producer, a batch at a time, and its transactions.

* :class:`Sink` — ``publish(batch, result, dead)`` writes a batch's assignments (encoded by
  :mod:`streamkm.records` in one call) and its dead letters; ``publish_model`` the model record;
  ``flush`` waits until the brokers confirmed every record. It never decides when to
  checkpoint.
* :class:`DeliveryReports` — the producer's delivery callback: only failures arrive
  (``delivery.report.only.error``); records purged by an abort are not failures (their batch is
  redone), any other failure stops the daemon without a checkpoint.
* :class:`Transactions` — begin / send offsets / commit / abort with the retry rules written
  once: retriable errors are retried, abortable ones abort and raise
  :class:`TransactionAborted` (the caller redoes the batch), fencing and fatal errors raise
  :class:`~streamkm.errors.FencedError` / :class:`~streamkm.errors.KafkaClientError`.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import repeat
from typing import Any, Protocol

import numpy as np
from confluent_kafka import KafkaError as _CKafkaError
from confluent_kafka import KafkaException, TopicPartition

from streamkm.errors import KafkaClientError, StreamkmError
from streamkm.kafka import RateLimitedLog, to_error
from streamkm.records import DeadLetter, encode_assignments, model_record

log = logging.getLogger(__name__)

TopicPart = tuple[str, int]

TXN_TIMEOUT_S = 30.0
_FLUSH_WAIT_S = 5.0
_QUEUE_FULL_WAIT_S = 0.05
# Delivery reports of records that abort_transaction purged: the batch is redone, not lost.
_PURGED = (_CKafkaError._PURGE_QUEUE, _CKafkaError._PURGE_INFLIGHT)
# Consumes an iterator in C, keeping nothing: runs a ``map`` of produce calls.
_drain: Callable[[Iterable[object]], None] = deque[object](maxlen=0).extend


class TransactionAborted(StreamkmError):
    """The open transaction was aborted after an abortable error; redo the batch."""


def _nothing() -> None:
    return None


class Rows(Protocol):
    """The rows of a batch as the sink needs them (a :class:`~streamkm.batcher.Batch`)."""

    topic: str  # the input topic
    partitions: np.ndarray  # int (n,)
    offsets: np.ndarray  # int64 (n,)
    keys: Any  # sequence of bytes or None, length n


class DeliveryReports:
    """Collects failed deliveries (the producer's ``on_delivery``).

    Parameters
    ----------
    transactional : bool
        Records purged by ``abort_transaction`` are then expected, and not failures.
    on_failure : callable, optional
        Called once per failed record (e.g. to count it in a metric).
    """

    def __init__(self, transactional: bool, on_failure: Callable[[], object] | None = None) -> None:
        self.transactional = transactional
        self.on_failure = on_failure
        self.failures: list[str] = []

    def on_delivery(self, err: Any, msg: Any) -> None:
        """The producer's delivery callback."""
        if err is None:
            return
        if self.transactional and err.code() in _PURGED:
            return  # purged by an abort: the batch is rewound and redone
        if self.on_failure is not None:
            self.on_failure()
        self.failures.append(f"{msg.topic()}: {err.str()}")

    def clear(self) -> None:
        """Forget failures of records that will be produced again (an aborted batch)."""
        self.failures.clear()

    def check(self) -> None:
        """Raise if any record could not be delivered."""
        if self.failures:
            raise KafkaClientError(
                f"{len(self.failures)} record(s) could not be delivered (first: "
                f"{self.failures[0]}); stopping without a checkpoint so they are redone on restart",
                fatal=True,
            )


class Transactions:
    """The transactional calls of a producer, with their retry rules.

    Parameters
    ----------
    producer : confluent_kafka.Producer
        A producer with a ``transactional.id``.
    reports : DeliveryReports
        Cleared after an abort (the aborted records are redone).
    stopping : callable returning bool
        Retriable errors are not retried once this is true.
    timeout_s : float, default 30
        Timeout of each call.
    """

    def __init__(
        self,
        producer: Any,
        reports: DeliveryReports,
        stopping: Callable[[], bool] = lambda: False,
        timeout_s: float = TXN_TIMEOUT_S,
    ) -> None:
        self.producer = producer
        self.reports = reports
        self.stopping = stopping
        self.timeout_s = timeout_s
        self._rate_log = RateLimitedLog(log)
        self._open = False

    def init(self, on_retry: Callable[[str], object] | None = None) -> None:
        """``init_transactions``, retried while the brokers cannot be reached.

        ``on_retry`` is told each retriable error (readiness shows it).
        """
        while True:
            try:
                self.producer.init_transactions(self.timeout_s)
                return
            except KafkaException as exc:
                err = exc.args[0]
                if not err.retriable() or err.fatal():
                    raise to_error(exc, "initialising transactions") from None
                if self.stopping():
                    raise to_error(exc, "initialising transactions (stopping)") from None
                if on_retry is not None:
                    on_retry(err.str())
                self._rate_log.warning(
                    "txn-init", "initialising transactions: %s; retrying", err.str()
                )

    @property
    def open(self) -> bool:
        """Whether a transaction is open (begun, neither committed nor aborted yet): a part
        that writes in a transaction of its own must wait until it is not."""
        return self._open

    def begin(self) -> None:
        """Open a transaction."""
        try:
            self.producer.begin_transaction()
        except KafkaException as exc:
            raise to_error(exc, "beginning a transaction") from None
        self._open = True

    def commit(
        self,
        offsets: Mapping[TopicPart, int] | None = None,
        group_metadata: Any = None,
        doing: str = "committing",
    ) -> None:
        """Send the input ``offsets`` (if any) to the transaction, then commit it."""
        producer, timeout = self.producer, self.timeout_s
        if offsets:
            tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
            self._call(
                lambda: producer.send_offsets_to_transaction(tps, group_metadata, timeout),
                "sending offsets to the transaction",
            )
        self._call(lambda: producer.commit_transaction(timeout), doing)
        self._open = False

    def abort(self) -> None:
        """Abort the open transaction; its records' failures do not count."""
        while True:
            try:
                self.producer.abort_transaction(self.timeout_s)
                break
            except KafkaException as exc:
                if not exc.args[0].retriable():
                    raise to_error(exc, "aborting a transaction") from None
        self._open = False
        # Serve the purged records' reports now, then forget them: the batch is redone.
        self.producer.poll(0)
        self.reports.clear()

    def _call(self, call: Callable[[], object], doing: str) -> None:
        """Retry the retriable, abort the abortable, raise the rest (fencing apart)."""
        while True:
            try:
                call()
                return
            except KafkaException as exc:
                err = exc.args[0]
                if err.retriable() and not self.stopping():
                    self._rate_log.warning("txn-retry", "%s: %s; retrying", doing, err.str())
                    continue
                if err.txn_requires_abort():
                    self.abort()
                    raise TransactionAborted(f"{doing}: {err.str()}") from None
                raise to_error(exc, doing) from None


class Sink:
    """Everything the daemon writes, through one producer.

    Parameters
    ----------
    producer : confluent_kafka.Producer
        An open producer whose ``on_delivery`` is ``reports.on_delivery``.
    reports : DeliveryReports
        Its delivery failures.
    output_topic : str
        Where assignments go.
    dead_letter_topic : str, optional
        Where refused inputs go; None logs (rate-limited) and skips them.
    model_topic : str, optional
        Where the model is published on every checkpoint.
    model_key : bytes, optional
        Key of the model records (the group id: a compacted topic keeps one per group).
    dead_letter_max_bytes : int, default 1,000,000
        The largest record the producer and the dead-letter topic take.
    transactions : Transactions, optional
        Set in exactly-once mode: records are written inside transactions the caller opens,
        and a produce error aborts the open one.
    waiting : callable, optional
        Called while waiting for the brokers (queue full, flush); raises to stop waiting
        (e.g. a fatal client error).
    """

    def __init__(
        self,
        producer: Any,
        reports: DeliveryReports,
        output_topic: str,
        dead_letter_topic: str | None = None,
        model_topic: str | None = None,
        model_key: bytes | None = None,
        dead_letter_max_bytes: int = 1_000_000,
        transactions: Transactions | None = None,
        waiting: Callable[[], None] = _nothing,
    ) -> None:
        self.producer = producer
        self.reports = reports
        self.output_topic = output_topic
        self.dead_letter_topic = dead_letter_topic
        self.model_topic = model_topic
        self.model_key = model_key
        self.dead_letter_max_bytes = dead_letter_max_bytes
        self.transactions = transactions
        self._waiting = waiting
        self._rate_log = RateLimitedLog(log)
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Give the brokers a few seconds for what is queued; never block on a broker that is
        gone (undelivered records are redone on restart)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.producer.flush(_FLUSH_WAIT_S)

    # -- writing -----------------------------------------------------------------------------

    def publish(
        self,
        batch: Rows,
        result: Any,
        dead: Sequence[DeadLetter] = (),
        version: int = 0,
        emit: np.ndarray | None = None,
    ) -> int:
        """Write a batch's assignments and dead letters; return how many assignments.

        Parameters
        ----------
        batch : Rows
            The batch: its input topic, and the partition, offset and key of each of its n rows.
        result : StepOutput or None
            The model's labels, distances and scores of the n rows (None when n is 0).
        dead : sequence of DeadLetter
            Refused inputs to copy to the dead-letter topic.
        version : int
            Model version that labelled the rows.
        emit : ndarray of bool, shape (n,), optional
            Rows to publish; None means all.
        """
        topic, partitions, offsets, keys = batch.topic, batch.partitions, batch.offsets, batch.keys
        n_out = 0
        if result is not None and len(offsets):
            labels, distances, scores = result.labels, result.distances, result.scores
            if emit is not None:
                rows = np.flatnonzero(emit)
                labels, distances, scores = labels[rows], distances[rows], scores[rows]
                partitions, offsets = partitions[rows], offsets[rows]
                if isinstance(keys, np.ndarray):
                    keys = keys[rows].tolist()
                else:
                    keys = [keys[i] for i in rows.tolist()]
            elif isinstance(keys, np.ndarray):
                keys = keys.tolist()
            elif not isinstance(keys, list):
                keys = list(keys)
            if len(offsets):
                values = encode_assignments(
                    labels, distances, scores, version, topic, partitions, offsets
                )
                self._produce_all(self.output_topic, values, keys)
                n_out = len(values)
        for d in dead:
            if self.dead_letter_topic is None:
                self._rate_log.warning(
                    f"dead-{d.error.reason}", "skipping %s[%d]@%d: %s (%s)",
                    d.topic, d.partition, d.offset, d.error.message, d.error.reason,
                )  # fmt: skip
                continue
            value, headers = d.record(self.dead_letter_max_bytes)
            self._produce_one(self.dead_letter_topic, value, d.key, headers)
        self.producer.poll(0)
        return n_out

    def publish_model(self, version: int, state: Mapping[str, Any]) -> bool:
        """Publish the model record (in a transaction of its own in exactly-once mode).

        Returns False, with a warning, when an abortable error dropped it this time.
        """
        if self.model_topic is None:
            return False
        value = model_record(version, state)
        txn = self.transactions
        try:
            if txn is not None:
                txn.begin()
                self._produce_one(self.model_topic, value, self.model_key, None)
                txn.commit(doing="publishing the model")
            else:
                self._produce_one(self.model_topic, value, self.model_key, None)
        except TransactionAborted as abort:
            log.warning("model not published this time: %s", abort)
            return False
        return True

    def poll(self) -> None:
        """Serve delivery reports without waiting.

        Raises
        ------
        FencedError, KafkaClientError
            The producer hit a fatal error (another instance took its transactional id, say).
        """
        try:
            self.producer.poll(0)
        except KafkaException as exc:
            raise to_error(exc, "serving delivery reports") from None

    def flush(self) -> None:
        """Wait until the brokers confirmed every record; raise if any failed."""
        while self.producer.flush(_FLUSH_WAIT_S) > 0:
            self._waiting()
            self.reports.check()
            self._rate_log.warning("flush", "waiting for the brokers to confirm records")
        self.reports.check()

    def check(self) -> None:
        """Raise if a record could not be delivered."""
        self.reports.check()

    # -- produce -----------------------------------------------------------------------------

    def _produce_all(self, topic: str, values: list[bytes], keys: Sequence[bytes | None]) -> None:
        """Produce records in order; a full local queue is waited out.

        The loop over the records runs in C (``map`` drained by a zero-length deque), with no
        key argument when no record has a key: no Python bytecode per record. When the queue
        is full, the record that did not fit is the one before the iterator's position
        (``length_hint`` of a list iterator is exact); it is produced again, then the rest.
        """
        produce = self.producer.produce
        n = len(values)
        if not n:
            return
        keyless = keys.count(None) == n if isinstance(keys, list) else all(k is None for k in keys)
        rest = iter(values)
        rest_keys = None if keyless else iter(keys)
        retry: int | None = None
        while True:
            try:
                if retry is not None:
                    if rest_keys is None:
                        produce(topic, values[retry])
                    else:
                        produce(topic, values[retry], keys[retry])
                    retry = None
                if rest_keys is None:
                    _drain(map(produce, repeat(topic), rest))
                else:
                    _drain(map(produce, repeat(topic), rest, rest_keys))
                return
            except BufferError:
                retry = n - operator.length_hint(rest) - 1  # taken from ``rest``, not produced
                self._wait_for_room()
            except KafkaException as exc:
                raise self._produce_failed(exc, topic) from None

    def _produce_one(self, topic: str, value: Any, key: Any, headers: Any) -> None:
        while True:
            try:
                if headers is None:
                    self.producer.produce(topic, value, key)
                else:
                    self.producer.produce(topic, value, key, headers=headers)
                return
            except BufferError:
                self._wait_for_room()
            except KafkaException as exc:
                raise self._produce_failed(exc, topic) from None

    def _wait_for_room(self) -> None:
        # The local queue is full: serve delivery reports until there is room.
        self.producer.poll(_QUEUE_FULL_WAIT_S)
        self._waiting()

    def _produce_failed(self, exc: KafkaException, topic: str) -> StreamkmError:
        err = to_error(exc, f"producing to {topic}")
        if self.transactions is not None and not err.fatal:
            self.transactions.abort()  # the open transaction must not stay half-filled
            return TransactionAborted(str(err))
        return err


__all__ = ["DeliveryReports", "Rows", "Sink", "TransactionAborted", "Transactions"]
