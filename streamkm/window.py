"""Exactly-once: the open transaction, which may span several batches.

A transaction opens with the first batch after the previous commit and commits (its outputs
together with its input offsets) once it is ``delivery.transaction_ms`` old: fewer commits,
each for more records. Before its first batch the model is snapshotted; an abort puts the
model back as it was there, and the conductor reads every batch of the transaction again from
the first offsets :class:`TransactionWindow` noted.

Examples
--------
>>> window = TransactionWindow(transactions, window_s=0.1)            # doctest: +SKIP
>>> window.open_for(learner)                 # before a batch's model step  # doctest: +SKIP
>>> window.add(first, after)                 # begins the transaction once  # doctest: +SKIP
>>> window.commit(offsets.transaction_offsets, metadata)  # if due  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

TopicPart = tuple[str, int]


class TransactionWindow:
    """The batches of the open transaction, its undo point and when it commits.

    Parameters
    ----------
    transactions : Transactions
        The producer's transactional calls (:class:`~streamkm.sink.Transactions`).
    window_s : float
        A transaction commits once it is this old (``delivery.transaction_ms``).
    clock : callable, default time.monotonic
        Injectable for tests.
    """

    def __init__(
        self, transactions: Any, window_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.transactions = transactions
        self.window_s = window_s
        self.clock = clock
        self._learner: Any = None
        self._snapshot: Any = None
        self._started = 0.0
        self._begun = False
        self.first: dict[TopicPart, int] = {}  # where to read its batches again
        self.after: dict[TopicPart, int] = {}  # the input offsets it commits

    @property
    def open(self) -> bool:
        """Whether a transaction holds batches not committed yet."""
        return self._learner is not None

    def open_for(self, learner: Any) -> None:
        """Before a batch's model step: with no transaction open, open one whose undo point is
        the model as it is now."""
        if self._learner is None:
            self._learner = learner
            self._snapshot = learner.snapshot()
            self._started = self.clock()

    def add(self, first: Mapping[TopicPart, int], after: Mapping[TopicPart, int]) -> None:
        """A batch's input offsets join the transaction (begun on its first batch)."""
        for key, o in first.items():
            self.first.setdefault(key, o)
        self.after.update(after)
        if not self._begun:
            self.transactions.begin()
            self._begun = True

    def due(self) -> bool:
        """Whether the open transaction is old enough to commit."""
        return self.open and self.clock() - self._started >= self.window_s

    def commit(
        self,
        offsets_for: Callable[[Mapping[TopicPart, int]], Mapping[TopicPart, int]],
        group_metadata: Any,
        force: bool = False,
    ) -> dict[TopicPart, int] | None:
        """Commit the open transaction when it is due (or now, with ``force``).

        ``offsets_for`` turns the positions after its batches into the offsets to commit.

        Returns
        -------
        dict of (topic, partition) to int or None
            The positions after the committed batches; None when nothing was committed.

        Raises
        ------
        TransactionAborted
            The commit was aborted; :meth:`undo` puts the model back.
        """
        if not self.open or not (force or self.due()):
            return None
        if self._begun:
            self.transactions.commit(offsets_for(self.after), group_metadata)
        after = self.after
        self._close()
        return after

    def undo(self) -> dict[TopicPart, int]:
        """The transaction was aborted: put the model back as it was before its first batch.

        Returns
        -------
        dict of (topic, partition) to int
            The first offset of its batches in every partition: where to read them again.
        """
        learner, first = self._learner, self.first
        if learner is not None:
            learner.restore(self._snapshot)
        self._close()
        return first

    def _close(self) -> None:
        self._learner, self._snapshot, self._begun = None, None, False
        self.first, self.after = {}, {}


__all__ = ["TransactionWindow"]
