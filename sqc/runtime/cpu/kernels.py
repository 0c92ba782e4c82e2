"""Running the generated CPU kernels on torch tensors.

:class:`CpuLutKernels` holds one layer's codes in the CPU lane layout (:mod:`sqc.runtime.cpu.lanes`), its
lane words and compiled functions and runs ``y = x @ W_hat.T + b``. Tensors
reach TVM through DLPack without copies; x is copied only when it is not a
contiguous fp32 matrix as wide as the padded layout (the kernels declare
small alignments, so misaligned views are safe as well).

The kernels are built and tuned by :func:`sqc.codegen.tune.attach_cpu_kernels`;
an artifact carries the built libraries and :class:`sqc.runtime.cpu.plan.CpuKernelPlan`
loads them with no compiler.
"""
from __future__ import annotations

from typing import Callable

import torch

from .bytelanes import BYTE_LANES, ByteLayout, byte_tables, from_byte_words, sparse_deltas, to_byte_words
from .lanes import LANES_ISA, KernelKey, LaneLayout, from_lane_words, to_lane_words
from ..layout import PackedLinear, pack_codes
from ..kernels import register_kernels
from .ops import lut_linear_cpu

__all__ = ["CpuLutKernels", "kernel_key", "host_lanes", "cpu_flags"]

