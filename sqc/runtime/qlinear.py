"""``SqcLinear``: the drop-in module that replaces an ``nn.Linear`` after compilation."""
from __future__ import annotations

import torch
from torch import nn

from . import ops  # noqa: F401  (registers torch.ops.sqc.lut_linear)
from .layout import PackedLinear

__all__ = ["SqcLinear"]


class SqcLinear(nn.Module):
    """A linear layer whose weight is a packed dense-and-sparse codebook.

    Buffers: ``codes``, ``lut``, ``crow``, ``col``, ``val`` (see
    :mod:`sqc.runtime.layout`) and ``bias`` (or none). ``kernel`` names the
    implementation the forward pass runs; ``"reference"`` is the plain
    PyTorch op, ``"reference (why)"`` says why no generated kernel runs.

    Once generated kernels are attached (:meth:`set_kernel`), the canonical
    ``codes`` buffer is dropped: the kernels hold the codes in their own
    layout, and ``codes`` / ``state_dict()`` rebuild the canonical words on
    demand, so saving stays lossless while memory holds one copy.
    """

    def __init__(self, packed: PackedLinear, bias: torch.Tensor | None, kernel: str = "reference"):
        super().__init__()
        self.bits = packed.bits
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.kernel = kernel
        for name in PackedLinear.TENSORS:
            self.register_buffer(name, getattr(packed, name))
        if bias is not None:
            self.register_buffer("bias", bias.detach())
        else:
            self.bias = None
        self._kernels = None

    def set_kernel(self, kernels, name: str) -> None:
        """Run ``kernels`` (or the reference op when None); ``name`` is what reports show."""
        if kernels is None and self._kernels is not None:
            codes = self._kernels.canonical_codes()
            self._kernels = None
            self.register_buffer("codes", codes)
        self._kernels = kernels
        self.kernel = name
        if kernels is not None and "codes" in self._buffers:
            del self._buffers["codes"]

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        apply = getattr(self.__dict__.get("_kernels"), "apply", None)
        if apply is not None:  # CUDA kernels hold their code words; they follow .to()/.cuda()
            apply(fn)
        return self

    def __getattr__(self, name: str):
        if name == "codes" and self.__dict__.get("_kernels") is not None:
            return self.__dict__["_kernels"].canonical_codes()
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._kernels is not None:
            destination[prefix + "codes"] = self._kernels.canonical_codes()

    def resident_bytes(self) -> int:
        """Bytes of weight data this layer holds in memory (codes in whatever layout, tables, sparse)."""
        nb = lambda t: t.numel() * t.element_size()  # noqa: E731
        total = sum(nb(getattr(self, n)) for n in ("lut", "crow", "col", "val"))
        total += self._kernels.nbytes() if self._kernels is not None else nb(self.codes)
        return total

    @property
    def packed(self) -> PackedLinear:
        return PackedLinear(
            self.bits, self.in_features, self.out_features,
            self.codes, self.lut, self.crow, self.col, self.val,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernels is not None:
            return self._kernels(x, self.lut, self.crow, self.col, self.val, self.bias)
        return torch.ops.sqc.lut_linear(
            x, self.codes, self.lut, self.crow, self.col, self.val, self.bias, self.bits, self.in_features
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"nnz={self.col.numel()}, bias={self.bias is not None}, kernel={self.kernel}"
        )
