"""Kernels of streamkm.kernel against plain NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamkm import kernel

pytestmark = pytest.mark.unit

DTYPES = [np.float32, np.float64]
PATHS = {"direct": 1 << 60, "gemm": 0}


def ref_sq_dist(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Exact squared distances (n, k) in float64, from differences."""
    diff = X.astype(np.float64)[:, None, :] - C.astype(np.float64)[None, :, :]
    return (diff * diff).sum(axis=2)


def run_assign(X, C, inv_scale=None, gemm_min_dk=None, second=False):
    n, k = X.shape[0], C.shape[0]
    labels = np.full(n, -1, dtype=np.int64)
    d2 = np.full(n, np.nan)
    inv = np.empty((0, 0)) if inv_scale is None else inv_scale
    scores = np.full(n if inv_scale is not None else 0, np.nan)
    c_sq = np.einsum("ij,ij->i", C, C)
    work = np.empty(kernel.work_size(k), dtype=X.dtype)
    d2_second = np.full(n, np.nan) if second else None
    kernel.assign(X, C, c_sq, inv, labels, d2, scores, work, gemm_min_dk, d2_second)
    if second:
        return labels, d2, scores, d2_second
    return labels, d2, scores


def _tol(dtype, X, C):
    # the expanded form loses about eps·(‖x‖² + ‖c‖²) to cancellation
    scale = float(np.max((X.astype(np.float64) ** 2).sum(1))) + float(
        np.max((C.astype(np.float64) ** 2).sum(1))
    )
    return 64 * np.finfo(dtype).eps * (1.0 + scale)


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 40))
    d = draw(st.integers(1, 24))
    k = draw(st.one_of(st.just(1), st.just(n), st.integers(1, n)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((n, d)) * draw(st.sampled_from([0.1, 1.0, 10.0]))).astype(dtype)
    C = rng.standard_normal((k, d)).astype(dtype)
    if draw(st.booleans()):  # centroids on data rows, as after k-means++
        C = X[rng.choice(n, size=k, replace=False)].copy()
    return X, C


@settings(max_examples=60, deadline=None)
@given(problems(), st.sampled_from(sorted(PATHS)))
def test_assign_matches_reference(problem, path):
    X, C = problem
    labels, d2, _ = run_assign(X, C, gemm_min_dk=PATHS[path])
    ref = ref_sq_dist(X, C)
    tol = _tol(X.dtype, X, C)
    rows = np.arange(X.shape[0])
    assert labels.dtype == np.int64 and d2.dtype == np.float64
    assert ((labels >= 0) & (labels < C.shape[0])).all()
    assert (d2 >= 0).all()
    # the chosen centroid is the nearest, up to rounding of near-ties
    assert np.all(ref[rows, labels] <= ref.min(axis=1) + tol)
    np.testing.assert_allclose(d2, ref.min(axis=1), rtol=0, atol=tol)


@settings(max_examples=40, deadline=None)
@given(problems(), st.sampled_from(sorted(PATHS)))
def test_second_nearest_distance(problem, path):
    X, C = problem
    labels, d2, _, d2_second = run_assign(X, C, gemm_min_dk=PATHS[path], second=True)
    ref = np.sort(ref_sq_dist(X, C), axis=1)
    tol = _tol(X.dtype, X, C)
    if C.shape[0] == 1:
        assert np.isinf(d2_second).all()
    else:
        np.testing.assert_allclose(d2_second, ref[:, 1], rtol=0, atol=tol)
    assert (d2_second >= d2).all()
    # asking for it changes nothing else
    plain = run_assign(X, C, gemm_min_dk=PATHS[path])
    np.testing.assert_array_equal(plain[0], labels)
    np.testing.assert_array_equal(plain[1], d2)


@settings(max_examples=40, deadline=None)
@given(problems(), st.sampled_from(sorted(PATHS)))
def test_scores_are_min_of_affine_scaled_distance(problem, path):
    X, C = problem
    rng = np.random.default_rng(X.shape[0])
    coef = np.stack([rng.uniform(0.2, 5.0, size=C.shape[0]), rng.uniform(0, 3, size=C.shape[0])])
    _, _, scores = run_assign(X, C, inv_scale=coef, gemm_min_dk=PATHS[path])
    ref = ref_sq_dist(X, C)
    tol = _tol(X.dtype, X, C) * 5.0
    expected = (ref * coef[0][None, :] + coef[1][None, :]).min(axis=1)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_both_paths_agree_on_clear_cut_data(dtype):
    rng = np.random.default_rng(0)
    C = (rng.standard_normal((40, 30)) * 10).astype(dtype)
    X = (C[rng.integers(0, 40, 700)] + rng.standard_normal((700, 30)) * 0.1).astype(dtype)
    a = run_assign(X, C, gemm_min_dk=PATHS["direct"])
    b = run_assign(X, C, gemm_min_dk=PATHS["gemm"])
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=0, atol=_tol(dtype, X, C))


