"""Thin wrappers over confluent-kafka: client configuration and error mapping."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka import KafkaError as _CKafkaError
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from streamkm.config import Settings
from streamkm.errors import ConfigError, FencedError, KafkaClientError

log = logging.getLogger(__name__)

COOPERATIVE = "cooperative-sticky"

# A new partition of the input topic is seen within this (librdkafka's default is 5 minutes).
METADATA_REFRESH_MS = 10_000
# Room above ``input.max_message_bytes`` for the key and headers of a dead letter.
DEAD_LETTER_HEADER_ROOM = 64 * 1024
# The broker's default ``message.batch.max.bytes`` / topic ``max.message.bytes`` (1 MiB + 12),
# assumed for the dead-letter topic when its own setting cannot be read.
BROKER_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588


class _OncePerInterval(logging.Filter):
    """Let one record per (level, facility) through every ``interval_s``; count the rest.

    librdkafka repeats a connection failure every few milliseconds while a broker is down.
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self._interval = interval_s
        self._last: dict[tuple[int, str], float] = {}
        self._dropped: dict[tuple[int, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        # confluent-kafka logs ("%s [%s] %s", facility, client, text).
        facility = record.args[0] if isinstance(record.args, tuple) and record.args else record.msg
        key = (record.levelno, str(facility))
        now = time.monotonic()
        if now - self._last.get(key, -1e18) < self._interval:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return False
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped:
            record.msg = f"{record.msg} ({dropped} similar suppressed)"
        return True


# librdkafka's own log lines go through Python logging (and so the JSON format) too.
_LIBRDKAFKA_LOG = logging.getLogger("streamkm.librdkafka")
_LIBRDKAFKA_LOG.addFilter(_OncePerInterval())

# Error codes that mean another producer with our transactional id took over.
_FENCED_CODES = {
    _CKafkaError._FENCED,
    _CKafkaError.PRODUCER_FENCED,
    _CKafkaError.INVALID_PRODUCER_EPOCH,
    _CKafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
}


def to_error(exc: KafkaException | _CKafkaError, doing: str) -> KafkaClientError:
    """Map a confluent-kafka error to streamkm's, keeping the code (and fencing apart)."""
    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else exc
    if not isinstance(err, _CKafkaError):
        return KafkaClientError(f"{doing}: {exc}")
    message = f"{doing}: {err.str()} ({err.name()})"
    if err.code() in _FENCED_CODES:
        return FencedError(
            message + "; another instance uses the same transactional id", err.code(), True
        )
    return KafkaClientError(message, err.code(), err.fatal())


class RateLimitedLog:
    """Log at most one line per ``interval_s`` per key, saying how many were suppressed."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._log = logger
        self._interval = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e18) < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        skipped = self._suppressed.pop(key, 0)
        self._last[key] = now
        suffix = f" ({skipped} similar suppressed)" if skipped else ""
        self._log.warning(msg + suffix, *args)


def consumer_config(
    settings: Settings,
    error_cb: Callable[[Any], None],
    stats_cb: Callable[[str], object] | None,
) -> dict[str, Any]:
    """The consumer's librdkafka properties; the ``[kafka.client]`` table wins over defaults."""
    conf: dict[str, Any] = {
        "group.id": settings.kafka.group_id,
        # Static membership: a restarted instance takes its partitions back at once instead
        # of waiting for the session of its previous incarnation to time out.
        "group.instance.id": f"{settings.kafka.group_id}-{settings.delivery.instance_id}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        # Without a checkpoint or committed offset, start at the beginning: nothing is skipped.
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": COOPERATIVE,
        # librdkafka's default (1 s) caps a partition near 100k messages/s while catching up.
        "fetch.queue.backoff.ms": 10,
        "statistics.interval.ms": 5000,
        "topic.metadata.refresh.interval.ms": METADATA_REFRESH_MS,
        "error_cb": error_cb,
        "logger": _LIBRDKAFKA_LOG,
    }
    if settings.delivery.guarantee == "exactly-once":
        conf["isolation.level"] = "read_committed"
    if stats_cb is not None:
        conf["stats_cb"] = stats_cb
    conf.update(_client_props(settings, for_producer=False))
    return conf


def sync_consumer_config(settings: Settings, error_cb: Callable[[Any], None]) -> dict[str, Any]:
    """The sync-log reader's properties: ``assign()`` only (no group offsets), read_committed."""
    conf: dict[str, Any] = {
        # librdkafka wants a group id; this reader never joins the group nor commits.
        "group.id": f"{settings.kafka.group_id}-sync-reader",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "isolation.level": "read_committed",
        # An offset retention removed is an error to handle, never a silent jump to the end.
        "auto.offset.reset": "error",
        "fetch.wait.max.ms": 10,
        "error_cb": error_cb,
        "logger": _LIBRDKAFKA_LOG,
    }
    conf.update(_client_props(settings, for_producer=False))
    return conf


# What the sync topic must be: one partition (one order for every replica), and its records
# kept (deltas are not last-writer-wins: compaction alone would drop most of them).
SYNC_TOPIC_CONFIG = {"cleanup.policy": "delete", "retention.ms": "-1"}


def check_sync_topic(settings: Settings, topic: str, timeout_s: float = 10.0) -> None:
    """Create the sync topic if it is missing; refuse one that cannot carry a shared model.

    Raises
    ------
    ConfigError
        When the topic has more than one partition or ``cleanup.policy=compact`` alone.
    """
    conf = admin_config(settings)
    ensure_topics(conf, {topic: dict(SYNC_TOPIC_CONFIG)}, partitions=1, timeout_s=timeout_s)
    admin = AdminClient(conf)
    try:
        md = admin.list_topics(topic=topic, timeout=timeout_s).topics.get(topic)
    except KafkaException as exc:
        raise to_error(exc, f"describing the sync topic {topic}") from None
    if md is not None and md.partitions and len(md.partitions) != 1:
        raise ConfigError(
            f"kafka.sync_topic {topic} has {len(md.partitions)} partitions; it needs exactly 1 "
            "(every replica must read the deltas in one order)"
        )
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    try:
        futures = admin.describe_configs([resource], request_timeout=timeout_s)
        entries = next(iter(futures.values())).result(timeout=timeout_s)
        policy = str(entries["cleanup.policy"].value)
    except (KafkaException, KeyError, StopIteration, TimeoutError) as exc:
        log.warning("cannot read cleanup.policy of the sync topic %s (%s)", topic, exc)
        return
    if "delete" not in policy:
        raise ConfigError(
            f"kafka.sync_topic {topic} has cleanup.policy={policy}: deltas are not "
            "last-writer-wins, so compaction would drop them; use cleanup.policy=delete "
            "(with retention.ms=-1, or long enough for a restarted instance to replay)"
        )


def producer_config(
    settings: Settings,
    error_cb: Callable[[Any], None],
    on_delivery: Callable[[Any, Any], None],
) -> dict[str, Any]:
    """The producer's librdkafka properties (idempotent; transactional in exactly-once mode)."""
    conf: dict[str, Any] = {
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        # Any input the consumer accepts fits in its dead letter (see producer_max_bytes).
        "message.max.bytes": producer_max_bytes(settings),
        "topic.metadata.refresh.interval.ms": METADATA_REFRESH_MS,
        # Only failures reach Python: one callback per failed record, none per success.
        "delivery.report.only.error": True,
        "on_delivery": on_delivery,
        "error_cb": error_cb,
        "logger": _LIBRDKAFKA_LOG,
    }
    if settings.delivery.guarantee == "exactly-once":
        conf["transactional.id"] = settings.transactional_id
        conf["transaction.timeout.ms"] = 60_000
    conf.update(_client_props(settings, for_producer=True))
    return conf


def producer_max_bytes(settings: Settings) -> int:
    """The producer's ``message.max.bytes``: an input of ``input.max_message_bytes`` plus room
    for its dead letter's key and headers, and never below librdkafka's default (1,000,000)."""
    return max(1_000_000, settings.input.max_message_bytes + DEAD_LETTER_HEADER_ROOM)


def topic_max_message_bytes(settings: Settings, topic: str, timeout_s: float = 10.0) -> int:
    """The topic's ``max.message.bytes``: the largest record batch the broker accepts for it.

    Falls back to the broker's default (1,048,588) with a warning when it cannot be read (an
    ACL without DescribeConfigs, a topic not created yet).
    """
    admin = AdminClient(admin_config(settings))
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    try:
        futures = admin.describe_configs([resource], request_timeout=timeout_s)
        entries = next(iter(futures.values())).result(timeout=timeout_s)
        return int(entries["max.message.bytes"].value)
    except (KafkaException, KeyError, ValueError, TypeError, StopIteration, TimeoutError) as exc:
        log.warning(
            "cannot read max.message.bytes of topic %s (%s); assuming the broker default %d",
            topic, exc, BROKER_DEFAULT_MAX_MESSAGE_BYTES,
        )  # fmt: skip
        return BROKER_DEFAULT_MAX_MESSAGE_BYTES


def group_member_count(settings: Settings, group: str, timeout_s: float = 10.0) -> int | None:
    """How many members the consumer group has now, or None if it cannot be told."""
    admin = AdminClient(admin_config(settings))
    try:
        futures = admin.describe_consumer_groups([group], request_timeout=timeout_s)
        description = futures[group].result(timeout=timeout_s)
        return len(description.members)
    except (KafkaException, KeyError, TypeError, TimeoutError) as exc:
        log.debug("cannot describe group %s: %s", group, exc)
        return None


def admin_config(settings: Settings) -> dict[str, Any]:
    """An AdminClient's properties: the connection ones, without consumer or producer ones."""
    skip = (*_CONSUMER_ONLY, *_PRODUCER_ONLY)
    conf = {k: v for k, v in settings.librdkafka().items() if not k.startswith(skip)}
    return {**conf, "logger": _LIBRDKAFKA_LOG}


_CONSUMER_ONLY = (
    "group.", "enable.auto.", "auto.", "partition.assignment", "isolation.", "session.",
    "heartbeat.", "max.poll", "fetch.", "queued.", "check.crcs", "group.instance.id",
)  # fmt: skip
_PRODUCER_ONLY = (
    "acks", "linger.", "batch.", "compression.", "enable.idempotence", "transaction",
    "message.timeout", "delivery.", "queue.buffering", "retries", "request.required.acks",
)  # fmt: skip


def _client_props(settings: Settings, for_producer: bool) -> dict[str, Any]:
    """Connection properties, without those librdkafka would refuse on the other client kind."""
    skip = _CONSUMER_ONLY if for_producer else _PRODUCER_ONLY
    return {k: v for k, v in settings.librdkafka().items() if not k.startswith(skip)}


def make_consumer(conf: dict[str, Any]) -> Consumer:
    """A consumer from :func:`consumer_config`'s properties, errors mapped to streamkm's."""
    try:
        return Consumer(conf)
    except KafkaException as exc:
        raise to_error(exc, "creating the consumer") from None


def make_producer(
    settings: Settings, error_cb: Callable[[Any], None], on_delivery: Callable[[Any, Any], None]
) -> Producer:
    try:
        return Producer(producer_config(settings, error_cb, on_delivery))
    except KafkaException as exc:
        raise to_error(exc, "creating the producer") from None


def is_cooperative(conf: dict[str, Any]) -> bool:
    return COOPERATIVE in str(conf.get("partition.assignment.strategy", ""))


def ensure_topics(
    conf: dict[str, Any],
    topics: dict[str, dict[str, str]],
    partitions: int = 1,
    timeout_s: float = 30.0,
    replication_factor: int = -1,
) -> None:
    """Create the topics that do not exist yet (``{name: topic_config}``)."""
    admin_conf: dict[str, Any] = {**conf, "logger": _LIBRDKAFKA_LOG}
    admin = AdminClient(admin_conf)
    try:
        existing = set(admin.list_topics(timeout=timeout_s).topics)
    except KafkaException as exc:
        raise to_error(exc, "listing topics") from None
    wanted = [
        NewTopic(name, num_partitions=partitions, replication_factor=replication_factor, config=cfg)
        for name, cfg in topics.items()
        if name not in existing
    ]
    if not wanted:
        return
    for name, future in admin.create_topics(wanted, request_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            if exc.args[0].code() != _CKafkaError.TOPIC_ALREADY_EXISTS:
                raise to_error(exc, f"creating topic {name}") from None
