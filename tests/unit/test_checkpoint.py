"""Tests of streamkm.checkpoint: atomic writes, pruning, fallback on corruption, mismatches."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamkm import fileformat
from streamkm.checkpoint import (
    CheckpointStore,
    CheckpointTimer,
    checkpoint_summary,
    read,
)
from streamkm.errors import CheckpointError, CorruptFileError

pytestmark = pytest.mark.unit


class TinyModel:
    """Stand-in with the StreamingKMeans state interface."""

    def __init__(self, n_clusters: int = 3, dim: int = 2, steps: int = 0) -> None:
        self.n_clusters = n_clusters
        self.n_features_in_ = dim
        self.n_steps_ = steps
        self.n_samples_seen_ = 10.0 * steps
        self.counts_ = np.arange(1, n_clusters + 1, dtype=np.float64) * (steps + 1)
        self.cluster_centers_ = np.full((n_clusters, dim), float(steps))

    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = {
            "n_clusters": self.n_clusters,
            "n_steps": self.n_steps_,
            "n_samples_seen": self.n_samples_seen_,
        }
        return meta, {"counts": self.counts_, "cluster_centers": self.cluster_centers_}

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> TinyModel:
        centers = arrays["cluster_centers"]
        if centers.shape[0] != meta["n_clusters"]:
            raise ValueError("centers do not match n_clusters")
        m = cls(meta["n_clusters"], centers.shape[1], meta["n_steps"])
        m.n_samples_seen_ = meta["n_samples_seen"]
        m.counts_ = arrays["counts"]
        m.cluster_centers_ = centers
        return m


class WallClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "ckpt", keep=3, model_cls=TinyModel, wall_clock=WallClock())


OFFSETS = {("vectors", 0): 120, ("vectors", 1): 7, ("other", 3): 0}


def test_write_then_latest_round_trip(store: CheckpointStore) -> None:
    path = store.write(TinyModel(steps=5), OFFSETS, extra_meta={"group": "g"})
    assert re.fullmatch(r"ckpt-000000000005-1700000001000\.npz", path.name)
    ckpt = store.latest(expect_dim=2, expect_n_clusters=3)
    assert ckpt is not None
    assert ckpt.path == path
    assert ckpt.offsets == OFFSETS
    assert ckpt.model.n_steps_ == 5
    np.testing.assert_array_equal(ckpt.model.cluster_centers_, np.full((3, 2), 5.0))
    assert ckpt.meta["offsets"] == {"other": {"3": 0}, "vectors": {"0": 120, "1": 7}}
    assert ckpt.meta["extra"] == {"group": "g"}
    assert ckpt.meta["created_at"].startswith("2023-11-14T22:13:21")


def test_latest_of_missing_or_empty_dir_is_none(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "nope", model_cls=TinyModel).latest() is None
    assert CheckpointStore(tmp_path, model_cls=TinyModel).latest() is None


def test_keep_prunes_to_newest(store: CheckpointStore) -> None:
    for step in range(6):
        store.write(TinyModel(steps=step), OFFSETS)
    versions = [int(p.name.split("-")[1]) for p in store.paths()]
    assert versions == [5, 4, 3]
    assert sorted(os.listdir(store.dir)) == sorted(p.name for p in store.paths())


def test_newest_is_highest_version_then_latest_time(store: CheckpointStore) -> None:
    store.write(TinyModel(steps=9), {("t", 0): 1})
    later_same_version = store.write(TinyModel(steps=9), {("t", 0): 2})
    ckpt = store.latest()
    assert ckpt is not None and ckpt.path == later_same_version
    assert ckpt.offsets == {("t", 0): 2}


def test_write_never_prunes_the_file_it_just_wrote(store: CheckpointStore) -> None:
    for step in (10, 11, 12):
        store.write(TinyModel(steps=step), OFFSETS)
    fresh = store.write(TinyModel(steps=0), OFFSETS)  # a reset model, lower version
    assert fresh.exists()
    assert len(store.paths()) == 3


def test_failing_write_leaves_previous_checkpoint(
    store: CheckpointStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    previous = store.write(TinyModel(steps=1), OFFSETS)
    before = previous.read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileformat.os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        store.write(TinyModel(steps=2), OFFSETS)
    monkeypatch.undo()
    assert os.listdir(store.dir) == [previous.name]  # no temporary or partial file
    assert previous.read_bytes() == before
    ckpt = store.latest()
    assert ckpt is not None and ckpt.model.n_steps_ == 1


def test_unwritable_dir_raises_checkpoint_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    for target in (not_a_dir, not_a_dir / "sub"):
        s = CheckpointStore(target, model_cls=TinyModel)
        with pytest.raises(CheckpointError, match=re.escape(str(target))):
            s.write(TinyModel(), OFFSETS)
        with pytest.raises(CheckpointError, match="not writable"):
            s.ensure_writable()
    assert not_a_dir.read_text() == "x"


def test_ensure_writable_leaves_nothing_behind(store: CheckpointStore) -> None:
    store.ensure_writable()
    assert store.dir.is_dir() and os.listdir(store.dir) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "empty"])
def test_corrupt_newest_falls_back_with_warning(
    store: CheckpointStore, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    store.write(TinyModel(steps=1), {("t", 0): 10})
    newest = store.write(TinyModel(steps=2), {("t", 0): 20})
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        newest.write_bytes(b"\x00garbage" * 50)
    elif damage == "flip":
        # Flip a byte inside the centroid data: the zip still opens, the checksum must catch it.
        raw = np.full((3, 2), 2.0).tobytes()
        at = data.index(raw) + 3
        newest.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
    else:
        newest.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="streamkm.checkpoint"):
        ckpt = store.latest(expect_dim=2, expect_n_clusters=3)
    assert ckpt is not None and ckpt.model.n_steps_ == 1
    assert ckpt.offsets == {("t", 0): 10}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and newest.name in warnings[0].getMessage()


def test_inconsistent_state_counts_as_corrupt(
    store: CheckpointStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.write(TinyModel(steps=1), OFFSETS)
    bad = TinyModel(steps=2)
    bad.n_clusters = 5  # meta disagrees with the arrays; from_state refuses

    class Lenient(TinyModel):
        @classmethod
        def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> TinyModel:
            return TinyModel()

    # Written by a reader that accepts it (an older streamkm, say); this store must skip it.
    path = CheckpointStore(store.dir, keep=3, model_cls=Lenient).write(bad, OFFSETS)
    with pytest.raises(CheckpointError, match="does not read back"):
        store.write(bad, OFFSETS)
    with caplog.at_level(logging.WARNING, logger="streamkm.checkpoint"):
        ckpt = store.latest()
    assert ckpt is not None and ckpt.model.n_steps_ == 1
    assert path.name in caplog.text


def test_all_corrupt_gives_none_and_an_error_log(
    store: CheckpointStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.write(TinyModel(steps=1), OFFSETS).write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger="streamkm.checkpoint"):
        assert store.latest() is None
    assert any(r.levelno == logging.ERROR for r in caplog.records)


def test_dim_or_k_mismatch_refused_naming_both_values(store: CheckpointStore) -> None:
    store.write(TinyModel(n_clusters=3, dim=2, steps=1), OFFSETS)
    with pytest.raises(CheckpointError, match=r"dim 2 but 16 is configured"):
        store.latest(expect_dim=16)
    with pytest.raises(CheckpointError, match=r"n_clusters 3 but 8 is configured"):
        store.latest(expect_dim=2, expect_n_clusters=8)
    assert store.latest(expect_dim=2, expect_n_clusters=3) is not None


def test_mismatch_does_not_fall_back_to_older_matching_one(store: CheckpointStore) -> None:
    store.write(TinyModel(dim=4, steps=1), OFFSETS)
    store.write(TinyModel(dim=2, steps=2), OFFSETS)
    with pytest.raises(CheckpointError):
        store.latest(expect_dim=4)


def test_read_file_dir_and_missing(store: CheckpointStore, tmp_path: Path) -> None:
    first = store.write(TinyModel(steps=1), OFFSETS)
    store.write(TinyModel(steps=2), OFFSETS)
    assert read(first, model_cls=TinyModel).model.n_steps_ == 1
    assert read(store.dir, model_cls=TinyModel).model.n_steps_ == 2
    with pytest.raises(CheckpointError, match="does not exist"):
        read(tmp_path / "missing.npz", model_cls=TinyModel)
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        read(tmp_path, model_cls=TinyModel)
    first.write_bytes(b"junk")
    with pytest.raises(CorruptFileError):
        read(first, model_cls=TinyModel)


def test_not_a_checkpoint_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt-000000000001-1.npz"
    fileformat.save(path, {"kind": "model"}, {"a": np.zeros(2)})
    with pytest.raises(CorruptFileError, match="not a streamkm checkpoint"):
        read(path, model_cls=TinyModel)


def test_summary_has_exactly_the_documented_keys(store: CheckpointStore) -> None:
    store.write(TinyModel(n_clusters=2, dim=4, steps=3), {("v", 1): 5, ("v", 0): 9})
    ckpt = store.latest()
    assert ckpt is not None
    summary = checkpoint_summary(ckpt)
    assert summary == {
        "file": str(ckpt.path),
        "created_at": ckpt.meta["created_at"],
        "model_version": 3,
        "n_samples_seen": 30,
        "n_clusters": 2,
        "dim": 4,
        "counts": [4.0, 8.0],
        "centroids": [[3.0] * 4, [3.0] * 4],
        "sync_offset": None,
        "offsets": {"v": {"0": 9, "1": 5}},
    }
    assert json.loads(json.dumps(summary)) == summary


def test_stale_temporary_files_are_cleaned(store: CheckpointStore) -> None:
    store.dir.mkdir(parents=True)
    stale = store.dir / ".ckpt-000000000001-5.npz.tmp-999999999"
    stale.write_bytes(b"half")
    store.write(TinyModel(steps=1), OFFSETS)
    assert not stale.exists()


def test_keep_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        CheckpointStore(tmp_path, keep=0)


def test_timer_expires_on_interval() -> None:
    now = [50.0]
    timer = CheckpointTimer(10.0, clock=lambda: now[0])
    assert not timer.due() and timer.remaining() == 10.0
    now[0] = 59.9
    assert not timer.due()
    now[0] = 60.0
    assert timer.due() and timer.remaining() == 0.0
    timer.reset()
    assert not timer.due()
    now[0] = 70.0
    assert timer.due()
    with pytest.raises(ValueError):
        CheckpointTimer(0)


def test_round_trip_with_the_real_model(tmp_path: Path) -> None:
    model_mod = pytest.importorskip("streamkm.model")
    X = np.random.default_rng(0).normal(size=(300, 4))
    model = model_mod.StreamingKMeans(n_clusters=3).partial_fit(X)
    store = CheckpointStore(tmp_path, keep=2)
    store.write(model, OFFSETS)
    ckpt = store.latest(expect_dim=4, expect_n_clusters=3)
    assert ckpt is not None and type(ckpt.model) is model_mod.StreamingKMeans
    np.testing.assert_array_equal(ckpt.model.cluster_centers_, model.cluster_centers_)
    np.testing.assert_array_equal(ckpt.model.counts_, model.counts_)
    assert checkpoint_summary(ckpt)["model_version"] == model.n_steps_


def test_a_model_that_is_not_finite_is_refused_and_earlier_files_stay(
    store: CheckpointStore,
) -> None:
    good = store.write(TinyModel(steps=1), OFFSETS)
    bad = TinyModel(steps=2)
    bad.cluster_centers_ = bad.cluster_centers_.copy()
    bad.cluster_centers_[0, 0] = np.nan
    with pytest.raises(CheckpointError, match=r"not finite.*cluster_centers"):
        store.write(bad, OFFSETS)
    assert store.paths() == [good]


def test_a_model_whose_to_state_refuses_is_a_checkpoint_error(store: CheckpointStore) -> None:
    from streamkm.errors import StreamkmError

    class Refusing(TinyModel):
        def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
            raise StreamkmError("state is not finite")

    with pytest.raises(CheckpointError, match=r"refusing.*not finite"):
        store.write(Refusing(steps=1), OFFSETS)
    assert store.paths() == []


def test_a_file_that_does_not_read_back_is_removed_and_refused(store: CheckpointStore) -> None:
    good = store.write(TinyModel(steps=1), OFFSETS)

    class Unloadable(TinyModel):
        def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
            meta, arrays = super().to_state()
            return {**meta, "n_clusters": 99}, arrays  # from_state refuses this

    with pytest.raises(CheckpointError, match="does not read back"):
        store.write(Unloadable(steps=5), OFFSETS)
    assert store.paths() == [good]


def test_pruning_never_deletes_the_newest_readable_file(store: CheckpointStore) -> None:
    # Newer files that do not read back (written by an older streamkm, or damaged on disk)
    # must not push the good ones out.
    for step in (1, 2, 3):
        store.write(TinyModel(steps=step), OFFSETS)
    newest_good = store.write(TinyModel(steps=4), OFFSETS)
    for step in (7, 8, 9):
        (store.dir / f"ckpt-{step:012d}-1800000000000.npz").write_bytes(b"garbage")
    fresh = store.write(TinyModel(steps=5), OFFSETS)  # older version than the garbage
    assert fresh.exists()
    ckpt = store.latest()
    assert ckpt is not None and ckpt.path == fresh
    for step in (10, 11, 12):
        (store.dir / f"ckpt-{step:012d}-1800000000000.npz").write_bytes(b"garbage")
    again = store.write(TinyModel(steps=6), OFFSETS)
    assert again.exists() and store.latest().path == again  # type: ignore[union-attr]
    assert not newest_good.exists()  # old good files beyond keep do go
