"""The CPU kernel search: build, time and choose each layer's kernels, and attach them.

:func:`build_cpu_kernels` gives every :class:`~sqc.runtime.qlinear.SqcLinear`
of a model its kernels: for each distinct kernel key it looks up the tuning
database, searches the knobs when an entry is missing (``tune=True``) or takes
the default knobs (``tune=False``), and loads the compiled libraries from the
on-disk cache (building what is missing). A layer whose kernel cannot be built
runs the reference op and its kernel name says why. It returns the
:class:`~sqc.runtime.cpu.plan.CpuKernelPlan` (which library each layer runs per
batch bucket, the knobs, the tuning records) that ``sqc.save`` writes into an
artifact, so loading it builds and tunes nothing.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import torch

from ..runtime.cpu.kernels import CpuLutKernels, host_lanes, kernel_key
from ..runtime.cpu.plan import CpuKernelPlan
from ..runtime.cpu.lanes import LANES_ISA, SUPPORTED_BITS, GemvKnobs, KernelKey
from ..runtime.fused import kernel_layers
from ..runtime.int8 import Int8Kernels, Int8Linear
from ..runtime.status import KernelStatus
from . import build as B
from .cpu import cpu_lanes, default_gemm_knobs, default_gemv_knobs, gemm_candidates, gemv_candidates

__all__ = ["build_cpu_kernels", "attach_cpu_kernels"]

#: the kernel family in a layer's kernel name, by lane count
LANES_NAME = {64: "vnni", 16: "avx512", 8: "avx2"}


def _bench(fn, k: CpuLutKernels, m, batch: int, repeats: int, budget_s: float = 0.03) -> float:
    """Median ms of ``repeats`` calls, more for fast kernels (about ``budget_s`` of calls, at most 1000):
    a 60 µs kernel's median over 20 calls is too noisy to rank schedules by."""
    x = torch.randn((batch, k.layout.x_width))
    y = torch.empty((batch, k.out_features))
    x, y = k.kernel_views(x, y)
    args = k.kernel_args(m.lut, m.crow, m.col, m.val)
    call = lambda: fn(x, *args, y)  # noqa: E731
    call()
    t = time.perf_counter()
    call()
    once = max(time.perf_counter() - t, 1e-6)
    return B.median_ms(call, max(repeats, min(1000, int(budget_s / once))))


