"""LUT kernels for CPUs with AVX-512 VBMI and VNNI: byte lookups multiplied with int8 activations.

The layout and the numerics are defined (and stated as a reference) in
:mod:`sqc.runtime.cpu.bytelanes`. Per 64 weights the inner loop is

* ``vpmultishiftqb``: byte ``8q + j`` takes the 8 bits at offset ``bits * (8p + j)`` of qword ``q``
  (the code of slot ``8p + j``, with the next codes' bits above it);
* ``vpermb``: looks the byte up in the row's 64-byte table (the row's entries repeated, so the bits
  above the code do not matter);
* ``vpdpbusd``: 64 products of the table bytes (unsigned) with the pass's int8 activations, summed in
  groups of 4 into 16 int32 lanes;
* one int32 -> fp32 conversion and one FMA with the groups' activation scales (lanes ``2q``, ``2q + 1``
  hold qword ``q``'s group).

Each call first quantizes x (per batch row, :func:`sqc.runtime.cpu.bytelanes.quantize_x`) into a
workspace: the int8 values in pass order, the scales per lane, and the sum ``sum_g s_g * sum xq``
that the tables' minimum multiplies. Then each parallel task runs row tiles of ``rt`` rows:

* ``gemv`` (batch 1): ``rt`` rows share each pass's activation vector and scales;
* ``gemm`` (any batch, ``decode="reg"``): each looked-up vector feeds ``bt`` rows of x, so codes are
  unpacked and looked up once per ``bt`` batch rows.

The sparse part is fused as in the fp32 kernels, in fp32 with the exact x and table:
``(val - lut[scode]) * x[col]`` per non-zero (the differences made once, when the layer binds),
after the dense part, on four accumulators; then the bias.

Status: opt-in (``SQC_CPU_KERNELS=vnni``). Measured on an AMD EPYC (Zen 4), 2 threads, all
settings in the same interleaved rounds (``benchmarks/kernel_speed.py --stack-only``): a stack
of 4096x4096 layers beyond twice the L3 runs 1.9x (3-bit) to 2.2x (4-bit) faster than the fp32
lane kernels dense, 1.5x with 0.45 % sparse (the corrections' scalar loop is not overlapped with
the code stream). On SmolLM2's small layers decode is about even and prefill slower (the batched
kernel converts every pass's int32 sums to fp32 for its group scales); that and the tests that
compare against the exact op are what stand between these kernels and the default.
"""
from __future__ import annotations

from ..runtime.cpu.bytelanes import PANEL, ByteLayout
from ..runtime.cpu.lanes import GemmKnobs, GemvKnobs, KernelKey, padded_rows

__all__ = ["build_vnni", "vnni_gemv_candidates", "vnni_gemm_candidates"]

MAX_TASKS = 16
#: bytes of codes prefetched ahead of the loads
PREFETCH = 2048


