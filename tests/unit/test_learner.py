"""The model behind the loop's protocol: start rows, steps, snapshots, public state, kinds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamkm.config import Settings
from streamkm.errors import ConfigError
from streamkm.learner import KINDS, KMeansLearner, learner_from_settings

pytestmark = pytest.mark.unit


def settings(**model: object) -> Settings:
    return Settings.model_validate(
        {"model": {"n_clusters": 3, "batch_size": 8, "seed": 0, **model}}
    )


def test_rows_to_start_follow_the_settings() -> None:
    assert learner_from_settings(settings()).rows_to_start == 9  # 3 * n_clusters > batch_size
    assert learner_from_settings(settings(init_size=20)).rows_to_start == 20


def test_given_centroids_need_no_seeding_buffer(tmp_path: Path) -> None:
    path = tmp_path / "c.npy"
    np.save(path, np.eye(3, dtype=np.float32))
    learner = learner_from_settings(settings(init=str(path), init_size=50))
    assert learner.rows_to_start == 8  # one normal batch
    learner.step(np.eye(3, dtype=np.float32).repeat(3, axis=0))
    np.testing.assert_allclose(learner.estimator.cluster_centers_, np.eye(3), atol=1e-6)
    with pytest.raises(ConfigError, match="cannot read"):
        learner_from_settings(settings(init=str(tmp_path / "missing.npy")))


def test_a_restored_step_is_undone_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    learner = learner_from_settings(settings())
    assert not learner.fitted and learner.version == 0 and learner.dim is None
    learner.step(rng.normal(size=(9, 4)).astype(np.float32))
    assert learner.fitted and learner.version == 1 and learner.dim == 4
    centres = learner.estimator.cluster_centers_.copy()
    snap = learner.snapshot()
    out = learner.step(rng.normal(size=(8, 4)).astype(np.float32))
    assert out.labels.shape == (8,) and learner.version == 2
    learner.restore(snap)
    assert learner.version == 1
    np.testing.assert_array_equal(learner.estimator.cluster_centers_, centres)


def test_an_unfitted_snapshot_restores_an_unfitted_model() -> None:
    learner = learner_from_settings(settings())
    snap = learner.snapshot()
    learner.step(np.random.default_rng(1).normal(size=(9, 2)).astype(np.float32))
    learner.restore(snap)
    assert not learner.fitted


def test_public_state_and_kinds() -> None:
    learner = learner_from_settings(settings())
    learner.step(np.random.default_rng(2).normal(size=(9, 2)).astype(np.float32))
    state = learner.public_state()
    assert state["n_clusters"] == 3 and state["dim"] == 2 and len(state["centroids"]) == 3
    assert sum(state["counts"]) == pytest.approx(9.0)
    assert KINDS["kmeans"] is KMeansLearner
    wrapped = learner_from_settings(settings(), estimator=learner.estimator)
    assert wrapped.version == 1
    with pytest.raises(ConfigError, match="unknown model kind"):
        learner_from_settings(settings(), kind="nope")
