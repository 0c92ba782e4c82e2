"""The ``sqc::lut_linear`` op: its reference implementation defines sqc's semantics.

``y = x @ W_hat.T + bias`` with ``W_hat`` built from the packed layout as
documented in :mod:`sqc.runtime.layout`. Every generated kernel is tested
against :func:`lut_linear_reference`. The fake (meta) implementation checks
shapes and dtypes so that tracing a lowered graph fails at the boundary with
a message that names the problem.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from .layout import dequantize, words_per_row

__all__ = ["lut_linear", "lut_linear_reference", "check_lut_linear_args", "lut_linear_cpu", "register_kernels",
           "int8_linear", "int8_linear_reference", "int8_linear_cpu"]

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



# -- the generated kernels as one op per layer call ----------------------------------------------------------
#
# ``sqc::lut_linear_cpu(x, words, lut, crow, col, val, scode, bias)`` runs a layer's generated CPU kernels: the
# tensors are the layer's (codes in the CPU lane layout, its table and sparse part, its fp32 bias). The kernels
# are found through the tensor that holds the layer's codes (``words``; ``qweight`` for the int8 op): each
# layer's kernels are bound to that tensor's memory (:func:`register_kernels`), so a traced graph holds no
# process-specific constant. The same graph, stored with the artifact (:mod:`sqc.runtime.stepstore`), runs
# the kernels of whichever process restores it. The op is declared with ``torch.library`` and a fake
# implementation, so ``torch.compile`` and ``torch.export`` see one opaque op per layer; its implementation is
# registered for the CPU dispatch key only (no autograd wrapper on the hot path:
# :class:`sqc.runtime.qlinear.SqcLinear` routes gradients itself).

_LIB = torch.library.Library("sqc", "FRAGMENT")
_LIB.define("lut_linear_cpu(Tensor x, Tensor words, Tensor lut, Tensor crow, Tensor col, Tensor val, "
            "Tensor scode, Tensor bias) -> Tensor")
#: the address of a layer's code tensor -> (its kernels, weakly)
_KERNELS: dict[int, weakref.ref] = {}


def register_kernels(kernels, key: torch.Tensor) -> None:
    """Bind ``kernels`` (an object with ``run(x, <the op's tensors>)``) to ``key``, the tensor its op calls pass
    as the layer's codes. The registry holds the kernels weakly, so a dropped layer frees them; binding them to
    new codes (a reload, a copy) leaves the old address unbound."""
    ptr = key.data_ptr()
    if ptr == 0:
        raise ValueError("sqc: kernels must be bound to a non-empty code tensor")

    def gone(ref, ptr=ptr):
        if _KERNELS.get(ptr) is ref:
            del _KERNELS[ptr]

    kernels._key = ptr
    _KERNELS[ptr] = weakref.ref(kernels, gone)


def _kernels_of(key: torch.Tensor, op: str):
    ptr = key.data_ptr()
    ref = _KERNELS.get(ptr)
    k = None if ref is None else ref()
    if k is None or k._key != ptr:
        raise RuntimeError(f"sqc::{op}: no kernels are bound to these codes in this process (the layer that owned "
                           "them was freed or rebound); call the model's own layers")
    return k


def _lut_linear_cpu(x, words, lut, crow, col, val, scode, bias):
    return _kernels_of(words, "lut_linear_cpu").run(x, words, lut, crow, col, val, scode, bias)


_LIB.impl("lut_linear_cpu", _lut_linear_cpu, "CPU")


@torch.library.register_fake("sqc::lut_linear_cpu")
def _(x, words, lut, crow, col, val, scode, bias):
    if not x.is_floating_point():
        raise ValueError(f"sqc::lut_linear_cpu: x must be floating point, got {x.dtype}")
    return x.new_empty((*x.shape[:-1], lut.shape[0]))


lut_linear_cpu = torch.ops.sqc.lut_linear_cpu.default


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


_LIB.define("int8_linear_cpu(Tensor x, Tensor qweight, Tensor scale, Tensor bias) -> Tensor")


def _int8_linear_cpu(x, qweight, scale, bias):
    return _kernels_of(qweight, "int8_linear_cpu").run(x, qweight, scale, bias)


_LIB.impl("int8_linear_cpu", _int8_linear_cpu, "CPU")


@torch.library.register_fake("sqc::int8_linear_cpu")
def _(x, qweight, scale, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


int8_linear_cpu = torch.ops.sqc.int8_linear_cpu.default


def _int8_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1], inputs[2])


def _int8_backward(ctx, grad_y):
    q, s = ctx.saved_tensors
    return grad_y @ (q.to(grad_y.dtype) * s.to(grad_y.dtype)[:, None]), None, None, None


int8_linear.register_autograd(_int8_backward, setup_context=_int8_setup)
