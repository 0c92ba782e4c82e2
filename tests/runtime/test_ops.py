import pytest
import torch
from hypothesis import given, settings, strategies as st

from sqc.passes.fit_codebook import assign_codes
from sqc.passes.pack_layout import to_csr
from sqc.quant.kmeans import fit_rows
from sqc.quant.sparse import sparse_mask
from sqc.runtime.layout import PackedLinear, pack_codes
from sqc.runtime.ops import lut_linear_reference


def make_packed(w: torch.Tensor, bits: int, pct: float = 1.0, table_dtype=torch.float16) -> PackedLinear:
    mask = sparse_mask(w, None, pct, 0.0)
    res = fit_rows(w.float().numpy(), None, (~mask).numpy(), bits, iters=8)
    lut = torch.from_numpy(res.centroids).to(table_dtype)
    codes = assign_codes(w, lut)
    crow, col, val = to_csr(w, mask)
    return PackedLinear(bits, w.shape[1], w.shape[0], pack_codes(codes, bits), lut, crow, col, val)


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 5, 8]),
    rows=st.sampled_from([1, 3, 53]),
    cols=st.sampled_from([1, 33, 100]),
    wdtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 10_000),
)
def test_identity_reproduces_w_hat_and_sparse_is_exact(bits, rows, cols, wdtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * 0.05).to(wdtype)
    p = make_packed(w, bits, pct=2.0)
    w_hat = p.dequantize(torch.float32)
    y = lut_linear_reference(torch.eye(cols), p.codes, p.lut, p.crow, p.col, p.val, None, bits, cols)
    assert torch.equal(y.T, w_hat)
    rows_i, cols_i = p.sparse_coo()
    assert torch.equal(w_hat[rows_i, cols_i], w.float()[rows_i, cols_i])
    assert p.val.dtype == wdtype  # exact in the weight's own dtype
    # non-sparse entries are table entries of their row
    lut = p.lut.float()
    member = (w_hat.unsqueeze(-1) == lut.unsqueeze(1)).any(-1)
    member[rows_i, cols_i] = True
    assert member.all()


@pytest.mark.parametrize("batch", [(1,), (2,), (7,), (2, 5)])
@pytest.mark.parametrize("rows,cols", [(1, 33), (3, 100), (53, 576)])
def test_matches_float64_linear(batch, rows, cols):
    torch.manual_seed(rows * cols)
    w = torch.randn(rows, cols) * 0.02
    bias = torch.randn(rows)
    p = make_packed(w, 3)
    x = torch.randn(*batch, cols)
    y = lut_linear_reference(x, p.codes, p.lut, p.crow, p.col, p.val, bias, 3, cols)
    ref = torch.nn.functional.linear(x.double(), p.dequantize(torch.float64), bias.double())
    assert y.shape == (*batch, rows)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    # the registered op runs the same reference
    y2 = torch.ops.sqc.lut_linear(x, p.codes, p.lut, p.crow, p.col, p.val, bias, 3, cols)
    assert torch.equal(y, y2)


def test_fake_impl_checks_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = torch.randn(4, 40)
    p = make_packed(w, 4)
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(t) for t in (p.codes, p.lut, p.crow, p.col, p.val)]
        out = torch.ops.sqc.lut_linear(mode.from_tensor(torch.randn(2, 3, 40)), *args, None, 4, 40)
        assert out.shape == (2, 3, 4)
        with pytest.raises(ValueError, match="expects 40"):
            torch.ops.sqc.lut_linear(mode.from_tensor(torch.randn(2, 41)), *args, None, 4, 40)
        with pytest.raises(ValueError, match="codes must be int32"):
            torch.ops.sqc.lut_linear(mode.from_tensor(torch.randn(2, 40)), *args, None, 3, 40)


def test_bad_bias_shape():
    p = make_packed(torch.randn(4, 40), 4)
    with pytest.raises(ValueError, match="bias must have shape"):
        lut_linear_reference(torch.randn(1, 40), p.codes, p.lut, p.crow, p.col, p.val, torch.zeros(5), 4, 40)
