"""The generated CUDA kernels as a ``torch.library`` op: ``sqc::lut_linear_cuda``.

``sqc::lut_linear_cuda(x, words, lut, crow, col, val, scode, bias)`` runs one layer's generated CUDA kernels
(:class:`sqc.runtime.cuda.kernels.CudaLutKernels`): the tensors are the layer's (codes in the chunk layout, its
table and sparse part, the code under each sparse entry, its fp16 bias) and the result has x's dtype. Like the
CPU op, it finds the layer's kernels through the codes it is given (:func:`sqc.runtime.kernels.kernels_of`),
so a graph traced around it holds no process-specific constant. Its fake implementation lets
``torch.compile`` / ``torch.export`` trace a CUDA model (on meta or fake tensors too) with one opaque op per
layer; Inductor calls it as an extern kernel, and its launches go on torch's current stream, so a captured
CUDA graph holds them.

The CUDA implementation launches the kernels; the CPU one only explains that a layer compiled for a GPU does
not run on the CPU (the model or its inputs were not moved).
"""
from __future__ import annotations

import torch

from ..kernels import define_lut_linear_op, kernels_of

__all__ = ["lut_linear_cuda"]

_LIB = torch.library.Library("sqc", "FRAGMENT")


def _lut_linear_cuda(x, words, lut, crow, col, val, scode, bias):
    return kernels_of(words, "lut_linear_cuda").run(x, words, lut, crow, col, val, scode, bias)


def _not_on_a_gpu(x, words, lut, crow, col, val, scode, bias):
    kernels_of(words, "lut_linear_cuda").not_on_a_gpu(x)


lut_linear_cuda = define_lut_linear_op(_LIB, "lut_linear_cuda", {"CUDA": _lut_linear_cuda, "CPU": _not_on_a_gpu})
