"""The daemon: a conductor over parts with one job each.

::

    Source ──► Batcher ──► Learner.step ──► Sink.publish ──► (TransactionWindow.commit)
      │  (rows, dead letters, offsets)                 │
      └── OffsetTracker ◄──────────────────────────────┘── Checkpointer (interval, count,
                                                            revoke, shutdown; written in
                                                            a background thread)

* :class:`~streamkm.source.Source` consumes a bulk and decodes it (rows plus arrays of their
  partitions, offsets and keys, and dead letters) and forwards rebalances to the conductor;
* :class:`~streamkm.batcher.Batcher` gathers rows into mini-batches (full, or timed out);
* the :class:`~streamkm.learner.Learner` labels and learns a batch;
* :class:`~streamkm.sink.Sink` writes assignments, dead letters and the model record;
* :class:`~streamkm.window.TransactionWindow` (exactly-once) holds the open transaction, its
  undo point and when it commits;
* :class:`~streamkm.offsets.OffsetTracker` holds every offset and the delivery rules of the
  README's "Delivery guarantees";
* :class:`~streamkm.checkpointer.Checkpointer` says when a checkpoint is due and writes it off
  the loop's thread;
* :class:`~streamkm.dimension.DimensionVote` infers the input's dimension when none is set;
* :class:`~streamkm.recovery.LostVolume` applies ``checkpoint.when_lost`` and holds the input
  while a restore from the model topic is refused;
* :class:`~streamkm.shared.outbox.DeltaOutbox` (shared-model mode) sends what was learnt to
  the sync log;
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
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from streamkm import __version__, records
from streamkm.batcher import Batch, Batcher
from streamkm.checkpoint import CheckpointStore
from streamkm.checkpointer import Checkpointer, Written
from streamkm.clients import ClientFactory, Clients, kafka_clients
from streamkm.codec import VectorDecoder
from streamkm.config import Settings
from streamkm.dimension import DIM_QUORUM, DimensionVote
from streamkm.errors import FencedError, StreamkmError
from streamkm.health import Health
from streamkm.learner import Learner, learner_from_settings
from streamkm.metrics import Metrics
from streamkm.offsets import ORIGINS_FILE, OffsetTracker, TopicPart, format_offsets
from streamkm.records import DeadLetter
from streamkm.recovery import LostVolume
from streamkm.shared.outbox import DeltaOutbox
from streamkm.shared.replica import Replica
from streamkm.shared.sync import SharedLearner, SyncLog
from streamkm.sink import TransactionAborted
from streamkm.source import Bulk
from streamkm.topics import TopicWatch
from streamkm.window import TransactionWindow

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1
_POLL_MAX_S = 0.5
_LAG_EVERY_S = 1.0
_TOPIC_CHECK_S = 10.0


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
    dims : DimensionVote
        Infers the input's dimension while it is unknown.
    lost : LostVolume
        ``checkpoint.when_lost`` and the input held while no model could be restored.
    outbox : DeltaOutbox
        Shared-model mode: this instance's deltas on their way to the sync log.
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
        self.dims = DimensionVote(self.decoder)
        self.lost = LostVolume(settings, reset_model, self._model_reader, self._restored)
        self.outbox = DeltaOutbox(
            settings.delivery.instance_id,
            settings.kafka.input_topic,
            settings.kafka.sync_interval_ms / 1000.0,
        )
        self._window: TransactionWindow | None = None  # exactly-once, while connected
        self._checkpointed_version = -1
        self._next_lag = 0.0
        self.topics = TopicWatch(settings, every_s=_TOPIC_CHECK_S)  # prepared by run()
        max_wait_s = model_cfg.max_batch_wait_ms / 1000.0
        self.batcher = Batcher(
            max(model_cfg.batch_size, self.learner.rows_to_start), max_wait_s, dtype=np.float32
        )
        self._idle_wait_s = max(0.005, max_wait_s / 5)
        self._open_clients = clients
        self._clients: Clients | None = None
        self._dead: list[DeadLetter] = []  # consumed since the last batch, in arrival order
        self._group_check_due = False

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
                # Before joining the group: a refused topic then leaves no member behind, and
                # closing a consumer in the middle of its first join can take a session timeout.
                self.topics.prepare()
                with self.connected():
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
            if clients.transactions is not None:
                window_s = self.settings.delivery.transaction_ms / 1000.0
                self._window = TransactionWindow(clients.transactions, window_s)
            try:
                if clients.sync is not None:
                    assert isinstance(self.learner, SharedLearner)
                    clients.sync.start(self.learner)
                    clients.sync.catch_up()
                clients.source.subscribe(self)
                yield clients
            finally:
                # A write still in flight (the loop stopped on an error) finishes; its offsets
                # are not committed then, which only means more input is read again.
                self._let_write_finish()
                self._clients = None
                self._window = None

    def turn(self) -> None:
        """One turn of the loop: consume a bulk, run a batch if one is due, checkpoint if due."""
        source, sink = self._parts()
        self.health.beat()
        if self.lost.held is not None:
            self.lost.hold_turn(source, self.offsets.assigned)
            if self.lost.held is None:
                self.dims.reset()
            sink.poll()
            self._check()
            self.metrics.ready.set(0.0)
            return
        self._consume(source)
        sink.poll()
        self._check()
        sync = self._sync()
        if sync is not None:
            if sync.refresh() and self.learner.fitted:  # label with the newest replica
                self.metrics.record_model(self.learner.estimator)
            self._read_again(self.outbox.refused(sync, self._absorbed(), self.offsets.assigned))
        self.process(force=False)
        self._commit(force=False)
        self.outbox.send_if_due(sync)
        self._checkpoint_written(self.checkpointer.done())
        if not self.checkpointer.busy and self.checkpointer.due():
            self.checkpoint(wait=False)
        if self._group_check_due:
            self._check_group()
        self.metrics.ready.set(1.0 if self._ready()[0] else 0.0)
        self.metrics.rows_held.set(len(self.batcher))
        if not self.offsets.assigned:
            self.topics.check_if_due()
        now = time.monotonic()
        if now >= self._next_lag:
            self._next_lag = now + _LAG_EVERY_S
            self._update_lag(source)

    def _consume(self, source: Any) -> None:
        """Consume what the next batch still needs (only counting widths while the input's
        dimension is being inferred)."""
        need = self._rows_needed()
        if need <= 0:
            return
        if self.decoder.dim is None:
            again = self.dims.feed(source.consume_messages(need, self._idle_wait_s))
            if again is not None:
                source.seek(self.offsets.rewind_targets(again))
            return
        due = self.batcher.time_until_due()
        # consume() waits until it has `need` messages or the timeout passes, and rows
        # count their wait only from then: with nothing buffered, keep that wait a small
        # part of max_batch_wait_ms so a quiet stream still meets its latency bound.
        timeout = min(_POLL_MAX_S, self._idle_wait_s if due is None else due)
        began = time.monotonic()
        bulk = source.consume(need, timeout)
        if bulk is None:
            return
        if self.lost.held is None:
            self._take(bulk, began)
        else:  # held during this call: read again once a model is restored
            self.lost.note_consumed(bulk.first)

    def _update_lag(self, source: Any) -> None:
        """Lag from the consumer's position (right from the start, in both delivery modes;
        librdkafka's statistics only know committed offsets)."""
        m = self.metrics
        lags = source.lag(sorted(self.offsets.assigned))
        seconds = 0.0
        if any(lags.values()) and source.newest_ms is not None:
            seconds = max(0.0, time.time() - source.newest_ms / 1000.0)
        m.set_lag({(t, str(p)): float(v) for (t, p), v in lags.items()}, seconds)

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
            known = self.offsets.positions.keys() | self.offsets.origins.keys()
            self.lost.on_assigned(partitions, committed, starts, known, self.learner.fitted)
        self.health.clear_kafka_error()
        self._group_check_due = True
        return starts

    def on_revoked(self, partitions: list[TopicPart]) -> None:
        """Finish and checkpoint what is held before the partitions go."""
        self._group_check_due = True
        try:
            if self.health.fatal is not None:
                return  # stopping without a checkpoint: the work is redone on restart
            if self.learner.fitted:
                self.process(force=True)
                self.checkpoint()  # durable before the partitions go
            else:
                self._forget(partitions)
        finally:
            self._let_go(partitions)

    def on_lost(self, partitions: list[TopicPart]) -> None:
        """Another member may own them already: drop their work not yet committed."""
        self._forget(partitions)
        self._let_go(partitions)

    def _let_go(self, partitions: list[TopicPart]) -> None:
        self.dims.let_go(partitions)
        self.lost.let_go(partitions)
        self.offsets.let_go(partitions)
        self.outbox.forget(partitions)

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
        (opened here if none is), which commits once it is ``delivery.transaction_ms`` old."""
        _, sink = self._parts()
        calibrated = self.lost.first_batch(self.learner.estimator, batch.X)
        if calibrated is not None:  # restored from the model topic: spreads from this batch
            self.learner = self._new_learner(calibrated)
        window = self._window
        dead, self._dead = self._dead, []
        first, after = self.offsets.take_pending()
        learner = self.learner
        if window is not None:
            window.open_for(learner)
        t0 = time.perf_counter()
        result = learner.step(batch.X) if len(batch) else None
        t1 = time.perf_counter()
        topic = self.settings.kafka.input_topic
        emit = self.offsets.emit_mask(topic, batch.partitions, batch.offsets)
        fresh = [d for d in dead if not self.offsets.replayed(d.topic, d.partition, d.offset)]
        try:
            if window is not None:
                window.add(first, after)
            n_out = sink.publish(batch, result, fresh, version=learner.version, emit=emit)
            sync = self._sync()
            if sync is not None:
                replica = learner.estimator
                self.outbox.batch(sync, replica, batch, result, first, after, window is not None)
            if window is None:
                self.offsets.batch_done(after)
            else:
                self._commit(force=False)
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

    def _commit(self, force: bool) -> None:
        """Exactly-once: commit the open transaction when it is due (or now, with ``force``)."""
        window = self._window
        if window is None or not window.open:
            return
        source, _ = self._parts()
        try:
            after = window.commit(
                self.offsets.transaction_offsets, source.group_metadata(), force=force
            )
        except TransactionAborted as abort:
            self._redo(abort)
            return
        if after is not None:
            self.offsets.batch_done(after)

    def _redo(self, abort: TransactionAborted) -> None:
        """The open transaction was aborted: undo its batches and read them again."""
        assert self._window is not None
        log.warning("transaction aborted (%s); rewinding and redoing its batches", abort)
        first = self._window.undo()
        self.outbox.aborted(first)
        # What was consumed after those batches is read again too: drop it, and seek each
        # partition to the first offset of either.
        pending_first, _ = self.offsets.take_pending()
        if len(self.batcher):
            self.batcher.take(max_rows=len(self.batcher))
        self._dead = []
        targets = dict(pending_first)
        for key, o in first.items():
            targets[key] = min(o, targets.get(key, o))
        source, _ = self._parts()
        source.seek(self.offsets.rewind_targets(targets))

    def _forget(self, gone: Iterable[TopicPart]) -> None:
        """Drop consumed-but-unprocessed input of partitions this instance no longer owns
        (rows of the partitions it keeps stay buffered: nothing is read again)."""
        gone = set(gone)
        topic = self.settings.kafka.input_topic
        self.batcher.drop(topic, [p for t, p in gone if t == topic])
        self._dead = [d for d in self._dead if (d.topic, d.partition) not in gone]
        self.offsets.forget(gone)

    def _read_again(self, again: Mapping[TopicPart, int]) -> None:
        """Read these partitions again from these offsets (deltas the sync log refused)."""
        if not again:
            return
        source, _ = self._parts()
        for key, to in again.items():
            self._forget([key])
            self.offsets.rewind_to(key, to)
        source.seek(dict(again))

    # -- checkpoints ---------------------------------------------------------------------

    def checkpoint(self, wait: bool = True) -> None:
        """Flush, copy model + offsets and write them durably; once durable, commit the offsets
        (at-least-once) and publish the model record.

        With ``wait`` (revoke, shutdown) this returns once the checkpoint is durable; else
        the write goes on in the background and :meth:`turn` finishes it when it is done.
        """
        cp = self.checkpointer
        if wait:  # one writer at a time: the write in flight first
            self._checkpoint_written(cp.wait())
        # Shared-model mode: folding other instances' deltas changes the model too.
        changed = cp.dirty or (self.shared and self.learner.version != self._checkpointed_version)
        if not self.learner.fitted or not changed or cp.busy:
            if not cp.busy:
                cp.reset()
            return
        self._commit(force=True)  # a checkpoint holds committed input only
        _, sink = self._parts()
        self.outbox.flush(self._sync())  # a committed input must be in the sync log
        sink.flush()
        learner = self.learner
        record = (learner.version, learner.public_state())
        cp.start(learner.estimator, self.offsets.positions, context=record)
        self._checkpointed_version = learner.version
        if wait:
            self._checkpoint_written(cp.wait())

    def _checkpoint_written(self, written: Written | None) -> None:
        """A checkpoint is durable: commit its offsets (at-least-once), publish its model."""
        if written is None:
            return
        self.offsets.checkpointed_now(written.offsets)
        source, sink = self._parts()
        if self.exactly_once:
            self._commit(force=True)  # the model record goes in a transaction of its own
        else:
            source.commit(self.offsets.group_offsets(written.offsets))
        sink.publish_model(*written.context)
        self.metrics.record_checkpoint(written.seconds)
        self.checkpointer.log_written(written, self.metrics.total_lag())

    def _let_write_finish(self) -> None:
        with contextlib.suppress(StreamkmError):
            self.checkpointer.wait()

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
        window = self._window
        if window is not None and window.open and sink.reports.failures:
            # A record of the open transaction failed: its commit fails too, so try it now;
            # the abort that follows redoes the batches (and forgets the failures).
            self._commit(force=True)
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

    def _sync(self) -> SyncLog | None:
        return None if self._clients is None else self._clients.sync

    def _absorbed(self) -> Mapping[TopicPart, int]:
        return getattr(self.learner.estimator, "absorbed", {})

    def _model_reader(self) -> Any:
        return None if self._clients is None else self._clients.model_reader

    def _restored(self, model: Any) -> None:
        """A model restored from the model topic replaces the new one."""
        self.learner = self._new_learner(model)
        self.decoder.dim = self.learner.dim
        self.metrics.record_model(model)

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
        if self.lost.held is not None:
            return False, self.lost.held
        if self.offsets.assigned and self.decoder.dim is None:
            return False, self.dims.reason()
        missing = self.topics.missing()
        if not self.offsets.assigned and missing is not None:
            return False, missing
        return self.health.ready(assigned=bool(self.offsets.assigned), fitted=self.learner.fitted)


__all__ = ["DIM_QUORUM", "EXIT_ERROR", "EXIT_OK", "App"]
