"""Opening the daemon's Kafka clients: the consumer as a :class:`Source`, the producer as a
:class:`Sink` (with its :class:`Transactions` in exactly-once mode).

:func:`kafka_clients` is the one place that knows librdkafka's properties, the dead-letter size
limit and the transactional start-up; the conductor (:class:`~streamkm.app.App`) takes any
callable with its signature, so tests hand it clients over stand-ins without a broker.

Examples
--------
>>> with kafka_clients(settings, decoder, health, metrics, stopping) as clients:  # doctest: +SKIP
...     clients.source.subscribe(listener)
...     bulk = clients.source.consume(1024, 0.1)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from streamkm.codec import VectorDecoder
from streamkm.config import Settings
from streamkm.health import Health
from streamkm.kafka import (
    check_sync_topic,
    consumer_config,
    group_member_count,
    is_cooperative,
    make_consumer,
    make_producer,
    producer_max_bytes,
    sync_consumer_config,
    topic_max_message_bytes,
)
from streamkm.metrics import Metrics
from streamkm.restore import read_newest_model
from streamkm.shared.sync import SyncLog
from streamkm.sink import DeliveryReports, Sink, Transactions
from streamkm.source import Source


@dataclass
class Clients:
    """The open clients of one run.

    Attributes
    ----------
    source : Source
        The input side (subscribed by the conductor).
    sink : Sink
        The output side.
    transactions : Transactions or None
        The producer's transactional calls, in exactly-once mode.
    sync : SyncLog or None
        Shared-model mode (``kafka.sync_topic``): the sync log's reader and writer.
    model_reader : callable or None
        With ``kafka.model_topic``: reads the value of the group's newest model record there
        (None when there is none); see :func:`streamkm.restore.read_newest_model`.
    """

    source: Source
    sink: Sink
    transactions: Transactions | None
    sync: SyncLog | None = None
    model_reader: Callable[[], bytes | None] | None = None


class ClientFactory(Protocol):
    """What opens the clients: :func:`kafka_clients`, or a stand-in in tests."""

    def __call__(
        self,
        settings: Settings,
        decoder: VectorDecoder,
        health: Health,
        metrics: Metrics,
        stopping: Callable[[], bool],
    ) -> AbstractContextManager[Clients]: ...


@contextlib.contextmanager
def kafka_clients(
    settings: Settings,
    decoder: VectorDecoder,
    health: Health,
    metrics: Metrics,
    stopping: Callable[[], bool],
) -> Iterator[Clients]:
    """Open the consumer and the producer; on exit leave the group, then flush the producer.

    Parameters
    ----------
    settings : Settings
        All settings.
    decoder : VectorDecoder
        Turns input values into vectors.
    health : Health
        Receives the clients' errors (``error_cb``).
    metrics : Metrics
        Lag from the consumer's statistics; failed deliveries.
    stopping : callable returning bool
        Retries of start-up and transactional calls end once this is true.
    """
    kafka = settings.kafka
    exactly_once = settings.delivery.guarantee == "exactly-once"
    reports = DeliveryReports(exactly_once, on_failure=metrics.produce_errors.inc)
    # Lag comes from the consumer's position (App), not from librdkafka's statistics.
    consumer_conf = consumer_config(settings, health.on_client_error, None)
    dead_letter_max = producer_max_bytes(settings)
    if kafka.dead_letter_topic is not None:
        dead_letter_max = min(
            dead_letter_max, topic_max_message_bytes(settings, kafka.dead_letter_topic)
        )
    source = Source(
        make_consumer(consumer_conf),
        kafka.input_topic,
        decoder,
        cooperative=is_cooperative(consumer_conf),
        # Exactly-once replays up to them, shared-model mode starts there, and a lost
        # checkpoint volume is told from them.
        read_committed_offsets=True,
        members=lambda: group_member_count(settings, kafka.group_id),
    )
    with contextlib.ExitStack() as stack:
        stack.callback(source.close, quiet=True)  # until the source is entered below
        producer = make_producer(settings, health.on_client_error, reports.on_delivery)
        transactions = None
        if exactly_once:
            transactions = Transactions(producer, reports, stopping)
        sink = stack.enter_context(
            Sink(
                producer,
                reports,
                kafka.output_topic,
                dead_letter_topic=kafka.dead_letter_topic,
                model_topic=kafka.model_topic,
                model_key=kafka.group_id.encode(),
                dead_letter_max_bytes=dead_letter_max,
                transactions=transactions,
                waiting=health.raise_if_fatal,
            )
        )
        if transactions is not None:
            transactions.init(on_retry=health.note_kafka_error)
        sync = None
        if kafka.sync_topic is not None:
            check_sync_topic(settings, kafka.sync_topic)
            sync = stack.enter_context(
                SyncLog(
                    make_consumer(sync_consumer_config(settings, health.on_client_error)),
                    producer,
                    kafka.sync_topic,
                    settings.delivery.instance_id,
                    transactions=transactions,
                    metrics=metrics,
                )
            )
        # Entered last, closed first: the group is left before the producer's last flush.
        stack.enter_context(source)
        model_reader = None
        if kafka.model_topic is not None:
            model_reader = functools.partial(read_newest_model, settings)
        yield Clients(source, sink, transactions, sync, model_reader)


__all__ = ["ClientFactory", "Clients", "kafka_clients"]
