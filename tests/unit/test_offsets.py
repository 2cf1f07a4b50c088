"""The OffsetTracker: the delivery rules over consumed, processed, checkpointed and replayed offsets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from streamkm.errors import CheckpointError
from streamkm.offsets import OffsetTracker

pytestmark = pytest.mark.unit

P0, P1 = ("in", 0), ("in", 1)


def test_a_partition_starts_at_the_checkpoint_then_its_origin_then_the_groups(
    tmp_path: Path,
) -> None:
    t = OffsetTracker(tmp_path / "origins.json")
    t.restore({P0: 100})
    t.origins = {P0: 5, P1: 7}
    starts = t.on_assigned([P0, P1, ("in", 2)], committed={})
    assert starts == {P0: 100, P1: 7}
    assert t.assigned == {P0, P1, ("in", 2)}
    assert t.replay_until == {}


def test_origins_are_written_before_the_bulk_goes_on_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "origins.json"
    t = OffsetTracker(path)
    t.restore({P0: 50})
    t.consumed({P0: 50, P1: 3}, {P0: 60, P1: 9})
    # Only the partition no model absorbed gets an origin.
    assert json.loads(path.read_text()) == {"in": {"1": 3}}
    t.consumed({P1: 9}, {P1: 12})  # later bulks of the same batch change nothing
    assert t.take_pending() == ({P0: 50, P1: 3}, {P0: 60, P1: 12})
    again = OffsetTracker(path)
    again.load_origins()
    assert again.origins == {P1: 3}


def test_an_unreadable_origins_file_is_ignored_and_an_unwritable_one_is_an_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "origins.json"
    path.write_text("{not json")
    t = OffsetTracker(path)
    t.load_origins()
    assert t.origins == {}
    blocked = OffsetTracker(tmp_path / "missing-dir" / "origins.json")
    with pytest.raises(CheckpointError, match="cannot write"):
        blocked.consumed({P0: 0}, {P0: 1})


def test_exactly_once_replay_absorbs_without_emitting_and_never_moves_the_commit_back() -> None:
    t = OffsetTracker(None)
    t.restore({P0: 10})
    t.on_assigned([P0], committed={P0: 14})
    assert t.replay_until == {P0: 14}
    t.consumed({P0: 10}, {P0: 13})
    mask = t.emit_mask("in", np.array([0, 0, 0]), np.array([10, 11, 12]))
    assert mask is not None and mask.tolist() == [False, False, False]
    assert t.replayed("in", 0, 12) and not t.replayed("in", 0, 14)
    _, after = t.take_pending()
    assert t.transaction_offsets(after) == {}  # 13 < 14: the committed offset stays
    t.batch_done(after)
    assert t.positions == {P0: 13} and t.replay_until == {P0: 14}
    t.consumed({P0: 13}, {P0: 16})
    _, after = t.take_pending()
    assert t.transaction_offsets(after) == {P0: 16}
    t.batch_done(after)
    assert t.replay_until == {}
    assert t.emit_mask("in", np.array([0]), np.array([16])) is None


def test_only_owned_partitions_are_committed_rewound_or_kept() -> None:
    t = OffsetTracker(None)
    t.on_assigned([P0, P1], committed={})
    t.consumed({P0: 0, P1: 0}, {P0: 5, P1: 6})
    t.let_go([P1])
    t.forget([P1])
    first, after = t.take_pending()
    assert (first, after) == ({P0: 0}, {P0: 5})
    assert t.rewind_targets({P0: 0, P1: 0}) == {P0: 0}
    t.batch_done({P0: 5, P1: 6})
    assert t.group_offsets() == {P0: 5}
    assert t.transaction_offsets({P0: 5, P1: 6}) == {P0: 5}
    t.checkpointed_now()
    assert t.checkpointed == {P0: 5, P1: 6}
    assert not t.pending
