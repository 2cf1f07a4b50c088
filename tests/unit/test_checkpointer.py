"""The checkpoint policy (interval, count) and its writes through the store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamkm.checkpoint import CheckpointStore
from streamkm.checkpointer import Checkpointer
from streamkm.model import StreamingKMeans

pytestmark = pytest.mark.unit


def test_due_on_the_interval_or_the_count_whichever_comes_first() -> None:
    now = [0.0]
    cp = Checkpointer(None, interval_s=10, every_batches=3, clock=lambda: now[0])
    assert not cp.due() and not cp.dirty
    for _ in range(2):
        cp.batch_done(None)
    assert not cp.due() and cp.dirty
    cp.batch_done(None)
    assert cp.due()
    cp.reset()
    assert not cp.due() and not cp.dirty
    now[0] = 10.0
    assert cp.due()
    with pytest.raises(ValueError):
        Checkpointer(None, interval_s=0)
    with pytest.raises(ValueError):
        Checkpointer(None, interval_s=1, every_batches=0)


def test_write_then_restore_keeps_model_offsets_and_history(tmp_path: Path) -> None:
    model = StreamingKMeans(n_clusters=2, batch_size=8, random_state=0)
    model.step(np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32))
    cp = Checkpointer(CheckpointStore(tmp_path, keep=2), interval_s=30)
    cp.batch_done(model)
    path = cp.write(model, {("in", 0): 8})
    assert path.exists() and not cp.dirty
    again = Checkpointer(CheckpointStore(tmp_path, keep=2), interval_s=30)
    ckpt = again.restore(expect_dim=3, expect_n_clusters=2)
    assert ckpt is not None and ckpt.offsets == {("in", 0): 8}
    assert len(again.history) == 1 and again.history[0][1] == 8.0


def test_move_aside_takes_checkpoints_and_named_files(tmp_path: Path) -> None:
    model = StreamingKMeans(n_clusters=2, batch_size=8, random_state=0)
    model.step(np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32))
    store = CheckpointStore(tmp_path, keep=2)
    cp = Checkpointer(store, interval_s=30)
    cp.write(model, {})
    origins = tmp_path / "origins.json"
    origins.write_text("{}")
    aside = cp.move_aside(also=[origins])
    assert aside is not None and store.paths() == [] and not origins.exists()
    assert (aside / "origins.json").exists()
    assert cp.move_aside(also=[origins]) is None  # nothing left to move
