"""A compiled model's CPU kernels as files, loaded with TVM's runtime library alone (no compiler).

Where the kernels are built (:func:`sqc.codegen.tune.build_cpu_kernels`) each
layer gets one compiled library per batch bucket; the :class:`CpuKernelPlan`
records which. ``sqc.save`` writes it into the artifact folder ``kernels/cpu/``::

    plan.json            format, lanes and the CPU flags the code needs
                         (``avx512f`` for 16 lanes, ``avx2`` for 8), the target
                         and TVM version it was built with, one entry per
                         (kernel key, batch bucket): the library file, its
                         sha256, the symbol, the knobs, the layers it serves;
                         and the tuning records (what the search measured)
    <kernel>.so          the compiled libraries (copied from the kernel cache)

Loading (:meth:`CpuKernelPlan.read`, :meth:`CpuKernelPlan.attach`) checks
every library's sha256 before it is opened (a damaged library can kill the
process inside ``dlopen``), checks this CPU has the instruction set, and opens
the libraries with ``tvm_ffi.load_module`` after loading TVM's
``libtvm_runtime.so``: ``import tvm`` (the compiler, about 160 MB resident)
never happens, nothing is built and nothing is tuned.
"""
from __future__ import annotations

import ctypes
import dataclasses
import importlib.metadata
import json
import os
import shutil
import sys
import threading
from typing import Any

from .kernels import CpuLutKernels, cpu_flags, host_lanes, kernel_key
from .threads import use_torch_threads
from ..files import file_sha256, fsync_file, read_stripped, write_synced
from ..kernels import BUCKETS, KernelFileError, KernelsUnusable, set_tvm_threads
from .lanes import KernelKey
from ..fused import kernel_layers
from ..int8 import Int8Kernels, Int8Linear
from ..status import KernelStatus

__all__ = ["CpuKernelPlan", "PLAN_FILE", "PLAN_FORMAT", "kernel_runtime"]

PLAN_FILE = "plan.json"
PLAN_FORMAT = 1

_LOCK = threading.Lock()
_RUNTIME_LIB: ctypes.CDLL | None = None
_MODULES: dict[str, Any] = {}  # library path -> loaded module (kept alive: the functions live in it)


def kernel_runtime():
    """``tvm_ffi`` with TVM's runtime library (``libtvm_runtime.so``) loaded, without importing ``tvm``.

    Raises :class:`KernelsUnusable` when TVM is not installed.
    """
    global _RUNTIME_LIB
    set_tvm_threads()
    try:
        import tvm_ffi
    except ImportError as e:
        raise KernelsUnusable(f"the kernel runtime is not installed (import tvm_ffi: {e}); "
                              "pip install apache-tvm-ffi apache-tvm") from None
    with _LOCK:
        if _RUNTIME_LIB is None and sys.modules.get("tvm") is None:  # an imported tvm has loaded it itself
            lib = _runtime_library()
            try:
                _RUNTIME_LIB = ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            except OSError as e:
                raise KernelsUnusable(f"TVM's runtime library {lib} does not load ({e})") from None
    return tvm_ffi


def _runtime_library() -> str:
    """The path of ``libtvm_runtime.so`` of the installed ``apache-tvm``, from its distribution's file list:
    neither importing the ``tvm`` package nor asking the import system for it (which a process that keeps
    the compiler out, or an import blocker, may refuse)."""
    try:
        dist = importlib.metadata.distribution("apache-tvm")
    except importlib.metadata.PackageNotFoundError:
        raise KernelsUnusable("TVM's runtime library is not installed (no apache-tvm distribution); "
                              "pip install apache-tvm") from None
    lib = str(dist.locate_file("tvm/lib/libtvm_runtime.so"))
    if not os.path.isfile(lib):
        raise KernelsUnusable(f"TVM's runtime library {lib} is missing; reinstall apache-tvm")
    return lib


def _function(ffi, path: str, symbol: str):
    with _LOCK:
        mod = _MODULES.get(path)
        if mod is None:
            try:
                mod = _MODULES[path] = ffi.load_module(path)
            except Exception as e:  # a library of another TVM build
                raise KernelFileError(path, f"TVM's runtime cannot load this kernel library ({type(e).__name__}: {e}); "
                                      "re-create the artifact with this sqc and TVM") from None
            use_torch_threads(path)
    try:
        return mod[symbol]
    except Exception as e:
        raise KernelFileError(path, f"the library has no function {symbol!r} ({e})") from None


