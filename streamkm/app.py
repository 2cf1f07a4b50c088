"""The daemon loop: poll → decode → batch → step → publish → checkpoint → commit.

Delivery rules (see the README's "Delivery guarantees"):

* A batch is *everything consumed and not yet processed*: the loop consumes at most the rows
  a batch still needs, so after each batch every consumed message (valid or dead-lettered)
  is done, and the next offset of each partition is simply "one past the last one seen".
* The checkpoint holds the model and those next offsets; on start the daemon seeks there, so
  the model never counts an input twice whatever the group's committed offsets say.
* At-least-once: offsets are committed to the group only after a durable checkpoint, and a
  checkpoint is written only after the producer has confirmed every record before it.
* Exactly-once: each batch's assignments, dead letters and input offsets commit in one Kafka
  transaction. After a crash the inputs between the checkpoint and the committed offsets are
  replayed into the model without emitting anything.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import (
    Consumer,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka import KafkaError as _CKafkaError
from prometheus_client import CollectorRegistry

from streamkm import __version__
from streamkm.batcher import Batch, Batcher
from streamkm.checkpoint import CheckpointStore, CheckpointTimer
from streamkm.codec import (
    HEADER_MESSAGE,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_REASON,
    HEADER_TOPIC,
    VectorDecoder,
    dead_letter_record,
    encode_assignments,
)
from streamkm.config import Settings
from streamkm.errors import CheckpointError, DecodeError, FencedError, KafkaError, StreamkmError
from streamkm.fileformat import write_atomic
from streamkm.kafka import (
    RateLimitedLog,
    consumer_config,
    group_member_count,
    is_cooperative,
    make_consumer,
    make_producer,
    producer_max_bytes,
    to_error,
    topic_max_message_bytes,
)
from streamkm.metrics import Metrics
from streamkm.model import StreamingKMeans
from streamkm.source import read_headers

log = logging.getLogger(__name__)

TopicPart = tuple[str, int]

# Delivery reports of records that abort_transaction purged: the batch is redone, not lost.
_PURGED = (_CKafkaError._PURGE_QUEUE, _CKafkaError._PURGE_INFLIGHT)

ORIGINS_FILE = "origins.json"
HISTORY_POINTS = 2000
EXIT_OK = 0
EXIT_ERROR = 1
_TXN_TIMEOUT_S = 30.0
_POLL_MAX_S = 0.5


@dataclass
class DeadLetter:
    """A consumed message that will not reach the model."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None
    error: DecodeError
    headers_unreadable: bool = False


@dataclass
class _Pending:
    """What has been consumed since the last processed batch."""

    dead: list[DeadLetter] = field(default_factory=list)
    # First offset consumed per partition: where to rewind if the batch is dropped.
    first: dict[TopicPart, int] = field(default_factory=dict)
    # One past the last offset consumed per partition: the positions after the batch.
    next: dict[TopicPart, int] = field(default_factory=dict)

    def clear(self) -> None:
        self.dead.clear()
        self.first.clear()
        self.next.clear()