def _chunks(tiles: int) -> tuple[int, int]:
    nc = min(tiles, MAX_TASKS)
    per = -(-tiles // nc)
    return -(-tiles // per), per


def vnni_gemv_candidates() -> list[GemvKnobs]:
    """Rows per tile: whole panels, so a task reads one sequential stream of codes per panel."""
    return [GemvKnobs(rt, 1) for rt in (PANEL, 2 * PANEL)]


def vnni_gemm_candidates(bucket: str = "17+") -> list[GemmKnobs]:
    return [GemmKnobs(rt, bt, "reg") for rt, bt in ((PANEL, 4), (PANEL, 2), (2 * PANEL, 2), (PANEL, 6))]


def build_vnni(key: KernelKey, knobs):
    """TVMScript prim_func for ``key.op`` ``"gemv"`` (x fp32 [1, K]) or ``"gemm"`` (x fp32 [n, K]); y fp32
    [n, R]. Arguments: x, words uint8 [RP / PANEL, NZ * PANEL * 64] (byte layout, rows in panels), table bytes
    uint8 [R, 64], table step fp32 [R], table minimum fp32 [R], crow int32 [R+1], col [nnz], the sparse
    corrections ``val - lut[scode]`` fp32 [nnz] (made once, when the layer binds), bias fp32 [R], y."""
    from tvm.script import tirx as T

    batched = key.op == "gemm"
    if batched and knobs.decode != "reg":
        raise ValueError(f"the VNNI gemm decodes in registers (decode='reg'), not {knobs.decode!r}")
    lay = ByteLayout(key.in_features, key.bits)
    K, R, b = key.in_features, key.out_features, key.bits
    RP = padded_rows(R)
    NQ, PZ, BLK, NZ = lay.per_qword, lay.passes, lay.block, lay.n_blocks
    G = NZ * PZ  # pass vectors per row of x
    RT = knobs.rt
    BT = knobs.bt if batched else 1
    sparse = key.sparse
    col_dt = key.col_dtype
    NC, PER = _chunks(RP // RT)

    def lookup(tab, ct, word):
        idx = T.call_llvm_pure_intrin("uint8x64", "llvm.x86.avx512.pmultishift.qb.512", ct, word)
        return T.call_llvm_pure_intrin("uint8x64", "llvm.x86.avx512.permvar.qi.512", tab, idx)

    def dot(lk, xq):
        return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", T.Broadcast(T.int32(0), 16),
                                       lk, xq)

    @T.prim_func
    def kernel(x: T.handle, w: T.handle, qt: T.handle, ts: T.handle, tm: T.handle, crow: T.handle, col: T.handle,
               delta: T.handle, bias: T.handle, y: T.handle):
        T.func_attr({"global_symbol": key.op, "tirx.noalias": True})
        n = T.int32()
        nnz = T.int32()
        X = T.match_buffer(x, (n, K), "float32", align=4, offset_factor=1)
        W = T.match_buffer(w, (RP // PANEL, NZ * PANEL * 64), "uint8", align=1, offset_factor=1)
        QT = T.match_buffer(qt, (R, 64), "uint8", align=1, offset_factor=1)
        TS = T.match_buffer(ts, (R,), "float32", align=4, offset_factor=1)
        TM = T.match_buffer(tm, (R,), "float32", align=4, offset_factor=1)
        CROW = T.match_buffer(crow, (R + 1,), "int32", align=4, offset_factor=1)
        COL = T.match_buffer(col, (nnz,), col_dt, align=1, offset_factor=1)
        D = T.match_buffer(delta, (nnz,), "float32", align=4, offset_factor=1)
        BIAS = T.match_buffer(bias, (R,), "float32", align=4, offset_factor=1)
        Y = T.match_buffer(y, (n, R), "float32", align=4, offset_factor=1)
        XQ = T.decl_buffer((n * G * 64,), "int8", scope="global")
        XS = T.decl_buffer((n * G * 16,), "float32", scope="global")
        SS = T.decl_buffer((n,), "float32", scope="global")
        # quantize x: per batch row, per group (the W_p columns of one qword in one pass); a whole pass of 8-column
        # groups inside x in 8-lane vectors, the rest (the 5-column 3-bit pass, the last block's tail) one by one
        for bq in T.parallel(n) if batched else T.serial(n):
            am = T.decl_buffer((2,), "float32", scope="local")
            acc = T.decl_buffer((1,), "float32", scope="local")
            v = T.decl_buffer((8,), "float32", scope="local")
            h = T.decl_buffer((8,), "float32", scope="local")
            acc[0] = T.float32(0)
            for z in range(NZ):
                for p in range(PZ):
                    if NQ - 8 * p >= 8 and z * BLK + 64 * p + 64 <= K:
                        for q in range(8):
                            v[T.Ramp(0, 1, 8)] = X[bq, T.Ramp(z * BLK + 64 * p + 8 * q, 1, 8)]
                            h[T.Ramp(0, 1, 8)] = T.fabs(v[T.Ramp(0, 1, 8)])
                            h[T.Ramp(0, 1, 4)] = T.max(h[T.Ramp(0, 1, 4)], h[T.Ramp(4, 1, 4)])
                            h[T.Ramp(0, 1, 2)] = T.max(h[T.Ramp(0, 1, 2)], h[T.Ramp(2, 1, 2)])
                            am[0] = T.max(h[0], h[1])
                            am[1] = T.if_then_else(am[0] > T.float32(0), T.float32(127) / am[0], T.float32(0))
                            am[0] = am[0] / T.float32(127)
                            XS[T.Ramp((bq * G + z * PZ + p) * 16 + 2 * q, 1, 2)] = T.Broadcast(am[0], 2)
                            v[T.Ramp(0, 1, 8)] = T.nearbyint(v[T.Ramp(0, 1, 8)] * T.Broadcast(am[1], 8))
                            XQ[T.Ramp((bq * G + z * PZ + p) * 64 + 8 * q, 1, 8)] = T.Cast("int8x8", v[T.Ramp(0, 1, 8)])
                            v[T.Ramp(0, 1, 4)] = v[T.Ramp(0, 1, 4)] + v[T.Ramp(4, 1, 4)]
                            v[T.Ramp(0, 1, 2)] = v[T.Ramp(0, 1, 2)] + v[T.Ramp(2, 1, 2)]
                            acc[0] = acc[0] + am[0] * (v[0] + v[1])
                    else:
                        for q in range(8):
                            am[0] = T.float32(0)
                            for j in range(T.min(8, NQ - 8 * p)):
                                if z * BLK + 64 * p + q * T.min(8, NQ - 8 * p) + j < K:
                                    am[0] = T.max(am[0], T.fabs(X[bq, z * BLK + 64 * p + q * T.min(8, NQ - 8 * p) + j]))
                            am[1] = T.if_then_else(am[0] > T.float32(0), T.float32(127) / am[0], T.float32(0))
                            am[0] = am[0] / T.float32(127)
                            XS[(bq * G + z * PZ + p) * 16 + 2 * q] = am[0]
                            XS[(bq * G + z * PZ + p) * 16 + 2 * q + 1] = am[0]
                            for j in range(8):
                                XQ[(bq * G + z * PZ + p) * 64 + 8 * q + j] = T.int8(0)
                            for j in range(T.min(8, NQ - 8 * p)):
                                if z * BLK + 64 * p + q * T.min(8, NQ - 8 * p) + j < K:
                                    XQ[(bq * G + z * PZ + p) * 64 + 8 * q + j] = T.Cast("int8", T.nearbyint(
                                        X[bq, z * BLK + 64 * p + q * T.min(8, NQ - 8 * p) + j] * am[1]))
                                    acc[0] = acc[0] + am[0] * T.Cast(
                                        "float32", XQ[(bq * G + z * PZ + p) * 64 + 8 * q + j])
            SS[bq] = acc[0]
        for c in T.parallel(NC):
            ct = T.decl_buffer((PZ, 64), "uint8", scope="local")
            tab = T.decl_buffer((RT, 64), "uint8", scope="local")
            lk = T.decl_buffer((RT, 64), "uint8", scope="local")
            f = T.decl_buffer((BT, RT, 16), "float32", scope="local")
            h = T.decl_buffer((16,), "float32", scope="local")
            s = T.decl_buffer((4,), "float32", scope="local")
            for p in T.unroll(PZ):
                for q in T.unroll(8):
                    for j in T.unroll(8):
                        ct[p, 8 * q + j] = T.Cast("uint8", b * T.min(8 * p + j, NQ - 1))
            for rr in range(T.min(PER, RP // RT - c * PER)):
                rt = c * PER + rr
                for i in T.unroll(RT):
                    tab[i, T.Ramp(0, 1, 64)] = QT[T.min(rt * RT + i, R - 1), T.Ramp(0, 1, 64)]
                for bo in range((n + BT - 1) // BT):
                    for bi in T.unroll(BT):
                        for i in T.unroll(RT):
                            f[bi, i, T.Ramp(0, 1, 16)] = T.Broadcast(T.float32(0), 16)
                    for z in range(NZ):
                        # software prefetch PREFETCH bytes ahead in each panel's stream (into the next panel at the
                        # end of a row tile, so the sparse corrections' scalar work does not leave memory idle)
                        for pi in T.unroll(RT // PANEL):
                            for ln in T.unroll(PANEL):
                                T.evaluate(T.call_llvm_intrin(
                                    "void", "llvm.prefetch.p0",
                                    T.address_of(W[rt * RT // PANEL + pi, (z * PANEL + ln) * 64 + PREFETCH]),
                                    T.int32(0), T.int32(3), T.int32(1)))
                        for p in T.unroll(PZ):
                            for i in T.unroll(RT):
                                lk[i, T.Ramp(0, 1, 64)] = lookup(tab[i, T.Ramp(0, 1, 64)], ct[p, T.Ramp(0, 1, 64)],
                                                                 W[(rt * RT + i) // PANEL, T.Ramp(
                                                                     (z * PANEL + (rt * RT + i) % PANEL) * 64, 1, 64)])
                            for bi in T.unroll(BT):
                                for i in T.unroll(RT):
                                    f[bi, i, T.Ramp(0, 1, 16)] = f[bi, i, T.Ramp(0, 1, 16)] + T.Cast(
                                        "float32x16", dot(lk[i, T.Ramp(0, 1, 64)], XQ[T.Ramp(
                                            (T.min(bo * BT + bi, n - 1) * G + z * PZ + p) * 64, 1, 64)])
                                    ) * XS[T.Ramp((T.min(bo * BT + bi, n - 1) * G + z * PZ + p) * 16, 1, 16)]
                    for bi in range(BT):
                        for i in range(RT):
                            if bo * BT + bi < n and rt * RT + i < R:
                                h[T.Ramp(0, 1, 16)] = f[bi, i, T.Ramp(0, 1, 16)]
                                h[T.Ramp(0, 1, 8)] = h[T.Ramp(0, 1, 8)] + h[T.Ramp(8, 1, 8)]
                                h[T.Ramp(0, 1, 4)] = h[T.Ramp(0, 1, 4)] + h[T.Ramp(4, 1, 4)]
                                h[T.Ramp(0, 1, 2)] = h[T.Ramp(0, 1, 2)] + h[T.Ramp(2, 1, 2)]
                                s[0] = TS[rt * RT + i] * (h[0] + h[1]) + TM[rt * RT + i] * SS[bo * BT + bi]
                                if sparse:
                                    # three more accumulators: the corrections' FMA chain is what a sparse row
                                    # waits on
                                    e0 = CROW[rt * RT + i]
                                    ne = CROW[rt * RT + i + 1] - e0
                                    s[1] = T.float32(0)
                                    s[2] = T.float32(0)
                                    s[3] = T.float32(0)
                                    for e4 in range(ne // 4):
                                        for u in T.unroll(4):
                                            s[u] = s[u] + D[e0 + 4 * e4 + u] * X[
                                                bo * BT + bi, T.Cast("int32", COL[e0 + 4 * e4 + u])]
                                    for e in range(ne % 4):
                                        s[0] = s[0] + D[e0 + ne - ne % 4 + e] * X[
                                            bo * BT + bi, T.Cast("int32", COL[e0 + ne - ne % 4 + e])]
                                    s[0] = (s[0] + s[1]) + (s[2] + s[3])
                                Y[bo * BT + bi, rt * RT + i] = s[0] + BIAS[rt * RT + i]

    return kernel
