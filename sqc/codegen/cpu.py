"""LUT kernels for x86 CPUs, written in TVMScript and compiled by TVM's LLVM backend.

The lane layout
---------------
The CPU kernels vectorize along a row: a vector of ``L`` lanes (16 with
AVX-512, 8 with AVX2) holds ``L`` consecutive weights of one row, and the
row's table sits in one (or two) vector registers. A table lookup is then one
permute instruction (``vpermps``) whose index vector is the lanes' codes. The
layout that makes the codes of ``L`` consecutive columns arrive in ``L`` lanes
with one shift is:

* ``P = 32 // bits`` codes per int32 word (10 at 3 bits, 8 at 4 bits);
* a block covers ``BLK = L * P`` columns and is stored in ``L`` words;
* column ``c = blk * BLK + t * L + j`` lives in word ``blk * L + j`` at bits
  ``t * bits .. t * bits + bits - 1``.

``vpermps`` only looks at the low 3 (AVX2) or 4 (AVX-512) bits of each index,
so ``word >> (t * bits)`` is the index vector, no mask needed, as long as the
table register repeats the ``2**bits`` entries to fill all ``L`` lanes. AVX2
with 16-entry tables (4 bits) uses two permutes and a blend on bit 3.
Rows are padded with code 0 to ``Kp = NB * BLK`` columns; the runtime pads x
with zeros to match, so padding contributes exactly nothing. The tables, the
CSR arrays and the sparse values are the canonical ones, read in their stored
dtypes (fp16/bf16/fp32 tables, uint8/int16/int32 columns): only the codes get
a second layout, and it replaces the canonical codes in memory.

This layout is derived from the canonical one at load time
(:func:`sqc.runtime.cpu.to_lane_layout`); artifacts store the canonical layout.

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

import dataclasses
from typing import Any

__all__ = ["ROW_PAD", "padded_rows", "LaneLayout", "GemvKnobs", "GemmKnobs", "KernelKey", "build_gemv", "build_gemm",
           "cpu_lanes", "SUPPORTED_BITS", "gemv_candidates", "gemm_candidates", "default_gemm_knobs"]

SUPPORTED_BITS = (2, 3, 4)
#: rows of the lane layout are padded to a multiple of this (every rt knob divides it)
ROW_PAD = 8


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


def cpu_lanes(tvm_target) -> int:
    """16 with AVX-512F, 8 with AVX2, 0 when the target has neither (no LUT kernel)."""
    from tvm.target import codegen

    if tvm_target.kind.name != "llvm":
        return 0
    try:
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


def padded_rows(out_features: int) -> int:
    """Rows of the lane layout: ``out_features`` rounded up to a multiple of :data:`ROW_PAD`."""
    return -(-out_features // ROW_PAD) * ROW_PAD


def _geometry(key: KernelKey):
    """(lanes, codes per word, block, blocks, table width, bits, padded K, entries, rows, padded rows)."""
    lay = LaneLayout(key.in_features, key.bits, key.lanes)
    R = key.out_features
    return (lay.lanes, lay.per_word, lay.block, lay.n_blocks, lay.table_width, key.bits, lay.k_pad,
            1 << key.bits, R, padded_rows(R))


def _correction(T, VAL, LUT, SC, row, e):
    """The sparse entry ``e`` of ``row`` as an additive fp32 correction: val - lut[row, scode]."""
    return T.Cast("float32", VAL[e]) - T.Cast("float32", LUT[row, T.Cast("int32", SC[e])])


def build_gemv(key: KernelKey, knobs: GemvKnobs):
    """TVMScript prim_func for batch 1: ``y[r] = sum_k W_hat[r, k] * x[k]``.

    Arguments: x fp32 [Kp], words int32 [RP, NB*L] (lane layout), lut [R, 2**bits],
    crow int32 [R+1], col [nnz], val [nnz] (exact W), scode uint8 [nnz] (the dense code
    under each sparse entry), y fp32 [R].
    """
    from tvm.script import tirx as T

    L, P, BLK, NB, TW, b, _, E, R, RP = _geometry(key)
    RT, U = knobs.rt, knobs.unroll
    NBU = NB // U
    rem = NB - NBU * U
    sparse = key.sparse
    lut_dt, col_dt, val_dt = key.lut_dtype, key.col_dtype, key.val_dtype

    @T.prim_func
    def gemv(x: T.handle, w: T.handle, lut: T.handle, crow: T.handle, col: T.handle, val: T.handle,
             scode: T.handle, y: T.handle):
        T.func_attr({"global_symbol": "gemv", "tirx.noalias": True})
        nnz = T.int32()
        X = T.match_buffer(x, (NB * BLK,), "float32", align=4, offset_factor=1)
        W = T.match_buffer(w, (RP, NB * L), "int32", align=4, offset_factor=1)
        LUT = T.match_buffer(lut, (R, E), lut_dt, align=2, offset_factor=1)
        CROW = T.match_buffer(crow, (R + 1,), "int32", align=4, offset_factor=1)
        COL = T.match_buffer(col, (nnz,), col_dt, align=1, offset_factor=1)
        VAL = T.match_buffer(val, (nnz,), val_dt, align=2, offset_factor=1)
        SC = T.match_buffer(scode, (nnz,), "uint8", align=1, offset_factor=1)
        Y = T.match_buffer(y, (R,), "float32", align=4, offset_factor=1)
        for rt in T.parallel(RP // RT):
            acc = T.decl_buffer((RT, L), "float32", scope="local")
            tlo = T.decl_buffer((RT, L), "float32", scope="local")
            thi = T.decl_buffer((RT, L), "float32", scope="local")
            s = T.decl_buffer((2,), "float32", scope="local")
            # each row's table register(s): entry j is lut[row, j % E] in fp32 (padding rows read row R-1)
            for i in T.unroll(RT):
                for j in T.unroll(L):
                    tlo[i, j] = T.Cast("float32", LUT[T.min(rt * RT + i, R - 1), j % E])
                    thi[i, j] = T.Cast("float32", LUT[T.min(rt * RT + i, R - 1), (TW - L + j) % E])
            for i in T.unroll(RT):
                acc[i, T.Ramp(0, 1, L)] = T.Broadcast(T.float32(0), L)
            for bo in range(NBU):
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
                            T.shift_right(W[rt * RT + i, T.Ramp((NBU * U + br) * L, 1, L)],
                                          T.Broadcast(T.int32(t * b), L)),
                        ) * X[T.Ramp((NBU * U + br) * BLK + t * L, 1, L)]
            for i in range(RT):
                if rt * RT + i < R:
                    s[0] = T.float32(0)
                    for j in range(L):
                        s[0] = s[0] + acc[i, j]
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
                    Y[rt * RT + i] = s[0]

    return gemv


def build_gemm(key: KernelKey, knobs: GemmKnobs):
    """TVMScript prim_func for any batch n: ``y[n, r] = sum_k W_hat[r, k] * x[n, k]``.

    Arguments as :func:`build_gemv`, with x fp32 [n, Kp] and y fp32 [n, R].
    """
    if knobs.decode == "reg":
        return _build_gemm_reg(key, knobs)
    if knobs.decode != "tile":
        raise ValueError(f"unknown gemm decode strategy {knobs.decode!r}")
    return _build_gemm_tile(key, knobs)


def _build_gemm_reg(key: KernelKey, knobs: GemmKnobs):
    from tvm.script import tirx as T

    L, P, BLK, NB, TW, b, KP, E, R, RP = _geometry(key)
    RT, BT = knobs.rt, knobs.bt
    sparse = key.sparse
    lut_dt, col_dt, val_dt = key.lut_dtype, key.col_dtype, key.val_dtype

    @T.prim_func
    def gemm(x: T.handle, w: T.handle, lut: T.handle, crow: T.handle, col: T.handle, val: T.handle,
             scode: T.handle, y: T.handle):
        T.func_attr({"global_symbol": "gemm", "tirx.noalias": True})
        n = T.int32()
        nnz = T.int32()
        X = T.match_buffer(x, (n, KP), "float32", align=4, offset_factor=1)
        W = T.match_buffer(w, (RP, NB * L), "int32", align=4, offset_factor=1)
        LUT = T.match_buffer(lut, (R, E), lut_dt, align=2, offset_factor=1)
        CROW = T.match_buffer(crow, (R + 1,), "int32", align=4, offset_factor=1)
        COL = T.match_buffer(col, (nnz,), col_dt, align=1, offset_factor=1)
        VAL = T.match_buffer(val, (nnz,), val_dt, align=2, offset_factor=1)
        SC = T.match_buffer(scode, (nnz,), "uint8", align=1, offset_factor=1)
        Y = T.match_buffer(y, (n, R), "float32", align=4, offset_factor=1)
        for rt in T.parallel(RP // RT):
            acc = T.decl_buffer((BT, RT, L), "float32", scope="local")
            dec = T.decl_buffer((RT, L), "float32", scope="local")
            tlo = T.decl_buffer((RT, L), "float32", scope="local")
            thi = T.decl_buffer((RT, L), "float32", scope="local")
            s = T.decl_buffer((1,), "float32", scope="local")
            for i in T.unroll(RT):
                for j in T.unroll(L):
                    tlo[i, j] = T.Cast("float32", LUT[T.min(rt * RT + i, R - 1), j % E])
                    thi[i, j] = T.Cast("float32", LUT[T.min(rt * RT + i, R - 1), (TW - L + j) % E])
            for bo in range((n + BT - 1) // BT):
                for bi in T.unroll(BT):
                    for i in T.unroll(RT):
                        acc[bi, i, T.Ramp(0, 1, L)] = T.Broadcast(T.float32(0), L)
                for blk in range(NB):
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
                for bi in range(BT):
                    for i in range(RT):
                        if bo * BT + bi < n and rt * RT + i < R:
                            s[0] = T.float32(0)
                            for j in range(L):
                                s[0] = s[0] + acc[bi, i, j]
                            if sparse:
                                for e in range(CROW[rt * RT + i], CROW[rt * RT + i + 1]):
                                    s[0] = s[0] + _correction(T, VAL, LUT, SC, rt * RT + i, e) * X[bo * BT + bi, T.Cast("int32", COL[e])]
                            Y[bo * BT + bi, rt * RT + i] = s[0]

    return gemm


def _build_gemm_tile(key: KernelKey, knobs: GemmKnobs):
    from tvm.script import tirx as T

    L, P, BLK, NB, TW, b, KP, E, R, RP = _geometry(key)
    RT, BT = knobs.rt, knobs.bt
    KV = KP // L
    sparse = key.sparse
    lut_dt, col_dt, val_dt = key.lut_dtype, key.col_dtype, key.val_dtype

    @T.prim_func
    def gemm(x: T.handle, w: T.handle, lut: T.handle, crow: T.handle, col: T.handle, val: T.handle,
             scode: T.handle, y: T.handle):
        T.func_attr({"global_symbol": "gemm", "tirx.noalias": True})
        n = T.int32()
        nnz = T.int32()
        X = T.match_buffer(x, (n, KP), "float32", align=4, offset_factor=1)
        W = T.match_buffer(w, (RP, NB * L), "int32", align=4, offset_factor=1)
        LUT = T.match_buffer(lut, (R, E), lut_dt, align=2, offset_factor=1)
        CROW = T.match_buffer(crow, (R + 1,), "int32", align=4, offset_factor=1)
        COL = T.match_buffer(col, (nnz,), col_dt, align=1, offset_factor=1)
        VAL = T.match_buffer(val, (nnz,), val_dt, align=2, offset_factor=1)
        Y = T.match_buffer(y, (n, R), "float32", align=4, offset_factor=1)
        for rt in T.parallel(RP // RT):
            wt = T.decl_buffer((RT, KP), "float32", scope="global")
            acc = T.decl_buffer((BT, RT, L), "float32", scope="local")
            tlo = T.decl_buffer((RT, L), "float32", scope="local")
            thi = T.decl_buffer((RT, L), "float32", scope="local")
            s = T.decl_buffer((1,), "float32", scope="local")
            # each row's table register(s): entry j is lut[row, j % E] in fp32 (padding rows read row R-1)
            for i in T.unroll(RT):
                for j in T.unroll(L):
                    tlo[i, j] = T.Cast("float32", LUT[T.min(rt * RT + i, R - 1), j % E])
                    thi[i, j] = T.Cast("float32", LUT[T.min(rt * RT + i, R - 1), (TW - L + j) % E])
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
                            s[0] = T.float32(0)
                            for j in range(L):
                                s[0] = s[0] + acc[bi, i, j]
                            Y[bo * BT + bi, rt * RT + i] = s[0]

    return gemm


def gemv_candidates() -> list[GemvKnobs]:
    return [GemvKnobs(rt, u) for rt in (1, 2, 4) for u in (1, 2)]


def gemm_candidates(bucket: str = "17+") -> list[GemmKnobs]:
    reg = [GemmKnobs(rt, bt, "reg") for rt, bt in ((2, 8), (1, 8), (2, 4), (4, 4), (4, 2))]
    tile = [GemmKnobs(rt, bt, "tile") for rt, bt in ((4, 4), (8, 2), (2, 8), (4, 3))]
    return reg + tile if bucket == "2-16" else tile + reg


def default_gemm_knobs(bucket: str) -> GemmKnobs:
    return gemm_candidates(bucket)[0]
