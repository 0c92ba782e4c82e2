"""Inputs a layer cannot take are refused at the call, as nn.Linear refuses them (never a silent result)."""
import pytest
import torch

import sqc

from tests.conftest import ops_called


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    return sqc.compile(mlp, (torch.randn(3, 64),), config="w3")


@pytest.mark.slow
@pytest.mark.parametrize("width", [63, 100, 128, 129])
@pytest.mark.parametrize("batch", [1, 5])
def test_wrong_input_width_is_refused(compiled, width, batch):
    # the CPU kernels pad x to 64 columns; widths up to the padding used to pass silently
    with pytest.raises(ValueError, match="64 features"):
        compiled(torch.randn(batch, width))


def test_generated_kernels_are_what_ran(compiled):
    if not all(m.status.generated for m in compiled.quantized_modules().values()):
        pytest.skip(f"no generated CPU kernels here: {[m.kernel for m in compiled.quantized_modules().values()]}")
    x = torch.randn(2, 64)
    # the layers dispatch to the generated kernels' op, never to the reference op ...
    assert ops_called(compiled, x) == {"lut_linear_cpu"}
    # ... and a model whose layers report the reference op dispatches to it
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    plain = sqc.compile(mlp, (torch.randn(3, 64),), config="w3", kernels=False)
    assert not any(m.status.generated for m in plain.quantized_modules().values())
    assert ops_called(plain, x) == {"lut_linear"}
    torch.testing.assert_close(compiled(x), plain(x), rtol=1e-5, atol=1e-5)


def test_integer_input_is_refused(compiled):
    with pytest.raises((TypeError, ValueError), match="floating"):
        compiled(torch.randint(0, 5, (2, 64)))


def test_table_beyond_fp16_range_is_an_error_naming_the_layer():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with torch.no_grad():
        mlp[2].weight[1] = torch.linspace(7e4, 9e4, 8)  # a whole row beyond 65504: no centroid fits fp16
    with pytest.raises(ValueError, match=r"layer 2: row 1 needs a table entry .* beyond float16's range"):
        sqc.compile(mlp, (torch.randn(2, 16),), config="w3", kernels=False)
    ok = sqc.compile(mlp, (torch.randn(2, 16),), config=sqc.QuantConfig(bits=3, table_dtype="float32"), kernels=False)
    assert torch.isfinite(ok(torch.randn(2, 16))).all()


@pytest.mark.slow
@pytest.mark.parametrize("cast", ["half", "bfloat16", "double", "to_fp16", "float"])
def test_casting_the_model_keeps_the_packed_format_and_follows_the_activation_dtype(cast):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    c = sqc.compile(mlp, (torch.randn(3, 64),), config="w3")
    x = torch.randn(3, 64)
    ref = c(x)
    dtype = {"half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64, "to_fp16": torch.float16,
             "float": torch.float32}[cast]
    c = c.to(torch.float16) if cast == "to_fp16" else getattr(c, cast)()
    for m in c.quantized_modules().values():
        assert m.lut.dtype == torch.float16 and m.val.dtype == torch.float32
    y = c(x.to(dtype))
    assert y.dtype == dtype
    tol = {torch.float16: 2e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", [True, False])
def test_gradients_flow_through_quantized_layers_to_upstream_parameters(kernels):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    c = sqc.compile(mlp, (torch.randn(3, 64),), config="w4", kernels=kernels)
    x = torch.randn(3, 64, requires_grad=True)
    y = c(x)
    assert y.requires_grad
    y.pow(2).sum().backward()
    # the reference: the same network with the de-quantized weights as plain float64 linears
    xr = x.detach().double().requires_grad_()
    h = xr
    for m in c.model:
        if isinstance(m, torch.nn.ReLU):
            h = torch.relu(h)
        else:
            p = m.packed
            from sqc.runtime.layout import dequantize

            w = dequantize(p.codes, p.lut, p.crow, p.col, p.val, p.bits, p.in_features, dtype=torch.float64)
            h = torch.nn.functional.linear(h, w, None if m.bias is None else m.bias.double())
    h.pow(2).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-3, atol=1e-4)
