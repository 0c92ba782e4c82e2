"""The guided fit's laws (sqc.quant.guided), checked against a float64 reference objective."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sqc.quant.guided import (accumulate_guided_hessian, damped, guided_fit, layer_objective, objective_matrix,
                               row_objectives)
from sqc.quant.kmeans import fit_rows

SHAPES = [(1, 5), (3, 17), (5, 40), (2, 70)]  # few shapes: each is one XLA compile


def objective64(w, lut, codes, active, h, damp=0.01):
    """sum_r e_r^T H e_r in float64, written independently of the library."""
    hd = h.double() + damp * torch.diagonal(h.double()).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    e = (w.double() - torch.gather(lut.double(), 1, codes.long())) * active.double()
    return float(torch.einsum("rk,kl,rl->", e, hd, e))


def kmeans_start(w, f, active, bits):
    res = fit_rows([w.numpy()], [f.numpy()], [active.numpy()], bits, iters=8)
    lut = torch.from_numpy(res.centroids).half()
    codes = (w.unsqueeze(-1) - lut.float().unsqueeze(1)).abs().argmin(-1).to(torch.uint8)
    return lut, codes


def problem(seed, shape, tokens, bits, sparse_frac=0.05, dead=0):
    g = torch.Generator().manual_seed(seed)
    R, K = shape
    w = torch.randn(R, K, generator=g) * 0.05
    x = torch.randn(tokens, K, generator=g) * torch.rand(K, generator=g) * 2
    if dead:
        x[:, :dead] = 0.0  # dead inputs: zero rows and columns of H
    s = torch.rand(tokens, generator=g)
    h = (x * s.unsqueeze(1)).T @ x
    active = torch.rand(R, K, generator=g) >= sparse_frac
    f = (torch.rand(R, K, generator=g) + 0.1) * active
    lut, codes = kmeans_start(w, f, active, bits)
    return w, h, active, lut, codes


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.sampled_from(SHAPES), tokens=st.sampled_from([2, 8, 200]),
       bits=st.sampled_from([2, 3, 4]), iters=st.integers(0, 2), dead=st.sampled_from([0, 3]))
def test_objective_never_increases_and_never_worse_than_the_kmeans_start(seed, shape, tokens, bits, iters, dead):
    w, h, active, lut, codes = problem(seed, shape, tokens, bits, dead=dead)
    fit = guided_fit(w, h, active, lut, codes, iters=iters)
    values = [v for _, v in fit.trace]
    assert all(b <= a for a, b in zip(values, values[1:])), fit.trace
    start, end = objective64(w, lut, codes, active, h), objective64(w, fit.lut, fit.codes, active, h)
    assert end <= start * (1 + 1e-5) + 1e-12
    assert fit.objective == pytest.approx(end, rel=1e-4, abs=1e-12)
    assert fit.objective_start == pytest.approx(start, rel=1e-4, abs=1e-12)
    # the format is unchanged: one table of 2**bits entries per row in the table dtype, uint8 codes in range
    assert fit.lut.dtype == torch.float16 and fit.lut.shape == lut.shape and torch.isfinite(fit.lut).all()
    assert fit.codes.dtype == torch.uint8 and int(fit.codes.max()) < 1 << bits


def test_lowers_the_objective_on_a_correlated_layer():
    w, h, active, lut, codes = problem(0, (64, 96), 400, 3)
    fit = guided_fit(w, h, active, lut, codes, iters=2)
    assert fit.objective < 0.8 * fit.objective_start
    stages = [name for name, _ in fit.trace]
    assert stages == ["start", "error feedback", "tables 1", "descent 1", "tables 2", "descent 2"]


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.sampled_from(SHAPES), bits=st.sampled_from([2, 3]),
       distinct=st.integers(1, 4))
def test_exact_on_rows_with_at_most_2_bits_distinct_values(seed, shape, bits, distinct):
    R, K = shape
    rng = np.random.default_rng(seed)
    values = np.float16(rng.normal(size=(R, min(distinct, 1 << bits))) * 0.1).astype(np.float32)
    w = torch.from_numpy(np.take_along_axis(values, rng.integers(0, values.shape[1], (R, K)), 1))
    x = torch.from_numpy(rng.normal(size=(50, K)).astype(np.float32))
    active = torch.ones(R, K, dtype=torch.bool)
    lut, codes = kmeans_start(w, torch.ones(R, K), active, bits)
    fit = guided_fit(w, x.T @ x, active, lut, codes, iters=1)
    assert torch.equal(torch.gather(fit.lut.float(), 1, fit.codes.long()), w)
    assert fit.objective == 0.0


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.sampled_from(SHAPES), bits=st.sampled_from([3, 4]))
def test_sparse_positions_are_excluded_from_the_objective(seed, shape, bits):
    w, h, active, lut, codes = problem(seed, shape, 100, bits, sparse_frac=0.2)
    # any value at a sparse position (kept exactly) changes nothing of the fit
    w2 = torch.where(active, w, torch.randn(w.shape) * 100)
    a = guided_fit(w, h, active, lut, codes, iters=1)
    b = guided_fit(w2, h, active, lut, codes, iters=1)
    assert torch.equal(a.lut, b.lut)
    assert torch.equal(a.codes[active], b.codes[active])
    assert a.objective == b.objective


@pytest.mark.parametrize("case", ["zero", "rank1", "dead", "huge", "indefinite"])
def test_singular_or_ill_conditioned_hessian_is_damped_without_nan(case):
    w, h, active, lut, codes = problem(1, (5, 40), 200, 3)
    if case == "zero":
        h = torch.zeros_like(h)  # no tokens at all: the identity, plain squared error
    elif case == "rank1":
        v = torch.randn(40)
        h = torch.outer(v, v)
    elif case == "dead":
        h[:10] = 0.0
        h[:, :10] = 0.0
    elif case == "huge":
        h = torch.diag(torch.logspace(-20, 20, 40))
    else:  # rounding made it slightly indefinite: more damping for the error feedback, no error
        v = torch.randn(40)
        h = torch.outer(v, v) * 1e3 - 50.0 * torch.eye(40)
    fit = guided_fit(w, h, active, lut, codes, iters=2)
    assert torch.isfinite(fit.lut).all() and np.isfinite(fit.objective)
    assert fit.objective <= fit.objective_start + 1e-6 * abs(fit.objective_start) + 1e-12
    if case == "zero":
        assert torch.equal(damped(h, 0.01), torch.eye(40, dtype=torch.float64))


def test_deterministic():
    w, h, active, lut, codes = problem(3, (5, 40), 100, 3)
    a = guided_fit(w, h, active, lut, codes, iters=2)
    b = guided_fit(w, h, active, lut, codes, iters=2)
    assert torch.equal(a.lut, b.lut) and torch.equal(a.codes, b.codes)


def test_layer_objective_matches_the_reference():
    w, h, active, lut, codes = problem(4, (3, 17), 30, 3)
    got = float(layer_objective(w, lut, codes, active, damped(h, 0.01)).sum())
    assert got == pytest.approx(objective64(w, lut, codes, active, h), rel=1e-10)


def test_bad_shapes_are_refused():
    w, h, active, lut, codes = problem(5, (3, 17), 30, 3)
    with pytest.raises(ValueError, match="H must be"):
        guided_fit(w, h[:5, :5], active, lut, codes)
    with pytest.raises(ValueError, match="must match"):
        guided_fit(w, h, active[:2], lut, codes)


@pytest.mark.parametrize("lead", [(512,), (2, 7)])
def test_hessian_accumulation_against_float64(lead):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, 96, generator=g) * torch.rand(96, generator=g) * 3
    grad = torch.randn(*lead, 40, generator=g) * 1e-4 * torch.rand(*lead, 1, generator=g)
    h = torch.zeros(96, 96)
    before = torch.backends.mkldnn.matmul.fp32_precision
    accumulate_guided_hessian(h, x, grad)
    accumulate_guided_hessian(h, x, grad)
    x2, g2 = x.reshape(-1, 96).double(), grad.reshape(-1, 40).double()
    ref = 2 * (x2 * (g2 ** 2).mean(1, keepdim=True)).T @ x2
    assert float((h.double() - ref).norm() / ref.norm()) < 1e-5
    assert h.dtype == torch.float32
    # positive semi-definite (the fit's Cholesky relies on it); no global matmul setting is touched
    assert float(torch.linalg.eigvalsh(h.double()).min()) >= -1e-6 * float(torch.diagonal(h).max())
    assert torch.backends.mkldnn.matmul.fp32_precision == before


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 1.0), st.floats(1e-3, 1.0))
def test_shrunk_objective_without_forming_the_matrix(seed, shrink, damp):
    # row_objectives (the budget's estimate) is e^T M e for the fit's matrix M = objective_matrix(h, ...)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 24, generator=g) * torch.rand(24, generator=g)
    h, e = x.T @ x, torch.randn(5, 24, generator=g)
    m = objective_matrix(h, damp, shrink)
    ref = ((e.double() @ m) * e.double()).sum(dim=1)
    torch.testing.assert_close(row_objectives(e, h, damp, shrink), ref, rtol=1e-5, atol=0)
    # the ends of the range: shrink 0 keeps H, shrink 1 keeps only its diagonal
    torch.testing.assert_close(objective_matrix(h, damp, 0.0), damped(h, damp))
    torch.testing.assert_close(objective_matrix(h, damp, 1.0), damped(torch.diag(torch.diagonal(h)), damp))


def test_guided_fit_lowers_its_shrunk_objective():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(16, 64, generator=g), torch.randn(256, 64, generator=g)
    h = x.T @ x
    lut0 = torch.quantile(w, torch.linspace(0, 1, 8), dim=1).T.contiguous()
    codes0 = (w.unsqueeze(-1) - lut0.unsqueeze(1)).abs().argmin(-1).to(torch.uint8)
    active = torch.ones_like(w, dtype=torch.bool)
    fit = guided_fit(w, h, active, lut0, codes0, shrink=0.5)
    m = objective_matrix(h, 0.01, 0.5)
    assert fit.objective < fit.objective_start
    assert fit.objective == pytest.approx(float(layer_objective(w, fit.lut, fit.codes, active, m).sum()), rel=1e-4)
    with pytest.raises(ValueError, match="shrink must lie in"):
        guided_fit(w, h, active, lut0, codes0, shrink=1.5)
