"""The checkpoint policy (interval, count) and its writes through the store, in the background."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamkm.checkpoint import CheckpointStore
from streamkm.checkpointer import Checkpointer
from streamkm.errors import CheckpointError
from streamkm.model import StreamingKMeans
from tests.unit.gated_store import GatedStore

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


def fitted(seed: int = 0) -> StreamingKMeans:
    model = StreamingKMeans(n_clusters=2, batch_size=8, random_state=0)
    model.step(np.random.default_rng(seed).normal(size=(8, 3)).astype(np.float32))
    return model


def test_a_write_runs_in_the_background_from_a_copy_of_the_state(tmp_path: Path) -> None:
    store = GatedStore(tmp_path)
    cp = Checkpointer(store, interval_s=30)
    model = fitted()
    centers = model.cluster_centers_.copy()
    cp.batch_done(model)
    cp.start(model, {("in", 0): 8}, context="publish me")
    assert cp.busy and not cp.dirty and cp.done() is None  # running: nothing to hand back
    with pytest.raises(RuntimeError):
        cp.start(model, {("in", 0): 8})  # one writer at a time
    model.step(np.random.default_rng(1).normal(5, 1, size=(8, 3)).astype(np.float32))
    assert store.paths() == []
    store.gate.set()
    written = cp.wait()
    assert written is not None and not cp.busy and cp.done() is None  # handed back once
    assert written.offsets == {("in", 0): 8} and written.context == "publish me"
    assert written.model["n_steps"] == 1 and written.seconds > 0
    ckpt = Checkpointer(CheckpointStore(tmp_path), interval_s=30).restore()
    assert ckpt is not None and ckpt.path == written.path
    assert np.array_equal(ckpt.model.cluster_centers_, centers)  # the state at start()


def test_a_failed_background_write_is_raised_to_the_caller(tmp_path: Path) -> None:
    store = GatedStore(tmp_path, fail=True)
    cp = Checkpointer(store, interval_s=30)
    cp.start(fitted(), {("in", 0): 8})
    store.gate.set()
    with pytest.raises(CheckpointError, match="No space left"):
        cp.wait()
    assert not cp.busy and store.paths() == []
    with pytest.raises(CheckpointError, match="NaN or infinity"):
        bad = fitted()
        bad.cluster_centers_[0, 0] = np.nan
        cp.start(bad, {})  # refused before any thread starts
    assert not cp.busy
