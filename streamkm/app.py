"""The daemon: a conductor over parts with one job each.

::

    Source ──► Batcher ──► Learner.step ──► Sink.publish ──► (Transactions.commit)
      │  (rows, dead letters, offsets)                 │
      └── OffsetTracker ◄──────────────────────────────┘── Checkpointer (interval, count,
                                                            revoke, shutdown)

* :class:`~streamkm.source.Source` consumes a bulk and decodes it (rows plus arrays of their
  partitions, offsets and keys, and dead letters) and forwards rebalances to the conductor;
* :class:`~streamkm.batcher.Batcher` gathers rows into mini-batches (full, or timed out);
* the :class:`~streamkm.learner.Learner` labels and learns a batch;
* :class:`~streamkm.sink.Sink` writes assignments, dead letters and the model record, and in
  exactly-once mode :class:`~streamkm.sink.Transactions` commits each batch with its offsets;
* :class:`~streamkm.offsets.OffsetTracker` holds every offset and the delivery rules of the
  README's "Delivery guarantees";
* :class:`~streamkm.checkpointer.Checkpointer` says when a checkpoint is due and writes it;
* :class:`~streamkm.health.Health` answers ``/healthz`` and ``/readyz`` and keeps the first fatal
  error.

The clients come from a :class:`~streamkm.clients.ClientFactory` (:func:`kafka_clients` by
default), opened and closed as a context manager.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from streamkm import __version__, records
from streamkm.batcher import Batch, Batcher
from streamkm.checkpoint import CheckpointStore
from streamkm.checkpointer import Checkpointer
from streamkm.clients import ClientFactory, Clients, kafka_clients
from streamkm.codec import VectorDecoder
from streamkm.config import Settings
from streamkm.errors import CheckpointError, FencedError, RestoreError, StreamkmError
from streamkm.health import Health
from streamkm.learner import Learner, learner_from_settings
from streamkm.metrics import Metrics
from streamkm.offsets import ORIGINS_FILE, OffsetTracker, TopicPart, format_offsets
from streamkm.records import DeadLetter
from streamkm.restore import NOT_RESTORED, calibrated, model_from_record, pause, resume
from streamkm.shared.replica import Replica
from streamkm.shared.sync import DeltaBuilder, SharedLearner, SyncLog
from streamkm.sink import TransactionAborted
from streamkm.source import Bulk
from streamkm.topics import TopicState, input_topic_exists, prepare_topics

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1
_POLL_MAX_S = 0.5
_LAG_EVERY_S = 1.0
_TOPIC_CHECK_S = 10.0
# Valid messages that must agree on a width before it becomes the input's dimension.
DIM_QUORUM = 8
# checkpoint.when_lost = "restore-from-model-topic", refused: read the model topic again after.
RESTORE_RETRY_S = 30.0


@dataclass
class _DimProbe:
    """Widths of the first valid messages while ``input.dim`` is unknown."""

    first: dict[TopicPart, int] = field(default_factory=dict)  # where to read them again
    votes: dict[int, int] = field(default_factory=dict)

    def winner(self) -> tuple[int, int] | None:
        """The width held by at least DIM_QUORUM messages and by more than all others."""
        if not self.votes:
            return None
        width, n = max(self.votes.items(), key=lambda wn: wn[1])
        others = sum(self.votes.values()) - n
        return (width, n) if n >= DIM_QUORUM and n > others else None


@dataclass
class _OpenTransaction:
    """Exactly-once: the batches in the open transaction (several within transaction_ms)."""

    snapshot: Any  # the model before the first of them
    started: float
    begun: bool = False
    first: dict[TopicPart, int] = field(default_factory=dict)  # where to read them again
    after: dict[TopicPart, int] = field(default_factory=dict)  # the offsets to commit

    def add(self, first: Mapping[TopicPart, int], after: Mapping[TopicPart, int]) -> None:
        for key, o in first.items():
            self.first.setdefault(key, o)
        self.after.update(after)


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
        Where metrics are registered; by default a new one that also carries the process
        metrics (``process_*``: resident memory, CPU, open files).
    clients : ClientFactory, optional
        Opens the Kafka clients (:func:`~streamkm.clients.kafka_clients` by default).

    Attributes
    ----------
    learner : Learner
        The model (restored from the newest checkpoint, else new) once :meth:`start` ran.
    offsets : OffsetTracker
        Every offset the daemon knows.
    checkpointer : Checkpointer
        When and how checkpoints are written.
    health : Health
        Liveness, readiness and the first fatal error.
    metrics : Metrics
        The daemon's Prometheus metrics.
    """

    def __init__(
        self,
        settings: Settings,
        reset_model: bool = False,
        registry: CollectorRegistry | None = None,
        clients: ClientFactory = kafka_clients,
    ) -> None:
        self.settings = settings
        self.reset_model = reset_model
        self.exactly_once = settings.delivery.guarantee == "exactly-once"
        self.stop_event = threading.Event()
        self.metrics = Metrics(registry)
        self.metrics.set_checkpoint_interval(settings.checkpoint.interval_s)
        self.metrics.shared_model.set(1.0 if settings.kafka.sync_topic else 0.0)
        model_cfg = settings.model
        stuck_after = max(60.0, 10 * model_cfg.max_batch_wait_ms / 1000.0)
        self.health = Health(stuck_after, on_fatal=self.stop_event.set)
        store = CheckpointStore(settings.checkpoint.dir, keep=settings.checkpoint.keep)
        self.checkpointer = Checkpointer(
            store, settings.checkpoint.interval_s, every_batches=settings.checkpoint.every_batches
        )
        self.offsets = OffsetTracker(store.dir / ORIGINS_FILE)
        self.decoder = VectorDecoder(
            settings.input.format,
            dim=settings.input.dim,
            json_field=settings.input.json_field,
            max_bytes=settings.input.max_message_bytes,
            dtype=np.float32,
        )
        self.shared = settings.kafka.sync_topic is not None
        self.learner: Learner = self._new_learner()
        self._deltas = DeltaBuilder(settings.delivery.instance_id)
        self._checkpointed_version = -1
        self._next_lag = 0.0
        self._next_sync_send = 0.0
        self._open_txn: _OpenTransaction | None = None
        self._dim_probe = _DimProbe()
        self._topics: TopicState | None = None  # set by run(); None in embedded use
        self._next_topic_check = 0.0
        max_wait_s = model_cfg.max_batch_wait_ms / 1000.0
        self.batcher = Batcher(
            max(model_cfg.batch_size, self.learner.rows_to_start), max_wait_s, dtype=np.float32
        )
        self._idle_wait_s = max(0.005, max_wait_s / 5)
        self._open_clients = clients
        self._clients: Clients | None = None
        self._dead: list[DeadLetter] = []  # consumed since the last batch, in arrival order
        self._group_check_due = False
        # A lost checkpoint volume whose restore from the model topic was refused: the reason
        # (readiness), and where each partition starts once a model is restored.
        self._held: str | None = None
        self._held_starts: dict[TopicPart, int] = {}
        self._next_restore = 0.0
        self._calibrate = False  # a model restored from the topic: spreads from its 1st batch

    @property
    def model(self) -> Any:
        """The fitted estimator (e.g. :class:`~streamkm.model.StreamingKMeans`), else None."""
        return self.learner.estimator if self.learner.fitted else None

    # -- public --------------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM/SIGINT or a fatal error; return the process exit status."""
        self._install_signal_handlers()
        try:
            self.start()
            log.info("%s", self.banner())
            self.warm_up()
            server = self.metrics.serve(
                self.settings.metrics.host, self.settings.metrics.port, self._live, self._ready
            )
            try:
                with self.connected():
                    self._topics = prepare_topics(self.settings)
                    while not self.stop_event.is_set():
                        self.turn()
                    self._check()
                    self._shutdown()
            finally:
                server.close()
            return EXIT_OK
        except FencedError as exc:
            log.error("fenced: %s", exc)
            return EXIT_ERROR
        except StreamkmError as exc:
            log.error("%s", exc)
            return EXIT_ERROR

    def banner(self) -> str:
        """One line saying what this daemon is about to do."""
        s = self.settings
        k = s.kafka
        parts = [
            f"streamkm {__version__}: {k.input_topic} ({s.input.format}) -> {k.output_topic}",
            f"group {k.group_id}, instance {s.delivery.instance_id}, {s.delivery.guarantee}",
            f"k={s.model.n_clusters}, batch {s.model.batch_size}",
            f"dead letters: {k.dead_letter_topic or 'logged, not kept'}",
        ]
        if k.model_topic:
            parts.append(f"model topic {k.model_topic}")
        if k.sync_topic:
            parts.append(f"shared model via {k.sync_topic}")
        return "; ".join(parts)

    def warm_up(self) -> None:
        """Load (or, on the first run after an install, compile) the Numba kernels now, with a
        notice, rather than stall silently on the first batch."""
        log.info("loading the compiled kernels (the first run after an install compiles them)")
        t0 = time.perf_counter()
        records.warm_up()
        rng = np.random.default_rng(0)
        X = rng.normal(size=(64, 2)).astype(np.float32)
        probe = learner_from_settings(
            Settings.model_validate({"model": {"n_clusters": 2, "batch_size": 32, "seed": 0}})
        )
        probe.step(X)
        probe.step(X[:32])
        Replica.from_centroids(X[:2].astype(np.float64)).assign(X)
        log.info("kernels ready in %.1f s", time.perf_counter() - t0)

    def request_stop(self) -> None:
        """Ask the loop to finish the current batch, checkpoint and exit."""
        self.stop_event.set()

    def start(self) -> None:
        """Check the checkpoint directory and restore the newest checkpoint, if any."""
        self.checkpointer.store.ensure_writable()  # type: ignore[union-attr]
        if self.reset_model:
            self.checkpointer.move_aside(also=[self.offsets.origins_path])  # type: ignore[list-item]
        k = self.settings.model.n_clusters
        ckpt = self.checkpointer.restore(expect_dim=self.settings.input.dim, expect_n_clusters=k)
        if ckpt is not None and self.shared != isinstance(ckpt.model, Replica):
            log.warning(
                "ignoring %s: it holds a %s model, and kafka.sync_topic is %s",
                ckpt.path.name, "shared" if isinstance(ckpt.model, Replica) else "local",
                "set" if self.shared else "unset",
            )  # fmt: skip
            ckpt = None
        if ckpt is not None:
            self.learner = self._new_learner(ckpt.model)
            self.offsets.restore(ckpt.offsets)
            self.decoder.dim = self.learner.dim
            log.info(
                "restored %s: model version %d, %d samples, offsets %s",
                ckpt.path.name, self.learner.version, ckpt.model.n_samples_seen_,
                format_offsets(ckpt.offsets),
            )  # fmt: skip
            self.metrics.record_model(self.learner.estimator)
        self.offsets.load_origins()

    @contextlib.contextmanager
    def connected(self) -> Iterator[Clients]:
        """Open the clients and join the group; leave it and close them on exit."""
        with self._open_clients(
            self.settings, self.decoder, self.health, self.metrics, self.stop_event.is_set
        ) as clients:
            self._clients = clients
            try:
                if clients.sync is not None:
                    assert isinstance(self.learner, SharedLearner)
                    clients.sync.start(self.learner)
                    clients.sync.catch_up()
                clients.source.subscribe(self)
                yield clients
            finally:
                self._clients = None

    def turn(self) -> None:
        """One turn of the loop: consume a bulk, run a batch if one is due, checkpoint if due."""
        source, sink = self._parts()
        self.health.beat()
        if self._held is not None:
            self._hold_turn(source)
            sink.poll()
            self._check()
            self.metrics.ready.set(0.0)
            return
        need = self._rows_needed()
        if need > 0 and self.decoder.dim is None:
            self._infer_dim(source, source.consume_messages(need, self._idle_wait_s))
        elif need > 0:
            due = self.batcher.time_until_due()
            # consume() waits until it has `need` messages or the timeout passes, and rows
            # count their wait only from then: with nothing buffered, keep that wait a small
            # part of max_batch_wait_ms so a quiet stream still meets its latency bound.
            timeout = min(_POLL_MAX_S, self._idle_wait_s if due is None else due)
            began = time.monotonic()
            bulk = source.consume(need, timeout)
            if bulk is not None and self._held is None:
                self._take(bulk, began)
            elif bulk is not None:  # held during this call: read again once a model is restored
                for key, o in bulk.first.items():
                    self._held_starts.setdefault(key, o)
        sink.poll()
        self._check()
        sync = self._sync()
        if sync is not None:
            if sync.refresh() and self.learner.fitted:  # label with the newest replica
                self.metrics.record_model(self.learner.estimator)
            self._rewind_rejected(sync)
        self.process(force=False)
        self._commit_if_due(force=False)
        self._send_held(sync, force=False)
        if self.checkpointer.due():
            self.checkpoint()
        if self._group_check_due:
            self._check_group()
        self.metrics.ready.set(1.0 if self._ready()[0] else 0.0)
        self.metrics.rows_held.set(len(self.batcher))
        now = time.monotonic()
        if not self.offsets.assigned and now >= self._next_topic_check:
            self._next_topic_check = now + _TOPIC_CHECK_S
            self._check_topics()
        if now >= self._next_lag:
            self._next_lag = now + _LAG_EVERY_S
            self._update_lag(source)

    def _check_topics(self) -> None:
        """While nothing is assigned: verify the topics again once the brokers answer, and
        notice the input topic appearing."""
        state = self._topics
        if state is None:
            return
        if not state.checked:
            self._topics = prepare_topics(self.settings)
        elif not state.input_exists and input_topic_exists(self.settings):
            log.info("input topic %s exists now", self.settings.kafka.input_topic)
            self._topics = TopicState(checked=True, input_exists=True, created=state.created)

    def _update_lag(self, source: Any) -> None:
        """Lag from the consumer's position (right from the start, in both delivery modes;
        librdkafka's statistics only know committed offsets)."""
        m = self.metrics
        lags = source.lag(sorted(self.offsets.assigned))
        seconds = 0.0
        if any(lags.values()) and source.newest_ms is not None:
            seconds = max(0.0, time.time() - source.newest_ms / 1000.0)
        m.set_lag({(t, str(p)): float(v) for (t, p), v in lags.items()}, seconds)

    def _infer_dim(self, source: Any, messages: list[Any]) -> None:
        """``input.dim`` unset and no checkpoint: count the widths of the first valid messages
        (without keeping them) until one width has a quorum, then read them all again from
        the first offsets seen. A stray message cannot fix the dimension on its own."""
        probe = self._dim_probe
        if self.decoder.dim is not None:  # a model restored during this call fixed it
            source.seek(self.offsets.rewind_targets(_first_offsets(messages)))
            return
        for m in messages:
            key = (m.topic(), m.partition())
            probe.first.setdefault(key, m.offset())
            width = self.decoder.width(m.value())
            if width is not None:
                probe.votes[width] = probe.votes.get(width, 0) + 1
        winner = probe.winner()
        if winner is None:
            return
        width, votes = winner
        log.info(
            "input dimension %d inferred from %d of the first %d valid messages "
            "(set input.dim to fix it in advance)", width, votes, sum(probe.votes.values()),
        )  # fmt: skip
        self.decoder.dim = width
        source.seek(self.offsets.rewind_targets(probe.first))
        self._dim_probe = _DimProbe()

    # -- the rebalance listener (streamkm.source.AssignmentListener) -----------------------

    def on_assigned(
        self, partitions: list[TopicPart], committed: Mapping[TopicPart, int]
    ) -> dict[TopicPart, int]:
        """Start each partition where the model stopped (or where its lineage began)."""
        sync = self._sync()
        if sync is not None:
            # Fold what the partitions' previous owners sent before taking them on.
            sync.catch_up()
            replica = sync.learner.replica if sync.learner is not None else None
            absorbed = {} if replica is None else replica.absorbed
            starts = self.offsets.on_assigned_shared(partitions, committed, absorbed)
        else:
            starts = self.offsets.on_assigned(partitions, committed)
            self._when_checkpoints_lost(partitions, committed, starts)
        self.health.clear_kafka_error()
        self._group_check_due = True
        return starts

    def _when_checkpoints_lost(
        self,
        partitions: list[TopicPart],
        committed: Mapping[TopicPart, int],
        starts: Mapping[TopicPart, int],
    ) -> None:
        """The group has moved on but this instance has no checkpoint of it: say so loudly,
        and do what ``checkpoint.when_lost`` says before the model sees any input."""
        if self._held is not None:  # still waiting for a model: these wait with the others
            self._hold_from(partitions, committed, starts)
            return
        known = self.offsets.positions.keys() | self.offsets.origins.keys()
        orphans = sorted(k for k in partitions if k in committed and k not in known)
        if not orphans:
            return
        s = self.settings
        where = ", ".join(f"{t}[{p}]@{committed[(t, p)]}" for t, p in orphans)
        if self.learner.fitted:
            log.error(
                "the model in %s has no offsets of %s, but the group %s has committed offsets "
                "there: the model takes them on from those offsets; inputs before them are not "
                "learnt", s.checkpoint.dir, where, s.kafka.group_id,
            )  # fmt: skip
            return
        if self.reset_model:
            log.warning(
                "--reset-model: a new model starts from the group %s's committed offsets (%s); "
                "inputs before them are not learnt", s.kafka.group_id, where,
            )  # fmt: skip
            return
        lost = (
            f"no checkpoint in {s.checkpoint.dir}, but the group {s.kafka.group_id} has "
            f"committed offsets ({where}): the checkpoint volume was lost or replaced"
        )
        topic = s.kafka.model_topic
        choices = (
            "The choices: put the checkpoint files back and restart (nothing is lost); "
            + (
                f'checkpoint.when_lost = "restore-from-model-topic" goes on from the newest '
                f"model in {topic}; "
                if topic
                else "with kafka.model_topic set, checkpoint.when_lost = "
                '"restore-from-model-topic" goes on from the newest published model; '
            )
            + '"new-model" starts a new model from those offsets (inputs before them are not '
            "learnt); reset the group's offsets to relearn what Kafka still holds; "
            '"stop" exits instead'
        )
        policy = s.checkpoint.when_lost
        if policy == "stop":
            raise CheckpointError(f'{lost}. checkpoint.when_lost = "stop": exiting. {choices}')
        if policy == "restore-from-model-topic":
            log.error("%s. Restoring the newest model from %s", lost, topic)
            self._restore_from_model_topic(where)
            if self._held is not None:
                self._hold_from(partitions, committed, starts)
            return
        log.error(
            '%s. checkpoint.when_lost = "new-model": starting a NEW model from those offsets; '
            "inputs before them are not learnt. %s", lost, choices,
        )  # fmt: skip

    def _hold_from(
        self,
        partitions: list[TopicPart],
        committed: Mapping[TopicPart, int],
        starts: Mapping[TopicPart, int],
    ) -> None:
        """Note where each partition starts once a model is restored."""
        for key in partitions:
            start = starts.get(key, committed.get(key))
            if start is not None:
                self._held_starts[key] = start

    def _restore_from_model_topic(self, where: str = "") -> None:
        """Replace the new model by the newest one of the model topic; else hold the input."""
        s = self.settings
        topic = s.kafka.model_topic
        reader = None if self._clients is None else self._clients.model_reader
        self._next_restore = time.monotonic() + RESTORE_RETRY_S
        try:
            if reader is None:
                raise RestoreError("kafka.model_topic is not set")
            model, rec = model_from_record(reader(), s)
        except StreamkmError as exc:
            self._held = (
                f"checkpoint volume lost and no model restored from the model topic {topic}: "
                f"{exc}; input held, retried every {RESTORE_RETRY_S:.0f} s (or set "
                'checkpoint.when_lost = "new-model" or "stop")'
            )
            log.error("%s", self._held)
            return
        self.learner = self._new_learner(model)
        self.decoder.dim = rec["dim"]
        self._calibrate = True
        self.metrics.record_model(model)
        log.warning(
            "restored model version %d (%d samples, %d clusters, dimension %d) from the model "
            "topic %s; it goes on from the group's committed offsets%s. Not restored: %s",
            rec["model_version"], rec["n_samples_seen"], rec["n_clusters"], rec["dim"], topic,
            f" ({where})" if where else "", NOT_RESTORED,
        )  # fmt: skip
        self._held = None

    def _hold_turn(self, source: Any) -> None:
        """Held: no input reaches the model (its partitions are paused) until one is restored."""
        held = sorted(self.offsets.assigned)
        pause(source, held)
        for m in source.consume_messages(1, _POLL_MAX_S):  # keeps the group membership
            self._held_starts.setdefault((m.topic(), m.partition()), m.offset())
        if time.monotonic() >= self._next_restore:
            self._restore_from_model_topic()
        if self._held is None:
            resume(source, sorted(self.offsets.assigned))
            starts = {k: o for k, o in self._held_starts.items() if k in self.offsets.assigned}
            source.seek(starts)
            self._held_starts = {}
            self._dim_probe = _DimProbe()

    def on_revoked(self, partitions: list[TopicPart]) -> None:
        """Finish and checkpoint what is held before the partitions go."""
        self._group_check_due = True
        try:
            if self.health.fatal is not None:
                return  # stopping without a checkpoint: the work is redone on restart
            if self.learner.fitted:
                self.process(force=True)
                self.checkpoint()
            else:
                self._forget(partitions)
        finally:
            self._let_go(partitions)

    def on_lost(self, partitions: list[TopicPart]) -> None:
        """Another member may own them already: drop their work not yet committed."""
        self._forget(partitions)
        self._let_go(partitions)

    def _let_go(self, partitions: list[TopicPart]) -> None:
        for key in partitions:
            self._dim_probe.first.pop(key, None)
            self._held_starts.pop(key, None)
        self.offsets.let_go(partitions)
        for key in partitions:
            self._deltas.forget(key)

    # -- batches -------------------------------------------------------------------------

    def _take(self, bulk: Bulk, began: float) -> None:
        self.offsets.consumed(bulk.first, bulk.next)
        if len(bulk):
            # Rows count their wait from the consume call, not from its return: a quiet
            # stream's rows may have waited most of that call's timeout already.
            self.batcher.add(
                bulk.X, self.settings.kafka.input_topic, bulk.partitions, bulk.offsets,
                bulk.keys, arrived=began,
            )  # fmt: skip
        if bulk.dead:
            self._dead.extend(bulk.dead)
        self.metrics.messages_consumed.inc(bulk.n_messages)
        self.metrics.observe_stage("decode", bulk.seconds)

    def _rows_needed(self) -> int:
        if not self.learner.fitted:
            return self.learner.rows_to_start - len(self.batcher)
        return self.settings.model.batch_size - len(self.batcher)

    def process(self, force: bool) -> None:
        """Run the pending batch if it is due (or, with ``force``, whenever it can run)."""
        rows = len(self.batcher)
        if not rows and not self._dead:
            return
        if not self.learner.fitted:
            # Hold the first vectors for seeding; their dead letters wait with them, in order.
            if rows and rows < self.learner.rows_to_start:
                return
        elif rows and not (force or rows >= self.settings.model.batch_size or self.batcher.ready()):
            return
        self._run_batch(self.batcher.take(max_rows=rows))

    def _run_batch(self, batch: Batch) -> None:
        """Label, learn and publish one batch; exactly-once, inside the open transaction
        (begun here if none is), which commits once it is ``delivery.transaction_ms`` old."""
        _, sink = self._parts()
        if self._calibrate and len(batch):  # restored from the model topic: no spreads yet
            self.learner = self._new_learner(calibrated(self.learner.estimator, batch.X))
            self._calibrate = False
        txn = self._txn()
        dead, self._dead = self._dead, []
        first, after = self.offsets.take_pending()
        learner = self.learner
        if txn is not None and self._open_txn is None:
            # Undo point of the whole transaction: the model as it was before its first batch.
            self._open_txn = _OpenTransaction(learner.snapshot(), time.monotonic())
        open_txn = self._open_txn
        t0 = time.perf_counter()
        result = learner.step(batch.X) if len(batch) else None
        t1 = time.perf_counter()
        topic = self.settings.kafka.input_topic
        emit = self.offsets.emit_mask(topic, batch.partitions, batch.offsets)
        fresh = [d for d in dead if not self.offsets.replayed(d.topic, d.partition, d.offset)]
        try:
            if open_txn is not None:
                open_txn.add(first, after)
                if not open_txn.begun:
                    txn.begin()
                    open_txn.begun = True
            n_out = sink.publish(batch, result, fresh, version=learner.version, emit=emit)
            sync = self._sync()
            if sync is not None:
                deltas = self._batch_deltas(batch, result, first, after)
                if txn is not None:
                    sync.send(deltas)  # in the transaction, with this batch's offsets
                else:
                    self._deltas.hold(deltas)
            if open_txn is None:
                self.offsets.batch_done(after)
            else:
                self._commit_if_due(force=False)
        except TransactionAborted as abort:
            self._redo(abort)
            return
        m = self.metrics
        m.observe_stage("model", t1 - t0)
        m.observe_stage("produce", time.perf_counter() - t1)
        m.batches.inc()
        m.messages_assigned.inc(n_out)
        for d in dead:
            m.record_dead_letter(d.error.reason)
        if result is not None:
            m.record_model(learner.estimator)
        self.checkpointer.batch_done(learner.estimator if result is not None else None)

    def _commit_if_due(self, force: bool) -> None:
        """Exactly-once: commit the open transaction (its outputs and input offsets) when it
        is ``delivery.transaction_ms`` old, or now with ``force``."""
        open_txn = self._open_txn
        if open_txn is None:
            return
        window = self.settings.delivery.transaction_ms / 1000.0
        if not force and time.monotonic() - open_txn.started < window:
            return
        source, _ = self._parts()
        txn = self._txn()
        try:
            txn.commit(self.offsets.transaction_offsets(open_txn.after), source.group_metadata())
        except TransactionAborted as abort:
            self._redo(abort)
            return
        self._open_txn = None
        self.offsets.batch_done(open_txn.after)

    def _redo(self, abort: TransactionAborted) -> None:
        """The open transaction was aborted: undo its batches and read them again."""
        open_txn, self._open_txn = self._open_txn, None
        assert open_txn is not None
        log.warning("transaction aborted (%s); rewinding and redoing its batches", abort)
        self.learner.restore(open_txn.snapshot)
        for key, o in open_txn.first.items():
            self._deltas.sent_until[key] = o  # the aborted deltas never reached the log
        # What was consumed after those batches is read again too: drop it, and seek each
        # partition to the first offset of either.
        pending_first, _ = self.offsets.take_pending()
        if len(self.batcher):
            self.batcher.take(max_rows=len(self.batcher))
        self._dead = []
        targets = dict(pending_first)
        for key, o in open_txn.first.items():
            targets[key] = min(o, targets.get(key, o))
        source, _ = self._parts()
        source.seek(self.offsets.rewind_targets(targets))

    def _forget(self, gone: Iterable[TopicPart]) -> None:
        """Drop consumed-but-unprocessed input of partitions this instance no longer owns.

        Rows of the partitions it keeps stay buffered, so nothing needs to be read again.
        """
        gone = set(gone)
        if len(self.batcher):
            batch = self.batcher.take(max_rows=len(self.batcher))
            lost = [p for t, p in gone if t == self.settings.kafka.input_topic]
            keep = ~np.isin(batch.partitions, lost)
            if keep.any():
                self.batcher.add(
                    batch.X[keep], batch.topics[keep], batch.partitions[keep],
                    batch.offsets[keep], batch.keys[keep], batch.timestamps[keep],
                )  # fmt: skip
        self._dead = [d for d in self._dead if (d.topic, d.partition) not in gone]
        self.offsets.forget(gone)

    def _batch_deltas(
        self, batch: Batch, result: Any, first: dict[TopicPart, int], after: dict[TopicPart, int]
    ) -> list[Any]:
        replica = self.learner.estimator
        labels = None if result is None else result.labels
        d2 = None if result is None else result.distances**2
        return self._deltas.build(
            replica, self.settings.kafka.input_topic, batch.X, batch.partitions, batch.offsets,
            labels, d2, first, after,
        )  # fmt: skip

    def _send_held(self, sync: SyncLog | None, force: bool) -> None:
        """At-least-once: send the held deltas every kafka.sync_interval_ms (and before any
        offset is committed: a committed input must be in the log)."""
        if sync is None or not self._deltas.holding:
            return
        now = time.monotonic()
        if force or now >= self._next_sync_send:
            self._next_sync_send = now + self.settings.kafka.sync_interval_ms / 1000.0
            sync.send(self._deltas.take())

    def _rewind_rejected(self, sync: SyncLog) -> None:
        """Read again, from where the log stands, a partition whose delta the log refused."""
        if not sync.rejected_own:
            return
        rejected, sync.rejected_own = sync.rejected_own, []
        replica = self.learner.estimator
        source, _ = self._parts()
        for delta in rejected:
            key = (delta.topic, delta.partition)
            if key not in self.offsets.assigned or delta.epoch != self._deltas.epoch.get(key, 0):
                continue
            to = replica.absorbed.get(key, delta.first)
            log.warning(
                "the sync log refused a delta of %s[%d] (offsets %d..%d; it holds up to %d): "
                "reading the partition again from %d", *key, delta.first, delta.after - 1,
                to - 1, to,
            )  # fmt: skip
            self._forget([key])
            self.offsets.rewind_to(key, to)
            self._deltas.rewind(key, to)
            source.seek({key: to})

    # -- checkpoints ---------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Flush, write model + offsets durably, commit offsets (at-least-once), publish."""
        cp = self.checkpointer
        # Shared-model mode: folding other instances' deltas changes the model too.
        changed = cp.dirty or (self.shared and self.learner.version != self._checkpointed_version)
        if not self.learner.fitted or not changed:
            cp.reset()
            return
        self._commit_if_due(force=True)  # a checkpoint holds committed input only
        source, sink = self._parts()
        t0 = time.perf_counter()
        self._send_held(self._sync(), force=True)
        sink.flush()
        estimator = self.learner.estimator
        path = cp.write(estimator, self.offsets.positions)
        self._checkpointed_version = self.learner.version
        self.offsets.checkpointed_now()
        if not self.exactly_once:
            source.commit(self.offsets.group_offsets())
        sink.publish_model(self.learner.version, self.learner.public_state())
        duration = time.perf_counter() - t0
        self.metrics.record_checkpoint(duration)
        cp.log_written(path, duration, estimator, self.metrics.total_lag())

    # -- shutdown and checks ---------------------------------------------------------------

    def _shutdown(self) -> None:
        log.info("stopping: finishing the current batch")
        if self.learner.fitted:
            self.process(force=True)
        self.checkpoint()
        source, _ = self._parts()
        source.close()  # leave the group now (the revoke finds nothing left to do)
        log.info("stopped cleanly")

    def _check(self) -> None:
        self.health.raise_if_fatal()
        _, sink = self._parts()
        if self._open_txn is not None and sink.reports.failures:
            # A record of the open transaction failed: its commit fails too, so try it now;
            # the abort that follows redoes the batches (and forgets the failures).
            self._commit_if_due(force=True)
        sink.check()

    def _check_group(self) -> None:
        """Warn when other members share the group: each instance keeps its own model."""
        self._group_check_due = False
        source, _ = self._parts()
        members = source.group_members()
        if members is None:
            return
        self.metrics.group_members.set(members)
        if members > 1 and not self.shared:
            log.error(
                "consumer group %s has %d members: each instance keeps its own model of its "
                "own partitions, so the models differ and a rebalance republishes assignments "
                "(more than the at-least-once bound); run one instance per group",
                self.settings.kafka.group_id, members,
            )  # fmt: skip

    def _parts(self) -> tuple[Any, Any]:
        clients = self._clients
        if clients is None:
            raise RuntimeError("the clients are not open (use App.connected())")
        return clients.source, clients.sink

    def _txn(self) -> Any:
        return None if self._clients is None else self._clients.transactions

    def _sync(self) -> SyncLog | None:
        return None if self._clients is None else self._clients.sync

    def _new_learner(self, estimator: Any = None) -> Learner:
        if self.shared:
            return SharedLearner(self.settings.model, estimator)
        return learner_from_settings(self.settings, estimator)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.request_stop())

    # -- health --------------------------------------------------------------------------

    def _live(self) -> tuple[bool, str]:
        return self.health.live()

    def _ready(self) -> tuple[bool, str]:
        if self._held is not None:
            return False, self._held
        topics = self._topics
        if self.offsets.assigned and self.decoder.dim is None:
            votes = self._dim_probe.votes
            best = max(votes.values(), default=0)
            return False, (
                f"inferring the input dimension: {best} of {sum(votes.values())} valid messages "
                f"agree, {DIM_QUORUM} (and a majority) needed; or set input.dim"
            )
        missing = topics is not None and topics.checked and not topics.input_exists
        if not self.offsets.assigned and missing:
            topic = self.settings.kafka.input_topic
            return False, f"input topic {topic} does not exist; waiting for it"
        return self.health.ready(assigned=bool(self.offsets.assigned), fitted=self.learner.fitted)


def _first_offsets(messages: list[Any]) -> dict[TopicPart, int]:
    first: dict[TopicPart, int] = {}
    for m in messages:
        first.setdefault((m.topic(), m.partition()), m.offset())
    return first


__all__ = ["EXIT_ERROR", "EXIT_OK", "App"]
