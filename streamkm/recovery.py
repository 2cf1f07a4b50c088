"""A lost checkpoint volume: the ``checkpoint.when_lost`` policy, and holding the input.

When partitions are assigned that the group has committed offsets for but this instance has
no checkpoint of, the volume was lost or replaced. :class:`LostVolume` says so loudly and does
what ``checkpoint.when_lost`` says before the model sees any input:

* ``"stop"`` raises :class:`~streamkm.errors.CheckpointError`;
* ``"new-model"`` goes on with a new model from the group's offsets;
* ``"restore-from-model-topic"`` replaces the new model by the newest one published on
  ``kafka.model_topic`` (:mod:`streamkm.restore`). If that is refused, the input is *held*:
  the partitions are paused, readiness says why, and the restore is retried every
  :data:`RESTORE_RETRY_S` seconds; once a model is restored each partition is read from where
  it was to start.

A model restored from the topic has no cluster spreads; :meth:`LostVolume.first_batch`
re-estimates them from the first batch.

Examples
--------
>>> lost = LostVolume(settings, reset_model=False, reader=lambda: None,
...                   on_restored=install)                              # doctest: +SKIP
>>> lost.on_assigned(partitions, committed, starts, known, fitted=False)  # doctest: +SKIP
>>> lost.held                                     # the reason, or None  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from streamkm.config import Settings
from streamkm.errors import CheckpointError, RestoreError, StreamkmError
from streamkm.restore import NOT_RESTORED, calibrated, model_from_record, pause, resume

log = logging.getLogger(__name__)

TopicPart = tuple[str, int]
# checkpoint.when_lost = "restore-from-model-topic", refused: read the model topic again after.
RESTORE_RETRY_S = 30.0
_POLL_S = 0.5


class LostVolume:
    """The ``checkpoint.when_lost`` policy and the held input of a refused restore.

    Parameters
    ----------
    settings : Settings
        ``checkpoint.when_lost``, ``checkpoint.dir``, ``kafka.model_topic`` and the model's shape.
    reset_model : bool
        ``--reset-model``: a new model is wanted, whatever the group's offsets.
    reader : callable
        Returns the callable that reads the newest model record's value (None while the
        clients are closed or without ``kafka.model_topic``).
    on_restored : callable
        Called with a model restored from the topic, to put it in the daemon's hands.
    retry_s : float, default RESTORE_RETRY_S
        Time between restore attempts while the input is held.
    clock : callable, default time.monotonic
        Injectable for tests.

    Attributes
    ----------
    held : str or None
        While no model could be restored: why (readiness shows it); else None.
    """

    def __init__(
        self,
        settings: Settings,
        reset_model: bool,
        reader: Callable[[], Callable[[], bytes | None] | None],
        on_restored: Callable[[Any], object],
        retry_s: float = RESTORE_RETRY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.reset_model = reset_model
        self.reader = reader
        self.on_restored = on_restored
        self.retry_s = retry_s
        self.clock = clock
        self.held: str | None = None
        self.starts: dict[TopicPart, int] = {}  # where each held partition starts, once restored
        self._next_restore = 0.0
        self._calibrate = False  # a model restored from the topic: spreads from its 1st batch

    def on_assigned(
        self,
        partitions: list[TopicPart],
        committed: Mapping[TopicPart, int],
        starts: Mapping[TopicPart, int],
        known: Iterable[TopicPart],
        fitted: bool,
    ) -> None:
        """The group has moved on but this instance has no checkpoint of it: say so loudly,
        and do what ``checkpoint.when_lost`` says before the model sees any input.

        ``known``: the partitions the checkpoint or the lineage origins know; ``fitted``:
        whether a model exists already.

        Raises
        ------
        CheckpointError
            ``checkpoint.when_lost = "stop"``.
        """
        if self.held is not None:  # still waiting for a model: these wait with the others
            self._hold_from(partitions, committed, starts)
            return
        known = set(known)
        orphans = sorted(k for k in partitions if k in committed and k not in known)
        if not orphans:
            return
        s = self.settings
        where = ", ".join(f"{t}[{p}]@{committed[(t, p)]}" for t, p in orphans)
        if fitted:
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
            self._restore(where)
            if self.held is not None:
                self._hold_from(partitions, committed, starts)
            return
        log.error(
            '%s. checkpoint.when_lost = "new-model": starting a NEW model from those offsets; '
            "inputs before them are not learnt. %s", lost, choices,
        )  # fmt: skip

    def hold_turn(self, source: Any, assigned: Iterable[TopicPart]) -> None:
        """While held: keep the partitions paused (and the group membership alive), and retry
        the restore when it is due; once restored, resume and seek each partition to its start.
        """
        owned = sorted(assigned)
        pause(source, owned)
        for m in source.consume_messages(1, _POLL_S):  # keeps the group membership
            self.starts.setdefault((m.topic(), m.partition()), m.offset())
        if self.clock() >= self._next_restore:
            self._restore()
        if self.held is None:
            resume(source, owned)
            source.seek({k: o for k, o in self.starts.items() if k in owned})
            self.starts = {}

    def note_consumed(self, first: Mapping[TopicPart, int]) -> None:
        """Input consumed while the hold began: it is read again from these offsets."""
        for key, o in first.items():
            self.starts.setdefault(key, o)

    def let_go(self, partitions: Iterable[TopicPart]) -> None:
        """These partitions are no longer this instance's."""
        for key in partitions:
            self.starts.pop(key, None)

    def first_batch(self, model: Any, X: np.ndarray) -> Any:
        """``model`` with cluster spreads from its first batch ``X`` (n, d) when it was just
        restored from the topic (once); else None."""
        if not self._calibrate or not len(X):
            return None
        self._calibrate = False
        return calibrated(model, X)

    def _hold_from(
        self,
        partitions: list[TopicPart],
        committed: Mapping[TopicPart, int],
        starts: Mapping[TopicPart, int],
    ) -> None:
        for key in partitions:
            start = starts.get(key, committed.get(key))
            if start is not None:
                self.starts[key] = start

    def _restore(self, where: str = "") -> None:
        """Replace the new model by the newest one of the model topic; else hold the input."""
        s = self.settings
        topic = s.kafka.model_topic
        reader = self.reader()
        self._next_restore = self.clock() + self.retry_s
        try:
            if reader is None:
                raise RestoreError("kafka.model_topic is not set")
            model, rec = model_from_record(reader(), s)
        except StreamkmError as exc:
            self.held = (
                f"checkpoint volume lost and no model restored from the model topic {topic}: "
                f"{exc}; input held, retried every {self.retry_s:.0f} s (or set "
                'checkpoint.when_lost = "new-model" or "stop")'
            )
            log.error("%s", self.held)
            return
        self.on_restored(model)
        self._calibrate = True
        log.warning(
            "restored model version %d (%d samples, %d clusters, dimension %d) from the model "
            "topic %s; it goes on from the group's committed offsets%s. Not restored: %s",
            rec["model_version"], rec["n_samples_seen"], rec["n_clusters"], rec["dim"], topic,
            f" ({where})" if where else "", NOT_RESTORED,
        )  # fmt: skip
        self.held = None


__all__ = ["RESTORE_RETRY_S", "LostVolume"]
