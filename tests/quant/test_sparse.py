import pytest
import torch
from hypothesis import given, settings, strategies as st

from sqc.quant.sparse import count_for, kth_largest, sparse_mask, top_k_mask


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 20), cols=st.integers(1, 40), pct=st.floats(0, 10), seed=st.integers(0, 1000),
       ties=st.booleans())
def test_exact_counts(rows, cols, pct, seed, ties):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if ties:
        w = torch.round(w * 2) / 2  # many equal magnitudes
    k = count_for(pct, w.numel())
    m = top_k_mask(w.abs(), k)
    assert int(m.sum()) == k
    # every chosen |w| >= every unchosen |w|
    if 0 < k < w.numel():
        assert w.abs()[m].min() >= w.abs()[~m].max()


def test_ties_broken_by_lowest_index():
    m = top_k_mask(torch.ones(2, 3), 2)
    assert m.flatten().tolist() == [True, True, False, False, False, False]


def test_union_of_outliers_and_sensitive():
    w = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    f = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 7.0, 0.0]])
    m = sparse_mask(w, f, outlier_pct=10.0, sensitive_pct=10.0)  # 1 + 1 of 8
    assert m.nonzero().tolist() == [[0, 0], [1, 2]]


@pytest.mark.parametrize("kind", ["normal", "ties", "sample_misses"])
@pytest.mark.parametrize("k", [1, 300, 4000, 50_000])
def test_kth_largest_of_a_large_tensor_is_topk_s(kind, k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2_100_001, generator=g)  # a strided sample of every 2nd entry
    if kind == "ties":  # many equal values at the threshold
        x = torch.round(x * 4) / 4
    elif kind == "sample_misses":  # the large values sit between the strided samples' positions
        x = torch.zeros(2_100_001)
        x[1::2][:k] = torch.rand(k, generator=g) + 1
    want = torch.topk(x, k, sorted=False).values.min()
    assert kth_largest(x, k) == want
    m = top_k_mask(x, k)
    assert int(m.sum()) == k and bool((x[m] >= want).all()) and bool((x[~m] <= want).all())
