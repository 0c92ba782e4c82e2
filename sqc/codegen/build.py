"""Building kernels: the on-disk kernel library cache, the tuning database, the knob search.

Everything persistent lives under :func:`cache_dir` (``$SQC_CACHE_DIR``, else
``~/.cache/sqc``):

* ``kernels/<hash>.so``: a compiled kernel library. The hash covers the
  kernel's TVMScript text, the target and the TVM version, so a changed
  kernel, target or TVM never loads a stale library. Written to a temporary
  name and renamed, so a crash never leaves a half-written library.
* ``tuning.json``: for every (target, TVM version, kernel key, batch bucket),
  the knobs the search chose and what it measured. A second compile of the
  same model finds every entry and tunes nothing.

:data:`STATS` counts builds, cache hits and tuning searches in this process;
tests use it to prove that a second compile does no work.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import statistics
import tempfile
import threading
import time
from typing import Any, Callable

from ..runtime.cpu.threads import use_torch_threads
from ..runtime.files import atomic_write, file_sha256, read_stripped
from ..runtime.kernels import BUCKETS, bucket_of, set_tvm_threads
from ..runtime.cpu.lanes import GemmKnobs, GemvKnobs, KernelKey
from .cpu import build_gemm, build_gemv, build_int8_gemv, gemm_candidates, gemv_candidates

__all__ = ["cache_dir", "import_tvm", "KernelLibrary", "TuningDB", "STATS", "BUCKETS", "bucket_of", "median_ms",
           "copy_bandwidth_gbps"]

STATS = {"builds": 0, "cache_hits": 0, "searches": 0, "db_hits": 0}
_LOCK = threading.Lock()

#: the batch size each bucket (:data:`sqc.runtime.kernels.BUCKETS`) is tuned at
BUCKET_TUNE_BATCH = {"1": 1, "2-16": 8, "17+": 64}


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` in ms, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def cache_dir() -> str:
    d = os.environ.get("SQC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sqc")
    os.makedirs(d, exist_ok=True)
    return d


def import_tvm():
    """Import TVM with its thread pool sized to this process's CPU affinity."""
    set_tvm_threads()
    import tvm

    return tvm


class KernelLibrary:
    """Builds prim_funcs for a target, with an on-disk cache of compiled libraries."""

    def __init__(self, target_spec) -> None:
        self.tvm = import_tvm()
        self.spec = target_spec
        self.target = target_spec.to_tvm()
        self.dir = os.path.join(cache_dir(), "kernels")
        os.makedirs(self.dir, exist_ok=True)
        self._mem: dict[str, Any] = {}
        #: (key, knobs) -> the library file each :meth:`get` returned a function of (what an artifact copies)
        self.files: dict[tuple[KernelKey, Any], str] = {}

    def source(self, key: KernelKey, knobs) -> tuple[Any, str]:
        build = {"gemv": build_gemv, "gemm": build_gemm, "i8gemv": build_int8_gemv}[key.op]
        func = build(key, knobs)
        return func, func.script()

    def digest(self, script: str) -> str:
        h = hashlib.sha256()
        for part in (script, str(self.target), self.tvm.__version__, _launcher_source()):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()[:32]

    def get(self, key: KernelKey, knobs):
        """The compiled function for (key, knobs): from memory, from disk, or freshly built."""
        func, script = self.source(key, knobs)
        digest = self.digest(script)
        path = os.path.join(self.dir, f"{key.tag()}_{knobs.tag()}_{digest}.so")
        self.files[(key, knobs)] = path
        if digest in self._mem:
            return self._mem[digest]
        fn = None
        # a truncated or byte-flipped library can crash the process inside dlopen: load only what matches the
        # checksum written beside it when it was built; anything else is rebuilt
        if os.path.exists(path) and file_sha256(path) == read_stripped(path + ".sha256"):
            try:
                fn = self.tvm.runtime.load_module(path)[key.op]
                use_torch_threads(path)
                STATS["cache_hits"] += 1
            except Exception:  # a foreign library (another TVM build): rebuild it
                fn = None
        if fn is None:
            ex = self.tvm.compile(self.tvm.IRModule({key.op: func}), target=self.target)
            STATS["builds"] += 1
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".so")
            os.close(fd)
            try:
                ex.export_library(tmp, addons=[LAUNCHER])
                atomic_write(path + ".sha256", file_sha256(tmp).encode())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            fn = self.tvm.runtime.load_module(path)[key.op]
            use_torch_threads(path)
        self._mem[digest] = fn
        return fn


#: C source linked into every CPU kernel library: runs its parallel loops on torch's OpenMP team (runtime/cpu/threads.py)
LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "omp_launch.c")


@functools.lru_cache(maxsize=1)
def _launcher_source() -> str:
    with open(LAUNCHER) as fh:
        return fh.read()


class TuningDB:
    """``tuning.json``: chosen knobs and measurements per (target, TVM, kernel, bucket)."""

    def __init__(self, target_str: str, tvm_version: str) -> None:
        self.path = os.path.join(cache_dir(), "tuning.json")
        self.prefix = f"{target_str}|tvm{tvm_version}|"

    def _read(self) -> dict[str, Any]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def lookup(self, key: KernelKey, bucket: str) -> dict[str, Any] | None:
        return self._read().get(self.prefix + f"{key.tag()}|{bucket}")

    def store(self, key: KernelKey, bucket: str, record: dict[str, Any]) -> None:
        # read-modify-write under a lock across threads (_LOCK) and processes (flock on a side file):
        # two processes tuning at once must not drop each other's entries
        import fcntl

        with _LOCK, open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                db = self._read()
                db[self.prefix + f"{key.tag()}|{bucket}"] = record
                atomic_write(self.path, json.dumps(db, indent=1, sort_keys=True).encode())
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def knobs_from_dict(op: str, d: dict[str, Any]):
    return GemvKnobs(**d) if op == "gemv" else GemmKnobs(**d)


def db_knobs(op: str, rec: dict[str, Any] | None, bucket: str = "17+", lanes: int = 16):
    """The knobs of a database record, or None when there is none, it is from another sqc version, or its
    knobs are not among this version's candidates (an edited or foreign entry is not trusted)."""
    if rec is None:
        return None
    try:
        knobs = knobs_from_dict(op, rec["knobs"])
    except (KeyError, TypeError, ValueError):
        return None
    allowed = gemv_candidates(lanes) + [GemvKnobs()] if op == "gemv" else gemm_candidates(bucket, lanes)
    return knobs if knobs in allowed else None


def knobs_to_dict(k) -> dict[str, Any]:
    return dataclasses.asdict(k)


_COPY_GBPS: list[float] = []


def copy_bandwidth_gbps(mib: int = 64, repeats: int = 5) -> float:
    """Measured memory copy bandwidth (bytes read + written per second), once per process."""
    if _COPY_GBPS:
        return _COPY_GBPS[0]
    import torch

    a = torch.empty(mib << 20, dtype=torch.uint8)
    a.fill_(1)
    b = torch.empty_like(a)
    ms = median_ms(lambda: b.copy_(a), repeats, warmup=1)
    _COPY_GBPS.append(2 * a.numel() / (ms * 1e-3) / 1e9)
    return _COPY_GBPS[0]
