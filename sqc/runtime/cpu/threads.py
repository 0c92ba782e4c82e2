"""One thread pool: the generated CPU kernels run their parallel loops on torch's OpenMP team.

TVM's generated code calls its parallel launcher through a function pointer in
each kernel library (``__TVMBackendParallelLaunch``), which TVM's loader points
at TVM's own thread pool. Next to torch's OpenMP team that is two pools on the
same cores, and they stall each other: each spins after its work, and TVM pins
its worker to a core the other pool's threads also want. Measured on this
2-core machine, a SmolLM2 decode step took 26-33 ms on one pool and
280-460 ms (erratically) on both, once a prefill had started torch's team.

sqc links a small launcher into every kernel library it builds
(``sqc/codegen/omp_launch.c``); :func:`use_torch_threads` hands it the OpenMP
entry points of the runtime torch loaded (found in this process's own memory
map, so it is the very team torch uses) and repoints the library's launcher at
it. The kernels then use as many threads as ``torch.set_num_threads`` says.

A library without the launcher (built by an older sqc) or with parallel
barriers keeps TVM's pool: :func:`thread_pools` counts both kinds and each such
library raises a warning that names it and says how to fix it.
"""
from __future__ import annotations

import ctypes
import threading
import warnings

__all__ = ["use_torch_threads", "openmp_entry_points", "thread_pools"]

#: loaded kernel library -> where its parallel loops run: "torch_openmp", "serial" or "tvm_pool: <why>"
MODES: dict[str, str] = {}

_LOCK = threading.Lock()
_ENTRY: tuple[int, int, int, int] | None = None
_NAMES = ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads", "omp_get_max_threads")


def openmp_entry_points() -> tuple[int, int, int, int] | None:
    """Addresses of ``GOMP_parallel`` and three ``omp_get_*`` functions in the OpenMP runtime torch loaded
    (None when this process has none: torch built without OpenMP)."""
    global _ENTRY
    with _LOCK:
        if _ENTRY is not None:
            return _ENTRY
        import torch  # noqa: F401  (loads its OpenMP runtime)

        paths = []
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split(None, 5)
                path = parts[5].strip() if len(parts) == 6 else ""
                name = path.rsplit("/", 1)[-1]
                if name.startswith(("libgomp", "libiomp", "libomp")) and ".so" in name and path not in paths:
                    paths.append(path)
        for path in paths:
            try:
                lib = ctypes.CDLL(path)  # already loaded: the same handle, the same team
                _ENTRY = tuple(ctypes.cast(getattr(lib, n), ctypes.c_void_p).value for n in _NAMES)
                return _ENTRY
            except (OSError, AttributeError):
                continue
        return None


def thread_pools() -> dict:
    """How many loaded kernel libraries run on torch's OpenMP team, have no parallel loops, or fell back to
    TVM's pool (with the first library's reason)."""
    with _LOCK:
        modes = list(MODES.items())
    out = {"torch_openmp": 0, "serial": 0, "tvm_pool": 0, "why_tvm_pool": None}
    for path, mode in modes:
        kind, _, why = mode.partition(": ")
        out[kind] += 1
        if why and out["why_tvm_pool"] is None:
            out["why_tvm_pool"] = f"{path}: {why}"
    return out


def _fallback(path: str, why: str) -> bool:
    with _LOCK:
        new = not MODES.get(path, "").startswith("tvm_pool")
        MODES[path] = f"tvm_pool: {why}"
    if new:  # once per library (a reload of the same file does not warn again)
        warnings.warn(f"sqc: kernel library {path} runs its parallel loops on TVM's own thread pool ({why}); next "
                      "to torch's OpenMP team the two pools stall each other (decode several times slower)",
                      RuntimeWarning, stacklevel=3)
    return False


def use_torch_threads(path: str) -> bool:
    """Point the loaded kernel library at ``path`` to torch's OpenMP team; True when it runs there (or has no
    parallel loops). Call it after every load of the library: TVM's loader resets the pointer."""
    lib = ctypes.CDLL(path)  # the library TVM loaded: dlopen returns the same handle
    try:
        slot = ctypes.c_void_p.in_dll(lib, "__TVMBackendParallelLaunch")
    except ValueError:
        with _LOCK:
            MODES[path] = "serial"
        return True
    try:
        ctypes.c_void_p.in_dll(lib, "__TVMBackendParallelBarrier")
        return _fallback(path, "its kernels use parallel barriers, which the OpenMP launcher does not provide")
    except ValueError:
        pass
    if not hasattr(lib, "sqc_parallel_launch"):
        return _fallback(path, "it was built without sqc's OpenMP launcher, by an older sqc; re-create the artifact with this sqc, or "
                                "sqc.load(path, target=...) to rebuild its kernels")
    entry = openmp_entry_points()
    if entry is None:
        return _fallback(path, "this torch has no OpenMP runtime")
    if lib.sqc_omp_init(*(ctypes.c_void_p(a) for a in entry)) != 0:
        return _fallback(path, "the launcher did not accept the OpenMP entry points")
    slot.value = ctypes.cast(lib.sqc_parallel_launch, ctypes.c_void_p).value
    with _LOCK:
        MODES[path] = "torch_openmp"
    return True