def _search(lib, okey: KernelKey, bucket: str, probe: CpuLutKernels, m, tune: bool, trials, repeats: int, on_trial):
    """Time the candidate knobs of one kernel; return (function, record without layers)."""
    op = okey.op
    batch = B.BUCKET_TUNE_BATCH[bucket]
    lanes = okey.lanes
    default = default_gemv_knobs(lanes) if op == "gemv" else default_gemm_knobs(bucket, lanes)
    cands = [default]
    if tune:
        B.STATS["searches"] += 1
        cands += [c for c in (gemv_candidates(lanes) if op == "gemv" else gemm_candidates(bucket, lanes))
                  if c != default]
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
    nbytes = probe.nbytes() + sum(t.nbytes for t in (m.lut, m.crow, m.col, m.val))
    nbytes += 4 * batch * (probe.layout.x_width + okey.out_features)
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
    whether the choice came from the tuning database. :func:`build_cpu_kernels`
    does the work and also returns the plan an artifact stores.
    """
    plan = build_cpu_kernels(model, target_spec, tune, trials, repeats, progress)
    return plan.records() if plan is not None else []


def build_cpu_kernels(
    model: torch.nn.Module,
    target_spec,
    tune: bool = True,
    trials: int | None = None,
    repeats: int = 20,
    progress: Callable[[str, int, int], None] | None = None,
    store: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> CpuKernelPlan | None:
    """Give every SqcLinear in ``model`` its generated kernels (see :func:`attach_cpu_kernels`).

    ``store`` keeps each layer's lane words (and canonical codes) where it puts them: a
    :class:`~sqc.runtime.spill.Spill` of a compile larger than memory (see :class:`CpuLutKernels`).

    Returns the :class:`~sqc.runtime.cpu.plan.CpuKernelPlan` of what was
    attached (the libraries in the kernel cache, the knobs, the layers, the
    tuning records), or None when the model has no SqcLinear or TVM is missing.
    """
    mods = kernel_layers(model)  # fused groups' layers, not their members
    heads = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    if not mods and not heads:
        return None
    try:
        lib = B.KernelLibrary(target_spec)
    except Exception as e:  # no TVM, or a target TVM cannot build for
        for m in (*mods.values(), *heads.values()):
            m.set_kernel(None, KernelStatus.reference(f"TVM unavailable: {type(e).__name__}: {e}"))
        return None
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
                why = f"target {lib.target.attrs.get('mcpu', '')} needs {', '.join(LANES_ISA[lanes])}, which this CPU lacks"
            else:
                why = f"no LUT kernel for {m.bits}-bit codes"
            m.set_kernel(None, KernelStatus.reference(why))
            continue
        groups.setdefault(kernel_key("lut", m, lanes), []).append(name)
    records: list[dict[str, Any]] = []
    kernels: list[dict[str, Any]] = []  # the plan: which library runs which layers in which bucket
    # progress counts tuning trials (a kernel found in the database counts as all its trials)
    n_trials = {"1": len(gemv_candidates(lanes)), "2-16": len(gemm_candidates("2-16", lanes)),
                "17+": len(gemm_candidates("17+", lanes))}
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

    kname = f"tvm-lut-{LANES_NAME.get(lanes, 'none')}"
    for key, names in groups.items():
        first = mods[names[0]]
        fns: dict[str, Callable] = {}
        probe = CpuLutKernels(first.packed, lanes, fns, names[0], store)  # becomes the first layer's kernels
        failed = None
        planned: list[dict[str, Any]] = []
        for bucket in B.BUCKETS:
            okey = dataclasses.replace(key, op="gemv" if bucket == "1" else "gemm")
            rec = db.lookup(okey, bucket)
            knobs = B.db_knobs(okey.op, rec, bucket, lanes)
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
                planned.append({"key": okey.as_dict(), "bucket": bucket, "knobs": dict(rec["knobs"]),
                                "layers": list(names), "symbol": okey.op, "kernel": kname,
                                "library": lib.files.get((okey, B.knobs_from_dict(okey.op, rec["knobs"])))})
            except Exception as e:  # TVM could not build this kernel: the reference op runs, and says so
                first_line = (str(e).strip().splitlines() or [""])[0][:200]
                failed = KernelStatus.reference(f"TVM could not build {okey.tag()}: {type(e).__name__}: {first_line}")
                break
            finally:
                report(before + n_trials[bucket] - done)
        if not failed:
            kernels += planned
        for name in names:
            m = mods[name]
            if failed:
                m.set_kernel(None, failed)
            else:
                m.set_kernel(probe if name == names[0] else CpuLutKernels(m.packed, lanes, fns, name, store),
                             KernelStatus.kernel(kname))
    kernels += _attach_heads(lib, heads, min(lanes, 16), min(host, 16))
    return CpuKernelPlan(lanes=lanes, isa=list(LANES_ISA.get(lanes, ())), target=str(target_spec),
                         mcpu=str(lib.target.attrs.get("mcpu", "")), tvm=lib.tvm.__version__, kernels=kernels,
                         tuning=records)


#: the int8 head kernel's knobs (rows per task; not searched: it streams one byte per weight, memory-bound)
HEAD_KNOBS = GemvKnobs(rt=4)


def head_key(m, lanes: int) -> KernelKey:
    return KernelKey("i8gemv", m.out_features, m.in_features, 8, lanes, False, "float32", "int8", "float32")


def _attach_heads(lib, heads: dict, lanes: int, host: int) -> list[dict[str, Any]]:
    """Build and attach the batch-1 kernel of every :class:`Int8Linear`; return their plan entries."""
    planned = []
    kname = f"tvm-int8-{LANES_NAME.get(lanes, 'none')}"
    for name, m in heads.items():
        if lanes == 0 or lanes > host:
            m.set_kernel(None, KernelStatus.reference("no AVX2/AVX-512 kernel for this target on this CPU"))
            continue
        key = head_key(m, lanes)
        try:
            fn = lib.get(key, HEAD_KNOBS)
        except Exception as e:  # TVM could not build it: the reference op runs, and says so
            m.set_kernel(None, KernelStatus.reference(f"TVM could not build {key.tag()}: {type(e).__name__}"))
            continue
        m.set_kernel(Int8Kernels(fn, m.out_features, m.in_features, name), KernelStatus.kernel(kname))
        planned.append({"key": key.as_dict(), "bucket": "1", "knobs": B.knobs_to_dict(HEAD_KNOBS), "layers": [name],
                        "symbol": key.op, "kernel": kname, "library": lib.files.get((key, HEAD_KNOBS))})
    return planned
