"""Running the generated CPU kernels on torch tensors, and choosing them per layer.

:func:`to_lane_words` derives the CPU lane layout of the codes (see
:mod:`sqc.codegen.cpu`) from the canonical packed weight and
:func:`from_lane_words` inverts it; :class:`CpuLutKernels` holds one layer's
lane words and compiled functions and runs ``y = x @ W_hat.T + b``. Tensors
reach TVM through DLPack without copies; x is copied only when it is not a
contiguous fp32 matrix as wide as the padded layout (the kernels declare
small alignments, so misaligned views are safe as well).

:func:`attach_cpu_kernels` gives every :class:`SqcLinear` of a model its
kernels: for each distinct kernel key it looks up the tuning database,
searches the knobs when an entry is missing (``tune=True``) or takes the
default knobs (``tune=False``), and loads the compiled libraries from the
on-disk cache. A layer whose kernel cannot be built runs the reference op and
its kernel name says why.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from ..codegen.cpu import (
    SUPPORTED_BITS, GemvKnobs, KernelKey, LaneLayout, default_gemm_knobs, gemm_candidates, gemv_candidates, padded_rows,
)
from .layout import PackedLinear, pack_codes

__all__ = ["to_lane_words", "from_lane_words", "CpuLutKernels", "attach_cpu_kernels", "kernel_key"]

_DT = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
       torch.uint8: "uint8", torch.int16: "int16", torch.int32: "int32"}


def to_lane_words(codes: torch.Tensor, bits: int, lanes: int) -> torch.Tensor:
    """``[R, K]`` integer codes -> lane-layout words int32 ``[RP, NB * lanes]``."""
    R, K = codes.shape
    lay = LaneLayout(K, bits, lanes)
    RP = padded_rows(R)
    c = torch.zeros((RP, lay.k_pad), dtype=torch.int64)
    c[:R, :K] = codes
    c = c.view(RP, lay.n_blocks, lay.per_word, lanes)
    words = torch.zeros((RP, lay.n_blocks, lanes), dtype=torch.int64)
    for t in range(lay.per_word):
        words |= c[:, :, t, :] << (t * bits)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.to(torch.int32).view(RP, lay.words).contiguous()


def from_lane_words(words: torch.Tensor, bits: int, lanes: int, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`to_lane_words`: codes as int64 ``[R, K]``."""
    lay = LaneLayout(in_features, bits, lanes)
    u = words.to(torch.int64).view(-1, lay.n_blocks, 1, lanes) & 0xFFFFFFFF
    shifts = (torch.arange(lay.per_word) * bits).view(1, 1, -1, 1)
    c = (u >> shifts) & ((1 << bits) - 1)
    return c.reshape(-1, lay.k_pad)[:out_features, :in_features]


def host_lanes() -> int:
    """Vector lanes this machine's CPU runs (16 AVX-512, 8 AVX2, 0 neither)."""
    from ..codegen.build import import_tvm
    from ..codegen.cpu import cpu_lanes

    tvm = import_tvm()
    cpu = tvm.get_global_func("target.llvm_get_system_cpu")()
    return cpu_lanes(tvm.target.Target({"kind": "llvm", "mcpu": cpu}))


def kernel_key(op: str, m, lanes: int) -> KernelKey:
    return KernelKey(op, m.out_features, m.in_features, m.bits, lanes, m.col.numel() > 0,
                     _DT[m.lut.dtype], _DT[m.col.dtype], _DT[m.val.dtype])


