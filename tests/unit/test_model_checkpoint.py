"""A StreamingKMeans with a full sample through the daemon's checkpoint store and back."""

from __future__ import annotations

import numpy as np
import pytest

from streamkm.checkpoint import CheckpointStore
from streamkm.model import StreamingKMeans

pytestmark = pytest.mark.unit


def test_checkpoint_restores_predictions_and_continuation(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.uniform(-20, 20, size=(6, 8))
    X = (centres[rng.integers(0, 6, 24_000)] + rng.normal(size=(24_000, 8))).astype(np.float32)
    batches = [X[i : i + 1000] for i in range(0, 24_000, 1000)]
    # a sample that has filled, evicted and freed slots before the checkpoint
    kw = dict(batch_size=1000, sample_size=3000, random_state=5)
    model = StreamingKMeans(6, **kw)
    for xb in batches[:12]:
        model.step(xb)
    assert model._sample.n_free > 0 and model.n_refines_ > 0
    store = CheckpointStore(tmp_path / "ckpt", keep=2)
    offsets = {("vectors", 0): 12_000}
    store.write(model, offsets)
    ckpt = store.latest()
    assert ckpt is not None and ckpt.offsets == offsets
    restored = ckpt.model
    assert isinstance(restored, StreamingKMeans)
    np.testing.assert_array_equal(restored.predict(X), model.predict(X))
    np.testing.assert_array_equal(restored.anomaly_score(X[:500]), model.anomaly_score(X[:500]))
    for xb in batches[12:]:
        a, b = model.step(xb), restored.step(xb)
        for u, v in zip(a, b, strict=True):
            np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(model.cluster_centers_, restored.cluster_centers_)
    np.testing.assert_array_equal(model.counts_, restored.counts_)
    assert model.n_refines_ == restored.n_refines_
