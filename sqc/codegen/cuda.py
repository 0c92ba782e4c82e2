"""LUT kernels for NVIDIA GPUs, written in TVMScript with hand-placed thread bindings.

TVM's default GPU schedules do not fit a table lookup, so every kernel here
binds its loops to ``blockIdx``/``threadIdx`` itself; TVM lowers the TIR and
emits the CUDA C++ (:func:`generate_source`), and :mod:`sqc.codegen.nvcc`
builds it into a fatbin. No GPU is needed for either step; running the result
needs only the driver (:mod:`sqc.runtime.cuda.kernels`).

The chunk layout
----------------
``P = 32 // bits`` codes per 32-bit word (16 at 2 bits, 10 at 3 bits, 8 at 4
bits). A *chunk* is four consecutive words, read with one 16-byte load, and
holds the ``CW = 4 * P`` consecutive columns ``g * CW .. g * CW + CW - 1``:
column ``g * CW + w * P + j`` is word ``4 * g + w`` at bits ``j * bits``. A
row has ``NC = ceil(K / CW)`` chunks; the padding codes are 0 and the kernels
never read x past ``K``. The layout is derived from the canonical one at load
(:func:`sqc.runtime.cuda.kernels.to_chunk_words`); artifacts store the canonical one.

Kernels (fp16 activations, fp32 accumulation)
---------------------------------------------
* ``gemv`` (batch 1): a block of threads splits K (``TC`` threads along the
  chunks of a row, each holding the x of its chunks in registers for the whole
  block) and ``TR = threads / TC`` rows side by side. A block owns
  ``RB = TR * ri * it`` rows; their tables sit in shared memory as fp32 (all
  lanes of a warp read the same 8 or 16 entries, so lookups never conflict).
  Each thread keeps ``ri`` row accumulators, adds the sparse corrections of
  its share of each row's non-zeros (``(val - lut[scode]) * x[col]``), and a
  reduction tree of warp shuffles (then shared memory when ``TC > 32``) sums
  them: no atomics.
* ``gemm`` (batch n >= 2, any n): a block owns ``RT = 16 * wm`` rows and
  ``np`` rows of x. Each warp decodes its ``16 x KT`` weight tile once into
  shared memory as fp16 and multiplies it with tensor-core
  ``mma.sync.m16n8k16`` (fp16 in, fp32 accumulate); ``wk`` warps split K
  inside the block and meet in a shared-memory reduction. The sparse
  corrections are added in the epilogue, each row's non-zeros once per block.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from typing import Any

from ..runtime.kernels import BUCKETS
from ..runtime.cuda.chunks import ChunkLayout, CudaKey, GemmKnobs, GemvKnobs, KernelSpec
from ..runtime.status import KernelStatus

__all__ = ["SUPPORTED_BITS", "CUDA_ARCHS", "ChunkLayout", "CudaKey", "GemvKnobs", "GemmKnobs", "KernelSpec",
           "build_gemv", "build_gemm", "gemv_candidates", "gemm_candidates", "generate_source", "PRELUDE",
           "GEMM_BATCH_TILES", "build_bundle", "build_check_bundle", "kernel_name"]

SUPPORTED_BITS = (2, 3, 4)
#: the architectures sqc builds for (tests build every kernel for sm_80, sm_86 and sm_90)
CUDA_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
#: batch tile of the gemm per batch bucket: 2-16 -> 16, 17+ -> 64
GEMM_BATCH_TILES = {"2-16": 16, "17+": 64}

#: device helpers the generated code calls (``T.call_extern``); prepended to TVM's source
PRELUDE = r"""
// ---- sqc device helpers (prepended to the TVM-generated kernels) ----
#include <cuda_fp16.h>
// D = A * B + D for one m16n8k16 tile: a holds 8 halves (rows g, g+8; k 2q.., 2q+8..),
// b holds 4 halves (k 2q.., 2q+8..; column g), c holds 4 floats (rows g, g+8; columns 2q, 2q+1).
__device__ __forceinline__ void sqc_mma_16816(float* c, const void* a, const void* b) {
  const unsigned* A = reinterpret_cast<const unsigned*>(a);
  const unsigned* B = reinterpret_cast<const unsigned*>(b);
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(A[0]), "r"(A[1]), "r"(A[2]), "r"(A[3]), "r"(B[0]), "r"(B[1]));
}
// two fp32 values as one word of two fp16 (lo in the low half)
__device__ __forceinline__ unsigned sqc_pack_half2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}
"""


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def gemv_geometry(key: CudaKey, knobs: GemvKnobs) -> dict[str, int]:
    lay = ChunkLayout(key.in_features, key.bits)
    nc = lay.n_chunks
    if nc <= 32:
        tc, cpt = _pow2_at_least(nc), 1
        nt = max(knobs.threads, tc)
    else:
        cpt = -(-nc // 1024)
        tc = 32 * -(-(-(-nc // cpt)) // 32)
        nt = tc
    tr = nt // tc
    # no more row iterations than the layer has rows for, and at most 16 KiB of tables per block
    it = max(1, min(knobs.it, -(-key.rows // (tr * knobs.ri)), (16384 // 4 >> key.bits) // (tr * knobs.ri)))
    if nt > 256:  # ptxas keeps under ~96 registers at this block size: at most 4 code loads in flight
        it = max(1, min(it, 4 // (knobs.ri * cpt)))
    rb = tr * knobs.ri * it
    return {"TC": tc, "CPT": cpt, "NT": nt, "TR": tr, "IT": it, "RB": rb, "NBLK": -(-key.rows // rb)}


def gemv_candidates(key: CudaKey) -> list[GemvKnobs]:
    """The knob settings the GPU tuner times for a gemv (the first is the default)."""
    out = [GemvKnobs(128, 4, 2), GemvKnobs(128, 2, 4), GemvKnobs(128, 2, 2), GemvKnobs(128, 1, 4),
           GemvKnobs(256, 2, 2)]
    if ChunkLayout(key.in_features, key.bits).n_chunks > 32:  # the thread count is fixed by K
        out = [k for k in out if k.threads == 128]
    return out


def _kt_chunks(bits: int, kc: int) -> int:
    """Smallest even chunk count >= ``kc`` whose columns are a multiple of the mma k (16)."""
    cw = 4 * (32 // bits)
    while (kc * cw) % 16 or kc % 2:  # even: a warp decodes 16 rows x 2 chunks per round
        kc += 1
    return kc


def gemm_candidates(key: CudaKey, batch_tile: int) -> list[GemmKnobs]:
    """The knob settings the GPU tuner times for a gemm with this batch tile (the first is the default)."""
    kcs = (_kt_chunks(key.bits, 2), _kt_chunks(key.bits, 4))
    shapes = [(1, 8), (1, 12), (2, 6), (1, 16), (2, 4), (1, 4), (1, 2)]
    out = [GemmKnobs(wm, wk, batch_tile, kc) for kc in kcs for wm, wk in shapes]
    return [k for k in out if gemm_smem(key, k) <= 46 * 1024][:4]  # (1, 2) at the smallest k-tile always fits


def gemm_smem(key: CudaKey, knobs: GemmKnobs) -> int:
    """Static shared memory of a gemm: fp32 tables, one fp16 tile per warp, the fp32 reduction buffer."""
    _, S = _tile_strides(key.bits, knobs.kc)
    return (16 * knobs.wm * (1 << key.bits) * 4 + knobs.wm * knobs.wk * 16 * S * 4
            + knobs.wm * 32 * (knobs.np // 2) * 4)


def _tile_strides(bits: int, kc: int) -> tuple[int, int]:
    """(chunk stride D, row stride S) of a warp's fp16 tile, in 32-bit words.

    A decode round has lane ``l`` write row ``l % 16``, chunk ``l // 16`` of a chunk pair, one word (two
    fp16) at a time: with S even, S / 2 odd and D odd, the 32 lanes start in 32 distinct banks.
    """
    D = 2 * (32 // bits) + 1  # a chunk is 4 * (32 // bits) fp16 = 2 * (32 // bits) words, plus one
    S = kc * D
    S += S % 2
    while (S // 2) % 2 == 0:
        S += 2
    return D, S


def _code4(T, word, shift, mask: int):
    """``4 * ((word >> shift) & mask)`` as one shift and one mask, meant to give the byte offset of an fp32
    table entry in two integer instructions (the ``// 4`` at the call folds into the ``* 4`` of the address);
    on the H200 it measured the same as the plain form (the gemv is not bound by integer work). Done in int32:
    the mask drops whatever an arithmetic shift brings in; the select folds once ``shift`` is unrolled."""
    w = T.Cast("int32", word)
    s = T.Select(shift >= 2, T.shift_right(w, T.max(shift - 2, 0)), T.shift_left(w, T.max(2 - shift, 0)))
    return T.bitwise_and(s, T.int32(mask << 2))


def build_gemv(key: CudaKey, knobs: GemvKnobs, name: str):
    """TVMScript prim_func for batch 1: ``y[0, r] = sum_k W_hat[r, k] * x[0, k] + bias[r]`` (fp16 in and out)."""
    from tvm.script import tirx as T

    lay = ChunkLayout(key.in_features, key.bits)
    P, CW, NC, NW = lay.per_word, lay.chunk_cols, lay.n_chunks, lay.words
    R, K, b = key.rows, key.in_features, key.bits
    E, MASK = 1 << b, (1 << b) - 1
    geo = gemv_geometry(key, knobs)
    TC, CPT, NT, TR, RB, NBLK = (geo[k] for k in ("TC", "CPT", "NT", "TR", "RB", "NBLK"))
    RI, IT = knobs.ri, geo["IT"]
    NR = RI * IT  # rows per thread
    NWC = TC // 32 if TC > 32 else 1  # warps along a row
    SW = min(TC, 32)  # shuffle width of the first reduction stage
    NSTEP = int(math.log2(SW))
    NLUT = -(-(RB * E) // NT)
    sparse = key.sparse
    lut_dt, col_dt, val_dt = key.lut_dtype, key.col_dtype, key.val_dtype

    @T.prim_func
    def gemv(x: T.handle, w: T.handle, lut: T.handle, crow: T.handle, col: T.handle, val: T.handle,
             scode: T.handle, bias: T.handle, y: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        nnz = T.int32()
        X = T.match_buffer(x, (1, K), "float16")
        W = T.match_buffer(w, (R, NW), "uint32", align=16)
        LUT = T.match_buffer(lut, (R, E), lut_dt)
        CROW = T.match_buffer(crow, (R + 1,), "int32")
        COL = T.match_buffer(col, (nnz,), col_dt)
        VAL = T.match_buffer(val, (nnz,), val_dt)
        SC = T.match_buffer(scode, (nnz,), "uint8")
        BIAS = T.match_buffer(bias, (R,), "float16")
        Y = T.match_buffer(y, (1, R), "float16")
        for bx in T.thread_binding(NBLK, thread="blockIdx.x"):
            for t in T.thread_binding(NT, thread="threadIdx.x"):
                lut_s = T.alloc_buffer((RB * E,), "float32", scope="shared")
                red_s = T.alloc_buffer((NWC * NR,), "float32", scope="shared")
                xr = T.alloc_buffer((CPT * CW,), "float32", scope="local")
                wr = T.alloc_buffer((NR * CPT * 4,), "uint32", scope="local")
                cr = T.alloc_buffer((2 * NR,), "int32", scope="local")
                sv = T.alloc_buffer((NR,), "float32", scope="local")
                sx = T.alloc_buffer((NR,), "float32", scope="local")
                acc = T.alloc_buffer((NR,), "float32", scope="local")
                # thread-local row i is block row ((i // RI) * TR + t // TC) * RI + i % RI
                # 1. every row's 16-byte code loads are issued first: NR * CPT loads in flight per thread
                for i in T.unroll(NR):
                    for c in T.unroll(CPT):
                        if (bx * RB + ((i // RI) * TR + t // TC) * RI + i % RI < R) and c * TC + t % TC < NC:
                            for v in T.vectorized(4):
                                wr[(i * CPT + c) * 4 + v] = W[bx * RB + ((i // RI) * TR + t // TC) * RI + i % RI,
                                                              (c * TC + t % TC) * 4 + v]
                        else:
                            for v in T.unroll(4):
                                wr[(i * CPT + c) * 4 + v] = T.uint32(0)
                # 2. the rows' CSR bounds (their latency hides behind the dense work)
                if sparse:
                    for i in T.unroll(NR):
                        if bx * RB + ((i // RI) * TR + t // TC) * RI + i % RI < R:
                            cr[2 * i] = CROW[bx * RB + ((i // RI) * TR + t // TC) * RI + i % RI]
                            cr[2 * i + 1] = CROW[bx * RB + ((i // RI) * TR + t // TC) * RI + i % RI + 1]
                        else:
                            cr[2 * i] = 0
                            cr[2 * i + 1] = 0
                # 3. the block's tables (fp32, shared) and this thread's x (fp32, registers, 0 past K)
                for q in range(NLUT):
                    if q * NT + t < RB * E:
                        if bx * RB + (q * NT + t) // E < R:
                            lut_s[q * NT + t] = T.Cast("float32", LUT[bx * RB + (q * NT + t) // E, (q * NT + t) % E])
                for c in T.unroll(CPT):
                    for q in T.unroll(CW):
                        xr[c * CW + q] = T.if_then_else(
                            ((c * TC + t % TC) * CW + q) < K,
                            T.Cast("float32", X[0, T.min((c * TC + t % TC) * CW + q, K - 1)]), T.float32(0))
                T.tvm_storage_sync("shared")
                # 4. the first sparse entry of every row per thread: (val - lut[scode]) and x[col] are loaded now,
                #    so their two dependent round trips overlap the dense work of this and the other warps
                if sparse:
                    for i in T.unroll(NR):
                        if cr[2 * i] + t % TC < cr[2 * i + 1]:
                            sv[i] = T.Cast("float32", VAL[cr[2 * i] + t % TC]) - lut_s[
                                (((i // RI) * TR + t // TC) * RI + i % RI) * E + T.Cast("int32", SC[cr[2 * i] + t % TC])]
                            sx[i] = T.Cast("float32", X[0, T.Cast("int32", COL[cr[2 * i] + t % TC])])
                        else:
                            sv[i] = T.float32(0)
                            sx[i] = T.float32(0)
                # 5. dense dot products of all rows
                for i in T.unroll(NR):
                    acc[i] = T.float32(0)
                    for c in T.unroll(CPT):
                        for v in T.unroll(4):
                            for j in T.unroll(P):
                                acc[i] = acc[i] + lut_s[(((i // RI) * TR + t // TC) * RI + i % RI) * E + _code4(
                                    T, wr[(i * CPT + c) * 4 + v], j * b, MASK) // 4] * xr[c * CW + v * P + j]
                # 6. sparse corrections (val - lut[scode]) * x[col]: each thread takes every TC-th non-zero of a
                #    row; the first ones were loaded above, longer rows finish in a loop
                if sparse:
                    for i in T.unroll(NR):
                        acc[i] = acc[i] + sv[i] * sx[i]
                    for i in T.unroll(NR):
                        for e in range((cr[2 * i + 1] - cr[2 * i] + TC - 1) // TC - 1):
                            if cr[2 * i] + (e + 1) * TC + t % TC < cr[2 * i + 1]:
                                acc[i] = acc[i] + (
                                    T.Cast("float32", VAL[cr[2 * i] + (e + 1) * TC + t % TC])
                                    - lut_s[(((i // RI) * TR + t // TC) * RI + i % RI) * E
                                            + T.Cast("int32", SC[cr[2 * i] + (e + 1) * TC + t % TC])]
                                ) * T.Cast("float32", X[0, T.Cast("int32", COL[cr[2 * i] + (e + 1) * TC + t % TC])])
                # 7. reduction tree: shuffles within the row's lanes, then (TC > 32) across warps in shared memory
                for i in T.unroll(NR):
                    for s in T.unroll(NSTEP):
                        acc[i] = acc[i] + T.call_extern("float32", "__shfl_xor_sync", T.uint32(0xFFFFFFFF),
                                                        acc[i], (SW // 2) >> s, 32)
                if NWC == 1:
                    for i in T.unroll(NR):
                        if t % TC == 0:
                            if bx * RB + ((i // RI) * TR + t // TC) * RI + i % RI < R:
                                Y[0, bx * RB + ((i // RI) * TR + t // TC) * RI + i % RI] = T.Cast(
                                    "float16", acc[i] + T.Cast(
                                        "float32", BIAS[bx * RB + ((i // RI) * TR + t // TC) * RI + i % RI]))
                else:  # TR == 1: thread-local row i is block row i
                    if t % 32 == 0:
                        for i in T.unroll(NR):
                            red_s[(t // 32) * NR + i] = acc[i]
                    T.tvm_storage_sync("shared")
                    if t < NR:
                        acc[0] = T.float32(0)
                        for wi in T.unroll(NWC):
                            acc[0] = acc[0] + red_s[wi * NR + t]
                        if bx * RB + t < R:
                            Y[0, bx * RB + t] = T.Cast("float16", acc[0] + T.Cast("float32", BIAS[bx * RB + t]))

    return gemv, geo


def build_gemm(key: CudaKey, knobs: GemmKnobs, name: str):
    """TVMScript prim_func for n >= 2 rows of x: ``y[n, r] = sum_k W_hat[r, k] * x[n, k] + bias[r]``.

    A block owns ``16 * wm`` rows and ``np`` rows of x and has ``wm * wk``
    warps: warp (i, j) owns rows ``16 i ..`` and every ``wk``-th k-tile from
    ``j`` (split K inside the block). Per k-tile a warp decodes its 16 x KT
    weight tile once into its own shared tile (fp16), then runs
    ``mma.sync.m16n8k16`` over it with x fragments read straight from global
    memory (L1-cached, shared by the ``wm`` warps of one k-range). The sparse
    corrections are split over the ``wk`` warps too; the partial sums meet in
    shared memory (a reduction, no atomics) and the first warp of each row
    group adds the bias and stores.
    """
    from tvm.script import tirx as T

    lay = ChunkLayout(key.in_features, key.bits)
    P, CW, NC, NW = lay.per_word, lay.chunk_cols, lay.n_chunks, lay.words
    R, K, b = key.rows, key.in_features, key.bits
    E, MASK = 1 << b, (1 << b) - 1
    WM, WK, NP, KC = knobs.wm, knobs.wk, knobs.np, knobs.kc
    if (KC * CW) % 16 or KC % 2 or NP % 8:
        raise ValueError(f"gemm knobs {knobs}: the k-tile must be an even number of chunks and a multiple of 16 "
                         "columns, the batch tile a multiple of 8")
    RT = 16 * WM
    KT = KC * CW
    CWW = CW // 2  # words per decoded chunk
    D, S = _tile_strides(b, KC)
    NT = 32 * WM * WK
    NTW = NP // 8  # n8 tiles per warp
    NKT = -(-NC // KC)
    NKW = -(-NKT // WK)  # k-tiles per warp
    NBLK = -(-R // RT)
    NDEC = KC // 2  # decode rounds: 16 rows x 2 chunks each
    NLUT = -(-(RT * E) // NT)
    PAIRS = K % 2 == 0  # x rows 4-byte aligned: fragment pairs load as one 32-bit word
    sparse = key.sparse
    lut_dt, col_dt, val_dt = key.lut_dtype, key.col_dtype, key.val_dtype

    @T.prim_func
    def gemm(x: T.handle, w: T.handle, lut: T.handle, crow: T.handle, col: T.handle, val: T.handle,
             scode: T.handle, bias: T.handle, y: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        n = T.int32()
        nnz = T.int32()
        X = T.match_buffer(x, (n, K), "float16")
        W = T.match_buffer(w, (R, NW), "uint32", align=16)
        LUT = T.match_buffer(lut, (R, E), lut_dt)
        CROW = T.match_buffer(crow, (R + 1,), "int32")
        COL = T.match_buffer(col, (nnz,), col_dt)
        VAL = T.match_buffer(val, (nnz,), val_dt)
        SC = T.match_buffer(scode, (nnz,), "uint8")
        BIAS = T.match_buffer(bias, (R,), "float16")
        Y = T.match_buffer(y, (n, R), "float16")
        for bx in T.thread_binding(NBLK, thread="blockIdx.x"):
            for by in T.thread_binding((n + NP - 1) // NP, thread="blockIdx.y"):
                for t in T.thread_binding(NT, thread="threadIdx.x"):
                    # tables code-major per 16-row group: the 16 rows of a decode round read 16 banks
                    lut_s = T.alloc_buffer((RT * E,), "float32", scope="shared")
                    w_s = T.alloc_buffer((WM * WK * 16 * S,), "uint32", scope="shared")
                    red_s = T.alloc_buffer((WM * 32 * NTW * 4,), "float32", scope="shared")
                    wr = T.alloc_buffer((NDEC * 4,), "uint32", scope="local")
                    af = T.alloc_buffer((4,), "uint32", scope="local")
                    bf = T.alloc_buffer((4,), "float16", scope="local")
                    cf = T.alloc_buffer((NTW * 4,), "float32", scope="local")
                    for i in range(NLUT):
                        if i * NT + t < RT * E:
                            if bx * RT + (i * NT + t) // (16 * E) * 16 + (i * NT + t) % 16 < R:
                                lut_s[i * NT + t] = T.Cast("float32", LUT[
                                    bx * RT + (i * NT + t) // (16 * E) * 16 + (i * NT + t) % 16, (i * NT + t) // 16 % E])
                    for i in T.unroll(NTW * 4):
                        cf[i] = T.float32(0)
                    T.tvm_storage_sync("shared")
                    # words of the warp's first k-tile; each iteration then loads the next tile's words
                    # right after decoding the current one, so the loads fly during the sync and the mma
                    for i in T.unroll(NDEC):
                        if (bx * RT + (t // 32) % WM * 16 + t % 16 < R
                                and ((t // 32) // WM) * KC + 2 * i + (t % 32) // 16 < NC):
                            for v in T.vectorized(4):
                                wr[i * 4 + v] = W[bx * RT + (t // 32) % WM * 16 + t % 16,
                                                  (((t // 32) // WM) * KC + 2 * i + (t % 32) // 16) * 4 + v]
                    for kw in range(NKW):
                        # (a warp past the last k-tile decodes zeros: its chunks are past NC, its x past K)
                        for i in T.unroll(NDEC):
                            if (bx * RT + (t // 32) % WM * 16 + t % 16 < R
                                    and ((t // 32) // WM + kw * WK) * KC + 2 * i + (t % 32) // 16 < NC):
                                for v in T.unroll(4):
                                    for jj in T.unroll(P // 2):
                                        w_s[((t // 32) * 16 + t % 16) * S + (2 * i + (t % 32) // 16) * D
                                            + (v * P) // 2 + jj] = T.call_extern(
                                            "uint32", "sqc_pack_half2",
                                            lut_s[((t // 32) % WM * E + T.Cast("int32", T.bitwise_and(
                                                T.shift_right(wr[i * 4 + v], T.uint32(2 * jj * b)), T.uint32(MASK))))
                                                  * 16 + t % 16],
                                            lut_s[((t // 32) % WM * E + T.Cast("int32", T.bitwise_and(
                                                T.shift_right(wr[i * 4 + v], T.uint32((2 * jj + 1) * b)), T.uint32(MASK))))
                                                  * 16 + t % 16])
                            else:
                                for q in T.unroll(CWW):
                                    w_s[((t // 32) * 16 + t % 16) * S + (2 * i + (t % 32) // 16) * D + q] = T.uint32(0)
                        for i in T.unroll(NDEC):
                            if (bx * RT + (t // 32) % WM * 16 + t % 16 < R
                                    and ((t // 32) // WM + (kw + 1) * WK) * KC + 2 * i + (t % 32) // 16 < NC):
                                for v in T.vectorized(4):
                                    wr[i * 4 + v] = W[bx * RT + (t // 32) % WM * 16 + t % 16,
                                                      (((t // 32) // WM + (kw + 1) * WK) * KC + 2 * i + (t % 32) // 16) * 4 + v]
                        for ks in T.unroll(KT // 16):
                            # A fragment (4 words): rows g, g+8 of the warp's 16; k pairs 2q, 2q+8
                            for h in T.unroll(4):
                                af[h] = w_s[((t // 32) * 16 + (t % 32) // 4 + (h % 2) * 8) * S
                                            + ((ks * 16 + (h // 2) * 8 + (t % 4) * 2) // CW) * D
                                            + ((ks * 16 + (h // 2) * 8 + (t % 4) * 2) % CW) // 2]
                            for nt in T.unroll(NTW):
                                # B fragment from x in global memory: row n = g of the n8 tile, k pairs 2q, 2q+8
                                for h in T.unroll(2):
                                    if PAIRS:
                                        if (by * NP + nt * 8 + (t % 32) // 4 < n
                                                and ((t // 32) // WM + kw * WK) * KT + ks * 16 + (t % 4) * 2 + h * 8 < K):
                                            for v in T.vectorized(2):
                                                bf[h * 2 + v] = X[by * NP + nt * 8 + (t % 32) // 4,
                                                                  ((t // 32) // WM + kw * WK) * KT + ks * 16
                                                                  + (t % 4) * 2 + h * 8 + v]
                                        else:
                                            for v in T.unroll(2):
                                                bf[h * 2 + v] = T.float16(0)
                                    else:
                                        for v in T.unroll(2):
                                            bf[h * 2 + v] = T.if_then_else(
                                                by * NP + nt * 8 + (t % 32) // 4 < n and ((t // 32) // WM + kw * WK) * KT
                                                + ks * 16 + (t % 4) * 2 + h * 8 + v < K,
                                                X[T.min(by * NP + nt * 8 + (t % 32) // 4, n - 1),
                                                  T.min(((t // 32) // WM + kw * WK) * KT + ks * 16 + (t % 4) * 2
                                                        + h * 8 + v, K - 1)], T.float16(0))
                                T.evaluate(T.call_extern("void", "sqc_mma_16816", T.address_of(cf[nt * 4]),
                                                         af.data, bf.data))
                    # sparse corrections, split over the wk warps of each row group (entry e goes to warp e % wk),
                    # added to the partial sums before they meet
                    if sparse:
                        for h in T.unroll(2):
                            if bx * RT + (t // 32) % WM * 16 + (t % 32) // 4 + h * 8 < R:
                                for e in range((CROW[bx * RT + (t // 32) % WM * 16 + (t % 32) // 4 + h * 8 + 1]
                                                - CROW[bx * RT + (t // 32) % WM * 16 + (t % 32) // 4 + h * 8]
                                                - (t // 32) // WM + WK - 1) // WK):
                                    for nt in T.unroll(NTW):
                                        for v in T.unroll(2):
                                            if by * NP + nt * 8 + (t % 4) * 2 + v < n:
                                                cf[nt * 4 + h * 2 + v] = cf[nt * 4 + h * 2 + v] + (
                                                    T.Cast("float32", VAL[CROW[bx * RT + (t // 32) % WM * 16 + (t % 32) // 4
                                                                               + h * 8] + (t // 32) // WM + e * WK])
                                                    - T.Cast("float32", LUT[
                                                        bx * RT + (t // 32) % WM * 16 + (t % 32) // 4 + h * 8,
                                                        T.Cast("int32", SC[CROW[bx * RT + (t // 32) % WM * 16 + (t % 32) // 4
                                                                                + h * 8] + (t // 32) // WM + e * WK])])
                                                ) * T.Cast("float32", X[
                                                    by * NP + nt * 8 + (t % 4) * 2 + v,
                                                    T.Cast("int32", COL[CROW[bx * RT + (t // 32) % WM * 16 + (t % 32) // 4
                                                                             + h * 8] + (t // 32) // WM + e * WK])])
                    # the wk partial sums of each row group meet in shared memory, one round per k-warp
                    for s in range(1, WK):
                        T.tvm_storage_sync("shared")
                        if (t // 32) // WM == s:
                            for i in T.unroll(NTW * 4):
                                red_s[((t // 32) % WM * 32 + t % 32) * NTW * 4 + i] = cf[i]
                        T.tvm_storage_sync("shared")
                        if (t // 32) // WM == 0:
                            for i in T.unroll(NTW * 4):
                                cf[i] = cf[i] + red_s[((t // 32) % WM * 32 + t % 32) * NTW * 4 + i]
                    # epilogue (first k-warp of each row group): bias, fp16 store
                    if (t // 32) // WM == 0:
                        for h in T.unroll(2):
                            if bx * RT + (t // 32) % WM * 16 + (t % 32) // 4 + h * 8 < R:
                                for nt in T.unroll(NTW):
                                    for v in T.unroll(2):
                                        if by * NP + nt * 8 + (t % 4) * 2 + v < n:
                                            Y[by * NP + nt * 8 + (t % 4) * 2 + v,
                                              bx * RT + (t // 32) % WM * 16 + (t % 32) // 4 + h * 8] = T.Cast(
                                                "float16", cf[nt * 4 + h * 2 + v] + T.Cast(
                                                    "float32", BIAS[bx * RT + (t // 32) % WM * 16 + (t % 32) // 4 + h * 8]))

    geo = {"NT": NT, "NBLK": NBLK, "RT": RT, "KT": KT, "NP": NP}
    return gemm, geo


def kernel_name(op: str, key: CudaKey, knobs: Any) -> str:
    h = hashlib.sha256(repr((op, key, knobs)).encode()).hexdigest()[:10]
    return f"sqc_{op}_{h}"


_SIG = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(([^)]*)\)\s*\{')


def _params(source: str) -> dict[str, tuple[str, ...]]:
    """Kernel symbol -> parameter names (``x_ptr`` -> ``x``), parsed from the generated source."""
    out = {}
    for m in _SIG.finditer(source):
        names = []
        for p in m.group(2).split(","):
            nm = p.strip().split()[-1]
            names.append((nm[:-4] if nm.endswith("_ptr") else nm).lower())
        out[m.group(1)] = tuple(names)
    return out


def generate_source(requests: list[tuple[str, CudaKey, Any]], arch: str = "sm_90") -> tuple[str, list[KernelSpec]]:
    """CUDA C++ for every (op, key, knobs) in ``requests``, from one TVM build.

    TVM lowers the TIR and emits the source; sqc builds it with nvcc itself, so
    TVM's own CUDA compile step is replaced by a pass-through for this call.
    """
    from .build import import_tvm

    tvm = import_tvm()
    import tvm_ffi

    funcs, specs = {}, []
    for op, key, knobs in requests:
        name = kernel_name(op, key, knobs)
        if name in funcs:
            continue
        if op == "gemv":
            f, geo = build_gemv(key, knobs, name)
            spec = KernelSpec(name, op, key, knobs, geo["NT"], geo["NBLK"], 1)
        elif op == "gemm":
            f, geo = build_gemm(key, knobs, name)
            spec = KernelSpec(name, op, key, knobs, geo["NT"], geo["NBLK"], geo["NP"])
        else:
            raise ValueError(f"unknown CUDA kernel op {op!r}")
        funcs[name] = f
        specs.append(spec)
    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    previous = tvm.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", lambda code, *a: code.encode(), override=True)
    try:
        ex = tvm.compile(tvm.IRModule(funcs), target=target)
    finally:
        if previous is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", previous, override=True)
    source = PRELUDE + ex.mod.imports[0].inspect_source("cuda")
    params = _params(source)
    out = []
    for s in specs:
        sym = s.name + "_kernel"
        if sym not in params:
            raise RuntimeError(f"TVM emitted no kernel {sym} (got {sorted(params)})")
        out.append(dataclasses.replace(s, name=sym, params=params[sym]))
    return source, out


def _build(entries: list[tuple[CudaKey, list[str]]], arch: str, target: str, candidates: bool,
           notes: list[str] | None):
    """Generate and build the kernels of ``entries`` (key, layers it serves) into a CudaBundle.

    Each key gets a gemv (batch 1) and two gemms (batch tiles 16 and 64); with
    ``candidates`` every tuning candidate is built too, else only the defaults.
    ``notes=None`` lets a missing nvcc raise; a list records it and keeps the
    source without a fatbin.
    """
    from ..runtime.cuda.kernels import CUDA_FORMAT, CudaBundle
    from .build import import_tvm
    from .nvcc import NvccError, build_fatbin, nvcc_version

    requests, slots = [], []
    for key, layers in entries:
        for bucket in BUCKETS:
            if bucket == "1":
                op, cands = "gemv", gemv_candidates(key)
            else:
                op, cands = "gemm", gemm_candidates(key, GEMM_BATCH_TILES[bucket])
            if not candidates:
                cands = cands[:1]
            requests += [(op, key, kn) for kn in cands]
            syms = [kernel_name(op, key, kn) + "_kernel" for kn in cands]
            slots.append({"key": dataclasses.asdict(key), "bucket": bucket, "layers": list(layers),
                          "candidates": syms, "chosen": syms[0]})
    source, specs = generate_source(requests, arch)
    try:
        fatbin, nvcc = build_fatbin(source, (arch,)), nvcc_version()
    except NvccError as e:
        if notes is None:
            raise
        fatbin, nvcc = b"", None
        notes.append(f"no fatbin in this build ({e}); the CUDA source is kept, but running needs a rebuild with nvcc")
    plan = {"format": CUDA_FORMAT, "arch": [arch], "target": target, "nvcc": nvcc,
            "tvm": import_tvm().__version__, "kernels": {s.name: s.as_dict() for s in specs}, "slots": slots}
    return CudaBundle(source, fatbin, plan)


def build_bundle(model, target_spec, tune: bool = True, notes: list[str] | None = None):
    """Generate, build and plan the CUDA kernels of every quantized layer of ``model``; attach them.

    One gemv (batch 1) and two gemms (batch tiles 16 and 64) per distinct layer
    key. With ``tune`` the fatbin also carries the other candidate knobs, so a
    GPU can time them later (:meth:`sqc.runtime.cuda.kernels.CudaBundle.tune`);
    without it only the defaults are built. Layers whose width has no kernel
    run the reference op and say why. Returns the
    :class:`~sqc.runtime.cuda.kernels.CudaBundle`, or None when no layer got a kernel.
    """
    from ..runtime.cuda.kernels import layer_key
    from ..runtime.qlinear import SqcLinear

    groups: dict[CudaKey, list[str]] = {}
    for name, m in model.named_modules():
        if not isinstance(m, SqcLinear):
            continue
        if m.bits not in SUPPORTED_BITS:
            m.set_kernel(None, KernelStatus.reference(f"no CUDA LUT kernel for {m.bits}-bit codes"))
            continue
        groups.setdefault(CudaKey(**layer_key(m)), []).append(name)
    if not groups:
        return None
    arch = str(target_spec.as_dict().get("arch", "sm_80"))
    bundle = _build(list(groups.items()), arch, str(target_spec), tune, notes if notes is not None else [])
    bundle.attach(model, str(target_spec))
    return bundle


def build_check_bundle(keys: list[CudaKey], arch: str = "sm_90", all_candidates: bool = True):
    """Kernels for ``keys`` without a model (tests and benchmarks): every bucket, every candidate.

    Returns a :class:`~sqc.runtime.cuda.kernels.CudaBundle` whose slots serve no layers;
    write it with ``bundle.write(folder)`` and read it on the GPU machine.
    """
    return _build([(k, []) for k in keys], arch, f"cuda -arch={arch}", all_candidates, None)
