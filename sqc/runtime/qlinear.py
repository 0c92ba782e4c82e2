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
    PyTorch op.
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

    @property
    def packed(self) -> PackedLinear:
        return PackedLinear(
            self.bits, self.in_features, self.out_features,
            self.codes, self.lut, self.crow, self.col, self.val,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.sqc.lut_linear(
            x, self.codes, self.lut, self.crow, self.col, self.val, self.bias, self.bits, self.in_features
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"nnz={self.col.numel()}, bias={self.bias is not None}, kernel={self.kernel}"
        )
