"""Inferring the input's dimension from the first valid messages (streamkm.dimension)."""

from __future__ import annotations

import numpy as np
import pytest
from confluent_kafka import Message

from streamkm.codec import VectorDecoder
from streamkm.dimension import DIM_QUORUM, DimensionVote

pytestmark = pytest.mark.unit


def msg(partition: int, offset: int, width: int) -> Message:
    value = np.zeros(width, dtype="<f4").tobytes()
    return Message(topic="in", partition=partition, offset=offset, value=value)


def test_a_quorum_and_a_majority_decide_and_every_partition_is_read_again() -> None:
    decoder = VectorDecoder("float32", dim=None)
    vote = DimensionVote(decoder)
    stray = [msg(0, 10, 2)]
    assert vote.feed(stray) is None and decoder.dim is None  # one message decides nothing
    half = [msg(1, 20 + i, 3) for i in range(DIM_QUORUM - 1)]
    assert vote.feed(half) is None
    assert "7 of 8 valid messages agree" in vote.reason()
    again = vote.feed([msg(0, 11, 3), msg(1, 27, 3)])
    assert decoder.dim == 3
    assert again == {("in", 0): 10, ("in", 1): 20}  # the first offset the vote saw of each
    assert vote.votes == {} and vote.first == {}  # nothing is kept after the vote


def test_a_quorum_without_a_majority_waits() -> None:
    decoder = VectorDecoder("float32", dim=None)
    vote = DimensionVote(decoder, quorum=2)
    assert (
        vote.feed([msg(0, i, 2) for i in range(2)] + [msg(0, 2 + i, 4) for i in range(2)]) is None
    )
    assert vote.winner() is None and decoder.dim is None
    assert vote.feed([msg(0, 4, 4)]) == {("in", 0): 0}
    assert decoder.dim == 4


def test_partitions_let_go_are_not_read_again_and_a_known_dim_rewinds_the_bulk() -> None:
    decoder = VectorDecoder("float32", dim=None)
    vote = DimensionVote(decoder, quorum=2)
    vote.feed([msg(0, 5, 3), msg(2, 9, 1)])
    vote.let_go([("in", 2)])
    assert vote.first == {("in", 0): 5}
    decoder.dim = 3  # a model restored meanwhile fixed it: read this bulk again
    assert vote.feed([msg(1, 7, 3), msg(1, 8, 3)]) == {("in", 1): 7}
    vote.reset()
    assert vote.first == {} and vote.votes == {}
