"""The CPU lane layout and what a CPU kernel is specialised on: shared by the kernels and the runtime.

The lane layout
---------------
The CPU kernels (:mod:`sqc.codegen.cpu`) vectorize along a row: a vector of
``L`` lanes (16 with AVX-512, 8 with AVX2) holds ``L`` consecutive weights of
one row, and the row's table sits in one (or two) vector registers. A table
lookup is then one permute instruction (``vpermps``) whose index vector is the
lanes' codes. The layout that makes the codes of ``L`` consecutive columns
arrive in ``L`` lanes with one shift is:

* ``P = 32 // bits`` codes per int32 word (10 at 3 bits, 8 at 4 bits);
* a block covers ``BLK = L * P`` columns and is stored in ``L`` words;
* column ``c = blk * BLK + t * L + j`` lives in word ``blk * L + j`` at bits
  ``t * bits .. t * bits + bits - 1``.

Rows are padded with code 0 to ``Kp = NB * BLK`` columns and the row count to
a multiple of :data:`ROW_PAD`. When ``K`` is a multiple of ``L`` (every LLM
shape) the kernels stop the last block after ``(K % BLK) / L`` shifts, so they
read exactly ``K`` values of x and x needs no padding (:attr:`LaneLayout.x_width`);
otherwise x is padded with zeros to ``Kp``, so padding contributes nothing. The layout is derived from the canonical one
(:mod:`sqc.runtime.layout`) when kernels attach
(:func:`to_lane_words`, inverted by :func:`from_lane_words`); artifacts store the canonical layout.

A kernel library is built for one :class:`KernelKey` (shape, bits, lanes,
storage dtypes) and one set of knobs (:class:`GemvKnobs` for batch 1,
:class:`GemmKnobs` for the other batch buckets); the names here are the ones
both the code generator and a saved artifact's kernel plan use.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from ..layout import codes_as_numpy, row_chunks

__all__ = ["SUPPORTED_BITS", "ROW_PAD", "padded_rows", "LaneLayout", "GemvKnobs", "GemmKnobs", "KernelKey",
           "LANES_ISA", "to_lane_words", "from_lane_words"]

#: code widths the CPU LUT kernels take
SUPPORTED_BITS = (2, 3, 4)
#: rows of the lane layout are padded to a multiple of this (every rt knob divides it)
ROW_PAD = 8
#: the instruction sets a lane count needs (flags of /proc/cpuinfo); 64 names the byte kernels of
#: :mod:`sqc.runtime.cpu.bytelanes` (64 bytes per vector: VBMI byte lookups, VNNI int8 dot products)
LANES_ISA = {64: ("avx512f", "avx512bw", "avx512vbmi", "avx512_vnni"), 16: ("avx512f",), 8: ("avx2",)}


def padded_rows(out_features: int) -> int:
    """Rows of the lane layout: ``out_features`` rounded up to a multiple of :data:`ROW_PAD`."""
    return -(-out_features // ROW_PAD) * ROW_PAD


@dataclasses.dataclass(frozen=True)
class LaneLayout:
    """Geometry of the lane layout for one (in_features, bits, lanes)."""

    in_features: int
    bits: int
    lanes: int

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    @property
    def block(self) -> int:
        return self.lanes * self.per_word

    @property
    def n_blocks(self) -> int:
        return -(-self.in_features // self.block)

    @property
    def k_pad(self) -> int:
        return self.n_blocks * self.block

    @property
    def words(self) -> int:
        return self.n_blocks * self.lanes

    @property
    def x_width(self) -> int:
        """Values of x (per batch row) the kernels read: ``K`` when it is a multiple of the lanes, else ``Kp``."""
        return self.in_features if self.in_features % self.lanes == 0 else self.k_pad

    @property
    def full_blocks(self) -> int:
        """Blocks whose ``P`` shifts all cover columns the kernels read."""
        return self.x_width // self.block

    @property
    def tail_shifts(self) -> int:
        """Shifts of the last, partial block (0 when ``x_width`` is a whole number of blocks)."""
        return (self.x_width % self.block) // self.lanes

    @property
    def table_width(self) -> int:
        return max(self.lanes, 1 << self.bits)


@dataclasses.dataclass(frozen=True)
class GemvKnobs:
    rt: int = 2  # rows per parallel task (share one x load)
    unroll: int = 1  # blocks unrolled per inner iteration

    def tag(self) -> str:
        return f"rt{self.rt}u{self.unroll}"


@dataclasses.dataclass(frozen=True)
class GemmKnobs:
    rt: int = 4  # weight rows per decoded tile / register block
    bt: int = 4  # batch rows per register block
    decode: str = "tile"  # "tile": decode rt rows once into fp32 scratch; "reg": decode in registers per bt rows of x

    def tag(self) -> str:
        return f"rt{self.rt}bt{self.bt}{self.decode}"


@dataclasses.dataclass(frozen=True)
class KernelKey:
    """What a kernel is specialized on (``op`` is ``"gemv"`` or ``"gemm"``; gemm takes any batch)."""

    op: str
    out_features: int
    in_features: int
    bits: int
    lanes: int
    sparse: bool
    lut_dtype: str = "float16"
    col_dtype: str = "int16"
    val_dtype: str = "float32"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def tag(self) -> str:
        sp = f"_sp-{self.col_dtype}-{self.val_dtype}" if self.sparse else ""
        return f"{self.op}_{self.out_features}x{self.in_features}_b{self.bits}_l{self.lanes}_{self.lut_dtype}{sp}"


def to_lane_words(codes: torch.Tensor, bits: int, lanes: int) -> torch.Tensor:
    """``[R, K]`` integer codes -> lane-layout words int32 ``[RP, NB * lanes]``."""
    c = codes_as_numpy(codes, bits)
    R, K = c.shape
    lay = LaneLayout(K, bits, lanes)
    RP = padded_rows(R)
    out = np.zeros((RP, lay.n_blocks, lanes), dtype=np.uint32)
    for lo, hi in row_chunks(R, lay.k_pad):
        n = hi - lo
        cc = np.zeros((n, lay.k_pad), dtype=np.uint8)
        cc[:, :K] = c[lo:hi]
        # [per_word, n, NB, lanes]: code t of every word, one contiguous plane per t
        planes = np.ascontiguousarray(cc.reshape(n, lay.n_blocks, lay.per_word, lanes).transpose(2, 0, 1, 3))
        words = out[lo:hi]
        for t in range(lay.per_word):
            words |= planes[t].astype(np.uint32) << np.uint32(t * bits)
    return torch.from_numpy(out.view(np.int32).reshape(RP, lay.words))


def from_lane_words(words: torch.Tensor, bits: int, lanes: int, out_features: int, in_features: int,
                    dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`to_lane_words`: codes ``[R, K]`` of ``dtype``."""
    lay = LaneLayout(in_features, bits, lanes)
    u = words.detach().contiguous().numpy().view(np.uint32).reshape(-1, lay.n_blocks, lanes)
    out = np.empty((out_features, in_features), dtype=np.uint8)
    mask = np.uint32((1 << bits) - 1)
    for lo, hi in row_chunks(out_features, lay.k_pad):
        n = hi - lo
        planes = np.empty((lay.per_word, n, lay.n_blocks, lanes), dtype=np.uint8)
        for t in range(lay.per_word):
            planes[t] = (u[lo:hi] >> np.uint32(t * bits)) & mask
        out[lo:hi] = planes.transpose(1, 2, 0, 3).reshape(n, lay.k_pad)[:, :in_features]
    return torch.from_numpy(out).to(dtype)