def test_distance_is_clamped_at_zero():
    # a row equal to a centroid far from the origin: the expanded form may go negative
    C = np.array([[1e4, -1e4, 3e3], [0.0, 0.0, 0.0]], dtype=np.float32)
    X = np.repeat(C[:1], 5, axis=0)
    for th in PATHS.values():
        labels, d2, _ = run_assign(X, C, gemm_min_dk=th)
        assert (labels == 0).all()
        assert (d2 >= 0).all()


def test_row_sq_norms():
    X = np.random.default_rng(1).standard_normal((13, 7))
    out = np.empty(13)
    kernel.row_sq_norms(X, out)
    np.testing.assert_allclose(out, (X * X).sum(1))


def _update(X, w, labels, C, counts, clip=np.inf):
    k, d = C.shape
    d2 = ref_sq_dist(X, C)[np.arange(X.shape[0]), labels]
    sse, sse2 = np.zeros(k), np.zeros(k)
    recent = np.zeros(k)
    inv = np.ones(k)
    shift = kernel.update_centroids(
        X, w, labels, d2, inv, clip, C, counts, sse, sse2, recent, np.empty((k, d)), np.empty(k)
    )
    return shift, d2, (sse, sse2), recent


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 50),
    st.integers(1, 6),
    st.integers(1, 5),
    st.sampled_from(DTYPES),
    st.integers(0, 2**32 - 1),
)
def test_update_equals_sum_vector_over_count(n, d, k, dtype, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(dtype)
    w = rng.uniform(0.0, 3.0, size=n)
    labels = rng.integers(0, k, size=n).astype(np.int64)
    C = rng.standard_normal((k, d)).astype(dtype)
    counts = rng.choice([0.0, 0.5, 7.0], size=k)
    C0, counts0 = C.copy(), counts.copy()
    shift, _, _, recent = _update(X, w, labels, C, counts)
    # seed 000: keep a sum-vector and a count per centroid, divide at the end
    sum_vec = C0.astype(np.float64) * counts0[:, None]
    count = counts0.copy()
    np.add.at(sum_vec, labels, w[:, None] * X)
    np.add.at(count, labels, w)
    hit = count > counts0
    expected = np.where(hit[:, None], sum_vec / np.where(count > 0, count, 1)[:, None], C0)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(C, expected, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(counts, count, rtol=1e-12)
    np.testing.assert_allclose(recent, count - counts0, rtol=1e-12, atol=1e-12)
    moved = np.sqrt(((C.astype(np.float64) - C0) ** 2).sum(1)).mean()
    assert shift == pytest.approx(moved, rel=1e-6, abs=1e-9)


def test_update_equals_per_sample_streaming_average():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((200, 4))
    w = rng.uniform(0.1, 2.0, 200)
    labels = rng.integers(0, 3, 200).astype(np.int64)
    C = rng.standard_normal((3, 4))
    counts = np.array([5.0, 0.0, 1.0])
    # c_j ← c_j + w·(x − c_j)/W_j, one sample at a time
    ref_C, ref_W = C.copy(), counts.copy()
    for x, wi, j in zip(X, w, labels, strict=True):
        ref_W[j] += wi
        ref_C[j] += wi * (x - ref_C[j]) / ref_W[j]
    _update(X, w, labels, C, counts)
    np.testing.assert_allclose(C, ref_C, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(counts, ref_W, rtol=1e-12)


def test_update_ignores_zero_weight_rows_and_clips_sse():
    X = np.array([[0.0], [1.0], [1000.0]])
    C = np.array([[0.0]])
    counts = np.zeros(1)
    _, _, (sse, sse2), _ = _update(X, np.array([1.0, 1.0, 0.0]), np.zeros(3, np.int64), C, counts)
    assert C[0, 0] == pytest.approx(0.5) and counts[0] == 2.0
    assert sse[0] == pytest.approx(1.0) and sse2[0] == pytest.approx(1.0)
    C = np.array([[0.0]])
    _, _, (sse, sse2), _ = _update(X, np.ones(3), np.zeros(3, np.int64), C, np.zeros(1), clip=4.0)
    assert sse[0] == pytest.approx(0 + 1 + 4.0)  # the far row adds at most clip·s
    assert sse2[0] == pytest.approx(0 + 1 + 16.0)  # and its square, of the clipped value


@settings(max_examples=40, deadline=None)
@given(problems(), st.booleans(), st.booleans())
def test_direct_assignment_with_a_shift_matches_reference(problem, scores, second):
    X, C = problem
    n, k = X.shape[0], C.shape[0]
    offset = X.dtype.type(1e3)
    shift = (X.mean(axis=0) + offset).astype(X.dtype)
    Xs, Cc = X + offset, (C + offset) - shift
    coef = np.stack([np.linspace(0.5, 2.0, k), np.linspace(0.0, 1.0, k)]) if scores else None
    labels, d2 = np.empty(n, np.int64), np.empty(n)
    out_scores = np.empty(n if scores else 0)
    d2_second = np.empty(n) if second else np.empty(0)
    work = np.empty(2 * X.shape[1], X.dtype)
    no_coef = np.empty((0, k))
    kernel.assign_direct(
        Xs, shift, Cc, coef if scores else no_coef, labels, d2, out_scores, d2_second, work
    )
    ref = ref_sq_dist(Xs.astype(np.float64) - shift, Cc)
    tol = 64 * np.finfo(X.dtype).eps * (1.0 + float(ref.max()) + 4 * float(offset))
    rows = np.arange(n)
    assert np.all(ref[rows, labels] <= ref.min(axis=1) + tol)
    np.testing.assert_allclose(d2, ref.min(axis=1), rtol=0, atol=tol)
    if scores:
        expected = (ref * coef[0][None, :] + coef[1][None, :]).min(axis=1)
        np.testing.assert_allclose(out_scores, expected, rtol=0, atol=5 * tol)
    if second:
        want = np.sort(ref, axis=1)[:, 1] if k > 1 else np.full(n, np.inf)
        np.testing.assert_allclose(d2_second, want, rtol=0, atol=tol)


def test_learn_batch_is_decay_then_update_with_totals():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((300, 6)).astype(np.float32)
    w = rng.uniform(0.0, 2.0, 300)
    w[::7] = 0.0
    labels = rng.integers(0, 4, 300).astype(np.int64)
    C = rng.standard_normal((4, 6)).astype(np.float32)
    d2 = ref_sq_dist(X, C)[np.arange(300), labels]
    counts, sse, recent = rng.uniform(1, 9, 4), rng.uniform(1, 9, 4), rng.uniform(1, 9, 4)
    sse2 = rng.uniform(1, 9, 4)
    inv = rng.uniform(0.5, 2.0, 4)
    ref = [a.copy() for a in (C, counts * 0.5, sse * 0.5, sse2 * 0.5, recent * 0.75)]
    ref_shift = kernel.update_centroids(
        X, w, labels, d2, inv, 9.0, *ref, np.empty((4, 6)), np.empty(4)
    )
    totals = np.empty(2)
    shift = kernel.learn_batch(
        X, w, labels, d2, inv, 9.0, 0.5, 0.75, C, counts, sse, sse2, recent,
        np.empty((4, 6)), np.empty(4), totals,
    )  # fmt: skip
    for got, want in zip((C, counts, sse, sse2, recent), ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert shift == pytest.approx(ref_shift, rel=1e-6)
    np.testing.assert_allclose(totals, [w.sum(), np.dot(w, d2)], rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_magnitude_bits_is_the_largest_magnitude(dtype):
    rng = np.random.default_rng(6)
    uint, mask = (np.uint32, 0x7FFFFFFF) if dtype == np.float32 else (np.uint64, (1 << 63) - 1)
    X = (rng.standard_normal((50, 3)) * 1e3).astype(dtype)
    X[17, 1] = -5e4
    peak = kernel.max_magnitude_bits(X.reshape(-1).view(uint), uint(mask))
    assert np.array(peak, dtype=uint).view(dtype) == np.abs(X).max()
    finite_max = np.array(np.finfo(dtype).max, dtype=dtype).view(uint)
    for bad in (np.nan, -np.inf, np.inf):
        Y = X.copy()
        Y[3, 2] = bad
        assert kernel.max_magnitude_bits(Y.reshape(-1).view(uint), uint(mask)) > finite_max


@pytest.mark.parametrize("rate", [0.0, 1e-3, 0.7])
@pytest.mark.parametrize("tau", [-np.inf, -1.0, 0.5, 3.0])
def test_sample_candidates_match_the_priority_rule(rate, tau):
    rng = np.random.default_rng(7)
    n, t0 = 500, 12_345
    w = rng.choice([0.0, 0.3, 1.0, 4.0], size=n)
    u = rng.random(n)
    idx, lw, lq = np.empty(n, np.int64), np.empty(n), np.empty(n)
    threshold = tau + t0 * rate  # the level of this batch's priorities, as in a live sample
    m = kernel.sample_candidates(w, u, t0, rate, threshold, idx, lw, lq)
    with np.errstate(divide="ignore"):
        ref_lw = np.log(w) + (t0 + np.arange(n)) * rate
    ref_lq = ref_lw - np.log1p(-u)
    ref = np.flatnonzero(ref_lq > threshold)
    np.testing.assert_array_equal(idx[:m], ref)
    np.testing.assert_allclose(lw[:m], ref_lw[ref], rtol=1e-14)
    np.testing.assert_allclose(lq[:m], ref_lq[ref], rtol=1e-14)
    assert 0 < m < n or tau == -np.inf


def _kpp(X, k, seed=0, w=None):
    n = X.shape[0]
    w = np.ones(n) if w is None else w
    trials = kernel.n_local_trials(k)
    u = np.random.default_rng(seed).random(1 + (k - 1) * trials)
    centers = np.empty(k, np.int64)
    closest = np.empty(n)
    pot = kernel.kmeans_plusplus(X, w, u, centers, closest, np.empty(n), np.empty(n), np.empty(n))
    return centers, pot, closest


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 5), st.integers(0, 2**32 - 1), st.booleans())
def test_kmeans_plusplus_picks_distinct_rows(n, d, seed, duplicates):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    if duplicates:  # only two distinct points: fewer distinct values than k
        X = X[rng.integers(0, min(2, n), size=n)]
    k = int(rng.integers(1, n + 1))
    centers, pot, closest = _kpp(X, k, seed)
    assert len(set(centers.tolist())) == k
    assert ((centers >= 0) & (centers < n)).all()
    ref = ref_sq_dist(X, X[centers]).min(axis=1)
    np.testing.assert_allclose(closest, ref, atol=1e-9)
    assert pot == pytest.approx(ref.sum(), abs=1e-9)


def test_kmeans_plusplus_finds_separated_clusters_and_ignores_zero_weight():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((6, 3)) * 50
    y = np.repeat(np.arange(6), 30)
    X = centres[y] + rng.standard_normal((180, 3))
    w = np.ones(180)
    w[:30] = 0.0  # cluster 0 carries no weight
    centers, _, _ = _kpp(X, 5, seed=1, w=w)
    assert sorted(y[centers].tolist()) == [1, 2, 3, 4, 5]


def _relocate(X, w, d2, targets, C, u=None, min_gain=None, min_captured=0.0):
    n, m = X.shape[0], len(targets)
    if u is None:
        u = np.random.default_rng(0).random((m, kernel.n_local_trials(C.shape[0])))
    min_gain = np.zeros(m) if min_gain is None else np.asarray(min_gain, dtype=np.float64)
    gain, captured = np.empty(m), np.empty(m)
    moved = kernel.relocate(
        X,
        w,
        d2,
        np.asarray(targets, dtype=np.int64),
        u,
        min_gain,
        min_captured,
        C,
        gain,
        captured,
        np.empty(n),
        np.empty(n),
        np.empty(n),
    )
    return moved, gain, captured


def _far_group_problem():
    rng = np.random.default_rng(0)
    big = rng.standard_normal((300, 2))
    far = rng.standard_normal((20, 2)) * 0.1 + [40.0, 0.0]
    X = np.concatenate([big, far])
    C = np.array([[0.0, 0.0], [-500.0, -500.0]])  # centroid 1 is starved
    return X, C


def test_relocate_moves_centroid_to_largest_error():
    X, C = _far_group_problem()
    w = np.ones(X.shape[0])
    d2 = ref_sq_dist(X, C).min(axis=1)
    before = float(d2.sum())
    moved, gain, captured = _relocate(X, w, d2, [1], C)
    assert moved == 1
    assert np.linalg.norm(C[1] - [40.0, 0.0]) < 1.0  # onto the far group
    assert any(np.array_equal(C[1], row) for row in X)
    assert captured[0] == pytest.approx(20.0)
    np.testing.assert_allclose(d2, ref_sq_dist(X, C).min(axis=1), atol=1e-9)
    assert before - d2.sum() == pytest.approx(gain[0], rel=1e-9)
    assert d2.sum() < 0.1 * before


def test_relocate_respects_min_gain_and_min_captured():
    X, C = _far_group_problem()
    w = np.ones(X.shape[0])
    d2 = ref_sq_dist(X, C).min(axis=1)
    total = float(d2.sum())
    C0 = C.copy()
    moved, gain, _ = _relocate(X, w, d2.copy(), [1], C, min_gain=[total])
    assert moved == 0 and gain[0] == 0.0
    np.testing.assert_array_equal(C, C0)
    moved, _, _ = _relocate(X, w, d2.copy(), [1], C, min_captured=21.0)  # group has 20 rows
    assert moved == 0
    moved, _, captured = _relocate(X, w, d2.copy(), [1], C, min_captured=20.0)
    assert moved == 1 and captured[0] >= 20.0


def _relocate_clipped(X, w, d2, cap, targets, C, min_captured=0.0):
    n, m = X.shape[0], len(targets)
    u = np.random.default_rng(0).random((m, kernel.n_local_trials(C.shape[0])))
    gain, captured = np.empty(m), np.empty(m)
    args = (np.asarray(targets, dtype=np.int64), u, np.zeros(m), min_captured, C, gain, captured)
    moved = kernel.relocate_clipped(X, w, d2, cap, *args, np.empty(n), np.empty(n), np.empty(n))
    return moved, gain, captured


def test_relocate_clipped_draws_dense_rows_past_a_few_far_ones():
    # two far rows hold almost all the squared distance; a candidate must take 20 rows
    rng = np.random.default_rng(1)
    dense = rng.standard_normal((400, 2)) + np.array([6.0, 0.0])
    X = np.concatenate([dense, [[900.0, 0.0], [0.0, 900.0]]])
    C = np.array([[0.0, 0.0], [-500.0, -500.0]])
    w = np.ones(X.shape[0])
    d2 = ref_sq_dist(X, C[:1]).min(axis=1)
    moved, _, _ = _relocate(X, w, d2.copy(), [1], C.copy(), min_captured=20.0)
    assert moved == 0  # every candidate drawn by plain squared distance is a far row
    C2 = C.copy()
    cap = 4.0 * float(d2.mean())
    moved, gain, captured = _relocate_clipped(X, w, d2.copy(), cap, [1], C2, min_captured=20.0)
    assert moved == 1 and captured[0] >= 20.0 and gain[0] > 0
    assert np.linalg.norm(C2[1] - [6.0, 0.0]) < 4.0
    # without a cap it is relocate itself
    C3, C4 = C.copy(), C.copy()
    a = _relocate_clipped(X, w, d2.copy(), np.inf, [1], C3)
    b = _relocate(X, w, d2.copy(), [1], C4)
    np.testing.assert_array_equal(C3, C4)
    assert a[0] == b[0] and a[1][0] == b[1][0]


def test_relocate_stops_when_nothing_is_left_to_gain():
    X = np.zeros((10, 3))
    C = np.array([[0.0, 0, 0], [9.0, 9, 9]])
    moved, _, _ = _relocate(X, np.ones(10), np.zeros(10), [1], C, u=np.full((1, 2), 0.5))
    assert moved == 0
    np.testing.assert_array_equal(C[1], [9.0, 9, 9])


def test_n_local_trials():
    assert kernel.n_local_trials(1) == 2
    assert kernel.n_local_trials(8) == 2 + int(np.log(8))
