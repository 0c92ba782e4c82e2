"""LUT kernels for x86 CPUs, written in TVMScript and compiled by TVM's LLVM backend.

The lane layout
---------------
The kernels read the codes in the lane layout defined (and documented) in
:mod:`sqc.runtime.cpu.lanes`: ``L`` lanes (16 with AVX-512, 8 with AVX2) hold
``L`` consecutive weights of one row, ``P = 32 // bits`` codes per int32 word,
and column ``c = blk * L * P + t * L + j`` lives in word ``blk * L + j`` at bits
``t * bits``, so one shift brings the codes of ``L`` columns into ``L`` lanes
and a table lookup is one permute (``vpermps``).

``vpermps`` only looks at the low 3 (AVX2) or 4 (AVX-512) bits of each index,
so ``word >> (t * bits)`` is the index vector, no mask needed, as long as the
table register repeats the ``2**bits`` entries to fill all ``L`` lanes. AVX2
with 16-entry tables (4 bits) uses two permutes and a blend on bit 3.
Rows are padded with code 0 to ``Kp = NB * BLK`` columns; when K is a multiple
of the lanes the kernels stop the last block at K and x is read as it comes,
otherwise the runtime pads x with zeros to ``Kp``. The bias is added in the
kernel (a layer without one passes zeros). The tables, the
CSR arrays and the sparse values are the canonical ones, read in their stored
dtypes (fp16/bf16/fp32 tables, uint8/int16/int32 columns): only the codes get
a second layout, and it replaces the canonical codes in memory.

This layout is derived from the canonical one at load time
(:func:`sqc.runtime.cpu.kernels.to_lane_words`); artifacts store the canonical layout.

Kernels
-------
* ``gemv``: batch 1. Each parallel task owns ``rt`` rows; per block it loads
  ``rt`` code vectors and one x vector, and keeps ``rt`` accumulators in
  registers. The sparse part is fused: after the dense dot product the row
  adds ``(val[e] - lut[scode[e]]) * x[col[e]]`` for its non-zeros (``scode``
  is the dense code under the sparse entry; the rows' dense work is uniform,
  so the short sparse tail does not skew the threads).
* ``gemm`` (``decode="tile"``): batch n (symbolic). Each parallel task decodes
  a tile of ``rt`` rows once into an fp32 scratch tile, writes the exact sparse
  values into it, then multiplies it with every row of x in register blocks of
  ``bt`` batch rows by ``rt`` weight rows. Codes are read from memory once per
  call and decoded once, never once per token.
* ``gemm`` (``decode="reg"``): the gemv loop with ``bt`` rows of x: each
  decoded vector stays in a register and feeds ``bt`` FMAs, the sparse
  correction is the gemv's per row of x. Codes are read from memory once per
  call (the row's codes stay in L1 across x tiles) and decoded once per ``bt``
  rows of x; for batches up to ``bt`` that is exactly once.

Knobs are searched by :mod:`sqc.codegen.tune`.
"""
from __future__ import annotations

import os

from ..runtime.cpu.bytelanes import BYTE_LANES
from ..runtime.cpu.lanes import ROW_PAD, SUPPORTED_BITS, GemmKnobs, GemvKnobs, KernelKey, LaneLayout, padded_rows

__all__ = ["ROW_PAD", "padded_rows", "LaneLayout", "GemvKnobs", "GemmKnobs", "KernelKey", "build_gemv", "build_gemm",
           "cpu_lanes", "SUPPORTED_BITS", "gemv_candidates", "gemm_candidates", "default_gemv_knobs",
           "default_gemm_knobs",
           "build_int8_gemv"]


#: the environment variable that opts into the byte kernels (``SQC_CPU_KERNELS=vnni``): they are correct and
#: tested, but not yet faster end to end on small layers (their per-call activation quantization), see
#: :mod:`sqc.codegen.cpu_vnni`
KERNELS_ENV = "SQC_CPU_KERNELS"


