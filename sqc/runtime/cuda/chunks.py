"""The CUDA chunk layout and the descriptions of generated CUDA kernels: shared by the kernels and the runtime.

The chunk layout (the kernels are in :mod:`sqc.codegen.cuda`): ``P = 32 // bits``
codes per 32-bit word; a *chunk* is four consecutive words, read with one
16-byte load, holding the ``CW = 4 * P`` consecutive columns
``g * CW .. g * CW + CW - 1``: column ``g * CW + w * P + j`` is word ``4 * g + w``
at bits ``j * bits``. A row has ``NC = ceil(K / CW)`` chunks, padded with code 0
(:func:`to_chunk_words` derives it from the canonical codes, :func:`from_chunk_words` inverts it).

A :class:`KernelSpec` is what the runtime needs to launch a kernel from a
fatbin (symbol, block size, grid, parameter names); an artifact's
``cuda/plan.json`` stores one per kernel.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = ["ChunkLayout", "CudaKey", "GemvKnobs", "GemmKnobs", "KernelSpec", "to_chunk_words", "from_chunk_words"]


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    in_features: int
    bits: int

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    @property
    def chunk_cols(self) -> int:
        return 4 * self.per_word

    @property
    def n_chunks(self) -> int:
        return -(-self.in_features // self.chunk_cols)

    @property
    def words(self) -> int:
        return 4 * self.n_chunks


@dataclasses.dataclass(frozen=True)
class CudaKey:
    """What a CUDA kernel is specialised on (one per distinct layer shape and storage)."""

    rows: int
    in_features: int
    bits: int
    sparse: bool
    lut_dtype: str
    col_dtype: str
    val_dtype: str

    def tag(self) -> str:
        sp = "s" if self.sparse else "d"
        return f"{self.rows}x{self.in_features}_b{self.bits}{sp}_{self.lut_dtype}_{self.col_dtype}_{self.val_dtype}"


@dataclasses.dataclass(frozen=True)
class GemvKnobs:
    threads: int = 128  # block size when a row needs at most 32 chunk threads
    ri: int = 2  # rows in flight per thread (accumulators)
    it: int = 4  # row iterations per block


@dataclasses.dataclass(frozen=True)
class GemmKnobs:
    wm: int = 2  # warps along rows (16 rows each)
    wk: int = 4  # warps splitting K
    np: int = 16  # batch tile (rows of x per block)
    kc: int = 2  # chunks per k-tile


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """A generated kernel: its symbol, launch shape and parameters (names as sqc passes them)."""

    name: str
    op: str  # "gemv" or "gemm"
    key: CudaKey
    knobs: Any
    threads: int
    grid_x: int
    batch_tile: int  # gemm: grid_y = ceil(n / batch_tile); gemv: 1
    params: tuple[str, ...] = ()

    def grid(self, n: int) -> tuple[int, int, int]:
        return (self.grid_x, -(-n // self.batch_tile) if self.op == "gemm" else 1, 1)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["knobs"] = dataclasses.asdict(self.knobs)
        d["params"] = list(self.params)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "KernelSpec":
        knobs = (GemvKnobs if d["op"] == "gemv" else GemmKnobs)(**d["knobs"])
        return KernelSpec(d["name"], d["op"], CudaKey(**d["key"]), knobs, d["threads"], d["grid_x"],
                          d["batch_tile"], tuple(d["params"]))


def to_chunk_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[R, K]`` integer codes -> chunk-layout words int32 ``[R, 4 * NC]``, on the codes' device."""
    R, K = codes.shape
    lay = ChunkLayout(K, bits)
    p = lay.per_word
    c = torch.zeros((R, lay.n_chunks * lay.chunk_cols), dtype=torch.int64, device=codes.device)
    c[:, :K] = codes
    c = c.view(R, lay.words, p)
    words = torch.zeros((R, lay.words), dtype=torch.int64, device=codes.device)
    for j in range(p):
        words |= c[:, :, j] << (j * bits)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.to(torch.int32).contiguous()


def from_chunk_words(words: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`to_chunk_words`: codes as int64 ``[R, K]``, on the words' device."""
    lay = ChunkLayout(in_features, bits)
    u = words.to(torch.int64).unsqueeze(-1) & 0xFFFFFFFF
    shifts = torch.arange(lay.per_word, device=words.device) * bits
    c = (u >> shifts) & ((1 << bits) - 1)
    return c.reshape(words.shape[0], lay.n_chunks * lay.chunk_cols)[:, :in_features]