class App:
    """The streamkm daemon.

    Parameters
    ----------
    settings : Settings
        All settings.
    reset_model : bool, default False
        Start a new model even if the checkpoint directory holds one of another shape
        (the old checkpoints are moved to a ``replaced-<time>`` subdirectory).
    registry : CollectorRegistry, optional
        Where metrics are registered (a fresh one by default).
    """

    def __init__(
        self,
        settings: Settings,
        reset_model: bool = False,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.reset_model = reset_model
        self.exactly_once = settings.delivery.guarantee == "exactly-once"
        self.metrics = Metrics(registry or CollectorRegistry())
        self.store = CheckpointStore(settings.checkpoint.dir, keep=settings.checkpoint.keep)
        self.decoder = VectorDecoder(
            settings.input.format,
            dim=settings.input.dim,
            json_field=settings.input.json_field,
            max_bytes=settings.input.max_message_bytes,
            dtype=np.float32,
        )
        self.batcher: Batcher | None = None
        self.model: StreamingKMeans | None = None
        self.positions: dict[TopicPart, int] = {}  # next offset after the last processed input
        self.origins: dict[TopicPart, int] = {}  # first offset a model lineage consumed
        self.replay_until: dict[TopicPart, int] = {}  # exactly-once: absorb but do not emit below
        self.checkpoint_offsets: dict[TopicPart, int] = {}
        self.pending = _Pending()
        self.assigned: set[TopicPart] = set()
        self.dirty = False
        self.stop_event = threading.Event()
        self.fatal: StreamkmError | None = None
        self.delivery_errors: list[str] = []
        self.heartbeat = time.monotonic()
        self.last_kafka_error: str | None = None  # shown by /readyz while unassigned
        self.rate_log = RateLimitedLog(log)
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None
        self._consumer_conf: dict[str, Any] = {}
        self._dead_letter_max = producer_max_bytes(settings)  # the largest dead letter record
        self._group_check_due = False
        self._closing = False
        self._timer = CheckpointTimer(settings.checkpoint.interval_s)
        self._rate_window = (time.monotonic(), 0)
        # Per-batch (unix time, samples seen, inertia, inertia moving average), kept in the
        # checkpoint so `streamkm report` can draw the curve of a run.
        self.history: deque[tuple[float, float, float, float]] = deque(maxlen=HISTORY_POINTS)
        self.metrics.set_checkpoint_interval(settings.checkpoint.interval_s)

    # -- public --------------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM/SIGINT or a fatal error; return the process exit status."""
        self._install_signal_handlers()
        server = None
        try:
            self.store.ensure_writable()
            self._restore()
            server = self.metrics.serve(
                self.settings.metrics.host, self.settings.metrics.port, self._health, self._ready
            )
            self._open_clients()
            self._loop()
            self._shutdown()
            return EXIT_OK
        except FencedError as exc:
            log.error("fenced: %s", exc)
            return EXIT_ERROR
        except StreamkmError as exc:
            log.error("%s", exc)
            return EXIT_ERROR
        finally:
            self._close_clients()
            if server is not None:
                server.close()

    def request_stop(self) -> None:
        """Ask the loop to finish the current batch, checkpoint and exit."""
        self.stop_event.set()

    # -- start-up ------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.request_stop())

    def _restore(self) -> None:
        k = self.settings.model.n_clusters
        if self.reset_model:
            self._move_checkpoints_aside()
        ckpt = self.store.latest(expect_dim=self.settings.input.dim, expect_n_clusters=k)
        if ckpt is not None:
            self.model = ckpt.model
            self.positions = dict(ckpt.offsets)
            self.checkpoint_offsets = dict(ckpt.offsets)
            self.decoder.dim = self.model.n_features_in_
            log.info(
                "restored %s: model version %d, %d samples, offsets %s",
                ckpt.path.name, self.model.n_steps_, self.model.n_samples_seen_, _fmt_offsets(ckpt.offsets),
            )  # fmt: skip
            self.metrics.record_model(self.model)
            self.history.extend(tuple(h) for h in ckpt.meta.get("extra", {}).get("history", []))
        self.origins = self._read_origins()

    def _move_checkpoints_aside(self) -> None:
        paths = self.store.paths()
        origins = self.store.dir / ORIGINS_FILE
        if not paths and not origins.exists():
            return
        aside = self.store.dir / f"replaced-{int(time.time())}"
        aside.mkdir(parents=True, exist_ok=True)
        for p in [*paths, origins]:
            if p.exists():
                p.rename(aside / p.name)
        log.warning("--reset-model: moved %d old checkpoints to %s", len(paths), aside)

    def _read_origins(self) -> dict[TopicPart, int]:
        path = self.store.dir / ORIGINS_FILE
        try:
            raw = json.loads(path.read_text())
            return {(t, int(p)): int(o) for t, parts in raw.items() for p, o in parts.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, AttributeError, OSError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return {}

    def _write_origins(self) -> None:
        out: dict[str, dict[str, int]] = {}
        for (t, p), o in sorted(self.origins.items()):
            out.setdefault(t, {})[str(p)] = o
        try:
            write_atomic(self.store.dir / ORIGINS_FILE, json.dumps(out).encode())
        except OSError as exc:
            raise CheckpointError(
                f"cannot write {self.store.dir / ORIGINS_FILE}: {exc.strerror}"
            ) from exc

    def _open_clients(self) -> None:
        stats_cb = self.metrics.update_lag_from_stats
        self._consumer_conf = consumer_config(self.settings, self._on_error, stats_cb)
        self.consumer = make_consumer(self._consumer_conf)
        self.producer = make_producer(self.settings, self._on_error, self._on_delivery)
        dl_topic = self.settings.kafka.dead_letter_topic
        if dl_topic is not None:
            self._dead_letter_max = min(
                producer_max_bytes(self.settings), topic_max_message_bytes(self.settings, dl_topic)
            )
        if self.exactly_once:
            self._init_transactions()
        self.consumer.subscribe(
            [self.settings.kafka.input_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def _init_transactions(self) -> None:
        """init_transactions, retried while the brokers cannot be reached (as consuming waits)."""
        assert self.producer is not None
        while True:
            try:
                self.producer.init_transactions(_TXN_TIMEOUT_S)
                return
            except KafkaException as exc:
                err = exc.args[0]
                if not err.retriable() or err.fatal():
                    raise to_error(exc, "initialising transactions") from None
                if self.stop_event.is_set():
                    raise to_error(exc, "initialising transactions (stopping)") from None
                self.last_kafka_error = err.str()
                self.rate_log.warning(
                    "txn-init", "initialising transactions: %s; retrying", err.str()
                )

    # -- callbacks -----------------------------------------------------------------------

    def _on_error(self, err: Any) -> None:
        if err.fatal():
            self.fatal = to_error(KafkaException(err), "Kafka client")
            self.stop_event.set()
        else:
            self.last_kafka_error = err.str()
            self.rate_log.warning(f"kafka-{err.code()}", "Kafka: %s", err.str())

    def _on_delivery(self, err: Any, msg: Message) -> None:
        # delivery.report.only.error: only failures arrive here.
        if err is not None:
            if self.exactly_once and err.code() in _PURGED:
                return  # purged by an abort: the batch is rewound and redone
            self.metrics.produce_errors.inc()
            self.delivery_errors.append(f"{msg.topic()}: {err.str()}")

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        committed: dict[TopicPart, int] = {}
        if self.exactly_once and partitions:
            try:
                for tp in consumer.committed(partitions, timeout=_TXN_TIMEOUT_S):
                    if tp.offset >= 0:
                        committed[(tp.topic, tp.partition)] = tp.offset
            except KafkaException as exc:
                self.fatal = to_error(exc, "reading committed offsets")
                self.stop_event.set()
        for tp in partitions:
            key = (tp.topic, tp.partition)
            start = self.positions.get(key, self.origins.get(key))
            if start is not None:
                tp.offset = start
                done = committed.get(key)
                if done is not None and done > start:
                    self.replay_until[key] = done
                    log.info(
                        "replaying %s[%d] offsets %d..%d into the model", *key, start, done - 1
                    )
            self.assigned.add(key)
        self.last_kafka_error = None
        self._group_check_due = True
        log.info("assigned %s", _fmt_tps(partitions))
        if is_cooperative(self._consumer_conf):
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("revoked %s", _fmt_tps(partitions))
        if not self._closing:
            self._group_check_due = True
        if not self._closing and self.fatal is None:
            try:
                if self.model is not None:
                    self._process(force=True)
                    self._checkpoint()
                else:
                    self._forget(_keys(partitions))
            except StreamkmError as exc:
                self.fatal = exc
                self.stop_event.set()
        self._let_go(consumer, partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning("lost %s; dropping work not yet committed", _fmt_tps(partitions))
        self._forget(_keys(partitions))
        self._let_go(consumer, partitions)

    def _let_go(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned -= _keys(partitions)
        for key in _keys(partitions):
            self.replay_until.pop(key, None)
        if is_cooperative(self._consumer_conf):
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()

    # -- the loop ------------------------------------------------------------------------

    def _loop(self) -> None:
        assert self.consumer is not None and self.producer is not None
        model_cfg = self.settings.model
        max_wait_s = model_cfg.max_batch_wait_ms / 1000.0
        capacity = max(model_cfg.batch_size, model_cfg.effective_init_size)
        self.batcher = Batcher(capacity, max_wait_s, dtype=np.float32)
        idle_wait_s = max(0.005, max_wait_s / 5)
        while not self.stop_event.is_set():
            self.heartbeat = time.monotonic()
            need = self._rows_needed()
            due = self.batcher.time_until_due()
            # consume() waits until it has `need` messages or the timeout passes, and rows
            # count their wait only from then: with nothing buffered, keep that wait a small
            # part of max_batch_wait_ms so a quiet stream still meets its latency bound.
            timeout = min(_POLL_MAX_S, idle_wait_s if due is None else due)
            if need > 0:
                try:
                    messages = self.consumer.consume(num_messages=need, timeout=timeout)
                except KafkaException as exc:
                    raise to_error(exc, "consuming") from None
                if messages:
                    self._ingest(messages)
            self.producer.poll(0)
            self._check_fatal()
            self._process(force=False)
            if self._timer.due():
                self._checkpoint()
            if self._group_check_due:
                self._check_group()
        self._check_fatal()

    def _check_group(self) -> None:
        """Warn when other members share the group: each instance keeps its own model."""
        self._group_check_due = False
        group = self.settings.kafka.group_id
        members = group_member_count(self.settings, group)
        if members is None:
            return
        self.metrics.group_members.set(members)
        if members > 1:
            log.error(
                "consumer group %s has %d members: each instance keeps its own model of its "
                "own partitions, so the models differ and a rebalance republishes assignments "
                "(more than the at-least-once bound); run one instance per group",
                group, members,
            )  # fmt: skip

    def _rows_needed(self) -> int:
        assert self.batcher is not None
        if self.model is None:
            return self._init_rows() - len(self.batcher)
        return self.settings.model.batch_size - len(self.batcher)

    def _init_rows(self) -> int:
        cfg = self.settings.model
        if cfg.init.endswith(".npy"):
            # Given centroids need no seeding buffer: the first batch is a normal one.
            return max(cfg.batch_size, cfg.n_clusters)
        return cfg.effective_init_size

    def _ingest(self, messages: list[Any]) -> None:
        assert self.batcher is not None
        values: list[bytes | None] = []
        kept: list[Any] = []  # confluent_kafka.Message, whose accessors are typed Optional
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise to_error(KafkaException(err), "consuming")
                if err.code() != -191:  # _PARTITION_EOF is no error
                    self.rate_log.warning(f"consume-{err.code()}", "consume: %s", err.str())
                continue
            kept.append(msg)
            values.append(msg.value())
        if not kept:
            return
        t0 = time.perf_counter()
        X, ok_index, errors = self.decoder.decode_many(values)
        n = len(kept)
        topics = [m.topic() for m in kept]
        partitions = [m.partition() for m in kept]
        offsets = [m.offset() for m in kept]
        new_origin = False
        for t, p, o in zip(topics, partitions, offsets, strict=True):
            key = (t, p)
            if key not in self.pending.first:
                self.pending.first[key] = o
                if key not in self.positions and key not in self.origins:
                    self.origins[key] = o
                    new_origin = True
            self.pending.next[key] = o + 1
        if new_origin:
            # Durable before any of these offsets can be committed: a restart without a
            # checkpoint must replay this partition from here, not from the group's offset.
            self._write_origins()
        if len(ok_index):
            idx = ok_index.tolist()
            self.batcher.add(
                X,
                [topics[i] for i in idx],
                [partitions[i] for i in idx],
                [offsets[i] for i in idx],
                [kept[i].key() for i in idx],
                [kept[i].timestamp()[1] for i in idx],
            )
        for i, error in errors:
            m = kept[i]
            headers, unreadable = read_headers(m)
            dead = DeadLetter(
                m.topic(), m.partition(), m.offset(), m.key(), m.value(), headers, error, unreadable
            )
            self.pending.dead.append(dead)
        self.metrics.messages_consumed.inc(n)
        self.metrics.observe_stage("decode", time.perf_counter() - t0)

    def _process(self, force: bool) -> None:
        """Process the pending batch if it is due (or whenever ``force`` and possible)."""
        batcher = self.batcher
        if batcher is None:
            return
        rows = len(batcher)
        if not rows and not self.pending.dead:
            return
        if self.model is None:
            # Hold the first vectors for seeding; their dead letters wait with them, in order.
            if rows and rows < self._init_rows():
                return
        elif rows and not (force or rows >= self.settings.model.batch_size or batcher.ready()):
            return
        self._step(batcher.take(max_rows=rows))

    def _step(self, batch: Batch) -> None:
        """Assign, update, publish and (exactly-once) commit one batch."""
        assert self.producer is not None
        dead = list(self.pending.dead)
        first, after = dict(self.pending.first), dict(self.pending.next)
        self.pending.clear()
        snapshot = copy.deepcopy(self.model) if self.exactly_once else None
        t0 = time.perf_counter()
        labels = distances = scores = None
        if len(batch):
            if self.model is None:
                self.model = self._new_model()
            labels, distances, scores = self.model.step(batch.X)
        t1 = time.perf_counter()
        self.metrics.observe_stage("model", t1 - t0)
        emit = self._emit_mask(batch)
        try:
            if self.exactly_once:
                self._begin()
            n_out = self._publish(batch, emit, labels, distances, scores, dead)
            if self.exactly_once:
                self._commit_transaction(after)
        except _Abort as abort:
            log.warning("transaction aborted (%s); rewinding and redoing the batch", abort)
            self.model = snapshot
            self._rewind(first)
            return
        self.metrics.observe_stage("produce", time.perf_counter() - t1)
        self.positions.update(after)
        for key, until in list(self.replay_until.items()):
            if after.get(key, 0) >= until:
                del self.replay_until[key]
        self.dirty = True
        self.metrics.batches.inc()
        self.metrics.messages_assigned.inc(n_out)
        if self.model is not None and len(batch):
            self.metrics.record_model(self.model)
            m = self.model
            self.history.append(
                (time.time(), float(m.n_samples_seen_), float(m.inertia_), float(m.inertia_ewma_))
            )

    def _emit_mask(self, batch: Batch) -> np.ndarray | None:
        """Rows to publish: all, except (exactly-once) inputs replayed after a crash."""
        if not self.replay_until or not len(batch):
            return None
        limit = np.array(
            [
                self.replay_until.get((t, int(p)), -1)
                for t, p in zip(batch.topics, batch.partitions, strict=True)
            ],
            dtype=np.int64,
        )
        return np.asarray(batch.offsets >= limit)

    def _new_model(self) -> StreamingKMeans:
        cfg = self.settings.model
        init: Any = cfg.init
        if init.endswith(".npy"):
            try:
                init = np.load(init, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise StreamkmError(f"model.init: cannot read {cfg.init}: {exc}") from None
        return StreamingKMeans(
            n_clusters=cfg.n_clusters,
            batch_size=cfg.batch_size,
            init=init,
            init_size=cfg.effective_init_size,
            half_life=cfg.half_life,
            reassignment_ratio=cfg.reassignment_ratio,
            random_state=cfg.seed,
            dtype=np.float32,
        )

    def _publish(
        self,
        batch: Batch,
        emit: np.ndarray | None,
        labels: Any,
        distances: Any,
        scores: Any,
        dead: list[DeadLetter],
    ) -> int:
        assert self.producer is not None
        out_topic = self.settings.kafka.output_topic
        n_out = 0
        if len(batch) and self.model is not None:
            rows = np.arange(len(batch)) if emit is None else np.flatnonzero(emit)
            if len(rows):
                values = encode_assignments(
                    labels[rows], distances[rows], scores[rows], self.model.n_steps_,
                    batch.topics[rows], batch.partitions[rows], batch.offsets[rows],
                )  # fmt: skip
                produce = self.producer.produce
                for value, key in zip(values, batch.keys[rows].tolist(), strict=True):
                    self._produce(produce, out_topic, value, key, None)
                n_out = len(rows)
        dl_topic = self.settings.kafka.dead_letter_topic
        for d in dead:
            self.metrics.record_dead_letter(d.error.reason)
            if self.replay_until and d.offset < self.replay_until.get((d.topic, d.partition), -1):
                continue
            if dl_topic is None:
                self.rate_log.warning(
                    f"dead-{d.error.reason}", "skipping %s[%d]@%d: %s (%s)",
                    d.topic, d.partition, d.offset, d.error.message, d.error.reason,
                )  # fmt: skip
                continue
            dl_value, headers = dead_letter_record(
                d.value, d.key, d.headers, (d.topic, d.partition, d.offset),
                d.error.reason, d.error.message, self._dead_letter_max, d.headers_unreadable,
            )  # fmt: skip
            self._produce(self.producer.produce, dl_topic, dl_value, d.key, headers)
        self.producer.poll(0)
        return n_out

    def _produce(self, produce: Any, topic: str, value: Any, key: Any, headers: Any) -> None:
        while True:
            try:
                if headers is None:
                    produce(topic, value, key)
                else:
                    produce(topic, value, key, headers=headers)
                return
            except BufferError:
                # The local queue is full: serve delivery reports until there is room.
                assert self.producer is not None
                self.producer.poll(0.05)
                self._check_fatal()
            except KafkaException as exc:
                err = to_error(exc, f"producing to {topic}")
                if self.exactly_once and not err.fatal:
                    self._abort()  # the open transaction must not stay half-filled
                    raise _Abort(str(err)) from None
                raise err from None

    # -- transactions (exactly-once) ------------------------------------------------------

    def _begin(self) -> None:
        assert self.producer is not None
        try:
            self.producer.begin_transaction()
        except KafkaException as exc:
            raise to_error(exc, "beginning a transaction") from None

    def _commit_transaction(self, after: dict[TopicPart, int]) -> None:
        assert self.producer is not None and self.consumer is not None
        producer, consumer = self.producer, self.consumer
        # A partition still replaying keeps its committed offset: that offset says which
        # assignments were already published, and moving it back would publish them again.
        offsets = [
            TopicPartition(t, p, o)
            for (t, p), o in after.items()
            if (t, p) in self.assigned and o >= self.replay_until.get((t, p), 0)
        ]
        if offsets:
            self._txn_call(
                lambda: producer.send_offsets_to_transaction(
                    offsets, consumer.consumer_group_metadata(), _TXN_TIMEOUT_S
                ),
                "sending offsets to the transaction",
            )
        self._txn_call(lambda: producer.commit_transaction(_TXN_TIMEOUT_S), "committing")

    def _txn_call(self, call: Any, doing: str) -> None:
        """Run a transactional call: retry the retriable, abort the abortable, stop if fenced."""
        assert self.producer is not None
        while True:
            try:
                call()
                return
            except KafkaException as exc:
                err = exc.args[0]
                if err.retriable() and not self.stop_event.is_set():
                    self.rate_log.warning("txn-retry", "%s: %s; retrying", doing, err.str())
                    continue
                if err.txn_requires_abort():
                    self._abort()
                    raise _Abort(f"{doing}: {err.str()}") from None
                raise to_error(exc, doing) from None

    def _abort(self) -> None:
        assert self.producer is not None
        while True:
            try:
                self.producer.abort_transaction(_TXN_TIMEOUT_S)
                # Failures of the aborted records do not count: the batch is redone.
                self.producer.poll(0)
                self.delivery_errors.clear()
                return
            except KafkaException as exc:
                if not exc.args[0].retriable():
                    raise to_error(exc, "aborting a transaction") from None

    def _rewind(self, first: dict[TopicPart, int]) -> None:
        """Seek back to the first offsets of a dropped batch so it is consumed again."""
        assert self.consumer is not None and self.batcher is not None
        for (t, p), o in first.items():
            if (t, p) in self.assigned:
                try:
                    self.consumer.seek(TopicPartition(t, p, o))
                except KafkaException as exc:
                    raise to_error(exc, f"seeking {t}[{p}] to {o}") from None

    def _forget(self, gone: set[TopicPart]) -> None:
        """Drop consumed-but-unprocessed input of partitions this instance no longer owns.

        Rows of the partitions it keeps stay buffered, so nothing needs to be read again.
        """
        batcher = self.batcher
        if batcher is not None and len(batcher):
            batch = batcher.take(max_rows=len(batcher))
            keep = np.array(
                [
                    (t, int(p)) not in gone
                    for t, p in zip(batch.topics, batch.partitions, strict=True)
                ],
                dtype=bool,
            )
            if keep.any():
                batcher.add(
                    batch.X[keep], batch.topics[keep], batch.partitions[keep],
                    batch.offsets[keep], batch.keys[keep], batch.timestamps[keep],
                )  # fmt: skip
        self.pending.dead = [d for d in self.pending.dead if (d.topic, d.partition) not in gone]
        for key in gone:
            self.pending.first.pop(key, None)
            self.pending.next.pop(key, None)

    # -- checkpoints ---------------------------------------------------------------------

    def _checkpoint(self) -> None:
        """Flush, write model + offsets durably, then commit offsets (at-least-once)."""
        self._timer.reset()
        if self.model is None or not self.dirty:
            return
        assert self.producer is not None and self.consumer is not None
        t0 = time.perf_counter()
        self._flush()
        extra = {"streamkm_version": __version__, "history": [list(h) for h in self.history]}
        path = self.store.write(self.model, self.positions, extra)
        self.checkpoint_offsets = dict(self.positions)
        self.dirty = False
        if not self.exactly_once:
            self._commit_offsets()
        self._publish_model()
        duration = time.perf_counter() - t0
        self.metrics.record_checkpoint(duration)
        self._log_checkpoint(path, duration)

    def _flush(self) -> None:
        assert self.producer is not None
        while self.producer.flush(5.0) > 0:
            self._check_fatal()
            self.rate_log.warning("flush", "waiting for the brokers to confirm records")
        self._check_fatal()

    def _commit_offsets(self) -> None:
        assert self.consumer is not None
        offsets = [
            TopicPartition(t, p, o)
            for (t, p), o in self.positions.items()
            if (t, p) in self.assigned
        ]
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # The checkpoint already holds these offsets; the group's copy is for lag tools.
            self.rate_log.warning("commit", "committing offsets failed: %s", exc.args[0].str())

    def _publish_model(self) -> None:
        topic = self.settings.kafka.model_topic
        if topic is None or self.model is None:
            return
        assert self.producer is not None
        m = self.model
        value = json.dumps(
            {
                "model_version": int(m.n_steps_),
                "n_samples_seen": float(m.n_samples_seen_),
                "n_clusters": int(m.n_clusters),
                "dim": int(m.n_features_in_),
                "centroids": np.asarray(m.cluster_centers_, dtype=np.float64).tolist(),
                "counts": np.asarray(m.counts_, dtype=np.float64).tolist(),
                "created_at": time.time(),
            }
        ).encode()
        key = self.settings.kafka.group_id.encode()
        try:
            if self.exactly_once:
                self._begin()
                self._produce(self.producer.produce, topic, value, key, None)
                producer = self.producer
                self._txn_call(
                    lambda: producer.commit_transaction(_TXN_TIMEOUT_S), "publishing the model"
                )
            else:
                self._produce(self.producer.produce, topic, value, key, None)
        except _Abort as abort:
            log.warning("model not published this time: %s", abort)

    def _log_checkpoint(self, path: Path, duration: float) -> None:
        assert self.model is not None
        now = time.monotonic()
        since, seen_before = self._rate_window
        seen = int(self.model.n_samples_seen_)
        rate = (seen - seen_before) / max(now - since, 1e-9)
        self._rate_window = (now, seen)
        lag = self.metrics.total_lag()
        log.info(
            "checkpoint %s in %.0f ms: version %d, %d samples, %.0f vectors/s, lag %s, inertia %.4g (avg %.4g)",
            path.name, duration * 1000, self.model.n_steps_, seen, rate,
            "?" if lag is None else f"{lag:.0f}", self.model.inertia_, self.model.inertia_ewma_,
        )  # fmt: skip

    # -- shutdown ------------------------------------------------------------------------

    def _shutdown(self) -> None:
        log.info("stopping: finishing the current batch")
        if self.model is not None:
            self._process(force=True)
        self._checkpoint()
        self._closing = True
        if self.consumer is not None:
            self.consumer.close()
            self.consumer = None
        log.info("stopped cleanly")

    def _close_clients(self) -> None:
        self._closing = True
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                self.consumer.close()
            self.consumer = None
        if self.producer is not None:
            # Never block on a broker that is gone: undelivered records are redone on restart.
            with contextlib.suppress(Exception):
                self.producer.flush(5.0)
            self.producer = None

    def _check_fatal(self) -> None:
        if self.fatal is not None:
            raise self.fatal
        if self.delivery_errors:
            first = self.delivery_errors[0]
            raise KafkaError(
                f"{len(self.delivery_errors)} record(s) could not be delivered (first: {first}); "
                "stopping without a checkpoint so they are redone on restart",
                fatal=True,
            )

    # -- health --------------------------------------------------------------------------

    def _health(self) -> tuple[bool, str]:
        if self.fatal is not None:
            return False, f"fatal error: {self.fatal}"
        stuck_after = max(60.0, 10 * self.settings.model.max_batch_wait_ms / 1000.0)
        idle = time.monotonic() - self.heartbeat
        if idle > stuck_after:
            return False, f"loop has not turned for {idle:.0f}s"
        return True, "ok"

    def _ready(self) -> tuple[bool, str]:
        if not self.assigned:
            if self.last_kafka_error:
                return False, f"no partitions assigned; last Kafka error: {self.last_kafka_error}"
            return False, "no partitions assigned"
        if self.model is None:
            return False, "model not initialised yet"
        return True, "ok"


class _Abort(Exception):
    """The current transaction was aborted; the batch is to be redone."""


def _keys(partitions: Iterable[TopicPartition]) -> set[TopicPart]:
    return {(tp.topic, tp.partition) for tp in partitions}


def _fmt_tps(partitions: Iterable[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"


def _fmt_offsets(offsets: dict[TopicPart, int]) -> str:
    return ", ".join(f"{t}[{p}]={o}" for (t, p), o in sorted(offsets.items())) or "none"


__all__ = [
    "HEADER_MESSAGE",
    "HEADER_OFFSET",
    "HEADER_PARTITION",
    "HEADER_REASON",
    "HEADER_TOPIC",
    "App",
]
