"""The canonical (interchange) packed layout of a dense-and-sparse linear weight.

Bit layout of the codes
-----------------------
A row of ``K`` codes of ``b`` bits (2 <= b <= 8) is padded with code 0 to
``K_pad = 32 * ceil(K / 32)`` and cut into groups of 32 consecutive columns.
Group ``g`` (columns ``32g .. 32g+31``) is stored in the ``b`` int32 words
``words[row, g*b : g*b + b]``. Read those words as one little-endian bit
stream of ``32*b`` bits (word ``g*b`` holds stream bits 0..31, word
``g*b+1`` bits 32..63, ...). Code ``i`` of the group occupies stream bits
``i*b .. i*b + b - 1``, least significant bit first. So

* b = 4: 8 codes per word, code ``i`` at bits ``4*(i % 8)`` of word ``i // 8``;
* b = 3: 32 codes in 3 words; codes 10 and 21 straddle a word boundary;
* b = 8: 4 codes per word, one per byte.

Words are stored as int32 (the bit pattern of the uint32 word).

The sparse part
---------------
A CSR matrix over the same ``[out_features, in_features]`` grid:
``crow`` int32 ``[R + 1]``, ``col`` in the narrowest integer type that holds
``in_features - 1`` (uint8 up to 256 columns, int16 up to 32768, else int32),
``val`` the *original* weight values in the weight's own dtype, exact.

Semantics (the reference op implements exactly this)::

    W_hat[r, c] = lut[r, code[r, c]]           if (r, c) not in S
    W_hat[r, c] = val at (r, c)                if (r, c) in S

i.e. ``W_hat = LUT[code] + D`` where ``D`` is the exact difference
``W - LUT[code]`` at the sparse positions. Storing ``W`` rather than a
rounded difference is what makes ``W_hat == W`` hold bit for bit there;
kernels form the difference in fp32 when they need an additive correction.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

__all__ = ["PackedLinear", "dtype_name", "pack_codes", "unpack_codes", "codes_as_numpy", "row_chunks", "words_per_row",
           "col_dtype_for"]

_GROUP = 32


def dtype_name(t: torch.Tensor) -> str:
    """A tensor's dtype as stored formats write it: ``"float16"``, ``"int32"``, ..."""
    return str(t.dtype).removeprefix("torch.")


def words_per_row(in_features: int, bits: int) -> int:
    return -(-in_features // _GROUP) * bits


def col_dtype_for(in_features: int) -> torch.dtype:
    """Narrowest integer dtype that holds every column index of the matrix."""
    if in_features <= 1 << 8:
        return torch.uint8
    if in_features <= 1 << 15:
        return torch.int16
    return torch.int32


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"code width must be in 2..8, got {bits}")


# row chunks of the bit conversions below hold about this many codes (bounded scratch memory)
_CHUNK_CODES = 1 << 24


