"""What the kernels of every backend share: batch buckets, the TVM thread pool size, and load-time errors.

A layer runs one kernel per batch bucket (:data:`BUCKETS`): a gemv for batch 1
and a gemm for each of the other ranges, each tuned on its own.
"""
from __future__ import annotations

import os

__all__ = ["BUCKETS", "bucket_of", "set_tvm_threads", "KernelFileError", "KernelsUnusable"]

#: batch buckets: each gets its own tuned kernel (gemv for 1, gemm knobs for the others)
BUCKETS = {"1": (1, 1), "2-16": (2, 16), "17+": (17, 1 << 31)}


def bucket_of(n: int) -> str:
    for name, (lo, hi) in BUCKETS.items():
        if lo <= n <= hi:
            return name
    raise ValueError(f"batch {n} is in no bucket")


def set_tvm_threads() -> None:
    """Size TVM's thread pool to this process's CPU affinity (``TVM_NUM_THREADS``) unless it is set already;
    TVM reads it when its runtime library starts its pool, so call this before that library loads.

    The generated CPU kernels run their parallel loops on torch's OpenMP team (:mod:`sqc.runtime.cpu.threads`);
    TVM's own pool serves only kernel libraries built by an older sqc, so it gets a short spin count
    (``TVM_THREAD_POOL_SPIN_COUNT=1000`` unless set) and yields the cores quickly. OpenMP's own spinning is
    left alone: it keeps torch's team warm between the many small kernel calls of a decode step
    (``GOMP_SPINCOUNT=1000`` made a SmolLM2 decode step twice as slow)."""
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "1000")
    if "TVM_NUM_THREADS" not in os.environ:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            n = os.cpu_count() or 1
        os.environ["TVM_NUM_THREADS"] = str(n)


class KernelFileError(RuntimeError):
    """A saved kernel file is missing, damaged or does not match its plan; the message names the file."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path


class KernelsUnusable(RuntimeError):
    """Saved kernels that are intact but cannot run here (an instruction set this CPU lacks, no kernel
    runtime installed); the message says why. Loading then rebuilds for this machine or runs the reference op."""
