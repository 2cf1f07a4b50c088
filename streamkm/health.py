"""What ``/healthz`` and ``/readyz`` answer, and the Kafka clients' error callback.

Examples
--------
>>> now = [0.0]
>>> h = Health(stuck_after_s=60, clock=lambda: now[0])
>>> h.live(), h.ready(assigned=False, fitted=False)
((True, 'ok'), (False, 'no partitions assigned'))
>>> now[0] = 61.0
>>> h.live()
(False, 'loop has not turned for 61s')
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaException

from streamkm.errors import StreamkmError
from streamkm.kafka import RateLimitedLog, to_error

log = logging.getLogger(__name__)


def _nothing() -> None:
    return None


class Health:
    """Liveness and readiness of the daemon, and the first fatal error.

    Parameters
    ----------
    stuck_after_s : float
        The loop counts as stuck when it has not turned (:meth:`beat`) for this long.
    on_fatal : callable, optional
        Called once when a fatal error is recorded (e.g. to ask the loop to stop).
    clock : callable, default time.monotonic
        Injectable for tests.
    """

    def __init__(
        self,
        stuck_after_s: float,
        on_fatal: Callable[[], object] = _nothing,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stuck_after_s = stuck_after_s
        self.on_fatal = on_fatal
        self._clock = clock
        self.heartbeat = clock()
        self.fatal: StreamkmError | None = None
        self.last_kafka_error: str | None = None  # shown by /readyz while unassigned
        self._rate_log = RateLimitedLog(log)

    def beat(self) -> None:
        """The loop turned."""
        self.heartbeat = self._clock()

    def fail(self, exc: StreamkmError) -> None:
        """Record a fatal error (the first one wins)."""
        if self.fatal is None:
            self.fatal = exc
            self.on_fatal()

    def raise_if_fatal(self) -> None:
        """Raise the recorded fatal error, if any."""
        if self.fatal is not None:
            raise self.fatal

    def on_client_error(self, err: Any) -> None:
        """The ``error_cb`` of the Kafka clients: fatal errors stop, the rest are logged."""
        if err.fatal():
            self.fail(to_error(KafkaException(err), "Kafka client"))
        else:
            self.note_kafka_error(err.str())
            self._rate_log.warning(f"kafka-{err.code()}", "Kafka: %s", err.str())

    def note_kafka_error(self, text: str) -> None:
        """Remember the last non-fatal Kafka error (readiness shows it while unassigned)."""
        self.last_kafka_error = text

    def clear_kafka_error(self) -> None:
        """Partitions were assigned: the last Kafka error is history."""
        self.last_kafka_error = None

    def live(self) -> tuple[bool, str]:
        """``/healthz``: no fatal error, and the loop turns."""
        if self.fatal is not None:
            return False, f"fatal error: {self.fatal}"
        idle = self._clock() - self.heartbeat
        if idle > self.stuck_after_s:
            return False, f"loop has not turned for {idle:.0f}s"
        return True, "ok"

    def ready(self, assigned: bool, fitted: bool) -> tuple[bool, str]:
        """``/readyz``: partitions assigned and a model to label with."""
        if not assigned:
            if self.last_kafka_error:
                return False, f"no partitions assigned; last Kafka error: {self.last_kafka_error}"
            return False, "no partitions assigned"
        if not fitted:
            return False, "model not initialised yet"
        return True, "ok"


__all__ = ["Health"]
