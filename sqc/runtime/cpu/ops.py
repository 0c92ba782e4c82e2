"""The generated CPU kernels as ``torch.library`` ops: ``sqc::lut_linear_cpu`` and ``sqc::int8_linear_cpu``.

Each call of a layer with generated CPU kernels is one call of one of these ops; their semantics are the
reference ops' (:mod:`sqc.runtime.ops`), which every kernel is tested against.
"""
from __future__ import annotations

import weakref

import torch

__all__ = ["lut_linear_cpu", "int8_linear_cpu", "register_kernels"]

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


# -- the int8 output projection's kernels ------------------------------------------------------------------------

_LIB.define("int8_linear_cpu(Tensor x, Tensor qweight, Tensor scale, Tensor bias) -> Tensor")


def _int8_linear_cpu(x, qweight, scale, bias):
    return _kernels_of(qweight, "int8_linear_cpu").run(x, qweight, scale, bias)


_LIB.impl("int8_linear_cpu", _int8_linear_cpu, "CPU")


@torch.library.register_fake("sqc::int8_linear_cpu")
def _(x, qweight, scale, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


int8_linear_cpu = torch.ops.sqc.int8_linear_cpu.default
