"""What the kernels of every backend share: batch buckets, the kernel registry of the ops, the TVM thread pool
size, and load-time errors.

A layer runs one kernel per batch bucket (:data:`BUCKETS`): a gemv for batch 1
and a gemm for each of the other ranges, each tuned on its own.

The ops that run generated kernels (``sqc::lut_linear_cpu``, ``sqc::lut_linear_cuda``,
``sqc::int8_linear_cpu``) take a layer's tensors and no handle: they find the layer's kernels through the
tensor that holds its codes (:func:`register_kernels`, :func:`kernels_of`). The kernel's identity is that
tensor, an argument of the graph like any weight, so a traced or stored graph holds no process-specific
constant (no load-order counter, no address) and its on-disk cache key does not depend on which models a
process loaded first.
"""
from __future__ import annotations

import os
import weakref

import torch

__all__ = ["BUCKETS", "bucket_of", "set_tvm_threads", "KernelFileError", "KernelsUnusable", "register_kernels",
           "kernels_of", "define_lut_linear_op"]

#: batch buckets: each gets its own tuned kernel (gemv for 1, gemm knobs for the others)
BUCKETS = {"1": (1, 1), "2-16": (2, 16), "17+": (17, 1 << 31)}


def bucket_of(n: int) -> str:
    for name, (lo, hi) in BUCKETS.items():
        if lo <= n <= hi:
            return name
    raise ValueError(f"batch {n} is in no bucket")


#: the address of a layer's code tensor -> (its kernels, weakly); CPU and GPU addresses never coincide (CUDA's
#: unified virtual addressing gives host and device memory disjoint ranges)
_KERNELS: dict[int, weakref.ref] = {}


def register_kernels(kernels, key: torch.Tensor) -> None:
    """Bind ``kernels`` (an object with ``run(x, <the op's tensors>)``) to ``key``, the tensor its op calls pass
    as the layer's codes. The registry holds the kernels weakly, so a dropped layer frees them; binding them to
    new codes (a reload, a copy, a move to another device) leaves the old address unbound."""
    ptr = key.data_ptr()
    if ptr == 0:
        raise ValueError("sqc: kernels must be bound to a non-empty code tensor")

    def gone(ref, ptr=ptr):
        if _KERNELS.get(ptr) is ref:
            del _KERNELS[ptr]

    kernels._key = ptr
    _KERNELS[ptr] = weakref.ref(kernels, gone)


def kernels_of(key: torch.Tensor, op: str):
    """The kernels bound to ``key`` (the codes an op call was given); a clear error when none are."""
    ptr = key.data_ptr()
    ref = _KERNELS.get(ptr)
    k = None if ref is None else ref()
    if k is None or k._key != ptr:
        raise RuntimeError(f"sqc::{op}: no kernels are bound to these codes in this process (the layer that owned "
                           "them was freed or rebound); call the model's own layers")
    return k


def define_lut_linear_op(lib: torch.library.Library, name: str, impls: dict[str, object]):
    """Declare ``sqc::<name>(x, words, lut, crow, col, val, scode, bias) -> Tensor`` (a layer's generated
    kernels; x's shape with the layer's rows last, in x's dtype), register ``impls`` (dispatch key ->
    function) and its fake implementation; returns the op."""
    lib.define(f"{name}(Tensor x, Tensor words, Tensor lut, Tensor crow, Tensor col, Tensor val, Tensor scode, "
               "Tensor bias) -> Tensor")
    for key, fn in impls.items():
        lib.impl(name, fn, key)

    def fake(x, words, lut, crow, col, val, scode, bias):
        if not x.is_floating_point():
            raise ValueError(f"sqc::{name}: x must be floating point, got {x.dtype}")
        return x.new_empty((*x.shape[:-1], lut.shape[0]))

    torch.library.register_fake(f"sqc::{name}", fake, lib=lib)
    return getattr(torch.ops.sqc, name).default


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