class CpuLutKernels:
    """One layer's generated kernels: ``gemv`` for batch 1, ``gemm`` per batch bucket.

    Holds the lane-layout words and the code under each sparse entry; the
    tables and CSR arrays stay on the module and are passed in at call time.
    """

    def __init__(self, packed: PackedLinear, lanes: int, fns: dict[str, Callable], name: str) -> None:
        self.lanes = lanes
        self.bits = packed.bits
        self.layout = LaneLayout(packed.in_features, packed.bits, lanes)
        self.fns = fns  # bucket -> compiled function
        self.out_features = packed.out_features
        self.in_features = packed.in_features
        self.name = name
        self.rebind(packed)

    def rebind(self, packed: PackedLinear, bias: torch.Tensor | None = None) -> None:
        """Take new codes (``load_state_dict``): the lane words and the codes under the sparse entries."""
        codes = packed.unpack()
        self.words = to_lane_words(codes, packed.bits, self.lanes)
        rows, cols = packed.sparse_coo()
        self.scode = codes[rows, cols].to(torch.uint8).contiguous()

    def canonical_codes(self) -> torch.Tensor:
        codes = from_lane_words(self.words, self.bits, self.lanes, self.out_features, self.in_features)
        return pack_codes(codes, self.bits)

    def nbytes(self) -> int:
        return self.words.numel() * 4 + self.scode.numel()

    def _x(self, x2: torch.Tensor) -> torch.Tensor:
        kp = self.layout.k_pad
        if x2.dtype == torch.float32 and x2.shape[1] == kp and x2.stride(1) == 1 and (x2.shape[0] == 1 or x2.stride(0) == kp):
            return x2
        xp = torch.zeros((x2.shape[0], kp), dtype=torch.float32)
        xp[:, : x2.shape[1]] = x2
        return xp

    def __call__(self, x: torch.Tensor, lut, crow, col, val, bias) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            # the padded layout would silently accept widths up to k_pad
            raise ValueError(f"layer '{self.name}' expects inputs with {self.in_features} features in the last "
                             f"dim (like nn.Linear), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"layer '{self.name}' takes floating-point inputs, got {x.dtype}; cast x first")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        n = x2.shape[0]
        y = torch.empty((n, self.out_features), dtype=torch.float32)
        if n:
            xp = self._x(x2)
            if n == 1:
                self.fns["1"](xp[0], self.words, lut, crow, col, val, self.scode, y[0])
            else:
                self.fns["2-16" if n <= 16 else "17+"](xp, self.words, lut, crow, col, val, self.scode, y)
        if bias is not None:
            y += bias.to(torch.float32)
        return y.to(x.dtype).view(*lead, self.out_features)


def _bench(fn, k: CpuLutKernels, m, batch: int, repeats: int, budget_s: float = 0.03) -> float:
    """Median ms of ``repeats`` calls, more for fast kernels (about ``budget_s`` of calls, at most 1000):
    a 60 µs kernel's median over 20 calls is too noisy to rank schedules by."""
    import time

    from ..codegen.build import median_ms

    shape = (k.layout.k_pad,) if batch == 1 else (batch, k.layout.k_pad)
    x = torch.randn(shape)
    y = torch.empty(shape[:-1] + (k.out_features,))
    call = lambda: fn(x, k.words, m.lut, m.crow, m.col, m.val, k.scode, y)  # noqa: E731
    call()
    t = time.perf_counter()
    call()
    once = max(time.perf_counter() - t, 1e-6)
    return median_ms(call, max(repeats, min(1000, int(budget_s / once))))


def _search(lib, okey: KernelKey, bucket: str, probe: CpuLutKernels, m, tune: bool, trials, repeats: int, on_trial):
    """Time the candidate knobs of one kernel; return (function, record without layers)."""
    from ..codegen import build as B

    op = okey.op
    batch = B.BUCKET_TUNE_BATCH[bucket]
    default = GemvKnobs() if op == "gemv" else default_gemm_knobs(bucket)
    cands = [default]
    if tune:
        B.STATS["searches"] += 1
        cands += [c for c in (gemv_candidates() if op == "gemv" else gemm_candidates(bucket)) if c != default]
        if trials is not None:
            cands = cands[: max(1, trials)]
    tried, best = [], None
    for kn in cands:
        f = lib.get(okey, kn)
        ms = _bench(f, probe, m, batch, repeats)
        tried.append({"knobs": B.knobs_to_dict(kn), "ms": ms})
        if len(tried) < len(cands):
            on_trial()
        if best is None or ms < best[1]:
            best = (kn, ms, f)
    knobs, best_ms, fn = best
    copy_bw = B.copy_bandwidth_gbps()
    nb = lambda t: t.numel() * t.element_size()  # noqa: E731
    nbytes = probe.nbytes() + sum(nb(t) for t in (m.lut, m.crow, m.col, m.val))
    nbytes += 4 * batch * (probe.layout.k_pad + okey.out_features)
    gbps = nbytes / (best_ms * 1e-3) / 1e9
    return fn, {
        "key": okey.as_dict(), "bucket": bucket, "tuned_at_batch": batch,
        "knobs": B.knobs_to_dict(knobs), "tuned": tune, "candidates": tried,
        "best_ms": best_ms, "default_ms": tried[0]["ms"], "bytes": nbytes, "gbps": gbps,
        "copy_gbps": copy_bw, "bw_ratio": gbps / copy_bw,
    }


def attach_cpu_kernels(
    model: torch.nn.Module,
    target_spec,
    tune: bool = True,
    trials: int | None = None,
    repeats: int = 20,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Give every SqcLinear in ``model`` its generated kernels; return one record per kernel.

    A record: kernel key, batch bucket, the layers using it, the chosen knobs,
    every candidate tried with its latency (in trial order), best and default
    latency, achieved GB/s and its ratio to the measured copy bandwidth, and
    whether the choice came from the tuning database.
    """
    from ..codegen import build as B
    from .qlinear import SqcLinear

    mods = {n: m for n, m in model.named_modules() if isinstance(m, SqcLinear)}
    if not mods:
        return []
    try:
        lib = B.KernelLibrary(target_spec)
    except Exception as e:  # no TVM, or a target TVM cannot build for
        for m in mods.values():
            m.set_kernel(None, f"reference (TVM unavailable: {type(e).__name__}: {e})")
        return []
    from ..codegen.cpu import cpu_lanes

    lanes = cpu_lanes(lib.target)
    host = host_lanes()
    db = B.TuningDB(str(lib.target), lib.tvm.__version__)
    groups: dict[KernelKey, list[str]] = {}
    for name, m in mods.items():
        if lanes == 0 or m.bits not in SUPPORTED_BITS or lanes > host:
            if lanes == 0:
                why = "no AVX2/AVX-512 on this target"
            elif lanes > host:
                # kernels for a wider CPU than this one would die on an illegal instruction
                why = f"target {lib.target.attrs.get('mcpu', '')} needs {'AVX-512' if lanes == 16 else 'AVX2'}, which this CPU lacks"
            else:
                why = f"no LUT kernel for {m.bits}-bit codes"
            m.set_kernel(None, f"reference ({why})")
            continue
        groups.setdefault(kernel_key("lut", m, lanes), []).append(name)
    records = []
    # progress counts tuning trials (a kernel found in the database counts as all its trials)
    n_trials = {"1": len(gemv_candidates()), "2-16": len(gemm_candidates("2-16")), "17+": len(gemm_candidates("17+"))}
    if trials is not None:
        n_trials = {b: min(n, max(1, trials)) for b, n in n_trials.items()}
    if not tune:
        n_trials = dict.fromkeys(n_trials, 1)
    total = len(groups) * sum(n_trials.values())
    done = 0

    def report(n: int) -> None:
        nonlocal done
        done = min(done + n, total)
        if progress is not None:
            progress("tune", done, total)

    kname = f"tvm-lut-{'avx512' if lanes == 16 else 'avx2'}"
    for key, names in groups.items():
        first = mods[names[0]]
        fns: dict[str, Callable] = {}
        probe = CpuLutKernels(first.packed, lanes, fns, names[0])  # becomes the first layer's kernels
        failed = None
        for bucket in B.BUCKETS:
            okey = dataclasses.replace(key, op="gemv" if bucket == "1" else "gemm")
            rec = db.lookup(okey, bucket)
            knobs = B.db_knobs(okey.op, rec, bucket)
            before = done
            try:
                if knobs is not None:
                    B.STATS["db_hits"] += 1
                    fn, rec = lib.get(okey, knobs), dict(rec, from_db=True)
                else:
                    fn, rec = _search(lib, okey, bucket, probe, first, tune, trials, repeats, lambda: report(1))
                    if tune:
                        db.store(okey, bucket, rec)
                    rec = dict(rec, from_db=False)
                fns[bucket] = fn
                records.append(dict(rec, layers=list(names), kernel=kname))
            except Exception as e:  # TVM could not build this kernel: the reference op runs, and says so
                first_line = (str(e).strip().splitlines() or [""])[0][:200]
                failed = f"reference (TVM could not build {okey.tag()}: {type(e).__name__}: {first_line})"
                break
            finally:
                report(before + n_trials[bucket] - done)
        for name in names:
            m = mods[name]
            if failed:
                m.set_kernel(None, failed)
            else:
                m.set_kernel(probe if name == names[0] else CpuLutKernels(m.packed, lanes, fns, name), kname)
    return records
