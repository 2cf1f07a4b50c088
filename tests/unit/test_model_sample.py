"""StreamingKMeans: the sample, refinement, snapshot/restore, determinism and numerical limits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamkm import limits
from streamkm.model import StateError, StreamingKMeans, refine, relocation, scoring
from streamkm.model.sample import Sample

pytestmark = pytest.mark.unit


def blobs(n, d=4, k=5, seed=0, offset=0.0, spread=1.0, sep=20.0):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-sep, sep, size=(k, d))
    y = rng.integers(0, k, size=n)
    X = centres[y] + spread * rng.standard_normal((n, d)) + offset
    return X.astype(np.float32), y


def state_bytes(model: StreamingKMeans) -> tuple[dict, dict[str, bytes]]:
    meta, arrays = model.to_state()
    return meta, {name: a.tobytes() + str(a.dtype).encode() for name, a in arrays.items()}


def np_assign(X, C, d2_second):
    """Nearest centroid in float64 NumPy: the ``assign`` a refinement is given."""
    d2 = ((X[:, None, :].astype(np.float64) - C[None].astype(np.float64)) ** 2).sum(-1)
    order = np.argsort(d2, axis=1, kind="stable")
    rows = np.arange(X.shape[0])
    if d2_second is not None:
        d2_second[:] = d2[rows, order[:, 1]] if C.shape[0] > 1 else np.inf
    return order[:, 0].astype(np.int64), d2[rows, order[:, 0]]


def assert_identical(a: StreamingKMeans, b: StreamingKMeans) -> None:
    ma, aa = state_bytes(a)
    mb, ab = state_bytes(b)
    assert ma == mb
    assert aa == ab


# ---------------------------------------------------------------- the sample


def test_sample_of_unit_weights_is_uniform_and_bounded():
    s = Sample(1000, 1, np.float64, None)
    rng = np.random.default_rng(0)
    stream = np.arange(100_000, dtype=np.float64)[:, None]
    for start in range(0, 100_000, 512):
        xb = stream[start : start + 512]
        s.offer(xb, np.ones(xb.shape[0]), rng.random(xb.shape[0]), start)
        assert s.n_live <= s.capacity
    assert 1000 <= s.n_live <= 1250
    live = s.lq[: s.used] > -math.inf
    kept = s.rows[: s.used][live, 0]
    assert np.unique(kept).size == kept.size
    # a uniform draw of the stream: each tenth of the stream holds about a tenth of the rows
    counts = np.histogram(kept, bins=10, range=(0, 100_000))[0]
    assert counts.min() > 0.6 * kept.size / 10
    w = s.weights(100_000.0)[live]
    assert np.allclose(w, w[0])  # every row stands for the same weight


def test_sample_with_half_life_holds_the_recent_stream():
    h = 2000.0
    s = Sample(1000, 1, np.float64, h)
    rng = np.random.default_rng(1)
    n = 50_000
    stream = np.arange(n, dtype=np.float64)[:, None]
    for start in range(0, n, 500):
        s.offer(stream[start : start + 500], np.ones(500), rng.random(500), start)
    live = s.lq[: s.used] > -math.inf
    ages = n - s.rows[: s.used][live, 0]
    w = s.weights(float(n))[live]
    # the weighted mean age of a decayed stream is h / ln 2
    mean_age = float(np.dot(w, ages) / w.sum())
    assert mean_age == pytest.approx(h / math.log(2), rel=0.2)


def test_weighted_rows_are_sampled_in_proportion():
    s = Sample(2000, 1, np.float64, None)
    rng = np.random.default_rng(2)
    n = 40_000
    label = (np.arange(n) % 2).astype(np.float64)[:, None]  # odd rows weigh 3
    w = np.where(label[:, 0] == 1, 3.0, 1.0)
    for start in range(0, n, 1000):
        s.offer(
            label[start : start + 1000],
            w[start : start + 1000],
            rng.random(1000),
            start,
        )
    live = s.lq[: s.used] > -math.inf
    ws = s.weights(float(n))[live]
    heavy = s.rows[: s.used][live, 0] == 1
    share = ws[heavy].sum() / ws.sum()
    assert share == pytest.approx(0.75, abs=0.03)


def test_memory_is_bounded_and_reported():
    rng = np.random.default_rng(3)
    model = StreamingKMeans(4, batch_size=1000, sample_size=2000, random_state=0)
    for _ in range(30):
        model.partial_fit(rng.normal(size=(1000, 16)).astype(np.float32))
    assert model._sample.n_live <= model._sample.capacity == 2500
    assert model._sample.rows.shape[0] <= 2500
    assert model.nbytes() == 4 * 16 * 4 + 4 * 4 * 8 + 16 * 4 + 2500 * (16 * 4 + 24)
    assert StreamingKMeans(8).sample_size == 32768


# ---------------------------------------------------------------- refinement


def test_refinement_reaches_a_lloyd_fixed_point_and_keeps_counts_consistent():
    X, _ = blobs(6000, k=6, sep=6.0, seed=4)
    model = StreamingKMeans(6, batch_size=500, random_state=0)
    for start in range(0, 6000, 500):
        model.partial_fit(X[start : start + 500])
    assert model.n_refines_ >= 2
    assert model.counts_.sum() == pytest.approx(6000, rel=1e-9)
    assert np.isfinite(model.cluster_mse_).all()
    # one more Lloyd step on the whole data barely moves the centroids
    labels = model.predict(X)
    C = np.array([X[labels == j].mean(0) for j in range(6)])
    assert np.abs(C - model.cluster_centers_).max() < 0.1


def test_refinement_is_off_without_a_sample():
    X, _ = blobs(4000, seed=5)
    model = StreamingKMeans(5, batch_size=500, sample_size=0, random_state=0)
    for start in range(0, 4000, 500):
        model.partial_fit(X[start : start + 500])
    assert model.n_refines_ == 0 and model._sample.n_live == 0


def test_schedule_keeps_refinement_within_its_budget(monkeypatch):
    monkeypatch.setattr(refine, "EARLY_FACTOR", None)
    gap = math.ceil(3 * 4096 / refine.REFINE_BUDGET)
    assert refine.next_refine(4096, 3, 4096, 32768, 1024) == 4096 + gap
    assert refine.next_refine(100, 1, 10, 32768, 1024) == 1124  # never closer than a batch
    full = refine.next_refine(40_000, 3, 32768, 32768, 1024)
    assert full == 40_000 + math.ceil(3 * 32768 / refine.REFINE_BUDGET)
    # while the sample holds the whole stream (the default): gaps of n²/size rows
    monkeypatch.setattr(refine, "EARLY_FACTOR", 2.0)
    assert refine.next_refine(4096, 3, 4096, 32768, 1024) == 4096 + 512
    assert refine.next_refine(16384, 3, 16384, 32768, 1024) == 16384 + 8192
    assert refine.next_refine(100, 3, 100, 32768, 1024) == 101  # a short stream: every call
    assert refine.next_refine(40_000, 3, 32768, 32768, 1024) == full


def test_filling_schedule_spends_a_bounded_share_per_doubling():
    # rows refined on while a 32768-row sample fills, streamed in batches of 256: each
    # doubling of the stream costs about ln 2 / (EARLY_FACTOR - 1) refinements of the full
    # sample, and a short stream is refined on every batch
    assert refine.EARLY_FACTOR is not None
    size, n, due, refined = 32768, 0, 256, []
    while n < size:
        n += 256
        if n >= due:
            refined.append(n)
            due = refine.next_refine(n, 1, n, size, 256)
    share = math.log(2.0) / (refine.EARLY_FACTOR - 1.0)
    per_doubling = [
        sum(r for r in refined if lo < r <= 2 * lo) / size for lo in (2048, 4096, 8192, 16384)
    ]
    # (once gaps reach the stream's length, a doubling holds one or two refinements)
    assert all(c < max(2.0 * share, 1.0) for c in per_doubling), per_doubling
    assert sum(refined) / size < share * math.log2(size / 256) + 2.0
    assert refined[:8] == [256 * i for i in range(1, 9)]  # a short stream: every batch


def test_match_centroids_undoes_a_permutation_and_pairs_nearest_first():
    rng = np.random.default_rng(3)
    old = rng.normal(size=(12, 5)) * 10
    perm = rng.permutation(12)
    new = old[perm] + rng.normal(size=(12, 5)) * 0.01
    order = refine.match_centroids(new, old)
    assert sorted(order.tolist()) == list(range(12))
    np.testing.assert_allclose(new[order], old, atol=0.1)


def test_seed_on_sample_draws_distinct_rows_and_ignores_zero_weight():
    X, _ = blobs(400, k=4, seed=2)
    w = np.ones(400)
    w[:200] = 0.0  # free slots of the sample
    C = refine.seed_on_sample(X, w, 8, np.random.default_rng(0))
    rows = {tuple(r) for r in X[200:].tolist()}
    assert C.shape == (8, 4) and len({tuple(c) for c in C.tolist()}) == 8
    assert all(tuple(c) in rows for c in C.tolist())
    again = refine.seed_on_sample(X, w, 8, np.random.default_rng(0))
    np.testing.assert_array_equal(C, again)


def test_a_restart_replaces_a_poor_optimum_and_keeps_cluster_ids():
    # two centroids share one blob while another pair of blobs shares one centroid: Lloyd
    # from there stays put; a fresh k-means++ seeding finds the blobs
    centres = np.array([[0.0, 0.0], [20.0, 0.0], [40.0, 0.0], [0.0, 30.0]])
    rng = np.random.default_rng(1)
    X = (centres[rng.integers(0, 4, 4000)] + rng.normal(size=(4000, 2))).astype(np.float32)
    w = np.ones(4000)
    C = np.array([[-0.5, 0.0], [0.5, 0.0], [30.0, 0.0], [0.0, 30.0]], dtype=np.float32)
    rng = np.random.default_rng
    stuck = refine.refine(X, w, C, np_assign, rng(0), swap=False, restarts=0)
    freed = refine.refine(X, w, C, np_assign, rng(0), swap=False, restarts=1)
    assert freed.swapped and not stuck.swapped
    assert freed.wsse.sum() < 0.5 * stuck.wsse.sum()
    # ids stay put where the clusters stay: the blob at (0, 30) keeps centroid 3
    assert np.abs(freed.centroids[3] - [0.0, 30.0]).max() < 0.5
    assert freed.wsum.sum() == pytest.approx(w.sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_centroid_on_a_few_scattered_far_rows_is_rehomed_among_dense_ones(seed):
    # Lloyd keeps a centroid on the few far rows nearest it, and candidates drawn by squared
    # distance would all be far rows, which a moved centroid may not take: the draws for a
    # centroid that serves no group are clipped, so it moves into the dense clusters
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    X = centres[rng.integers(0, 3, 12000)] + rng.normal(size=(12000, 2))
    X[:20] = rng.uniform(-300, 300, size=(20, 2))
    X = X.astype(np.float32)
    w = np.ones(12000)
    C = np.vstack([centres, X[:1]]).astype(np.float32)
    out = refine.refine(X, w, C, np_assign, np.random.default_rng(0), swap=True, restarts=0)
    assert out.swapped
    assert np.abs(out.centroids).max() < 20.0
    assert out.wsum.min() >= relocation.min_weight(w, 4)


def test_one_refinement_never_spends_more_than_its_work_cap(monkeypatch):
    X, _ = blobs(4000, d=8, k=6, seed=5)
    w = np.ones(4000)
    C = X[:6].copy()
    per_pass = 4000 * 6 * 8
    free = refine.refine(X, w, C, np_assign, np.random.default_rng(0), True, 1)
    assert free.passes > 5
    monkeypatch.setattr(refine, "MAX_WORK", 3 * per_pass)
    capped = refine.refine(X, w, C, np_assign, np.random.default_rng(0), True, 1)
    assert capped.passes <= 3


def test_reassignment_ratio_zero_turns_restarts_off(monkeypatch):
    X, _ = blobs(3000, k=6, seed=4)
    kw = dict(batch_size=300, random_state=0)
    off = StreamingKMeans(6, reassignment_ratio=0.0, **kw)
    calls = []
    real = refine.seed_on_sample
    monkeypatch.setattr(refine, "seed_on_sample", lambda *a: calls.append(1) or real(*a))
    for start in range(0, 3000, 300):
        off.partial_fit(X[start : start + 300])
    assert off.n_refines_ > 0 and calls == []
    on = StreamingKMeans(6, **kw)
    for start in range(0, 3000, 300):
        on.partial_fit(X[start : start + 300])
    assert calls


def test_one_pass_beats_minibatch_kmeans_on_real_digits():
    # a real table with more centroids than classes: small batches, tiny clusters
    sklearn = pytest.importorskip("sklearn")
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.datasets import load_digits

    del sklearn
    X, _ = load_digits(return_X_y=True)
    X = ((X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1)).astype(np.float32)
    k, B = 40, 89

    def inertia(C):
        d2 = ((X[:, None, :].astype(np.float64) - C[None].astype(np.float64)) ** 2).sum(-1)
        return float(d2.min(1).sum())

    base = inertia(KMeans(k, n_init=3, random_state=0).fit(X).cluster_centers_)
    for seed in range(3):
        Xs = X[np.random.default_rng(seed).permutation(X.shape[0])]
        ours = StreamingKMeans(k, batch_size=B, random_state=seed)
        mbk = MiniBatchKMeans(k, batch_size=B, n_init=1, random_state=seed)
        for start in range(0, X.shape[0], B):
            ours.partial_fit(Xs[start : start + B])
            mbk.partial_fit(Xs[start : start + B])
        assert inertia(ours.cluster_centers_) <= inertia(mbk.cluster_centers_)
        assert inertia(ours.cluster_centers_) < 1.12 * base


def test_refinement_beats_the_streaming_average_on_continuous_data():
    rng = np.random.default_rng(6)
    X = rng.uniform(0, 1, size=(20_000, 2)).astype(np.float32) ** 2
    kw = dict(batch_size=1000, random_state=0)
    refined = StreamingKMeans(16, **kw)
    plain = StreamingKMeans(16, sample_size=0, **kw)
    for start in range(0, 20_000, 1000):
        refined.partial_fit(X[start : start + 1000])
        plain.partial_fit(X[start : start + 1000])
    assert -refined.score(X) < 0.99 * -plain.score(X)


# ---------------------------------------------------------------- determinism, persistence


@pytest.mark.parametrize("kw", [dict(), dict(half_life=3000.0, dtype=np.float64)])
def test_save_load_mid_stream_continues_bit_for_bit(tmp_path, kw):
    X, _ = blobs(20 * 600, seed=7)
    weights = np.random.default_rng(0).uniform(0.5, 2.0, size=X.shape[0])
    batches = [(X[i * 600 : (i + 1) * 600], weights[i * 600 : (i + 1) * 600]) for i in range(20)]
    # a sample small enough to fill, evict and reuse slots within the stream
    params = dict(batch_size=600, sample_size=1500, random_state=11, **kw)
    a = StreamingKMeans(5, **params)
    for xb, wb in batches:
        a.step(xb, sample_weight=wb)
    b = StreamingKMeans(5, **params)
    for xb, wb in batches[:10]:
        b.step(xb, sample_weight=wb)
    assert b._sample.n_free > 0 or b._sample.tau > -math.inf  # evictions happened
    b.save(tmp_path / "mid.npz")
    b = StreamingKMeans.load(tmp_path / "mid.npz")
    for xb, wb in batches[10:]:
        b.step(xb, sample_weight=wb)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    np.testing.assert_array_equal(a.counts_, b.counts_)
    sa, sb = a._sample, b._sample
    assert (sa.used, sa.n_free, sa.tau) == (sb.used, sb.n_free, sb.tau)
    np.testing.assert_array_equal(sa.rows[: sa.used], sb.rows[: sb.used])
    np.testing.assert_array_equal(sa.lq[: sa.used], sb.lq[: sb.used])
    assert_identical(a, b)


def test_version_1_states_still_load():
    X, _ = blobs(3000, seed=8)
    model = StreamingKMeans(5, batch_size=500, random_state=0).fit(X)
    meta, arrays = model.to_state()
    v1 = {k: v for k, v in meta.items() if k not in ("sample", "next_refine", "n_refines")}
    v1["state_version"] = 1
    old = {k: arrays[k] for k in ("centroids", "counts", "sse", "recent")}
    twin = StreamingKMeans.from_state(v1, old)
    np.testing.assert_array_equal(twin.predict(X), model.predict(X))
    twin.partial_fit(X[:500])
    assert twin._sample.n_live == 500


def test_states_without_second_moments_load_with_gaussian_ones():
    X, _ = blobs(3000, seed=8)
    model = StreamingKMeans(5, batch_size=500, random_state=0).fit(X)
    meta, arrays = model.to_state()
    assert meta["state_version"] == 3 and (arrays["sse2"] > 0).all()
    v2 = {**meta, "state_version": 2}
    older = {k: v for k, v in arrays.items() if k != "sse2"}
    twin = StreamingKMeans.from_state(v2, older)
    d = X.shape[1]
    np.testing.assert_allclose(
        twin._sse2, arrays["sse"] ** 2 / arrays["counts"] * (1 + 2 / d), rtol=1e-12
    )
    np.testing.assert_array_equal(twin.predict(X), model.predict(X))
    scores = twin.anomaly_score(X[:50])
    assert np.isfinite(scores).all()


# ---------------------------------------------------------------- snapshot / restore


def test_restore_undoes_steps_bit_for_bit_and_replays_identically():
    X, _ = blobs(12 * 400, seed=9)
    model = StreamingKMeans(5, batch_size=400, sample_size=900, random_state=3)
    twin = StreamingKMeans(5, batch_size=400, sample_size=900, random_state=3)
    for i in range(12):
        xb = X[i * 400 : (i + 1) * 400]
        before = state_bytes(model) if i else None
        snap = model.snapshot()
        first = model.step(xb)
        model.restore(snap)  # as after an aborted transaction
        if before is not None:
            assert state_bytes(model) == before
        again = model.step(xb)  # the redo gives the same result
        for u, v in zip(first, again, strict=True):
            np.testing.assert_array_equal(u, v)
        twin.step(xb)
    assert model.n_refines_ >= 2 and model._sample.tau > -math.inf
    assert_identical(model, twin)


def test_snapshot_cost_does_not_grow_with_the_sample():
    rng = np.random.default_rng(10)
    model = StreamingKMeans(4, batch_size=256, sample_size=50_000, random_state=0)
    for _ in range(40):
        model.partial_fit(rng.normal(size=(256, 8)).astype(np.float32))
    snap = model.snapshot()
    copied = sum(a.nbytes for a in snap.arrays.values())
    assert copied < 4 * 8 * 4 * 10  # centroids and per-centroid statistics only
    model.partial_fit(rng.normal(size=(256, 8)).astype(np.float32))
    logged = sum(old.nbytes for _, _, old in model._sample._log or [])
    assert logged <= 256 * (8 * 4 + 16)  # at most the rows this step wrote


def test_restore_before_the_first_batch_and_stale_snapshots():
    X, _ = blobs(600, seed=11)
    model = StreamingKMeans(5, random_state=0)
    snap = model.snapshot()
    model.step(X)
    model.restore(snap)
    assert not hasattr(model, "cluster_centers_")
    model.step(X)
    old = model.snapshot()
    model.snapshot()
    with pytest.raises(ValueError, match="latest snapshot"):
        model.restore(old)


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4])
def test_assignment_keeps_its_accuracy_far_from_the_origin(offset):
    rng = np.random.default_rng(12)
    y = rng.integers(0, 2, size=20_000)
    X = np.stack([y * 3.0, np.zeros_like(y)], axis=1) + rng.normal(size=(20_000, 2)) * 0.3
    X = (X + offset).astype(np.float32)
    model = StreamingKMeans(2, batch_size=1000, random_state=0)
    for start in range(0, 20_000, 1000):
        result = model.step(X[start : start + 1000])
    labels = model.predict(X)
    acc = max(np.mean(labels == y), np.mean(labels != y))
    assert acc > 0.99
    # distinct points are never at distance exactly 0
    assert np.count_nonzero(result.distances == 0.0) == 0
    assert np.isfinite(result.scores).all()


def test_scores_of_degenerate_clusters_are_finite_bounded_and_monotone():
    X = np.full((3000, 3), 7.0, dtype=np.float32)
    model = StreamingKMeans(2, batch_size=500, random_state=0)
    for start in range(0, 3000, 500):
        model.step(X[start : start + 500])
    far = np.array([[7.0 + r, 7.0, 7.0] for r in (0.0, 1e-3, 1e-2, 1.0, 1e3, 2e5)], np.float32)
    s = model.anomaly_score(far)
    assert np.isfinite(s).all() and (s >= 0).all() and (s <= scoring.SCORE_MAX).all()
    assert np.all(np.diff(s) >= 0) and s[0] < 1.0 < s[1]
    # a tiny but real spread: scores grow with the distance and stay below the cap nearby
    rng = np.random.default_rng(13)
    tight = (rng.normal(size=(3000, 3)) * 1e-4 + 5.0).astype(np.float32)
    model = StreamingKMeans(1, batch_size=500, random_state=0).fit(tight)
    probe = np.array([[5.0 + r, 5.0, 5.0] for r in (1e-4, 1e-3, 1e-2, 0.1)], np.float32)
    t = model.anomaly_score(probe)
    assert np.all(np.diff(t) > 0) and t[-1] <= scoring.SCORE_MAX and t[0] < 10


def test_rows_beyond_the_range_rule_are_refused_and_nothing_overflows():
    bound = limits.max_sq_norm(np.float32)
    edge = math.sqrt(bound / 4) * 0.999  # at d = 4 a row of this value sits just inside
    assert 2 * edge > 4e18  # the row's norm
    rng = np.random.default_rng(14)
    X = (rng.normal(size=(2000, 4)) * edge / 4).astype(np.float32)
    X[::97] = np.float32(edge)
    X[1::97] = np.float32(-edge)
    model = StreamingKMeans(3, batch_size=500, random_state=0)
    for start in range(0, 2000, 500):
        r = model.step(X[start : start + 500])
        assert np.isfinite(r.distances).all() and np.isfinite(r.scores).all()
    assert np.isfinite(model.cluster_centers_).all() and np.isfinite(model._sse).all()
    assert math.isfinite(model.inertia_)
    model.to_state()  # finite, so accepted
    over = np.full((1, 4), np.float32(edge * 1.01))
    with pytest.raises(ValueError, match="squared norm above"):
        model.step(over)
    with pytest.raises(ValueError, match="squared norm above"):
        StreamingKMeans(1).fit(np.full((3, 4), 1.3e38, dtype=np.float32))


def test_a_non_finite_state_is_refused():
    X, _ = blobs(1000, seed=15)
    model = StreamingKMeans(5, random_state=0).fit(X)
    model._sse[0] = np.inf
    with pytest.raises(StateError, match="sse"):
        model.to_state()
    model._sse[0] = 1.0
    model.cluster_centers_[1, 0] = np.nan
    with pytest.raises(StateError, match="centroids"):
        model.to_state()
