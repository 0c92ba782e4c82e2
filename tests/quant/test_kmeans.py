import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sqc.quant.kmeans import _sort_rows, fit_rows, lloyd_trace


def weighted_err(w, f, c):
    code = np.abs(w[..., None] - c[:, None, :]).argmin(-1)
    return (f * (w - np.take_along_axis(c, code, 1)) ** 2).sum(1)


def rtn_err(w, f, bits):
    lo, hi = w.min(1, keepdims=True), w.max(1, keepdims=True)
    grid = lo + (hi - lo) * np.arange(1 << bits) / ((1 << bits) - 1)
    return weighted_err(w, f, grid)


@settings(max_examples=50, deadline=None)
@given(
    pool=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=6),
    R=st.integers(1, 4),
    K=st.integers(1, 40),
    seed=st.integers(0, 10_000),
)
def test_sort_rows_carries_weights_and_breaks_ties_by_column(pool, R, K, seed):
    # few distinct values (ties, signed zeros, subnormals from the pool)
    rng = np.random.default_rng(seed)
    w = np.asarray(pool, np.float32)[rng.integers(0, len(pool), (R, K))]
    cols = np.broadcast_to(np.arange(K, dtype=np.float32), (R, K))
    x, g = _sort_rows(w, cols)
    order = g.astype(np.int64)
    # a permutation of each row, carried along, values ascending
    assert (np.sort(order, axis=1) == np.arange(K)).all()
    assert np.array_equal(x.view(np.int32), np.take_along_axis(w, order, 1).view(np.int32))
    assert (np.diff(x, axis=1) >= 0).all()
    # equal bit patterns keep column order
    same = x.view(np.int32)[:, 1:] == x.view(np.int32)[:, :-1]
    assert (np.diff(order, axis=1)[same] > 0).all()


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 5), K=st.sampled_from([5, 33, 100]), seed=st.integers(0, 10_000))
def test_objective_not_worse_than_rtn(bits, K, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, (6, K)) * 0.02).astype(np.float32)
    f = (rng.random((6, K)) ** 3 + 1e-3).astype(np.float32)
    res = fit_rows(w, f, None, bits, iters=16)
    ours = weighted_err(w, f, res.centroids)
    assert (ours <= rtn_err(w, f, bits) * (1 + 1e-4) + 1e-12).all()


@settings(max_examples=20, deadline=None)
@given(bits=st.integers(2, 4), seed=st.integers(0, 10_000))
def test_lloyd_objective_non_increasing(bits, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((5, 64)).astype(np.float32)
    w /= np.abs(w).max(1, keepdims=True)
    f = rng.random((5, 64)).astype(np.float32)
    objs = lloyd_trace(w, f, bits, iters=12)
    assert objs.shape == (5, 13)
    assert (np.diff(objs, axis=1) <= 1e-6 * objs[:, :1]).all()


def test_deterministic():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((10, 77)).astype(np.float32)
    f = rng.random((10, 77)).astype(np.float32)
    a, b = fit_rows(w, f, None, 3), fit_rows(w, f, None, 3)
    assert np.array_equal(a.centroids, b.centroids)


def test_fewer_distinct_values_than_centroids():
    w = np.array([[0.1, 0.1, -0.2, -0.2, 0.3, 0.1]], np.float32)
    res = fit_rows(w, None, None, 3)
    assert res.objective[0] == pytest.approx(0.0, abs=1e-10)
    for v in (0.1, -0.2, 0.3):
        assert np.isclose(res.centroids[0], v, atol=1e-6).any()
    assert np.all(np.diff(res.centroids[0]) >= 0)


def test_constant_and_zero_rows():
    w = np.stack([np.full(40, 0.25), np.zeros(40)]).astype(np.float32)
    res = fit_rows(w, None, None, 4)
    assert np.allclose(res.centroids[0], 0.25) and np.allclose(res.centroids[1], 0.0)


def test_all_zero_weights_falls_back_to_unweighted():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 50)).astype(np.float32)
    zero = fit_rows(w, np.zeros_like(w), None, 3)
    plain = fit_rows(w, None, None, 3)
    np.testing.assert_allclose(zero.centroids, plain.centroids, rtol=1e-6)


def test_inactive_entries_are_ignored():
    w = np.array([[0.0, 0.01, 0.02, 0.03, 5.0]], np.float32)
    active = np.array([[1, 1, 1, 1, 0]], bool)
    res = fit_rows(w, None, active, 2)
    assert res.centroids.max() <= 0.03 + 1e-7  # the outlier did not stretch the codebook


def test_no_active_entries():
    w = np.array([[1.0, 2.0, 3.0]], np.float32)
    res = fit_rows(w, None, np.zeros_like(w, bool), 2)
    assert np.isfinite(res.centroids).all()


def test_nan_rejected():
    with pytest.raises(ValueError, match="NaN"):
        fit_rows(np.array([[np.nan, 1.0]], np.float32), None, None, 2)
