"""The byte layout of the VNNI CPU kernels, their int8 numerics, and the reference that states them.

Where the CPU has AVX-512 VBMI and VNNI (``avx512vbmi``, ``avx512_vnni``), the LUT kernels
(:mod:`sqc.codegen.cpu_vnni`) multiply bytes instead of floats: per 64 weights, one
``vpmultishiftqb`` pulls 64 codes out of packed qwords, one ``vpermb`` looks them up in the
row's table of unsigned bytes, and one ``vpdpbusd`` multiplies them with 64 int8 activations.
The fp32 route (:mod:`sqc.runtime.cpu.lanes`) spends one permute and one FMA per 16 weights.

The layout
----------
A row's codes are cut into blocks of ``BLK = 8 * n`` columns, ``n = 64 // bits`` codes per
qword (32 at 2 bits, 21 at 3, 16 at 4). A block is one 64-byte vector: 8 qwords, each holding
``n`` codes at bits ``bits * slot`` (slot 0 in the low bits; at 3 bits the top bit is 0). The
block is read in ``PZ = ceil(n / 8)`` passes; pass ``p`` takes slots ``8p .. 8p + W_p - 1`` of
every qword, ``W_p = min(8, n - 8p)`` (8, except 5 for the last pass at 3 bits), so byte
``8q + j`` of the pass is slot ``8p + j`` of qword ``q``. Column

    c = z * BLK + 64 * p + q * W_p + j            (block z, pass p, qword q, 0 <= j < W_p)

so a pass covers contiguous columns (64, or 40 in the last 3-bit pass). Rows are padded with code
0 to ``NZ = ceil(K / BLK)`` blocks and to a multiple of :data:`~sqc.runtime.cpu.lanes.ROW_PAD` rows,
and stored in panels of :data:`PANEL` rows: panel ``r // PANEL`` holds block ``z`` of its rows
side by side (row ``r``'s block ``z`` at bytes ``(z * PANEL + r % PANEL) * 64``), so the rows a
kernel reads together are one sequential stream.

The numerics (:func:`reference`)
--------------------------------
* **Tables** become unsigned bytes per row: ``m = min(lut[r])``, ``t = (max - min) / 255``
  (1 where the row's entries are all equal), ``u = round((lut - m) / t)``; the kernel's weight
  is ``m + t * u[code]`` (at most ``t / 2`` from the table entry).
* **Activations** become int8 per *group*: the ``W_p`` columns of one qword in one pass (8
  columns, 5 in the last 3-bit pass): ``s = max|x| / 127``, ``xq = round(x / s)``.
* The dense part is ``t * sum_g s_g * sum_{c in g} u[code_c] * xq_c + m * sum_g s_g * sum xq``:
  int32 dot products per pass, scaled in fp32.
* The **sparse part** stays exact: ``(val - lut[scode]) * x`` with the exact table and fp32 x,
  added to the row after the dense part; so is the **bias**.

With 8-column groups an outlier activation costs precision only in its own group: SmolLM2
w3-s0.45-g's perplexity (``sqc.real.perplexity``, the DESIGN.md protocol) is 17.970 with these
kernels against 17.927 with the fp32 kernels (+0.25 %); groups of 168 columns gave +1.05 %.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .lanes import padded_rows
from ..layout import codes_as_numpy, row_chunks

__all__ = ["BYTE_LANES", "PANEL", "ByteLayout", "to_byte_words", "from_byte_words", "byte_tables", "sparse_deltas",
           "quantize_x",
           "reference"]

#: the lane count that names the byte kernels in a :class:`~sqc.runtime.cpu.lanes.KernelKey` (64 bytes per vector)
BYTE_LANES = 64
#: rows stored interleaved, block by block: the kernels read a panel's rows together, and a row-major layout
#: made that several streams that jump at every row; a panel is one sequential stream (from DRAM on a Zen 4,
#: one thread: 16.9 GB/s against 7.6)
PANEL = 4


@dataclasses.dataclass(frozen=True)
class ByteLayout:
    """Geometry of the byte layout for one (in_features, bits)."""

    in_features: int
    bits: int

    @property
    def per_qword(self) -> int:
        return 64 // self.bits

    @property
    def passes(self) -> int:
        return -(-self.per_qword // 8)

    def width(self, p: int) -> int:
        """Columns per qword in pass ``p`` (``W_p``)."""
        return min(8, self.per_qword - 8 * p)

    @property
    def block(self) -> int:
        return 8 * self.per_qword

    @property
    def n_blocks(self) -> int:
        return -(-self.in_features // self.block)

    @property
    def row_bytes(self) -> int:
        return 64 * self.n_blocks

    @property
    def x_width(self) -> int:
        """Values of x per batch row the kernels read: exactly ``K`` (they quantize x themselves)."""
        return self.in_features

    def placement(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For every column: (block z, pass p, qword q, byte j in the pass's qword)."""
        c = np.arange(self.in_features)
        z, r = c // self.block, c % self.block
        p = np.minimum(r // 64, self.passes - 1)
        w = np.array([self.width(i) for i in range(self.passes)])[p]
        rr = r - 64 * p
        return z, p, rr // w, rr % w


def to_byte_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[R, K]`` integer codes -> byte-layout words uint8 ``[RP / PANEL, NZ * PANEL * 64]``."""
    c = codes_as_numpy(codes, bits)
    R, K = c.shape
    lay = ByteLayout(K, bits)
    z, p, q, j = lay.placement()
    qword = z * 8 + q  # the column's qword in the row
    slot = 8 * p + j
    out = np.zeros((padded_rows(R), lay.n_blocks * 8), dtype=np.uint64)
    for lo, hi in row_chunks(R, K):
        cc = c[lo:hi].astype(np.uint64)
        for s in range(lay.per_qword):  # a qword holds at most one column per slot
            cols = np.nonzero(slot == s)[0]
            out[lo:hi, qword[cols]] |= cc[:, cols] << np.uint64(bits * s)
    rp = out.shape[0]
    panels = out.view(np.uint8).reshape(rp // PANEL, PANEL, lay.n_blocks, 64).transpose(0, 2, 1, 3)
    return torch.from_numpy(np.ascontiguousarray(panels).reshape(rp // PANEL, lay.n_blocks * PANEL * 64))


def from_byte_words(words: torch.Tensor, bits: int, out_features: int, in_features: int,
                    dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`to_byte_words`: codes ``[R, K]`` of ``dtype``."""
    lay = ByteLayout(in_features, bits)
    z, p, q, j = lay.placement()
    panels = words.detach().contiguous().numpy().reshape(-1, lay.n_blocks, PANEL, 64).transpose(0, 2, 1, 3)
    u = np.ascontiguousarray(panels).view(np.uint64).reshape(-1, lay.n_blocks * 8)
    shift = (bits * (8 * p + j)).astype(np.uint64)
    mask = np.uint64((1 << bits) - 1)
    out = np.empty((out_features, in_features), dtype=np.uint8)
    for lo, hi in row_chunks(out_features, in_features):
        out[lo:hi] = (u[lo:hi][:, z * 8 + q] >> shift[None, :]) & mask
    return torch.from_numpy(out).to(dtype)


def byte_tables(lut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's tables as the kernels read them: (bytes uint8 ``[R, 64]``: the row's ``u`` repeated to fill
    64 bytes, so ``vpermb`` may ignore the bits above the code; step ``t`` fp32 ``[R]``; minimum ``m`` fp32 ``[R]``)."""
    lf = lut.detach().to(torch.float32)
    m = lf.min(1).values
    t = (lf.max(1).values - m) / 255
    t = torch.where(t > 0, t, torch.ones_like(t))
    u = torch.clamp(torch.round((lf - m[:, None]) / t[:, None]), 0, 255).to(torch.uint8)
    reps = 64 // lf.shape[1]
    return u.repeat(1, reps).contiguous(), t.contiguous(), m.contiguous()


def sparse_deltas(lut: torch.Tensor, crow: torch.Tensor, val: torch.Tensor, scode: torch.Tensor) -> torch.Tensor:
    """The sparse part as the kernels add it: ``val - lut[row, scode]`` in fp32, one per non-zero."""
    rows = torch.repeat_interleave(torch.arange(lut.shape[0]), (crow[1:] - crow[:-1]).long())
    return (val.to(torch.float32) - lut.to(torch.float32)[rows, scode.long()]).contiguous()


def quantize_x(x: torch.Tensor, lay: ByteLayout) -> torch.Tensor:
    """x ``[n, K]`` fp32 as the kernels see it: each group's int8 values times the group's scale."""
    n, K = x.shape
    z, p, q, _ = lay.placement()
    group = (z * lay.passes + p) * 8 + q  # groups are contiguous runs of columns
    ng = int(group.max()) + 1 if K else 0
    g = torch.from_numpy(group).long()
    amax = torch.zeros((n, ng), dtype=torch.float32).scatter_reduce(1, g.expand(n, K), x.abs(), "amax")
    s = amax / 127
    inv = torch.where(amax > 0, 127 / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.zeros_like(amax))
    xq = torch.round(x * inv[:, g])
    return xq * s[:, g]


def reference(x: torch.Tensor, codes: torch.Tensor, lut: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
              val: torch.Tensor, bias: torch.Tensor | None, bits: int) -> torch.Tensor:
    """``y`` fp32 ``[n, R]`` as the byte kernels compute it (the module docstring states the numerics), for x
    ``[n, K]`` and canonical codes ``[R, K]``."""
    x = x.to(torch.float32)
    R, K = codes.shape
    lay = ByteLayout(K, bits)
    tab, t, m = byte_tables(lut)
    codes = codes.long()
    w = m[:, None] + t[:, None] * torch.gather(tab[:, : lut.shape[1]].to(torch.float32), 1, codes)
    y = quantize_x(x, lay) @ w.T
    rows = torch.repeat_interleave(torch.arange(R), (crow[1:] - crow[:-1]).long())
    cols = col.long()
    if rows.numel():
        y.index_add_(1, rows, x[:, cols] * sparse_deltas(lut, crow, val, codes[rows, cols]))
    return y if bias is None else y + bias.to(torch.float32)
