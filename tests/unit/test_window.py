"""Exactly-once: the open transaction across batches (streamkm.window)."""

from __future__ import annotations

from typing import Any

import pytest

from streamkm.sink import TransactionAborted
from streamkm.window import TransactionWindow

pytestmark = pytest.mark.unit


class FakeTransactions:
    def __init__(self, abort: bool = False) -> None:
        self.calls: list[Any] = []
        self.abort = abort

    def begin(self) -> None:
        self.calls.append("begin")

    def commit(self, offsets: Any = None, group_metadata: Any = None) -> None:
        if self.abort:
            raise TransactionAborted("injected")
        self.calls.append(("commit", dict(offsets)))


class Counter:
    """A learner whose state is one number."""

    def __init__(self) -> None:
        self.value = 0
        self.snapshots = 0

    def snapshot(self) -> int:
        self.snapshots += 1
        return self.value

    def restore(self, snapshot: int) -> None:
        self.value = snapshot


def test_batches_share_one_transaction_until_it_is_old_enough() -> None:
    now = [0.0]
    txn = FakeTransactions()
    window = TransactionWindow(txn, window_s=0.1, clock=lambda: now[0])
    learner = Counter()
    assert not window.open and window.commit(dict, None) is None
    for i in range(3):
        window.open_for(learner)
        learner.value += 1
        window.add({("in", 0): 10 * i}, {("in", 0): 10 * i + 10})
        now[0] += 0.04
        if i < 2:
            assert window.commit(dict, None) is None  # not due yet
    assert txn.calls == ["begin"] and learner.snapshots == 1  # one transaction, one undo point
    after = window.commit(lambda a: {k: o + 1000 for k, o in a.items()}, None)
    assert after == {("in", 0): 30}
    assert txn.calls == ["begin", ("commit", {("in", 0): 1030})]
    assert not window.open


def test_force_commits_now_and_an_abort_undoes_every_batch_of_the_transaction() -> None:
    now = [0.0]
    txn = FakeTransactions(abort=True)
    window = TransactionWindow(txn, window_s=10.0, clock=lambda: now[0])
    learner = Counter()
    learner.value = 7
    for i in range(2):
        window.open_for(learner)
        learner.value += 5
        window.add({("in", 0): 4 * i, ("in", 1): 100 + i}, {("in", 0): 4 * i + 4})
    with pytest.raises(TransactionAborted):
        window.commit(dict, None, force=True)
    assert window.open  # still open until undone
    assert window.undo() == {("in", 0): 0, ("in", 1): 100}  # where its batches begin
    assert learner.value == 7 and not window.open
    txn.abort = False
    window.open_for(learner)  # the redo opens a new transaction with a new undo point
    window.add({("in", 0): 0}, {("in", 0): 8})
    assert window.commit(dict, None, force=True) == {("in", 0): 8}
