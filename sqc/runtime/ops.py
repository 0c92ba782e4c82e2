"""The ``sqc::lut_linear`` op: its reference implementation defines sqc's semantics.

``y = x @ W_hat.T + bias`` with ``W_hat`` built from the packed layout as
documented in :mod:`sqc.runtime.layout`. Every generated kernel is tested
against :func:`lut_linear_reference`. The fake (meta) implementation checks
shapes and dtypes so that tracing a lowered graph fails at the boundary with
a message that names the problem.
"""
from __future__ import annotations

from typing import Optional

import torch

from .layout import dequantize, words_per_row

__all__ = ["lut_linear", "lut_linear_reference", "check_lut_linear_args", "int8_linear", "int8_linear_reference"]

_INDEX_DTYPES = (torch.uint8, torch.int16, torch.int32)


def check_lut_linear_args(x, codes, lut, crow, col, val, bias, bits, in_features) -> int:
    """Validate the op's arguments; return out_features. Raises ValueError naming the problem."""
    if not 2 <= bits <= 8:
        raise ValueError(f"sqc::lut_linear: bits must be in 2..8, got {bits}")
    if not x.is_floating_point():
        raise ValueError(f"sqc::lut_linear: x must be floating point, got {x.dtype}")
    if x.shape[-1] != in_features:
        raise ValueError(
            f"sqc::lut_linear: x has {x.shape[-1]} features in its last dim, the layer expects {in_features}"
        )
    R = lut.shape[0]
    if codes.dtype != torch.int32 or codes.ndim != 2 or codes.shape[0] != R or codes.shape[1] != words_per_row(in_features, bits):
        raise ValueError(
            f"sqc::lut_linear: codes must be int32 [{R}, {words_per_row(in_features, bits)}], "
            f"got {codes.dtype} {tuple(codes.shape)}"
        )
    if not lut.is_floating_point() or lut.ndim != 2 or lut.shape[1] != 1 << bits:
        raise ValueError(f"sqc::lut_linear: lut must be float [rows, {1 << bits}], got {lut.dtype} {tuple(lut.shape)}")
    if crow.dtype != torch.int32 or crow.shape != (R + 1,):
        raise ValueError(f"sqc::lut_linear: crow must be int32 [{R + 1}], got {crow.dtype} {tuple(crow.shape)}")
    if col.dtype not in _INDEX_DTYPES or col.ndim != 1 or val.shape != col.shape or not val.is_floating_point():
        raise ValueError(
            f"sqc::lut_linear: col/val must be 1-D of equal length (col uint8/int16/int32, val float), "
            f"got col {col.dtype} {tuple(col.shape)}, val {val.dtype} {tuple(val.shape)}"
        )
    if bias is not None and bias.shape != (R,):
        raise ValueError(f"sqc::lut_linear: bias must have shape [{R}], got {tuple(bias.shape)}")
    return R


def lut_linear_reference(x, codes, lut, crow, col, val, bias, bits: int, in_features: int) -> torch.Tensor:
    """Plain-PyTorch semantics: de-quantize ``W_hat`` in x's dtype, then ``F.linear``."""
    check_lut_linear_args(x, codes, lut, crow, col, val, bias, bits, in_features)
    w = dequantize(codes, lut, crow, col, val, bits, in_features, dtype=x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    return torch.nn.functional.linear(x, w, b)


@torch.library.custom_op("sqc::lut_linear", mutates_args=())
def lut_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    lut: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    val: torch.Tensor,
    bias: Optional[torch.Tensor],
    bits: int,
    in_features: int,
) -> torch.Tensor:
    return lut_linear_reference(x, codes, lut, crow, col, val, bias, bits, in_features)


@lut_linear.register_fake
def _(x, codes, lut, crow, col, val, bias, bits, in_features):
    R = check_lut_linear_args(x, codes, lut, crow, col, val, bias, bits, in_features)
    return x.new_empty((*x.shape[:-1], R))


def _setup_context(ctx, inputs, output) -> None:
    x, codes, lut, crow, col, val, bias, bits, in_features = inputs
    ctx.save_for_backward(codes, lut, crow, col, val)
    ctx.bits, ctx.in_features = bits, in_features


def _backward(ctx, grad_y):
    # the packed weight is frozen: gradients flow to x only (dy/dx = W_hat)
    codes, lut, crow, col, val = ctx.saved_tensors
    w = dequantize(codes, lut, crow, col, val, ctx.bits, ctx.in_features, dtype=grad_y.dtype)
    return grad_y @ w, None, None, None, None, None, None, None, None


lut_linear.register_autograd(_backward, setup_context=_setup_context)



# -- the compact output projection: int8 weights, one fp32 scale per row -------------------------------------


def int8_linear_reference(x, qweight, scale, bias) -> torch.Tensor:
    """``y = x @ (q * s[:, None]).T + bias`` in x's dtype: the semantics of the int8 head kernels."""
    if not x.is_floating_point():
        raise ValueError(f"sqc::int8_linear: x must be floating point, got {x.dtype}")
    if qweight.dtype != torch.int8 or qweight.ndim != 2 or scale.shape != (qweight.shape[0],):
        raise ValueError(f"sqc::int8_linear: qweight must be int8 [rows, in] and scale [rows], got "
                         f"{qweight.dtype} {tuple(qweight.shape)} and {tuple(scale.shape)}")
    if x.shape[-1] != qweight.shape[1]:
        raise ValueError(f"sqc::int8_linear: x has {x.shape[-1]} features in its last dim, the layer expects "
                         f"{qweight.shape[1]}")
    w = qweight.to(x.dtype) * scale.to(x.dtype)[:, None]
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@torch.library.custom_op("sqc::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return int8_linear_reference(x, qweight, scale, bias)


@int8_linear.register_fake
def _(x, qweight, scale, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _int8_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1], inputs[2])


def _int8_backward(ctx, grad_y):
    q, s = ctx.saved_tensors
    return grad_y @ (q.to(grad_y.dtype) * s.to(grad_y.dtype)[:, None]), None, None, None


int8_linear.register_autograd(_int8_backward, setup_context=_int8_setup)
