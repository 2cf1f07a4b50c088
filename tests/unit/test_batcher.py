"""Tests of streamkm.batcher: fixed-size batches, timed flushes, FIFO order."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamkm.batcher import Batcher

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def rows(start: int, n: int, dim: int = 2) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float64)[:, None].repeat(dim, axis=1)


def add_range(b: Batcher, start: int, n: int, topic: str = "t", partition: int = 0) -> None:
    offsets = list(range(start, start + n))
    b.add(
        rows(start, n),
        topic,
        partition,
        offsets,
        keys=[f"k{o}".encode() for o in offsets],
        timestamps=[1000 + o for o in offsets],
    )


def test_full_batch_is_exactly_batch_size_and_carries_sources() -> None:
    b = Batcher(batch_size=4, max_wait_s=1.0, clock=FakeClock())
    add_range(b, 0, 3)
    assert not b.ready()
    add_range(b, 3, 3, topic="u", partition=7)
    assert b.ready() and len(b) == 6
    batch = b.take()
    assert batch.len == 4 == len(batch)
    assert batch.X[:, 0].tolist() == [0, 1, 2, 3]
    assert batch.offsets.tolist() == [0, 1, 2, 3]
    assert batch.topics.tolist() == ["t", "t", "t", "u"]
    assert batch.partitions.tolist() == [0, 0, 0, 7]
    assert batch.keys.tolist() == [b"k0", b"k1", b"k2", b"k3"]
    assert batch.timestamps.tolist() == [1000, 1001, 1002, 1003]
    assert len(b) == 2 and not b.ready()


def test_timed_flush_after_max_wait_of_oldest_row() -> None:
    clock = FakeClock()
    b = Batcher(batch_size=10, max_wait_s=0.5, clock=clock)
    assert b.time_until_due() is None and not b.ready()
    add_range(b, 0, 2)
    assert b.time_until_due() == pytest.approx(0.5)
    clock.now += 0.3
    add_range(b, 2, 1)  # a newer row must not restart the wait
    assert not b.ready()
    assert b.time_until_due() == pytest.approx(0.2)
    clock.now += 0.2
    assert b.ready() and b.time_until_due() == 0.0
    batch = b.take()
    assert batch.offsets.tolist() == [0, 1, 2]
    assert len(b) == 0 and not b.ready()


def test_full_batch_is_due_immediately() -> None:
    b = Batcher(batch_size=2, max_wait_s=60, clock=FakeClock())
    add_range(b, 0, 2)
    assert b.time_until_due() == 0.0


def test_take_respects_max_rows_and_empty() -> None:
    b = Batcher(batch_size=4, max_wait_s=1, clock=FakeClock())
    empty = b.take()
    assert empty.len == 0
    add_range(b, 0, 10)
    assert b.take(max_rows=3).offsets.tolist() == [0, 1, 2]
    assert b.take(max_rows=100).offsets.tolist() == list(range(3, 10))


def test_taken_batch_survives_later_adds() -> None:
    b = Batcher(batch_size=2, max_wait_s=1, clock=FakeClock())
    add_range(b, 0, 2)
    batch = b.take()
    add_range(b, 100, 5)  # reuses the buffer space
    assert batch.X[:, 0].tolist() == [0, 1]
    assert batch.offsets.tolist() == [0, 1]


def test_bulk_larger_than_capacity_grows_and_keeps_order() -> None:
    b = Batcher(batch_size=3, max_wait_s=1, clock=FakeClock())
    add_range(b, 0, 2)
    b.take(max_rows=1)
    add_range(b, 2, 50)
    got = []
    while len(b):
        got += b.take().offsets.tolist()
    assert got == list(range(1, 52))


def test_scalar_and_missing_keys_timestamps() -> None:
    b = Batcher(batch_size=2, max_wait_s=1, clock=FakeClock())
    b.add(rows(0, 2), ["a", "b"], [1, 2], [5, 6])
    batch = b.take()
    assert batch.keys.tolist() == [None, None]
    assert batch.timestamps.tolist() == [-1, -1]


def test_equal_length_keys_stay_bytes() -> None:
    b = Batcher(batch_size=2, max_wait_s=1, clock=FakeClock())
    b.add(rows(0, 2), "t", 0, [0, 1], keys=[b"ab", b"cd"])
    assert b.take().keys.tolist() == [b"ab", b"cd"]


def test_keys_of_every_form_are_copied_as_given() -> None:
    b = Batcher(batch_size=8, max_wait_s=1, clock=FakeClock())
    b.add(rows(0, 2), "t", 0, [0, 1], keys=[None, None])
    b.add(rows(2, 3), "t", 0, [2, 3, 4], keys=[b"ab", None, b"cd"])
    b.add(rows(5, 2), "t", 0, [5, 6], keys=(b"ef", b"gh"))
    held = np.empty(2, dtype=object)
    held[:] = [b"ij", None]
    b.add(rows(7, 2), "t", 0, [7, 8], keys=held)
    keys = b.take(max_rows=9).keys
    assert keys.shape == (9,)
    assert keys.tolist() == [None, None, b"ab", None, b"cd", b"ef", b"gh", b"ij", None]
    held[0] = b"changed"  # the batcher holds its own copy
    assert keys[7] == b"ij"


def test_dimension_and_length_mismatches_are_refused() -> None:
    b = Batcher(batch_size=2, max_wait_s=1, clock=FakeClock())
    add_range(b, 0, 1)
    with pytest.raises(ValueError, match="features"):
        b.add(np.zeros((1, 3)), "t", 0, [9])
    with pytest.raises(ValueError, match="offsets"):
        b.add(np.zeros((2, 2)), "t", 0, [9])
    with pytest.raises(ValueError, match="keys"):
        b.add(np.zeros((1, 2)), "t", 0, [9], keys=[b"a", b"b"])
    assert len(b) == 1


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        Batcher(batch_size=0, max_wait_s=1)
    with pytest.raises(ValueError):
        Batcher(batch_size=1, max_wait_s=-1)


@given(st.integers(1, 8), st.lists(st.integers(0, 20), max_size=30))
def test_fifo_and_exact_sizes_for_any_bulk_sequence(batch_size: int, bulks: list[int]) -> None:
    b = Batcher(batch_size=batch_size, max_wait_s=10, clock=FakeClock())
    taken: list[int] = []
    start = 0
    for n in bulks:
        if n:
            add_range(b, start, n)
        start += n
        while b.ready():
            batch = b.take()
            assert batch.len == batch_size  # never timed out: the clock is frozen
            assert batch.X[:, 0].tolist() == batch.offsets.tolist()
            taken += batch.offsets.tolist()
    assert len(b) == start - len(taken) < batch_size
    taken += b.take(max_rows=len(b)).offsets.tolist()
    assert taken == list(range(start))


def test_drop_removes_the_rows_of_partitions_let_go_and_keeps_the_rest_in_order() -> None:
    b = Batcher(batch_size=100, max_wait_s=1.0)
    add_range(b, 0, 3, partition=0)
    add_range(b, 10, 2, partition=1)
    add_range(b, 3, 2, partition=0)
    add_range(b, 20, 2, topic="other", partition=1)
    b.drop("t", [1])
    batch = b.take(max_rows=100)
    assert batch.offsets.tolist() == [0, 1, 2, 3, 4, 20, 21]
    assert batch.partitions.tolist() == [0, 0, 0, 0, 0, 1, 1]
    np.testing.assert_array_equal(batch.X[:3], rows(0, 3))
    b.drop("t", [0])  # empty: nothing to do
    assert len(b) == 0
