"""``SqcLinear``: the drop-in module that replaces an ``nn.Linear`` after compilation."""
from __future__ import annotations

import torch
from torch import nn

from . import ops  # noqa: F401  (registers torch.ops.sqc.lut_linear)
from .layout import PackedLinear, dequantize
from .status import REFERENCE, KernelStatus

__all__ = ["SqcLinear", "apply_keeping_dtypes"]


def apply_keeping_dtypes(module: nn.Module, fn) -> None:
    """``module._apply(fn)`` for a packed layer's buffers: device moves apply, dtype casts do not (the buffers
    are a storage format: fp16 tables, int8 weights, exact sparse values)."""
    for name, buf in list(module._buffers.items()):
        if buf is None:
            continue
        new = fn(buf)
        if new.dtype != buf.dtype:
            new = buf.to(device=new.device)
        module._buffers[name] = new


class _KernelGrad(torch.autograd.Function):
    """Generated kernels forward, ``dL/dx = dL/dy @ W_hat`` backward (the packed weight is frozen), so an
    upstream trainable parameter still gets its gradient."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return module._kernels(x, module.lut, module.crow, module.col, module.val, module.bias)

    @staticmethod
    def backward(ctx, grad_y):
        m = ctx.module
        w = dequantize(m.codes, m.lut, m.crow, m.col, m.val, m.bits, m.in_features, dtype=grad_y.dtype)
        return grad_y @ w, None


class SqcLinear(nn.Module):
    """A linear layer whose weight is a packed dense-and-sparse codebook.

    Buffers: ``codes``, ``lut``, ``crow``, ``col``, ``val`` (see
    :mod:`sqc.runtime.layout`) and ``bias`` (or none). ``status`` (a
    :class:`~sqc.runtime.status.KernelStatus`) says what the forward pass runs:
    a generated kernel, or the plain PyTorch reference op and why; ``kernel``
    is its display text.

    Once generated kernels are attached (:meth:`set_kernel`), the canonical
    ``codes`` buffer is dropped: the kernels hold the codes in their own
    layout, and ``codes`` / ``state_dict()`` rebuild the canonical words on
    demand, so saving stays lossless while memory holds one copy.
    """

    def __init__(self, packed: PackedLinear, bias: torch.Tensor | None, status: KernelStatus = REFERENCE):
        super().__init__()
        self.bits = packed.bits
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.status = status
        for name in PackedLinear.TENSORS:
            self.register_buffer(name, getattr(packed, name))
        if bias is not None:
            self.register_buffer("bias", bias.detach())
        else:
            self.bias = None
        self._kernels = None
        self._op = None
        self._args = None

    def _bind(self) -> None:
        """Bind the kernels' op and its arguments once (after attach, a load or a move): the forward pass then
        reads them from the instance dict instead of six buffers through ``nn.Module.__getattr__``. The op is
        the kernels' (``sqc::lut_linear_cpu`` or ``sqc::lut_linear_cuda``)."""
        k = self.__dict__.get("_kernels")
        bind = getattr(k, "bind", None)
        self.__dict__["_op"] = getattr(k, "op", None)
        self.__dict__["_args"] = None if bind is None else bind(
            self._buffers["lut"], self._buffers["crow"], self._buffers["col"], self._buffers["val"],
            self._buffers.get("bias"))

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._bind()  # a copy's kernels have their own handle and tensors

    @property
    def status(self) -> KernelStatus:
        """What the forward pass runs; a fused member runs its group's layer, so it reports that layer's."""
        member = getattr(self.__dict__.get("_kernels"), "member_status", None)
        return member if member is not None else self.__dict__["_status"]

    @status.setter
    def status(self, status: KernelStatus) -> None:
        if not isinstance(status, KernelStatus):
            raise TypeError(f"a layer's status is a KernelStatus, got {type(status).__name__}")
        self.__dict__["_status"] = status

    @property
    def kernel(self) -> str:
        """What runs, as reports show it (``str(self.status)``)."""
        return str(self.status)

    def set_kernel(self, kernels, status: KernelStatus | None = None) -> None:
        """Run ``kernels`` (or the reference op when None); ``status`` says which and why (a fused member's
        kernels carry their own)."""
        if status is None:
            if not hasattr(kernels, "member_status"):
                raise ValueError("set_kernel needs a KernelStatus for these kernels")
            status = self.__dict__.get("_status", REFERENCE)
        else:
            status.check(kernels)
        if kernels is None and self._kernels is not None:
            codes = self._kernels.canonical_codes()
            self._kernels = None
            self.register_buffer("codes", codes)
        self._kernels = kernels
        self.status = status
        if kernels is not None and "codes" in self._buffers:
            del self._buffers["codes"]
        self._bind()

    def _apply(self, fn, recurse: bool = True):
        # The buffers are a storage format (fp16 tables, exact sparse values): ``.half()``, ``.float()``,
        # ``.to(dtype)`` must not round them (the kernels take one table dtype and would fail, or worse).
        # Device moves apply; dtype casts are ignored here, and the layer then runs on inputs of the new
        # activation dtype, returning outputs in it.
        apply_keeping_dtypes(self, fn)
        apply = getattr(self.__dict__.get("_kernels"), "apply", None)
        if apply is not None:  # CUDA kernels hold their code words; they follow .to()/.cuda()
            apply(fn)
        self._bind()
        return self

    def __getattr__(self, name: str):
        if name == "codes" and self.__dict__.get("_kernels") is not None:
            return self.__dict__["_kernels"].canonical_codes()
        return super().__getattr__(name)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the sparse part's length differs between two fits of the same layer: col / val are taken as
        # they come (the other shapes are fixed by the layer and checked by torch)
        for name in ("col", "val"):
            t = state_dict.get(prefix + name)
            if isinstance(t, torch.Tensor) and t.shape != self._buffers[name].shape:
                self._buffers[name] = torch.empty_like(t, device=self._buffers[name].device)
        kernels = self.__dict__.get("_kernels")
        if kernels is not None:
            # the codes live in the kernels' layout: load through a canonical buffer, then rebind the
            # kernels to what was loaded, so codes and tables always come from the same source
            self._buffers["codes"] = kernels.canonical_codes()
        try:
            n_errors = len(error_msgs)
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            if len(error_msgs) == n_errors:
                try:
                    packed = PackedLinear(self.bits, self.in_features, self.out_features, self._buffers["codes"],
                                          self.lut, self.crow, self.col, self.val)
                except ValueError as e:
                    error_msgs.append(f"{prefix[:-1] or 'layer'}: the loaded tensors do not form one packed weight "
                                      f"({e}); load a whole state_dict of a model compiled the same way")
                else:
                    if kernels is not None:
                        kernels.rebind(packed, self.bias)
        finally:
            if kernels is not None:
                del self._buffers["codes"]
            self._bind()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._kernels is not None:
            destination[prefix + "codes"] = self._kernels.canonical_codes()

    def resident_bytes(self) -> int:
        """Bytes of weight data this layer holds in memory (codes in whatever layout, tables, sparse)."""
        total = sum(getattr(self, n).nbytes for n in ("lut", "crow", "col", "val"))
        total += self._kernels.nbytes() if self._kernels is not None else self.codes.nbytes
        return total

    @property
    def packed(self) -> PackedLinear:
        return PackedLinear(
            self.bits, self.in_features, self.out_features,
            self.codes, self.lut, self.crow, self.col, self.val,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = self._args
        if args is not None:  # generated kernels with bound arguments: one op call
            if x.requires_grad and torch.is_grad_enabled():
                return _KernelGrad.apply(x, self)
            return self._op(x, *args)
        if self._kernels is not None:
            if x.requires_grad and torch.is_grad_enabled():
                return _KernelGrad.apply(x, self)
            return self._kernels(x, self.lut, self.crow, self.col, self.val, self.bias)
        return torch.ops.sqc.lut_linear(
            x, self.codes, self.lut, self.crow, self.col, self.val, self.bias, self.bits, self.in_features
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"nnz={self.col.numel()}, bias={self.bias is not None}, kernel={self.kernel}"
        )
