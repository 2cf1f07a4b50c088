"""The anomaly score's coefficients: spreads, neighbourhood mass and the rarity term."""

from __future__ import annotations

import numpy as np
import pytest

from streamkm.model import scoring

pytestmark = pytest.mark.unit


def _split_group_and_single():
    """Four centroids 0.5 apart sharing one group, one centroid alone 20 away; equal shares."""
    C = np.zeros((5, 8))
    C[:4, 0] = [0.0, 0.5, 1.0, 1.5]
    C[4, 0] = 20.0
    counts = np.full(5, 1000.0)
    return C, counts


def test_a_split_group_keeps_its_mass_and_a_lone_centroid_pays():
    C, counts = _split_group_and_single()
    spread = np.full(5, 8.0)  # d = 8 unit-variance rows
    pi = counts / counts.sum()
    mass = scoring.neighbourhood_mass(C, pi, spread)
    # the four adjacent centroids see most of their group, the lone one only itself
    assert mass[:4].min() > 0.6
    assert mass[4] == pytest.approx(0.2, rel=1e-9)
    a, b = scoring.rarity_coef(counts, 1.0 / spread, C)
    # every centroid holds 1/k of the weight: measured per centroid, none would be rare
    assert b[4] > 0.5 * scoring.RARITY
    assert b[:4].max() < 0.1 * b[4]
    assert b.max() <= scoring.RARITY
    assert np.all(a > 1.0 / spread)  # plus the share measured in the mean spread


def test_a_wide_tiny_cluster_next_to_a_common_one_is_not_excused():
    # a centroid that settled among a few scattered outliers has a wide spread: measured in
    # that spread it would sit inside the common cluster; measured in the narrower spread of
    # the two it stands alone and pays nearly the whole rarity term
    C = np.array([[0.0, 0.0], [3.0, 0.0]])
    counts = np.array([9900.0, 100.0])
    spread = np.array([2.0, 400.0])
    b = scoring.rarity_coef(counts, 1.0 / spread, C)[1]
    assert b[0] == 0.0
    assert b[1] > 0.9 * scoring.RARITY


def test_coefficients_do_not_depend_on_where_the_data_sits():
    C, counts = _split_group_and_single()
    inv = np.full(5, 1.0 / 8.0)
    far = scoring.rarity_coef(counts, inv, C + 1e6)
    np.testing.assert_allclose(far, scoring.rarity_coef(counts, inv, C), rtol=1e-9, atol=1e-12)


def test_a_fresh_model_has_no_rarity():
    C, _ = _split_group_and_single()
    a, b = scoring.rarity_coef(np.zeros(5), np.full(5, 1.0), C.astype(np.float32))
    assert np.isfinite(a).all() and np.isfinite(b).all()
    # equal shares: only the lone centroid lacks neighbours
    assert b[:4].max() < 0.1 * scoring.RARITY


def test_the_deviation_is_a_gaussians_for_gaussian_rows_and_wider_for_heavy_tails():
    rng = np.random.default_rng(0)
    d = 16
    u_gauss = (rng.normal(size=(20000, d)) ** 2).sum(1)
    u_heavy = (rng.standard_t(3, size=(20000, d)) ** 2).sum(1)
    counts = np.array([20000.0, 20000.0])
    sse = np.array([u_gauss.sum(), u_heavy.sum()])
    sse2 = np.array([(u_gauss**2).sum(), (u_heavy**2).sum()])
    sigma = scoring.deviation(counts, sse, sse2, d)
    assert sigma[0] == pytest.approx(np.sqrt(2 / d), rel=0.05)
    assert sigma[1] > 2 * sigma[0]


def test_a_cluster_with_few_rows_borrows_the_pooled_deviation():
    counts = np.array([10000.0, 2.0, 0.0])
    sse = np.array([10000.0, 2.0, 0.0])
    sse2 = np.array([30000.0, 2.0, 0.0])  # E[u²]/E[u]² = 3, 1 (two equal rows), nothing
    sigma = scoring.deviation(counts, sse, sse2, 8)
    assert sigma[0] == pytest.approx(np.sqrt(2.0), rel=0.01)
    # two identical distances say little: mostly the pooled value, not zero
    assert 0.8 * sigma[0] < sigma[1] < sigma[0]
    assert sigma[2] == pytest.approx(sigma[0], rel=0.01)
    # a cluster of identical vectors (no squared distance at all) stays finite
    flat = scoring.deviation(np.array([50.0]), np.zeros(1), np.zeros(1), 4)
    assert flat[0] == pytest.approx(np.sqrt(2 / 4))


def test_the_score_is_a_z_score_of_the_distance_plus_the_rarity():
    C, counts = _split_group_and_single()
    inv = np.full(5, 1.0 / 8.0)
    sigma = np.array([0.5, 0.5, 0.5, 0.5, 0.25])
    a, b = scoring.rarity_coef(counts, inv, C)
    A, B = scoring.score_coef(counts, inv, C, sigma)
    d2 = 8.0 * np.array([0.5, 1.0, 3.0])[:, None]  # half, once and three times the spread
    np.testing.assert_allclose(A * d2 + B, (a * d2 - 1.0) / sigma + b, rtol=1e-12)


def test_the_demo_summary_counts_tied_scores_half():
    # most published scores are exactly 0 (rows inside their cluster's mean distance): an
    # outlier tied with them must count half, not by its position in the stream
    from sklearn.metrics import roc_auc_score

    from streamkm.tools.demo import _auc

    rng = np.random.default_rng(0)
    scores = np.maximum(rng.normal(size=400), 0.0)
    positive = rng.random(400) < 0.1
    assert _auc(scores, positive) == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)
    flat = np.zeros(10)
    assert _auc(flat, np.arange(10) < 3) == pytest.approx(0.5)
