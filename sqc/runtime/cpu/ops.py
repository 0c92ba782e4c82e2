"""The generated CPU kernels as ``torch.library`` ops: ``sqc::lut_linear_cpu`` and ``sqc::int8_linear_cpu``.

Each call of a layer with generated CPU kernels is one call of one of these ops; their semantics are the
reference ops' (:mod:`sqc.runtime.ops`), which every kernel is tested against.
"""
from __future__ import annotations

import torch

from ..kernels import define_lut_linear_op, kernels_of

__all__ = ["lut_linear_cpu", "int8_linear_cpu"]

# -- the generated kernels as one op per layer call ----------------------------------------------------------
#
# ``sqc::lut_linear_cpu(x, words, lut, crow, col, val, scode, bias)`` runs a layer's generated CPU kernels: the
# tensors are the layer's (codes in the CPU lane layout, its table and sparse part, its fp32 bias). The kernels
# are found through the tensor that holds the layer's codes (``words``; ``qweight`` for the int8 op): each
# layer's kernels are bound to that tensor's memory (:func:`sqc.runtime.kernels.register_kernels`), so a
# traced graph holds no process-specific constant. The same graph, stored with the artifact
# (:mod:`sqc.runtime.stepstore`), runs the kernels of whichever process restores it. The op is declared with
# ``torch.library`` and a fake implementation (:func:`sqc.runtime.kernels.define_lut_linear_op`), so
# ``torch.compile`` and ``torch.export`` see one opaque op per layer; its implementation is registered for the
# CPU dispatch key only (no autograd wrapper on the hot path:
# :class:`sqc.runtime.qlinear.SqcLinear` routes gradients itself).

_LIB = torch.library.Library("sqc", "FRAGMENT")


def _lut_linear_cpu(x, words, lut, crow, col, val, scode, bias):
    return kernels_of(words, "lut_linear_cpu").run(x, words, lut, crow, col, val, scode, bias)


lut_linear_cpu = define_lut_linear_op(_LIB, "lut_linear_cpu", {"CPU": _lut_linear_cpu})


# -- the int8 output projection's kernels ------------------------------------------------------------------------

_LIB.define("int8_linear_cpu(Tensor x, Tensor qweight, Tensor scale, Tensor bias) -> Tensor")


def _int8_linear_cpu(x, qweight, scale, bias):
    return kernels_of(qweight, "int8_linear_cpu").run(x, qweight, scale, bias)


_LIB.impl("int8_linear_cpu", _int8_linear_cpu, "CPU")


@torch.library.register_fake("sqc::int8_linear_cpu")
def _(x, qweight, scale, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


int8_linear_cpu = torch.ops.sqc.int8_linear_cpu.default
