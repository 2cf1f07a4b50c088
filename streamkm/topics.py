"""The topics are the daemon's job: create the missing output topics, verify the existing ones.

On start (:func:`prepare_topics`) the assignments, dead-letter and model topics that do not
exist are created (``[topics]``: partitions, replication factor and per-topic configuration;
the model topic always compacted); a model topic that exists without ``cleanup.policy=compact``
is refused, since it is meant to keep the newest model per group. The input topic is never
created: when it is missing, the daemon waits for it and ``/readyz`` says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource

from streamkm.config import Settings
from streamkm.errors import ConfigError
from streamkm.kafka import admin_config, ensure_topics, to_error

log = logging.getLogger(__name__)

_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class TopicState:
    """What :func:`prepare_topics` found.

    Attributes
    ----------
    checked : bool
        The brokers answered (False: nothing could be verified yet).
    input_exists : bool
        The input topic exists.
    created : tuple of str
        Topics created now.
    """

    checked: bool
    input_exists: bool
    created: tuple[str, ...] = ()


def input_topic_exists(settings: Settings, timeout_s: float = _TIMEOUT_S) -> bool | None:
    """Whether the input topic exists; None when the brokers do not answer."""
    admin = _admin(admin_config(settings))
    topic = settings.kafka.input_topic
    try:
        # All topics, not this one by name: naming it would create it on brokers with
        # auto.create.topics.enable.
        md = admin.list_topics(timeout=timeout_s).topics.get(topic)
    except KafkaException:
        return None
    return md is not None and md.error is None and bool(md.partitions)


def prepare_topics(settings: Settings, timeout_s: float = _TIMEOUT_S) -> TopicState:
    """Create the missing output topics and verify the model topic.

    Raises
    ------
    ConfigError
        If the model topic exists and is not compacted.
    """
    k, t = settings.kafka, settings.topics
    conf = admin_config(settings)
    admin = _admin(conf)
    try:
        existing = admin.list_topics(timeout=timeout_s).topics
    except KafkaException as exc:
        log.warning("cannot list topics (%s); they are checked again once the brokers answer", exc)
        return TopicState(checked=False, input_exists=False)
    input_md = existing.get(k.input_topic)
    input_exists = input_md is not None and input_md.error is None and bool(input_md.partitions)
    partitions = t.partitions or (len(input_md.partitions) if input_exists and input_md else 1)
    wanted: dict[str, dict[str, str]] = {k.output_topic: dict(t.output)}
    if k.dead_letter_topic:
        wanted[k.dead_letter_topic] = dict(t.dead_letter)
    if k.model_topic:
        wanted[k.model_topic] = {**t.model, "cleanup.policy": "compact"}
    missing = {name: cfg for name, cfg in wanted.items() if name not in existing}
    created: tuple[str, ...] = ()
    if missing and t.create:
        ensure_topics(
            conf, missing, partitions=partitions, timeout_s=timeout_s,
            replication_factor=t.replication_factor,
        )  # fmt: skip
        created = tuple(sorted(missing))
        log.info("created topics %s (%d partitions)", ", ".join(created), partitions)
    elif missing:
        log.warning("topics %s do not exist (topics.create is off)", ", ".join(sorted(missing)))
    if k.model_topic and k.model_topic in existing:
        _refuse_uncompacted(admin, k.model_topic, timeout_s)
    if not input_exists:
        log.warning("input topic %s does not exist; waiting for it", k.input_topic)
    return TopicState(checked=True, input_exists=input_exists, created=created)


def _admin(conf: dict[str, Any]) -> AdminClient:
    try:
        return AdminClient(conf)
    except KafkaException as exc:
        raise to_error(exc, "creating the admin client") from None


def _refuse_uncompacted(admin: AdminClient, topic: str, timeout_s: float) -> None:
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    try:
        futures = admin.describe_configs([resource], request_timeout=timeout_s)
        entries = next(iter(futures.values())).result(timeout=timeout_s)
        policy = str(entries["cleanup.policy"].value)
    except (KafkaException, KeyError, StopIteration, TimeoutError) as exc:
        log.warning("cannot read cleanup.policy of the model topic %s (%s)", topic, exc)
        return
    if "compact" not in policy:
        raise ConfigError(
            f"kafka.model_topic {topic} has cleanup.policy={policy}: it must be compacted "
            f"(kafka-configs --alter --entity-type topics --entity-name {topic} --add-config "
            "cleanup.policy=compact), or point kafka.model_topic at another topic"
        )


class TopicWatch:
    """The topics as the running daemon sees them: prepared once connected, checked again
    while nothing is assigned (the brokers may answer only now; the input may appear).

    Parameters
    ----------
    settings : Settings
        The topics' names and settings.
    every_s : float, default 10
        Time between checks while nothing is assigned.
    clock : callable, default time.monotonic
        Injectable for tests.
    """

    def __init__(
        self, settings: Settings, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.every_s = every_s
        self.clock = clock
        self.state: TopicState | None = None  # None: not prepared (embedded use, tests)
        self._next = 0.0

    def prepare(self) -> None:
        """Create the missing output topics and verify the model topic (:func:`prepare_topics`)."""
        self.state = prepare_topics(self.settings)

    def check_if_due(self) -> None:
        """Verify the topics again once the brokers answer, and notice the input appearing."""
        now = self.clock()
        state = self.state
        if state is None or now < self._next:
            return
        self._next = now + self.every_s
        if not state.checked:
            self.state = prepare_topics(self.settings)
        elif not state.input_exists and input_topic_exists(self.settings):
            log.info("input topic %s exists now", self.settings.kafka.input_topic)
            self.state = TopicState(checked=True, input_exists=True, created=state.created)

    def missing(self) -> str | None:
        """Readiness: the input topic is known not to exist, else None."""
        state = self.state
        if state is None or not state.checked or state.input_exists:
            return None
        return f"input topic {self.settings.kafka.input_topic} does not exist; waiting for it"


__all__ = ["TopicState", "TopicWatch", "input_topic_exists", "prepare_topics"]