@dataclasses.dataclass
class CpuKernelPlan:
    """Which compiled library each layer runs in each batch bucket, and how it was chosen.

    ``kernels`` holds one dict per (kernel key, bucket): ``key`` (a
    :class:`~sqc.runtime.cpu.lanes.KernelKey` as a dict), ``bucket``, ``symbol``,
    ``knobs``, ``layers``, ``kernel`` (the name reports show) and ``library``
    (a path; in ``plan.json`` a file name next to it, with its ``sha256``).
    ``tuning`` holds the tuning records (:meth:`records`).
    """

    lanes: int
    isa: list[str]
    target: str
    mcpu: str = ""
    tvm: str | None = None
    kernels: list[dict[str, Any]] = dataclasses.field(default_factory=list, repr=False)
    tuning: list[dict[str, Any]] = dataclasses.field(default_factory=list, repr=False)

    def records(self) -> list[dict[str, Any]]:
        """The tuning-report records (one per kernel key and bucket)."""
        return [dict(r) for r in self.tuning]

    def layers(self) -> set[str]:
        return {layer for k in self.kernels for layer in k["layers"]}

    # -- files -------------------------------------------------------------------------------
    def write(self, folder: str) -> dict[str, Any]:
        """Copy the libraries into ``folder`` and write ``plan.json``; return what the manifest records."""
        os.makedirs(folder, exist_ok=True)
        written: dict[str, str] = {}
        entries = []
        for k in self.kernels:
            src = k.get("library")
            if not src or not os.path.isfile(src):
                raise KernelFileError(str(src), f"the library of kernel {KernelKey(**k['key']).tag()} is gone (was the "
                                      "kernel cache cleared?); compile the model again")
            name = os.path.basename(src)
            if name not in written:
                expected = k.get("sha256") or read_stripped(src + ".sha256")  # from an artifact, or the cache's record
                dst = os.path.join(folder, name)
                shutil.copyfile(src, dst)
                digest = file_sha256(dst)
                if expected is not None and digest != expected:
                    raise KernelFileError(src, "fails its checksum (damaged since it was built or loaded); "
                                          "compile the model again")
                fsync_file(dst)
                written[name] = digest
            entries.append(dict(k, library=name, sha256=written[name]))
        plan = {"format": PLAN_FORMAT, "lanes": self.lanes, "isa": list(self.isa), "target": self.target,
                "mcpu": self.mcpu, "tvm": self.tvm, "kernels": entries, "tuning": self.tuning}
        ppath = os.path.join(folder, PLAN_FILE)
        write_synced(ppath, json.dumps(plan, indent=1, default=str))
        return {"plan_sha256": file_sha256(ppath), "lanes": self.lanes, "isa": list(self.isa)}

    @staticmethod
    def read(folder: str, plan_sha256: str | None = None) -> "CpuKernelPlan":
        """Read ``folder/plan.json`` and check it (against ``plan_sha256``) and every library's sha256.

        Raises :class:`~sqc.runtime.kernels.KernelFileError` naming the file that is missing or damaged.
        """
        ppath = os.path.join(folder, PLAN_FILE)
        if not os.path.isfile(ppath):
            raise KernelFileError(ppath, "is missing")
        if plan_sha256 is not None and file_sha256(ppath) != plan_sha256:
            raise KernelFileError(ppath, "was modified after it was written (its checksum does not match the manifest)")
        try:
            with open(ppath) as fh:
                plan = json.load(fh)
        except (ValueError, UnicodeDecodeError) as e:
            raise KernelFileError(ppath, f"is not valid JSON ({e})") from None
        if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
            got = plan.get("format") if isinstance(plan, dict) else None
            raise KernelFileError(ppath, f"has CPU kernel plan format {got!r}; this sqc reads {PLAN_FORMAT}")
        kernels = []
        checked: dict[str, str] = {}
        try:
            for k in plan["kernels"]:
                name = k["library"]
                if os.path.basename(name) != name:
                    raise KernelFileError(ppath, f"names a library outside its folder ({name!r})")
                lpath = os.path.join(folder, name)
                if not os.path.isfile(lpath):
                    raise KernelFileError(lpath, "is missing")
                if lpath not in checked:
                    checked[lpath] = file_sha256(lpath)
                if checked[lpath] != k["sha256"]:
                    raise KernelFileError(lpath, "fails its checksum (the kernel library is damaged or was replaced)")
                KernelKey(**k["key"])  # a well-formed key
                kernels.append(dict(k, library=lpath))
            return CpuKernelPlan(int(plan["lanes"]), list(plan["isa"]), str(plan["target"]), str(plan.get("mcpu", "")),
                                 plan.get("tvm"), kernels, list(plan.get("tuning", [])))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, KernelFileError):
                raise
            raise KernelFileError(ppath, f"is malformed ({type(e).__name__}: {e})") from None

    # -- attaching ---------------------------------------------------------------------------
    def check_host(self) -> None:
        """Raise :class:`KernelsUnusable` unless this CPU has the instruction set the libraries were built for."""
        flags = cpu_flags()
        missing = [f for f in self.isa if f not in flags]
        if missing or self.lanes > host_lanes(flags):
            built = f"{self.target}" + (f" (-mcpu={self.mcpu})" if self.mcpu and "mcpu" not in self.target else "")
            raise KernelsUnusable(f"the artifact's CPU kernels were built for {built} and need "
                                  f"{', '.join(missing) or f'{self.lanes}-lane vectors'}, which this CPU lacks")

    def attach(self, model) -> None:
        """Give every layer the plan names its kernels, loaded from the plan's libraries.

        Raises :class:`KernelsUnusable` (this CPU lacks the instruction set, or
        TVM's runtime is not installed) before any layer changes, and
        :class:`~sqc.runtime.kernels.KernelFileError` / ``ValueError`` when a
        library does not load or the plan does not fit the model.
        """
        self.check_host()
        ffi = kernel_runtime()
        mods = kernel_layers(model)  # fused groups' layers (by their group name), not their members
        heads = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}
        fns: dict[str, dict[str, Any]] = {}
        names: dict[str, str] = {}
        head_fns: dict[str, tuple[Any, str]] = {}
        for k in self.kernels:
            key = KernelKey(**k["key"])
            fn = _function(ffi, k["library"], k["symbol"])
            if key.op == "i8gemv":
                for layer in k["layers"]:
                    m = heads.get(layer)
                    if m is None or (m.out_features, m.in_features) != (key.out_features, key.in_features):
                        raise ValueError(f"the CPU kernel plan gives layer {layer!r} the int8 kernel {key.tag()}, "
                                         "which does not fit the model")
                    head_fns[layer] = (fn, k.get("kernel", "tvm-int8"))
                continue
            for layer in k["layers"]:
                m = mods.get(layer)
                if m is None:
                    raise ValueError(f"the CPU kernel plan names layer {layer!r}, which the model does not have")
                have = kernel_key(key.op, m, self.lanes)
                if have != key:
                    raise ValueError(f"the CPU kernel plan gives layer {layer!r} the kernel {key.tag()}, but the "
                                     f"layer needs {have.tag()}")
                fns.setdefault(layer, {})[k["bucket"]] = fn
                names.setdefault(layer, k.get("kernel", "tvm-lut"))
        for layer, by_bucket in fns.items():
            if set(by_bucket) != set(BUCKETS):
                raise ValueError(f"the CPU kernel plan gives layer {layer!r} kernels for {sorted(by_bucket)}, "
                                 "not every batch bucket")
        shared: dict[tuple, dict[str, Any]] = {}  # layers of one key share one dict of functions
        for layer, by_bucket in fns.items():
            m = mods[layer]
            table = shared.setdefault(tuple(sorted((b, id(f)) for b, f in by_bucket.items())), by_bucket)
            m.set_kernel(CpuLutKernels(m.packed, self.lanes, table, layer), KernelStatus.kernel(names[layer]))
        for layer, (fn, kname) in head_fns.items():
            m = heads[layer]
            m.set_kernel(Int8Kernels(fn, m.out_features, m.in_features, layer), KernelStatus.kernel(kname))