_DT = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
       torch.uint8: "uint8", torch.int16: "int16", torch.int32: "int32"}


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags of this machine's CPU (``avx2``, ``avx512f``, ...), read from ``cpuinfo``
    (the flags of the first processor; empty where the file is missing, as off Linux)."""
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def host_lanes(flags: frozenset[str] | None = None) -> int:
    """The widest kernel family this machine's CPU runs: 64 (AVX-512 VBMI and VNNI: the byte kernels), 16
    (AVX-512F), 8 (AVX2) or 0 (none)."""
    flags = cpu_flags() if flags is None else flags
    for lanes in (BYTE_LANES, 16, 8):
        if all(f in flags for f in LANES_ISA[lanes]):
            return lanes
    return 0


def kernel_key(op: str, m, lanes: int) -> KernelKey:
    return KernelKey(op, m.out_features, m.in_features, m.bits, lanes, m.col.numel() > 0,
                     _DT[m.lut.dtype], _DT[m.col.dtype], _DT[m.val.dtype])


class CpuLutKernels:
    """One layer's generated kernels: ``gemv`` for batch 1, ``gemm`` per batch bucket.

    Holds the lane-layout words, the code under each sparse entry and the bias
    in fp32 (zeros for a layer without one: the kernels add it). :meth:`bind`
    takes the module's tables and CSR arrays once and returns the argument
    tuple of the ``sqc::lut_linear_cpu`` op, so a call does no Python work
    beyond the op dispatch: no buffer lookups, no padding copy when K is a
    multiple of the lanes (the kernels stop at K), no separate bias add.

    ``store`` (for example :meth:`sqc.runtime.spill.Spill.put`) takes the lane words and returns
    where they are kept (a file-backed tensor); with one, the canonical codes the layer came with
    are kept as well (they are in the store already), so :meth:`canonical_codes` rebuilds nothing.
    """

    op = lut_linear_cpu

    def __init__(self, packed: PackedLinear, lanes: int, fns: dict[str, Callable], name: str,
                 store: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.lanes = lanes
        self.bits = packed.bits
        self.layout = (ByteLayout(packed.in_features, packed.bits) if lanes == BYTE_LANES
                       else LaneLayout(packed.in_features, packed.bits, lanes))
        # what bind() makes once: the byte kernels' tables (bytes, step, minimum) and sparse corrections
        # (val - lut[scode]), and the compiled functions' arguments between x and y
        self._derived: tuple = ()
        self._bound: tuple = ()
        self.fns = fns  # bucket -> compiled function
        self.out_features = packed.out_features
        self.in_features = packed.in_features
        self.name = name
        self.store = store
        self._canonical: torch.Tensor | None = None
        self._gemv, self._x_ok = None, False  # set by bind(): the search fills ``fns`` of a probe layer later
        self.rebind(packed)

    def __getstate__(self) -> dict:
        # a copy holds its tensors in its own memory: the store (a file of this process) stays behind
        return dict(self.__dict__, store=None)

    def __setstate__(self, state) -> None:
        # a copy (deepcopy, pickle) is a new layer: its kernels are bound to its own words
        self.__dict__.update(state)
        register_kernels(self, self.words)

    def rebind(self, packed: PackedLinear, bias: torch.Tensor | None = None) -> None:
        """Take new codes (``load_state_dict``): the lane words, the codes under the sparse entries, the bias."""
        codes = packed.unpack(torch.uint8)
        words = (to_byte_words(codes, packed.bits) if self.lanes == BYTE_LANES
                 else to_lane_words(codes, packed.bits, self.lanes))
        self.words = words if self.store is None else self.store(words)
        register_kernels(self, self.words)
        self._canonical = None if self.store is None else self.store(packed.codes)
        rows, cols = packed.sparse_coo()
        self.scode = codes[rows, cols].to(torch.uint8).contiguous()
        self.bias = (torch.zeros(self.out_features) if bias is None
                     else bias.detach().to(torch.float32).contiguous())

    def bind(self, lut, crow, col, val, bias) -> tuple:
        """The op's arguments after x: this layer's tensors (its kernels are found through ``words``)."""
        if bias is not None:
            self.bias = bias.detach().to(torch.float32).contiguous()
        # the decode-step fast path of :meth:`run`: the batch-1 kernel, and whether it reads x as it comes
        # (K a multiple of the lanes: no padding copy)
        self._gemv = self.fns.get("1")
        self._x_ok = self._gemv is not None and self.layout.x_width == self.in_features
        # the batch-1 function takes vectors, except the byte kernels' (matrices at every batch)
        self._vec_shapes = ((1, self.in_features), (1, self.out_features)) if self.lanes == BYTE_LANES else (
            (self.in_features,), (self.out_features,))
        self._derived = ()
        self._bound = self.kernel_args(lut, crow, col, val)
        return (self.words, lut, crow, col, val, self.scode, self.bias)

    def kernel_args(self, lut, crow, col, val) -> tuple:
        """The compiled functions' arguments between x and y: the layer's tensors, and for the byte kernels the
        tables as bytes and the sparse part as corrections (made once: kept for the calls after this one)."""
        if self.lanes != BYTE_LANES:
            return (self.words, lut, crow, col, val, self.scode, self.bias)
        if not self._derived:
            self._derived = (*byte_tables(lut), sparse_deltas(lut, crow, val, self.scode))
        tab, step, low, delta = self._derived
        return (self.words, tab, step, low, crow, col, delta, self.bias)

    def kernel_views(self, x2: torch.Tensor, y2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[n, KX]`` and y ``[n, R]`` as the functions take them: the byte kernels take matrices at every
        batch; the others a vector at batch 1."""
        if x2.shape[0] == 1 and self.lanes != BYTE_LANES:
            return x2[0], y2[0]
        return x2, y2

    def canonical_codes(self) -> torch.Tensor:
        return self.canonical_rows(0, self.out_features)

    def canonical_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the codes in the canonical layout (a fused member's part)."""
        if self._canonical is not None:  # kept in the store: a view (no copy, nothing resident)
            return self._canonical[start:stop]
        if self.lanes == BYTE_LANES:  # rows are interleaved in panels: unpack them all, keep the range
            codes = from_byte_words(self.words, self.bits, self.out_features, self.in_features, torch.uint8)[start:stop]
        else:
            codes = from_lane_words(self.words[start:stop], self.bits, self.lanes, stop - start, self.in_features,
                                    torch.uint8)
        return pack_codes(codes, self.bits)

    def nbytes(self) -> int:
        tables = sum(t.nbytes for t in self._derived)
        return self.words.nbytes + self.scode.numel() + tables

    def _x(self, x2: torch.Tensor) -> torch.Tensor:
        kx = self.layout.x_width
        if x2.dtype == torch.float32 and x2.shape[1] == kx and x2.stride(1) == 1 and (x2.shape[0] == 1 or x2.stride(0) == kx):
            return x2
        if kx == x2.shape[1]:
            return x2.to(torch.float32).contiguous()
        xp = torch.zeros((x2.shape[0], kx), dtype=torch.float32)
        xp[:, : x2.shape[1]] = x2
        return xp

    def run(self, x: torch.Tensor, words, lut, crow, col, val, scode, bias) -> torch.Tensor:
        """``y = x @ W_hat.T + bias`` in x's dtype (the op's CPU implementation)."""
        K = self.in_features
        if x.dtype is torch.float32 and x.numel() == K and x.shape[-1] == K and x.stride(-1) == 1 and self._x_ok:
            # a decode step's call (one row of x, as it comes): no reshape, no checks beyond these, one output
            y = torch.empty((*x.shape[:-1], self.out_features), dtype=torch.float32)
            xs, ys = self._vec_shapes
            self._gemv(x.view(xs), *self._bound, y.view(ys))
            return y
        if x.shape[-1] != self.in_features:
            # the padded layout would silently accept widths up to k_pad
            raise ValueError(f"layer '{self.name}' expects inputs with {self.in_features} features in the last "
                             f"dim (like nn.Linear), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"layer '{self.name}' takes floating-point inputs, got {x.dtype}; cast x first")
        if x.device.type != "cpu":
            raise ValueError(f"layer '{self.name}' runs CPU kernels; x is on {x.device} (compile for that target)")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        n = x2.shape[0]
        y = torch.empty((n, self.out_features), dtype=torch.float32)
        if n:
            xk, yk = self.kernel_views(self._x(x2), y)
            self.fns["1" if n == 1 else "2-16" if n <= 16 else "17+"](
                xk, *(self._bound or self.kernel_args(lut, crow, col, val)), yk)
        y = y.view(*lead, self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def __call__(self, x: torch.Tensor, lut, crow, col, val, bias) -> torch.Tensor:
        return lut_linear_cpu(x, *self.bind(lut, crow, col, val, bias))