def row_chunks(rows: int, per_row: int):
    """``(lo, hi)`` row ranges of about :data:`_CHUNK_CODES` codes each, covering ``rows``."""
    step = max(1, _CHUNK_CODES // max(per_row, 1))
    return [(lo, min(lo + step, rows)) for lo in range(0, rows, step)]


def codes_as_numpy(codes: torch.Tensor, bits: int) -> np.ndarray:
    """``[R, K]`` integer codes as a host uint8 array, after checking each is below ``2**bits``."""
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D [rows, in_features], got shape {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be integers, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    return codes.detach().to(device="cpu", dtype=torch.uint8).numpy()


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[R, K]`` integer codes (each < 2**bits) into ``[R, words_per_row]`` int32 (on the codes' device)."""
    _check_bits(bits)
    c = codes_as_numpy(codes, bits)
    R, K = c.shape
    G = -(-K // _GROUP)
    out = np.empty((R, G * bits), dtype=np.uint32)
    for lo, hi in row_chunks(R, G * _GROUP):
        n = hi - lo
        cc = np.zeros((n, G * _GROUP), dtype=np.uint32)
        cc[:, :K] = c[lo:hi]
        cc = np.ascontiguousarray(cc.reshape(n, G, _GROUP).transpose(2, 0, 1))  # [32, n, G]: one plane per code
        words = np.zeros((bits, n, G), dtype=np.uint32)
        for i in range(_GROUP):
            w, sh = divmod(i * bits, 32)
            words[w] |= cc[i] << np.uint32(sh)  # uint32: the bits past 32 fall off
            if sh + bits > 32:
                words[w + 1] |= cc[i] >> np.uint32(32 - sh)
        out[lo:hi] = words.transpose(1, 2, 0).reshape(n, G * bits)
    return torch.from_numpy(out.view(np.int32)).to(codes.device)


def unpack_codes(words: torch.Tensor, bits: int, in_features: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[R, words_per_row]`` int32 -> ``[R, in_features]`` codes of ``dtype``
    (int64 for indexing; uint8 where only the values are wanted)."""
    _check_bits(bits)
    R, W = words.shape
    if W != words_per_row(in_features, bits):
        raise ValueError(
            f"{W} words per row do not hold {in_features} {bits}-bit codes "
            f"(expected {words_per_row(in_features, bits)})"
        )
    G = W // bits
    u = words.detach().cpu().contiguous().numpy().view(np.uint32)
    out = np.empty((R, in_features), dtype=np.uint8)
    mask = np.uint32((1 << bits) - 1)
    for lo, hi in row_chunks(R, G * _GROUP):
        n = hi - lo
        uu = np.ascontiguousarray(u[lo:hi].reshape(n, G, bits).transpose(2, 0, 1))  # [bits, n, G]
        planes = np.empty((_GROUP, n, G), dtype=np.uint8)
        for i in range(_GROUP):
            w, sh = divmod(i * bits, 32)
            v = uu[w] >> np.uint32(sh)
            if sh + bits > 32:
                v |= uu[w + 1] << np.uint32(32 - sh)
            planes[i] = v & mask
        out[lo:hi] = planes.transpose(1, 2, 0).reshape(n, G * _GROUP)[:, :in_features]
    return torch.from_numpy(out).to(device=words.device, dtype=dtype)


@dataclasses.dataclass
class PackedLinear:
    """One quantized weight in the canonical layout (see the module docstring)."""

    bits: int
    in_features: int
    out_features: int
    codes: torch.Tensor  # int32 [R, words_per_row]
    lut: torch.Tensor  # [R, 2**bits], table dtype
    crow: torch.Tensor  # int32 [R + 1]
    col: torch.Tensor  # narrow int [nnz]
    val: torch.Tensor  # weight dtype [nnz]

    TENSORS = ("codes", "lut", "crow", "col", "val")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, name: str = "layer") -> None:
        R, K, b = self.out_features, self.in_features, self.bits
        _check_bits(b)
        problems = []
        if self.codes.dtype != torch.int32 or tuple(self.codes.shape) != (R, words_per_row(K, b)):
            problems.append(f"codes {self.codes.dtype} {tuple(self.codes.shape)} != int32 {(R, words_per_row(K, b))}")
        if not self.lut.is_floating_point() or tuple(self.lut.shape) != (R, 1 << b):
            problems.append(f"lut {self.lut.dtype} {tuple(self.lut.shape)} != float {(R, 1 << b)}")
        if self.crow.dtype != torch.int32 or tuple(self.crow.shape) != (R + 1,):
            problems.append(f"crow {self.crow.dtype} {tuple(self.crow.shape)} != int32 {(R + 1,)}")
        if self.col.dtype not in (torch.uint8, torch.int16, torch.int32) or self.col.ndim != 1:
            problems.append(f"col {self.col.dtype} {tuple(self.col.shape)} is not a 1-D uint8/int16/int32 index")
        if self.val.ndim != 1 or self.val.shape != self.col.shape or not self.val.is_floating_point():
            problems.append(f"val {self.val.dtype} {tuple(self.val.shape)} does not match col {tuple(self.col.shape)}")
        if not problems and self.crow.numel() and int(self.crow[-1]) != self.col.numel():
            problems.append(f"crow[-1] = {int(self.crow[-1])} but {self.col.numel()} sparse values")
        if problems:
            raise ValueError(f"{name}: malformed packed weight: " + "; ".join(problems))

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    def unpack(self, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """Codes as ``[R, K]`` of ``dtype`` (int64 by default)."""
        return unpack_codes(self.codes, self.bits, self.in_features, dtype)

    def sparse_coo(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, col) int64 index vectors of the sparse entries."""
        counts = (self.crow[1:] - self.crow[:-1]).to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(self.out_features, device=counts.device), counts)
        return rows, self.col.to(torch.int64)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_hat`` as a dense ``[R, K]`` matrix (see the semantics above)."""
        return dequantize(self.codes, self.lut, self.crow, self.col, self.val, self.bits, self.in_features, dtype)

    def nbytes(self) -> dict[str, int]:
        """Stored bytes by part: codes, tables, sparse (values + indices + row pointers)."""
        return {
            "codes": self.codes.nbytes,
            "tables": self.lut.nbytes,
            "sparse": self.val.nbytes + self.col.nbytes + self.crow.nbytes,
        }

    def bits_per_weight(self) -> float:
        return 8.0 * sum(self.nbytes().values()) / (self.in_features * self.out_features)


def dequantize(codes, lut, crow, col, val, bits: int, in_features: int, dtype=torch.float32) -> torch.Tensor:
    idx = unpack_codes(codes, bits, in_features)
    w = torch.gather(lut.to(dtype), 1, idx)
    if col.numel():
        counts = (crow[1:] - crow[:-1]).to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(lut.shape[0], device=lut.device), counts)
        w[rows, col.to(torch.int64)] = val.to(dtype)
    return w
