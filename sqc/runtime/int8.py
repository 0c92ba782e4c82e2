"""``Int8Linear``: the compact output projection (``lm_head``), int8 weights with one fp32 scale per row.

Storage: ``qweight`` int8 ``[R, K]`` with ``q = round(w / s)`` and ``s = max|w_row| / 127`` (a zero row
has ``s = 1``), ``scale`` fp32 ``[R]``, ``bias`` (or none). The semantics are
:func:`sqc.runtime.ops.int8_linear_reference`; batch 1 runs the generated ``i8gemv`` kernel through the
``sqc::int8_linear_cpu`` op (the weights are read once, at one byte each, a quarter of fp32), larger batches
(prefill) de-quantize row blocks and call ``F.linear`` (the GEMM is compute-bound there; the block bound
keeps the temporary small).

On SmolLM2-135M this format moved the tutorial-text perplexity by +0.006 % against fp32 (4-bit per-row
tables: +45 %), which is why it is the default head format.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .cpu.ops import int8_linear_cpu
from .kernels import register_kernels
from .ops import int8_linear
from .qlinear import apply_keeping_dtypes
from .status import REFERENCE, KernelStatus

__all__ = ["Int8Linear", "Int8Kernels", "quantize_int8_rows"]

#: rows de-quantized at a time for batches above 1: a block of SmolLM2's head (512 x 576 fp32, 1.2 MB) stays in
#: cache between its de-quantization and its GEMM (8192-row blocks, 19 MB, did not: 279 against 233 ms for a
#: 512-token prompt, fp32 F.linear 294 ms)
ROW_BLOCK = 512


def quantize_int8_rows(weight: torch.Tensor, block_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 q, fp32 scale) with ``weight ≈ q * scale[:, None]``, symmetric per row. Blocks of
    ``block_rows`` rows keep the fp32 temporaries small (a vocabulary-sized head is 100s of MB)."""
    R = weight.shape[0]
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(R, dtype=torch.float32)
    for r0 in range(0, R, block_rows):
        w = weight[r0 : r0 + block_rows].detach().to(torch.float32)
        s = w.abs().amax(dim=1) / 127.0
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[r0 : r0 + block_rows] = torch.round(w / s[:, None]).clamp_(-127, 127)
        scale[r0 : r0 + block_rows] = s
    return q, scale


class Int8Kernels:
    """The generated batch-1 kernel of one :class:`Int8Linear` (``fn(x, q, scale, bias, y)``)."""

    def __init__(self, fn: Callable, out_features: int, in_features: int, name: str) -> None:
        self.fn = fn
        self.out_features = out_features
        self.in_features = in_features
        self.name = name

    def run(self, x, qweight, scale, bias) -> torch.Tensor:
        K = self.in_features
        if x.shape[-1] != K:
            raise ValueError(f"layer '{self.name}' expects inputs with {K} features in the last dim, got shape "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"layer '{self.name}' takes floating-point inputs, got {x.dtype}; cast x first")
        if x.numel() != K:
            return _blocked_linear(x, qweight, scale, bias)
        xv = x.reshape(K)
        if xv.dtype != torch.float32 or xv.stride(0) != 1:
            xv = xv.to(torch.float32).contiguous()
        y = torch.empty(self.out_features, dtype=torch.float32)
        self.fn(xv, qweight, scale, bias, y)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


def _blocked_linear(x, qweight, scale, bias) -> torch.Tensor:
    R, K = qweight.shape
    x2 = x.reshape(-1, K)
    y = torch.empty((x2.shape[0], R), dtype=x.dtype)
    wbuf = torch.empty((min(R, ROW_BLOCK), K), dtype=x.dtype)  # one de-quantized block, reused
    sc = scale.to(x.dtype)[:, None]
    bx = None if bias is None else bias.to(x.dtype)
    for a in range(0, R, ROW_BLOCK):
        b = min(R, a + ROW_BLOCK)
        w = wbuf[: b - a]
        torch.mul(qweight[a:b], sc[a:b], out=w)
        y[:, a:b] = torch.nn.functional.linear(x2, w, None if bx is None else bx[a:b])
    return y.view(*x.shape[:-1], R)


class Int8Linear(nn.Module):
    """A linear layer with int8 per-row weights; ``kernel`` names what runs (as :class:`SqcLinear`)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 status: KernelStatus = REFERENCE) -> None:
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.ndim != 2 or scale.shape != (qweight.shape[0],):
            raise ValueError(f"Int8Linear needs int8 [rows, in] weights and [rows] scales, got {qweight.dtype} "
                             f"{tuple(qweight.shape)} and {tuple(scale.shape)}")
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.to(torch.float32))
        if bias is not None:
            self.register_buffer("bias", bias.detach())
        else:
            self.bias = None
        self.status = status  # what the forward pass runs (a KernelStatus)
        self._kernels = None
        self._args = None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        q, s = quantize_int8_rows(weight)
        return cls(q, s, None if bias is None else bias.detach().clone())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.to(dtype) * self.scale.to(dtype)[:, None]

    def resident_bytes(self) -> int:
        return sum(t.nbytes for t in (self.qweight, self.scale))

    @property
    def kernel(self) -> str:
        """What runs, as reports show it (``str(self.status)``)."""
        return str(self.status)

    def set_kernel(self, kernels: Int8Kernels | None, status: KernelStatus) -> None:
        self.status = status.check(kernels)
        self._kernels = kernels
        self._bind()

    def _bind(self) -> None:
        k = self.__dict__.get("_kernels")
        if k is None:
            self.__dict__["_args"] = None
            return
        b = self._buffers.get("bias")
        b = torch.zeros(self.out_features) if b is None else b.to(torch.float32).contiguous()
        q = self._buffers["qweight"]
        register_kernels(k, q)  # the op finds the kernels through the weights it is called with
        self.__dict__["_args"] = (q, self._buffers["scale"], b)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._bind()

    def _apply(self, fn, recurse: bool = True):
        # the int8 weights and fp32 scales are a storage format: dtype casts leave them, device moves apply
        apply_keeping_dtypes(self, fn)
        self._bind()
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._bind()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = self._args
        if args is not None and not (x.requires_grad and torch.is_grad_enabled()):
            return int8_linear_cpu(x, *args)
        return int8_linear(x, self.qweight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row, "
                f"bias={self.bias is not None}, kernel={self.kernel}")
