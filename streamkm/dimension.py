"""Inferring the input's dimension when ``input.dim`` is unset and no checkpoint fixes it.

The first valid messages vote with their width; a width becomes the input's dimension once
:data:`DIM_QUORUM` messages hold it and they outnumber all the others together, so a single
stray message cannot decide it. The votes keep no vectors: once a width wins, every partition
is read again from the first offset the vote saw of it.

Examples
--------
>>> from streamkm.codec import VectorDecoder
>>> decoder = VectorDecoder("float32", dim=None)
>>> dims = DimensionVote(decoder)
>>> dims.reason()
'inferring the input dimension: 0 of 0 valid messages agree, 8 (and a majority) needed; or set input.dim'
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from streamkm.codec import VectorDecoder

log = logging.getLogger(__name__)

TopicPart = tuple[str, int]
# Valid messages that must agree on a width before it becomes the input's dimension.
DIM_QUORUM = 8


class DimensionVote:
    """The widths of the first valid messages, until one has a quorum.

    Parameters
    ----------
    decoder : VectorDecoder
        Measures widths; its ``dim`` is set when a width wins.
    quorum : int, default DIM_QUORUM
        Votes the winning width needs (and more than all other widths together).
    """

    def __init__(self, decoder: VectorDecoder, quorum: int = DIM_QUORUM) -> None:
        self.decoder = decoder
        self.quorum = quorum
        self.first: dict[TopicPart, int] = {}  # where to read the voters again
        self.votes: dict[int, int] = {}

    def winner(self) -> tuple[int, int] | None:
        """``(width, votes)`` of the width with a quorum and a majority, else None."""
        if not self.votes:
            return None
        width, n = max(self.votes.items(), key=lambda wn: wn[1])
        others = sum(self.votes.values()) - n
        return (width, n) if n >= self.quorum and n > others else None

    def feed(self, messages: Iterable[Any]) -> dict[TopicPart, int] | None:
        """Count the widths of consumed messages (confluent-kafka ``Message`` objects).

        Returns
        -------
        dict of (topic, partition) to int or None
            Where to read every partition again once the dimension is known (the decoder's
            ``dim`` is set then, by this vote or by a model restored meanwhile); None while
            the vote goes on.
        """
        messages = list(messages)
        if self.decoder.dim is not None:  # a model restored during the consume fixed it
            first: dict[TopicPart, int] = {}
            for m in messages:
                first.setdefault((m.topic(), m.partition()), m.offset())
            return first
        for m in messages:
            self.first.setdefault((m.topic(), m.partition()), m.offset())
            width = self.decoder.width(m.value())
            if width is not None:
                self.votes[width] = self.votes.get(width, 0) + 1
        won = self.winner()
        if won is None:
            return None
        width, n = won
        log.info(
            "input dimension %d inferred from %d of the first %d valid messages "
            "(set input.dim to fix it in advance)", width, n, sum(self.votes.values()),
        )  # fmt: skip
        self.decoder.dim = width
        first, self.first, self.votes = self.first, {}, {}
        return first

    def reset(self) -> None:
        """Forget the vote (the input is read again from elsewhere)."""
        self.first, self.votes = {}, {}

    def let_go(self, partitions: Iterable[TopicPart]) -> None:
        """These partitions are no longer this instance's: nothing to read again of them."""
        for key in partitions:
            self.first.pop(key, None)

    def reason(self) -> str:
        """Why the daemon is not ready while the vote goes on (readiness text)."""
        best = max(self.votes.values(), default=0)
        return (
            f"inferring the input dimension: {best} of {sum(self.votes.values())} valid messages "
            f"agree, {self.quorum} (and a majority) needed; or set input.dim"
        )


__all__ = ["DIM_QUORUM", "DimensionVote"]
