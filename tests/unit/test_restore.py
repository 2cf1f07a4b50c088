"""A model rebuilt from its model-topic record: what it keeps, what it refuses, its spreads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamkm.config import Settings
from streamkm.errors import RestoreError
from streamkm.learner import learner_from_settings
from streamkm.records import model_record
from streamkm.restore import calibrated, model_from_record

pytestmark = pytest.mark.unit

SETTINGS = Settings.model_validate(
    {"model": {"n_clusters": 3, "batch_size": 64, "sample_size": 256, "seed": 0}}
)


def blobs(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    return (centres[rng.integers(0, 3, n)] + rng.normal(0, 1, (n, 2))).astype(np.float32)


def trained(batches: int = 20) -> tuple[bytes, object]:
    learner = learner_from_settings(SETTINGS)
    for i in range(batches):
        learner.step(blobs(64, seed=i))
    return model_record(learner.version, learner.public_state()), learner.estimator


def test_the_record_gives_back_centroids_counts_version_and_samples() -> None:
    record, original = trained()
    model, fields = model_from_record(record, SETTINGS)
    assert fields["model_version"] == model.n_steps_ == original.n_steps_ == 20
    assert model.n_samples_seen_ == original.n_samples_seen_ == 20 * 64
    np.testing.assert_array_equal(model.cluster_centers_, original.cluster_centers_)
    np.testing.assert_array_equal(model.counts_, original.counts_)
    assert model.cluster_centers_.dtype == np.float32 and model.n_features_in_ == 2
    # It goes on learning: the counts carry on from the published ones.
    model.step(blobs(64, seed=99))
    assert model.n_steps_ == 21 and model.counts_.sum() == pytest.approx(21 * 64)
    meta, _ = model.to_state()  # and it checkpoints like any model
    assert meta["n_samples_seen"] == 21 * 64


def test_spreads_come_from_the_first_batch() -> None:
    record, original = trained()
    model, _ = model_from_record(record, SETTINGS)
    X = blobs(64, seed=100)
    fresh = calibrated(model, X)
    assert (fresh._sse > 0).all() and (fresh._sse2 > 0).all()
    ours = fresh.anomaly_score(X)
    theirs = original.anomaly_score(X)
    # Ordinary inputs score within a few standard deviations under both models, not the 1e9
    # of an unknown spread.
    q_ours, q_theirs = np.quantile(ours, 0.9), np.quantile(theirs, 0.9)
    assert 0.3 < q_ours < 4 and q_ours == pytest.approx(q_theirs, abs=1.0)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"n_clusters": 4}, "shape"),
        ({"counts": [1.0, -1.0, 1.0]}, "not finite"),
        ({"centroids": [[0.0, float("nan")], [1.0, 1.0], [2.0, 2.0]]}, "not finite"),
        ({"model_version": 1.5}, "not a count"),
        ({"model_version": "7"}, "not a number"),
        ({"dim": None}, "not a number"),
    ],
)
def test_a_record_that_is_not_a_fitting_model_is_refused(change: dict, reason: str) -> None:
    record, _ = trained(batches=2)
    rec = {**json.loads(record), **change}
    with pytest.raises(RestoreError, match=reason):
        model_from_record(json.dumps(rec).encode(), SETTINGS)


def test_the_configured_shape_must_match() -> None:
    record, _ = trained(batches=2)
    with pytest.raises(RestoreError, match=r"has 3 clusters but model\.n_clusters is 4"):
        model_from_record(record, Settings.model_validate({"model": {"n_clusters": 4}}))
    with pytest.raises(RestoreError, match=r"has dimension 2 but input\.dim is 5"):
        model_from_record(
            record, Settings.model_validate({"model": {"n_clusters": 3}, "input": {"dim": 5}})
        )
    with pytest.raises(RestoreError, match="holds no model"):
        model_from_record(None, SETTINGS)
