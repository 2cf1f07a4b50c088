"""Shared-model mode: the sync log every instance writes its deltas to and folds in order.

* :class:`SyncLog` — a group-less ``assign()`` consumer of the single-partition sync topic
  (``read_committed``) that folds every record into the :class:`SharedLearner`'s replica, and
  the writer of this instance's records through the daemon's own producer (so in exactly-once
  mode a batch's deltas commit in the same transaction as its assignments and offsets);
* :class:`SharedLearner` — the :class:`~streamkm.learner.Learner` of shared-model mode: it
  labels with the newest applied replica and learns nothing locally; what it learnt leaves as
  deltas and comes back through the log.

Initialisation: an instance without a model proposes its k-means++ seeding on the log and
waits for the first init record in the log, its own or another's; every instance adopts that
one, so no input is labelled with a model that differs from the log's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition
from confluent_kafka import KafkaError as _CKafkaError

from streamkm.config import ModelSettings
from streamkm.errors import StateError, StreamkmError
from streamkm.kafka import RateLimitedLog, to_error
from streamkm.model.scoring import gaussian_sse2
from streamkm.shared import wire
from streamkm.shared.replica import Delta, Replica, seed_centroids

log = logging.getLogger(__name__)

TopicPart = tuple[str, int]
INIT_WAIT_S = 60.0
SNAPSHOT_EVERY = 1000
CATCH_UP_S = 30.0
_POLL_S = 0.05


class StepResult(NamedTuple):
    labels: np.ndarray
    distances: np.ndarray
    scores: np.ndarray


class SyncLog:
    """Reader and writer of the sync topic.

    Parameters
    ----------
    consumer : confluent_kafka.Consumer
        A consumer with ``isolation.level=read_committed``, used with ``assign()`` only.
    producer : confluent_kafka.Producer
        The daemon's producer (records go into its open transaction, if any).
    topic : str
        The sync topic (one partition).
    instance : str
        This instance's id (``delivery.instance_id``), carried by its records.
    transactions : Transactions, optional
        Exactly-once: an init proposal is committed in a transaction of its own.
    metrics : Metrics, optional
        ``streamkm_sync_*`` series.
    snapshot_every : int, default 1000
        Put a snapshot of the replica on the log after each of this many of this instance's
        deltas has been folded (0: never; exactly-once, at the first refresh with no
        transaction open); a reader without a checkpoint starts at the newest
        snapshot it finds, so the log's retention need only keep a few snapshot intervals.
    clock : callable, default time.time
    """

    def __init__(
        self,
        consumer: Any,
        producer: Any,
        topic: str,
        instance: str,
        transactions: Any = None,
        metrics: Any = None,
        snapshot_every: int = SNAPSHOT_EVERY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.topic = topic
        self.instance = instance
        self.transactions = transactions
        self.metrics = metrics
        self.snapshot_every = snapshot_every
        self._clock = clock
        self._own_folded = 0
        self._snapshot: tuple[dict[str, Any], dict[str, np.ndarray]] | None = None
        # Records passed over before the replica had a state: the log's beginning is gone, so
        # an init seen later is not the first one and only a snapshot can seed this replica.
        self.truncated = False
        self.learner: SharedLearner | None = None
        self._seek_to: int | None = None
        self.rejected_own: list[Delta] = []
        self.last_record_ts: float | None = None
        self._rate_log = RateLimitedLog(log)
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> SyncLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.consumer.close()
            except Exception:
                log.debug("closing the sync consumer failed", exc_info=True)

    def start(self, learner: SharedLearner) -> None:
        """Read the log from where ``learner``'s replica stands (its beginning if none)."""
        self.learner = learner
        learner.sync = self
        replica = learner.replica
        offset = OFFSET_BEGINNING if replica is None else replica.sync_offset
        try:
            self.consumer.assign([TopicPartition(self.topic, 0, offset)])
        except KafkaException as exc:
            raise to_error(exc, f"reading the sync topic {self.topic}") from None

    # -- reading -----------------------------------------------------------------------------

    def refresh(self, timeout: float = 0.0) -> int:
        """Fold every record available now (waiting up to ``timeout`` for the first)."""
        applied = 0
        while True:
            try:
                messages = self.consumer.consume(num_messages=512, timeout=timeout)
            except KafkaException as exc:
                raise to_error(exc, "consuming the sync topic") from None
            if not messages:
                break
            for msg in messages:
                err = msg.error()
                if err is not None:
                    if err.fatal():
                        raise to_error(KafkaException(err), "consuming the sync topic")
                    if err.code() == _CKafkaError._AUTO_OFFSET_RESET:
                        self._offset_gone()
                        break
                    continue
                applied += self._fold(msg)
                if self._seek_to is not None:
                    break  # adopted a snapshot: read on from the offset it stands for
            if self._seek_to is not None:
                self._seek(self._seek_to)
                self._seek_to = None
            timeout = 0.0
        self._put_snapshot()
        self._record_lag()
        return applied

    def _offset_gone(self) -> None:
        """The offset the replica stands for is no longer in the log (retention): start over
        from the newest snapshot the log holds."""
        assert self.learner is not None
        replica = self.learner.replica
        log.warning(
            "sync offset %s is no longer in the sync topic %s; starting from its oldest record "
            "and the first snapshot after it", None if replica is None else replica.sync_offset,
            self.topic,
        )  # fmt: skip
        self.learner.replica = None
        self.truncated = True
        self._seek_to = self._low_watermark()

    def _low_watermark(self) -> int:
        try:
            low, _ = self.consumer.get_watermark_offsets(
                TopicPartition(self.topic, 0), timeout=5.0, cached=False
            )
        except KafkaException as exc:
            raise to_error(exc, f"reading the sync topic {self.topic}'s start") from None
        return int(low)

    def _seek(self, offset: int) -> None:
        try:
            self.consumer.seek(TopicPartition(self.topic, 0, offset))
        except KafkaException as exc:
            raise to_error(exc, f"seeking the sync topic to {offset}") from None

    def _put_snapshot(self) -> None:
        if self._snapshot is None:
            return
        txn = self.transactions
        if txn is not None and txn.open:
            # Exactly-once: the batches' transaction is open (it may span several turns);
            # the snapshot goes in a transaction of its own at a later refresh.
            return
        meta, arrays = self._snapshot
        self._snapshot = None
        value = wire.encode_snapshot(self.instance, meta, arrays)
        txn = self.transactions
        if txn is not None:
            txn.begin()
            self._produce(value)
            txn.commit(doing="putting a snapshot on the sync log")
        else:
            self._produce(value)
        log.info("put a snapshot of model version %d on the sync log", meta["n_steps"])

    def _fold(self, msg: Any) -> int:
        assert self.learner is not None
        learner = self.learner
        value = msg.value() or b""
        self.last_record_ts = msg.timestamp()[1] / 1000.0
        if self.metrics is not None:
            self.metrics.sync_bytes_read.inc(len(value))
        try:
            kind, body = wire.decode(value)
        except StateError as exc:
            self._rate_log.warning("sync-bad", "skipping sync record @%d: %s", msg.offset(), exc)
            kind, body = "bad", None
        replica = learner.replica
        ok = False
        if replica is not None and kind == "snapshot":
            replica.sync_offset = msg.offset() + 1
            return 0  # this replica is past it already
        if replica is None and kind == "snapshot":
            meta, arrays = body
            try:
                state = Replica.from_state(meta, arrays)
            except StateError as exc:
                self._rate_log.warning("sync-snap", "unusable snapshot @%d: %s", msg.offset(), exc)
                return 0
            if state.sync_offset < self._low_watermark():
                return 0  # what it stands for is partly gone: wait for a later snapshot
            learner.replica = state
            # The snapshot stands for the log before its sync_offset: read on from there.
            self._seek_to = learner.replica.sync_offset
            log.info(
                "started from the snapshot at sync offset %d (model version %d)",
                learner.replica.sync_offset, learner.replica.n_steps_,
            )  # fmt: skip
            return 1
        if replica is None and kind == "init" and not self.truncated:
            learner.replica = replica = Replica.from_centroids(body, learner.half_life)
            log.info("adopted the model's init from the sync log (offset %d)", msg.offset())
            ok = True
        elif replica is None:
            self.truncated = True
        elif kind == "delta":
            ok = replica.apply(body)
            if not ok and body.instance == self.instance:
                self.rejected_own.append(body)
            if ok and body.instance == self.instance and self.snapshot_every > 0:
                self._own_folded += 1
                if self._own_folded % self.snapshot_every == 0:
                    replica.sync_offset = msg.offset() + 1
                    meta, arrays = replica.to_state()
                    self._snapshot = (meta, {n: a.copy() for n, a in arrays.items()})
        if learner.replica is not None:
            learner.replica.sync_offset = msg.offset() + 1
        if self.metrics is not None:
            (self.metrics.sync_applied if ok else self.metrics.sync_rejected).inc()
        return int(ok)

    def catch_up(self, timeout_s: float = CATCH_UP_S) -> bool:
        """Fold until the reader's position reaches the log's end (read_committed: its last
        stable offset, which an open transaction holds back); False if ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        tp = TopicPartition(self.topic, 0)
        while True:
            self.refresh(timeout=_POLL_S)
            try:
                _, high = self.consumer.get_watermark_offsets(tp, timeout=5.0, cached=False)
                pos = self.consumer.position([tp])[0].offset
            except KafkaException as exc:
                raise to_error(exc, "reading the sync topic's end") from None
            if pos < 0:  # nothing consumed yet: where the reader starts
                pos = (
                    0
                    if self.learner is None or self.learner.replica is None
                    else (self.learner.replica.sync_offset)
                )
            if pos >= high:
                return True
            if time.monotonic() > deadline:
                log.warning("sync log: still %d records behind after %.0f s", high - pos, timeout_s)
                return False

    def _record_lag(self) -> None:
        if self.metrics is None or self.learner is None or self.learner.replica is None:
            return
        tp = TopicPartition(self.topic, 0)
        try:
            _, high = self.consumer.get_watermark_offsets(tp, timeout=0.0, cached=True)
            pos = self.consumer.position([tp])[0].offset
        except KafkaException:
            return
        if pos < 0:
            pos = self.learner.replica.sync_offset
        if high >= 0:
            # From the reader's position: transaction markers take offsets but hold no record.
            lag = max(0, high - pos)
            self.metrics.sync_lag.set(lag)
            ts = self.last_record_ts
            self.metrics.sync_staleness.set(0.0 if lag == 0 or ts is None else self._clock() - ts)

    # -- writing -----------------------------------------------------------------------------

    def send(self, deltas: list[Delta]) -> None:
        """Produce deltas (into the producer's open transaction, if any)."""
        for delta in deltas:
            value = wire.encode_delta(delta)
            self._produce(value)
            if self.metrics is not None:
                self.metrics.sync_produced.inc()
                self.metrics.sync_bytes_sent.inc(len(value))

    def propose_init(self, centroids: np.ndarray) -> None:
        """Put this instance's seeding on the log (committed or flushed before returning)."""
        value = wire.encode_init(self.instance, centroids)
        txn = self.transactions
        if txn is not None:
            txn.begin()
            self._produce(value)
            txn.commit(doing="proposing the model's init")
        else:
            self._produce(value)
            while self.producer.flush(5.0) > 0:
                self._rate_log.warning("sync-init", "waiting for the brokers to take the init")
        log.info("proposed the model's init on the sync log")

    def _produce(self, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(self.topic, value, self.instance.encode(), partition=0)
                return
            except BufferError:
                self.producer.poll(0.05)
            except KafkaException as exc:
                raise to_error(exc, f"producing to the sync topic {self.topic}") from None


class SharedLearner:
    """The :class:`~streamkm.learner.Learner` of shared-model mode.

    Parameters
    ----------
    settings : ModelSettings
        The ``[model]`` section (k, seeding rows, seed, half_life).
    replica : Replica, optional
        Restored from a checkpoint; None until the log's init is folded.
    """

    kind: ClassVar[str] = "kmeans-shared"

    def __init__(self, settings: ModelSettings, replica: Replica | None = None) -> None:
        self.settings = settings
        self.replica = replica
        self.half_life = settings.half_life
        self.sync: SyncLog | None = None

    @property
    def rows_to_start(self) -> int:
        return self.settings.effective_init_size

    @property
    def fitted(self) -> bool:
        return self.replica is not None

    @property
    def version(self) -> int:
        return 0 if self.replica is None else int(self.replica.n_steps_)

    @property
    def dim(self) -> int | None:
        return None if self.replica is None else self.replica.n_features_in_

    @property
    def estimator(self) -> Any:
        return self.replica

    def step(self, X: np.ndarray) -> StepResult:
        """Label ``X`` with the newest applied replica (proposing an init first if none)."""
        if self.replica is None:
            self._initialise(X)
        assert self.replica is not None
        labels, d2, scores = self.replica.assign(X)
        return StepResult(labels, np.sqrt(d2), scores)

    def _initialise(self, X: np.ndarray) -> None:
        sync = self.sync
        if sync is None:
            raise StreamkmError("shared-model mode: the sync log is not open")
        sync.catch_up()
        if self.replica is None and sync.truncated:
            raise StreamkmError(
                f"the sync topic {sync.topic} no longer holds its beginning and no snapshot "
                "was found in what it holds: raise its retention (snapshots are put on it "
                "every few thousand deltas) or restore a checkpoint of this group"
            )
        if self.replica is None:
            k = self.settings.n_clusters
            sync.propose_init(seed_centroids(X, k, self.settings.seed))
            deadline = time.monotonic() + INIT_WAIT_S
            while self.replica is None:
                sync.refresh(timeout=_POLL_S)
                if time.monotonic() > deadline:
                    raise StreamkmError(
                        f"shared-model mode: no init record came back from the sync topic "
                        f"{sync.topic} within {INIT_WAIT_S:.0f} s"
                    )
        if self.replica.n_features_in_ != X.shape[1]:
            raise StreamkmError(
                f"the shared model has {self.replica.n_features_in_} features, the input "
                f"{X.shape[1]}"
            )

    def snapshot(self) -> None:
        return None  # nothing is learnt locally: an aborted batch leaves the replica as is

    def restore(self, snapshot: Any) -> None:
        return None

    def public_state(self) -> dict[str, Any]:
        r = self.replica
        assert r is not None
        return {
            "n_samples_seen": float(r.n_samples_seen_),
            "n_clusters": r.n_clusters,
            "dim": r.n_features_in_,
            "centroids": r.centroids.tolist(),
            "counts": r.counts_.tolist(),
            "sync_offset": int(r.sync_offset),
        }


class DeltaBuilder:
    """Turns a labelled batch into one delta per input partition, masking absorbed rows.

    Rows below what the log already absorbed of their partition (or below the end of this
    instance's own deltas still in flight) are left out, so a repeated input never counts twice.

    At-least-once, deltas can wait (:meth:`hold`) and merge with the next ones of their
    partition until :meth:`take`: fewer, larger records on the sync log. (Exactly-once sends
    each batch's deltas in that batch's transaction.)
    """

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.sent_until: dict[TopicPart, int] = {}  # end of this instance's deltas in flight
        self.epoch: dict[TopicPart, int] = {}
        self._held: dict[TopicPart, Delta] = {}
        self._ready: list[Delta] = []

    def hold(self, deltas: list[Delta]) -> None:
        """Keep deltas back, merging each with the held one it continues."""
        for d in deltas:
            key = (d.topic, d.partition)
            held = self._held.get(key)
            if held is not None and held.after == d.first and held.epoch == d.epoch:
                self._held[key] = merge(held, d)
            else:
                if held is not None:
                    self._ready.append(held)
                self._held[key] = d

    @property
    def holding(self) -> bool:
        return bool(self._held or self._ready)

    def take(self) -> list[Delta]:
        """Every held delta, in the order they are to be sent."""
        out = [*self._ready, *self._held.values()]
        self._ready, self._held = [], {}
        return out

    def build(
        self,
        replica: Replica,
        topic: str,
        X: np.ndarray,
        partitions: np.ndarray,
        offsets: np.ndarray,
        labels: np.ndarray | None,
        d2: np.ndarray | None,
        first: Mapping[TopicPart, int],
        after: Mapping[TopicPart, int],
    ) -> list[Delta]:
        out = []
        for key, end in sorted(after.items()):
            start = first.get(key, end)
            floor = max(replica.absorbed.get(key, start), self.sent_until.get(key, start))
            start = max(start, floor)
            if end <= start:
                continue
            p = key[1]
            if labels is None or d2 is None or not len(offsets):
                rows = np.empty(0, dtype=np.int64)
            else:
                rows = np.flatnonzero((partitions == p) & (offsets >= start))
            lab = np.empty(0, np.int64) if labels is None else labels[rows]
            dist = np.empty(0) if d2 is None else d2[rows]
            Xp = X[rows] if len(rows) else np.empty((0, replica.n_features_in_), X.dtype)
            out.append(
                replica.delta(
                    self.instance, topic, p, start, end, Xp, lab, dist, self.epoch.get(key, 0)
                )
            )
            self.sent_until[key] = end
        return out

    def rewind(self, key: TopicPart, to: int) -> None:
        """This instance reads ``key`` again from ``to``; deltas in flight are void."""
        self.epoch[key] = self.epoch.get(key, 0) + 1
        self.sent_until[key] = to
        self._drop(key)

    def forget(self, key: TopicPart) -> None:
        """The partition is another member's now: what is held of it is that member's to redo."""
        self.sent_until.pop(key, None)
        self._drop(key)

    def _drop(self, key: TopicPart) -> None:
        self._held.pop(key, None)
        self._ready = [d for d in self._ready if (d.topic, d.partition) != key]


def merge(a: Delta, b: Delta) -> Delta:
    """One delta for ``a`` followed by ``b`` (b continues a's partition where a ends)."""
    index = np.union1d(a.index, b.index)
    d = a.sums.shape[1] if a.sums.ndim == 2 and a.sums.size else b.sums.shape[1]
    sums = np.zeros((index.size, d))
    weights = np.zeros(index.size)
    sse = np.zeros(index.size)
    sse2 = np.zeros(index.size)
    for part in (a, b):
        pos = np.searchsorted(index, part.index)
        sums[pos] += part.sums
        weights[pos] += part.weights
        sse[pos] += part.sse
        if part.sse2 is not None:
            sse2[pos] += part.sse2
        else:
            sse2[pos] += gaussian_sse2(part.weights, part.sse, d)
    return Delta(
        a.instance, a.topic, a.partition, a.first, b.after, a.n + b.n,
        index, sums, weights, sse, a.epoch, sse2, a.error + b.error,
    )  # fmt: skip


__all__ = ["DeltaBuilder", "SharedLearner", "StepResult", "SyncLog", "merge"]