def cpu_lanes(tvm_target) -> int:
    """64 with AVX-512 VBMI and VNNI when ``SQC_CPU_KERNELS=vnni`` (the byte kernels of
    :mod:`sqc.codegen.cpu_vnni`), 16 with AVX-512F, 8 with AVX2, 0 when the target has none of them (no LUT
    kernel)."""
    from tvm.target import codegen

    if tvm_target.kind.name != "llvm":
        return 0
    try:
        if os.environ.get(KERNELS_ENV) == "vnni" and all(
                codegen.target_has_features(f, tvm_target) for f in ("avx512bw", "avx512vbmi", "avx512vnni")):
            return 64
        if codegen.target_has_features("avx512f", tvm_target):
            return 16
        if codegen.target_has_features("avx2", tvm_target):
            return 8
    except Exception:  # a non-x86 LLVM target
        return 0
    return 0


def _lookup(T, lanes: int, bits: int, tbl_lo, tbl_hi, idx):
    """Vector table lookup: one permute, or two and a blend for 16 entries on 8 lanes."""
    vf = f"float32x{lanes}"
    if lanes == 16:
        return T.call_llvm_pure_intrin(vf, "llvm.x86.avx512.permvar.sf.512", tbl_lo, idx)
    lo = T.call_llvm_pure_intrin(vf, "llvm.x86.avx2.permps", tbl_lo, idx)
    if bits <= 3:
        return lo
    hi = T.call_llvm_pure_intrin(vf, "llvm.x86.avx2.permps", tbl_hi, idx)
    sel = T.bitwise_and(idx, T.Broadcast(T.int32(8), lanes)) != T.Broadcast(T.int32(0), lanes)
    return T.Select(sel, hi, lo)


def _geometry(key: KernelKey):
    """(layout, lanes, codes per word, block, bits, entries, rows, padded rows)."""
    lay = LaneLayout(key.in_features, key.bits, key.lanes)
    R = key.out_features
    return lay, lay.lanes, lay.per_word, lay.block, key.bits, 1 << key.bits, R, padded_rows(R)


def _correction(T, VAL, LUT, SC, row, e):
    """The sparse entry ``e`` of ``row`` as an additive fp32 correction: val - lut[row, scode]."""
    return T.Cast("float32", VAL[e]) - T.Cast("float32", LUT[row, T.Cast("int32", SC[e])])


def _macros(T, L: int, E: int):
    """TVMScript macros shared by the kernels: ``tables`` and ``hsum``.

    ``tables(LUT, tlo, thi, i, row)`` loads row ``row``'s table into the registers ``tlo[i]`` (and ``thi[i]``):
    lane j holds lut[row, j % E]. ``vpermps`` reads the low 3 (AVX2) or 4 (AVX-512) bits of each lane's
    shifted word, which hold the code and, below 4 bits, low bits of the next code, so the table repeats its
    ``E`` entries across the register: vector loads of the row's entries converted to fp32, stored
    ``L // E`` times (LLVM keeps the register, no memory round trip).

    ``hsum(h, s, k)`` reduces the ``L`` lanes of ``h`` into ``s[k]`` as a tree (log2 L vector adds, not L
    serial ones).
    """
    R2 = max(1, L // E)

    @T.macro
    def tables(LUT, tlo, thi, i, row):
        if E >= L:
            tlo[i, T.Ramp(0, 1, L)] = T.Cast(f"float32x{L}", LUT[row, T.Ramp(0, 1, L)])
            if E > L:
                thi[i, T.Ramp(0, 1, L)] = T.Cast(f"float32x{L}", LUT[row, T.Ramp(L, 1, L)])
        else:
            for rep in T.unroll(R2):
                tlo[i, T.Ramp(rep * E, 1, E)] = T.Cast(f"float32x{E}", LUT[row, T.Ramp(0, 1, E)])

    @T.macro
    def hsum(h, s, k):
        if L == 16:
            h[T.Ramp(0, 1, 8)] = h[T.Ramp(0, 1, 8)] + h[T.Ramp(8, 1, 8)]
        h[T.Ramp(0, 1, 4)] = h[T.Ramp(0, 1, 4)] + h[T.Ramp(4, 1, 4)]
        h[T.Ramp(0, 1, 2)] = h[T.Ramp(0, 1, 2)] + h[T.Ramp(2, 1, 2)]
        s[k] = h[0] + h[1]

    return tables, hsum


#: parallel tasks per call: each task allocates its register scratch once (TVM turns the kernels' local
#: buffers into workspace allocations, one per task iteration: allocated per row tile they cost more than a
#: small layer's arithmetic) and runs a contiguous range of row tiles
MAX_TASKS = 16


def _chunks(tiles: int) -> tuple[int, int]:
    """(tasks, row tiles per task) for ``tiles`` row tiles."""
    nc = min(tiles, MAX_TASKS)
    per = -(-tiles // nc)
    return -(-tiles // per), per


def build_gemv(key: KernelKey, knobs: GemvKnobs):
    """TVMScript prim_func for batch 1: ``y[r] = sum_k W_hat[r, k] * x[k] + bias[r]``.

    Arguments: x fp32 [KX] (``LaneLayout.x_width``: K when K is a multiple of the lanes, else the padded
    Kp), words int32 [RP, NB*L] (lane layout), lut [R, 2**bits], crow int32 [R+1], col [nnz],
    val [nnz] (exact W), scode uint8 [nnz] (the dense code under each sparse entry), bias fp32 [R]
    (zeros for a layer without one), y fp32 [R].
    """
    if key.lanes == BYTE_LANES:
        from .cpu_vnni import build_vnni

        return build_vnni(key, knobs)
    from tvm.script import tirx as T

    lay, L, P, BLK, b, E, R, RP = _geometry(key)
    NF, TT, KX, NW = lay.full_blocks, lay.tail_shifts, lay.x_width, lay.words
    RT, U = knobs.rt, knobs.unroll
    NFU = NF // U
    rem = NF - NFU * U
    sparse = key.sparse
    lut_dt, col_dt, val_dt = key.lut_dtype, key.col_dtype, key.val_dtype
    tables, hsum = _macros(T, L, E)
    NC, PER = _chunks(RP // RT)

    @T.prim_func
    def gemv(x: T.handle, w: T.handle, lut: T.handle, crow: T.handle, col: T.handle, val: T.handle,
             scode: T.handle, bias: T.handle, y: T.handle):
        T.func_attr({"global_symbol": "gemv", "tirx.noalias": True})
        nnz = T.int32()
        X = T.match_buffer(x, (KX,), "float32", align=4, offset_factor=1)
        W = T.match_buffer(w, (RP, NW), "int32", align=4, offset_factor=1)
        LUT = T.match_buffer(lut, (R, E), lut_dt, align=2, offset_factor=1)
        CROW = T.match_buffer(crow, (R + 1,), "int32", align=4, offset_factor=1)
        COL = T.match_buffer(col, (nnz,), col_dt, align=1, offset_factor=1)
        VAL = T.match_buffer(val, (nnz,), val_dt, align=2, offset_factor=1)
        SC = T.match_buffer(scode, (nnz,), "uint8", align=1, offset_factor=1)
        BIAS = T.match_buffer(bias, (R,), "float32", align=4, offset_factor=1)
        Y = T.match_buffer(y, (R,), "float32", align=4, offset_factor=1)
        for c in T.parallel(NC):
            acc = T.decl_buffer((RT, L), "float32", scope="local")
            tlo = T.decl_buffer((RT, L), "float32", scope="local")
            thi = T.decl_buffer((RT, L), "float32", scope="local")
            h = T.decl_buffer((L,), "float32", scope="local")
            s = T.decl_buffer((2,), "float32", scope="local")
            for rr in range(T.min(PER, RP // RT - c * PER)):
                rt = c * PER + rr
                # padding rows read row R-1's table (their codes are 0, their results are dropped)
                for i in T.unroll(RT):
                    tables(LUT, tlo, thi, i, T.min(rt * RT + i, R - 1))
                for i in T.unroll(RT):
                    acc[i, T.Ramp(0, 1, L)] = T.Broadcast(T.float32(0), L)
                for bo in range(NFU):
                    for bu in T.unroll(U):
                        for i in T.unroll(RT):
                            for t in T.unroll(P):
                                acc[i, T.Ramp(0, 1, L)] = acc[i, T.Ramp(0, 1, L)] + _lookup(
                                    T, L, b, tlo[i, T.Ramp(0, 1, L)], thi[i, T.Ramp(0, 1, L)],
                                    T.shift_right(W[rt * RT + i, T.Ramp((bo * U + bu) * L, 1, L)],
                                                  T.Broadcast(T.int32(t * b), L)),
                                ) * X[T.Ramp((bo * U + bu) * BLK + t * L, 1, L)]
                for br in range(rem):
                    for i in T.unroll(RT):
                        for t in T.unroll(P):
                            acc[i, T.Ramp(0, 1, L)] = acc[i, T.Ramp(0, 1, L)] + _lookup(
                                T, L, b, tlo[i, T.Ramp(0, 1, L)], thi[i, T.Ramp(0, 1, L)],
                                T.shift_right(W[rt * RT + i, T.Ramp((NFU * U + br) * L, 1, L)],
                                              T.Broadcast(T.int32(t * b), L)),
                            ) * X[T.Ramp((NFU * U + br) * BLK + t * L, 1, L)]
                # the last block's columns beyond K are never read: x is exactly K wide
                for i in T.unroll(RT):
                    for t in T.unroll(TT):
                        acc[i, T.Ramp(0, 1, L)] = acc[i, T.Ramp(0, 1, L)] + _lookup(
                            T, L, b, tlo[i, T.Ramp(0, 1, L)], thi[i, T.Ramp(0, 1, L)],
                            T.shift_right(W[rt * RT + i, T.Ramp(NF * L, 1, L)], T.Broadcast(T.int32(t * b), L)),
                        ) * X[T.Ramp(NF * BLK + t * L, 1, L)]
                for i in range(RT):
                    if rt * RT + i < R:
                        h[T.Ramp(0, 1, L)] = acc[i, T.Ramp(0, 1, L)]
                        hsum(h, s, 0)
                        if sparse:
                            # two accumulators halve the loop-carried FMA latency chain
                            r = rt * RT + i
                            e0 = CROW[r]
                            s[1] = T.float32(0)
                            for e2 in range((CROW[r + 1] - e0) // 2):
                                s[0] = s[0] + _correction(T, VAL, LUT, SC, r, e0 + 2 * e2) * X[T.Cast("int32", COL[e0 + 2 * e2])]
                                s[1] = s[1] + _correction(T, VAL, LUT, SC, r, e0 + 2 * e2 + 1) * X[T.Cast("int32", COL[e0 + 2 * e2 + 1])]
                            if (CROW[r + 1] - e0) % 2 == 1:
                                s[0] = s[0] + _correction(T, VAL, LUT, SC, r, CROW[r + 1] - 1) * X[T.Cast("int32", COL[CROW[r + 1] - 1])]
                            s[0] = s[0] + s[1]
                        Y[rt * RT + i] = s[0] + BIAS[rt * RT + i]

    return gemv


def build_gemm(key: KernelKey, knobs: GemmKnobs):
    """TVMScript prim_func for any batch n: ``y[n, r] = sum_k W_hat[r, k] * x[n, k] + bias[r]``.

    Arguments as :func:`build_gemv`, with x fp32 [n, KX] and y fp32 [n, R].
    """
    if key.lanes == BYTE_LANES:
        from .cpu_vnni import build_vnni

        return build_vnni(key, knobs)
    if knobs.decode == "reg":
        return _build_gemm_reg(key, knobs)
    if knobs.decode != "tile":
        raise ValueError(f"unknown gemm decode strategy {knobs.decode!r}")
    return _build_gemm_tile(key, knobs)


def _build_gemm_reg(key: KernelKey, knobs: GemmKnobs):
    from tvm.script import tirx as T

    lay, L, P, BLK, b, E, R, RP = _geometry(key)
    NF, TT, KX, NW = lay.full_blocks, lay.tail_shifts, lay.x_width, lay.words
    RT, BT = knobs.rt, knobs.bt
    sparse = key.sparse
    lut_dt, col_dt, val_dt = key.lut_dtype, key.col_dtype, key.val_dtype
    tables, hsum = _macros(T, L, E)
    NC, PER = _chunks(RP // RT)

    @T.prim_func
    def gemm(x: T.handle, w: T.handle, lut: T.handle, crow: T.handle, col: T.handle, val: T.handle,
             scode: T.handle, bias: T.handle, y: T.handle):
        T.func_attr({"global_symbol": "gemm", "tirx.noalias": True})
        n = T.int32()
        nnz = T.int32()
        X = T.match_buffer(x, (n, KX), "float32", align=4, offset_factor=1)
        W = T.match_buffer(w, (RP, NW), "int32", align=4, offset_factor=1)
        LUT = T.match_buffer(lut, (R, E), lut_dt, align=2, offset_factor=1)
        CROW = T.match_buffer(crow, (R + 1,), "int32", align=4, offset_factor=1)
        COL = T.match_buffer(col, (nnz,), col_dt, align=1, offset_factor=1)
        VAL = T.match_buffer(val, (nnz,), val_dt, align=2, offset_factor=1)
        SC = T.match_buffer(scode, (nnz,), "uint8", align=1, offset_factor=1)
        BIAS = T.match_buffer(bias, (R,), "float32", align=4, offset_factor=1)
        Y = T.match_buffer(y, (n, R), "float32", align=4, offset_factor=1)
        for c in T.parallel(NC):
            acc = T.decl_buffer((BT, RT, L), "float32", scope="local")
            dec = T.decl_buffer((RT, L), "float32", scope="local")
            tlo = T.decl_buffer((RT, L), "float32", scope="local")
            thi = T.decl_buffer((RT, L), "float32", scope="local")
            h = T.decl_buffer((L,), "float32", scope="local")
            s = T.decl_buffer((1,), "float32", scope="local")
            for rr in range(T.min(PER, RP // RT - c * PER)):
                rt = c * PER + rr
                for i in T.unroll(RT):
                    tables(LUT, tlo, thi, i, T.min(rt * RT + i, R - 1))
                for bo in range((n + BT - 1) // BT):
                    for bi in T.unroll(BT):
                        for i in T.unroll(RT):
                            acc[bi, i, T.Ramp(0, 1, L)] = T.Broadcast(T.float32(0), L)
                    for blk in range(NF):
                        for t in T.unroll(P):
                            for i in T.unroll(RT):
                                dec[i, T.Ramp(0, 1, L)] = _lookup(
                                    T, L, b, tlo[i, T.Ramp(0, 1, L)], thi[i, T.Ramp(0, 1, L)],
                                    T.shift_right(W[rt * RT + i, T.Ramp(blk * L, 1, L)], T.Broadcast(T.int32(t * b), L)),
                                )
                            for bi in T.unroll(BT):
                                for i in T.unroll(RT):
                                    acc[bi, i, T.Ramp(0, 1, L)] = acc[bi, i, T.Ramp(0, 1, L)] + dec[i, T.Ramp(0, 1, L)] * X[
                                        T.min(bo * BT + bi, n - 1), T.Ramp(blk * BLK + t * L, 1, L)]
                    for t in T.unroll(TT):
                        for i in T.unroll(RT):
                            dec[i, T.Ramp(0, 1, L)] = _lookup(
                                T, L, b, tlo[i, T.Ramp(0, 1, L)], thi[i, T.Ramp(0, 1, L)],
                                T.shift_right(W[rt * RT + i, T.Ramp(NF * L, 1, L)], T.Broadcast(T.int32(t * b), L)),
                            )
                        for bi in T.unroll(BT):
                            for i in T.unroll(RT):
                                acc[bi, i, T.Ramp(0, 1, L)] = acc[bi, i, T.Ramp(0, 1, L)] + dec[i, T.Ramp(0, 1, L)] * X[
                                    T.min(bo * BT + bi, n - 1), T.Ramp(NF * BLK + t * L, 1, L)]
                    for bi in range(BT):
                        for i in range(RT):
                            if bo * BT + bi < n and rt * RT + i < R:
                                h[T.Ramp(0, 1, L)] = acc[bi, i, T.Ramp(0, 1, L)]
                                hsum(h, s, 0)
                                if sparse:
                                    for e in range(CROW[rt * RT + i], CROW[rt * RT + i + 1]):
                                        s[0] = s[0] + _correction(T, VAL, LUT, SC, rt * RT + i, e) * X[bo * BT + bi, T.Cast("int32", COL[e])]
                                Y[bo * BT + bi, rt * RT + i] = s[0] + BIAS[rt * RT + i]

    return gemm


def _build_gemm_tile(key: KernelKey, knobs: GemmKnobs):
    from tvm.script import tirx as T

    lay, L, P, BLK, b, E, R, RP = _geometry(key)
    NB, KP, KX, NW = lay.n_blocks, lay.k_pad, lay.x_width, lay.words
    RT, BT = knobs.rt, knobs.bt
    KV = KX // L
    sparse = key.sparse
    lut_dt, col_dt, val_dt = key.lut_dtype, key.col_dtype, key.val_dtype
    tables, hsum = _macros(T, L, E)
    NC, PER = _chunks(RP // RT)

    @T.prim_func
    def gemm(x: T.handle, w: T.handle, lut: T.handle, crow: T.handle, col: T.handle, val: T.handle,
             scode: T.handle, bias: T.handle, y: T.handle):
        T.func_attr({"global_symbol": "gemm", "tirx.noalias": True})
        n = T.int32()
        nnz = T.int32()
        X = T.match_buffer(x, (n, KX), "float32", align=4, offset_factor=1)
        W = T.match_buffer(w, (RP, NW), "int32", align=4, offset_factor=1)
        LUT = T.match_buffer(lut, (R, E), lut_dt, align=2, offset_factor=1)
        CROW = T.match_buffer(crow, (R + 1,), "int32", align=4, offset_factor=1)
        COL = T.match_buffer(col, (nnz,), col_dt, align=1, offset_factor=1)
        VAL = T.match_buffer(val, (nnz,), val_dt, align=2, offset_factor=1)
        BIAS = T.match_buffer(bias, (R,), "float32", align=4, offset_factor=1)
        Y = T.match_buffer(y, (n, R), "float32", align=4, offset_factor=1)
        for c in T.parallel(NC):
            wt = T.decl_buffer((RT, KP), "float32", scope="global")
            acc = T.decl_buffer((BT, RT, L), "float32", scope="local")
            tlo = T.decl_buffer((RT, L), "float32", scope="local")
            thi = T.decl_buffer((RT, L), "float32", scope="local")
            h = T.decl_buffer((L,), "float32", scope="local")
            s = T.decl_buffer((1,), "float32", scope="local")
            for rr in range(T.min(PER, RP // RT - c * PER)):
                rt = c * PER + rr
                for i in T.unroll(RT):
                    tables(LUT, tlo, thi, i, T.min(rt * RT + i, R - 1))
                # decode the row tile once; the sparse entries overwrite it with W exactly
                for i in range(RT):
                    for blk in range(NB):
                        for t in T.unroll(P):
                            wt[i, T.Ramp(blk * BLK + t * L, 1, L)] = _lookup(
                                T, L, b, tlo[i, T.Ramp(0, 1, L)], thi[i, T.Ramp(0, 1, L)],
                                T.shift_right(W[rt * RT + i, T.Ramp(blk * L, 1, L)], T.Broadcast(T.int32(t * b), L)),
                            )
                    if sparse:
                        if rt * RT + i < R:
                            for e in range(CROW[rt * RT + i], CROW[rt * RT + i + 1]):
                                wt[i, T.Cast("int32", COL[e])] = T.Cast("float32", VAL[e])
                # multiply it with every batch row: bt x rt accumulators in registers
                for bo in range((n + BT - 1) // BT):
                    for bi in T.unroll(BT):
                        for i in T.unroll(RT):
                            acc[bi, i, T.Ramp(0, 1, L)] = T.Broadcast(T.float32(0), L)
                    for kv in range(KV):
                        for bi in T.unroll(BT):
                            for i in T.unroll(RT):
                                acc[bi, i, T.Ramp(0, 1, L)] = acc[bi, i, T.Ramp(0, 1, L)] + wt[i, T.Ramp(kv * L, 1, L)] * X[
                                    T.min(bo * BT + bi, n - 1), T.Ramp(kv * L, 1, L)]
                    for bi in range(BT):
                        for i in range(RT):
                            if bo * BT + bi < n and rt * RT + i < R:
                                h[T.Ramp(0, 1, L)] = acc[bi, i, T.Ramp(0, 1, L)]
                                hsum(h, s, 0)
                                Y[bo * BT + bi, rt * RT + i] = s[0] + BIAS[rt * RT + i]

    return gemm


def gemv_candidates(lanes: int = 16) -> list[GemvKnobs]:
    if lanes == BYTE_LANES:
        from .cpu_vnni import vnni_gemv_candidates

        return vnni_gemv_candidates()
    return [GemvKnobs(rt, u) for rt in (1, 2, 4) for u in (1, 2)]


def gemm_candidates(bucket: str = "17+", lanes: int = 16) -> list[GemmKnobs]:
    if lanes == BYTE_LANES:
        from .cpu_vnni import vnni_gemm_candidates

        return vnni_gemm_candidates(bucket)
    reg = [GemmKnobs(rt, bt, "reg") for rt, bt in ((2, 8), (1, 8), (2, 4), (4, 4), (4, 2))]
    tile = [GemmKnobs(rt, bt, "tile") for rt, bt in ((4, 4), (8, 2), (2, 8), (4, 3))]
    return reg + tile if bucket == "2-16" else tile + reg


def default_gemv_knobs(lanes: int = 16) -> GemvKnobs:
    return gemv_candidates(lanes)[0] if lanes == BYTE_LANES else GemvKnobs()


def default_gemm_knobs(bucket: str, lanes: int = 16) -> GemmKnobs:
    return gemm_candidates(bucket, lanes)[0]


def build_int8_gemv(key: KernelKey, knobs: GemvKnobs):
    """TVMScript prim_func for the compact output projection at batch 1: ``y[r] = s[r] * sum_k q[r, k] x[k] + b[r]``.

    ``key.op == "i8gemv"``: int8 weights [R, K] with one fp32 scale per row (:mod:`sqc.runtime.int8`),
    x fp32 [K], bias fp32 [R] (zeros for none), y fp32 [R]. Each L-lane step loads L int8 weights
    (sign-extended and converted in registers: the weights are read once, at one byte each) and one
    x vector shared by ``rt`` rows; the scale and bias are applied once per row after the tree reduction.
    """
    from tvm.script import tirx as T

    L, R, K = key.lanes, key.out_features, key.in_features
    RT = knobs.rt
    RP = padded_rows(R)
    KV, KT = K // L, K % L
    _, hsum = _macros(T, L, L)  # the tree reduction only: the head has no tables
    NC, PER = _chunks(RP // RT)

    @T.prim_func
    def i8gemv(x: T.handle, q: T.handle, scale: T.handle, bias: T.handle, y: T.handle):
        T.func_attr({"global_symbol": "i8gemv", "tirx.noalias": True})
        X = T.match_buffer(x, (K,), "float32", align=4, offset_factor=1)
        Q = T.match_buffer(q, (R, K), "int8", align=1, offset_factor=1)
        S = T.match_buffer(scale, (R,), "float32", align=4, offset_factor=1)
        BIAS = T.match_buffer(bias, (R,), "float32", align=4, offset_factor=1)
        Y = T.match_buffer(y, (R,), "float32", align=4, offset_factor=1)
        for c in T.parallel(NC):
            acc = T.decl_buffer((RT, L), "float32", scope="local")
            h = T.decl_buffer((L,), "float32", scope="local")
            s = T.decl_buffer((1,), "float32", scope="local")
            for rr in range(T.min(PER, RP // RT - c * PER)):
                rt = c * PER + rr
                for i in T.unroll(RT):
                    acc[i, T.Ramp(0, 1, L)] = T.Broadcast(T.float32(0), L)
                for kv in range(KV):
                    for i in T.unroll(RT):
                        acc[i, T.Ramp(0, 1, L)] = acc[i, T.Ramp(0, 1, L)] + T.Cast(
                            f"float32x{L}", Q[T.min(rt * RT + i, R - 1), T.Ramp(kv * L, 1, L)]) * X[T.Ramp(kv * L, 1, L)]
                for i in range(RT):
                    if rt * RT + i < R:
                        h[T.Ramp(0, 1, L)] = acc[i, T.Ramp(0, 1, L)]
                        hsum(h, s, 0)
                        for kt in range(KT):
                            s[0] = s[0] + T.Cast("float32", Q[rt * RT + i, KV * L + kt]) * X[KV * L + kt]
                        Y[rt * RT + i] = s[0] * S[rt * RT + i] + BIAS[rt * RT + i]

    return i8gemv
