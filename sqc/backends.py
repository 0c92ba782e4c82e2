"""The kernel backends: one table maps a target kind to how its kernels attach at compile and load at run time.

Each :class:`Backend` has two functions:

* ``attach(model, spec, tune=..., trials=..., progress=..., notes=..., store=...)``, the
  compile side (needs the compiler: TVM, for CUDA also nvcc): generate, build
  (and tune) the kernels of every quantized layer of ``model`` for the target
  ``spec``, attach them, and return the *kernel set*, or None when no layer got
  a kernel (``store``, when given, keeps the kernels' copies of the codes
  where it puts them: :class:`~sqc.runtime.spill.Spill`);
* ``load(model, folder, entry, spec)``, the runtime side (no compiler): read the
  kernels an artifact carries in ``folder`` (``entry`` is what the manifest
  recorded for them), attach them and return the kernel set. It raises
  :class:`~sqc.runtime.kernels.KernelsUnusable` when the kernels are intact but
  cannot run on this machine.

A kernel set (:class:`~sqc.runtime.cpu.plan.CpuKernelPlan`,
:class:`~sqc.runtime.cuda.kernels.CudaBundle`) has ``records()`` (the tuning report)
and ``write(folder)``, which stores the kernels in an artifact and returns what
the manifest records beside them. ``sqc.compile`` runs ``attach`` as its
kernel stage and ``sqc.load`` runs ``load``; both look the backend up here, so
adding a target touches this table and nothing in compile or load.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Callable

__all__ = ["Backend", "BACKENDS", "backend", "compiler_missing"]


@dataclasses.dataclass(frozen=True)
class Backend:
    kind: str
    #: compile side: ``attach(model, spec, *, tune, trials, progress, notes) -> kernel set | None``
    attach: Callable[..., Any]
    #: runtime side: ``load(model, folder, entry, spec) -> kernel set``
    load: Callable[..., Any]
    #: where an artifact keeps this backend's kernels (relative to the artifact folder)
    folder: str
    #: whether ``sqc.load`` may rebuild the kernels for this machine (with the compiler, when it is installed)
    #: where the artifact's own cannot run: cheap for the CPU, for CUDA it needs nvcc and the target GPU's arch
    rebuild_on_load: bool


def _attach_cpu(model, spec, *, tune: bool = False, trials: int | None = None, progress=None, notes=None,
                store=None):
    from .codegen.tune import build_cpu_kernels

    return build_cpu_kernels(model, spec, tune=tune, trials=trials, progress=progress, store=store)


def _load_cpu(model, folder: str, entry: dict[str, Any], spec):
    from .runtime.cpu.plan import CpuKernelPlan

    plan = CpuKernelPlan.read(folder, entry.get("plan_sha256"))
    plan.attach(model)
    return plan


def _attach_cuda(model, spec, *, tune: bool = False, trials: int | None = None, progress=None, notes=None,
                 store=None):
    """Generate and build the CUDA kernels (no GPU needed); layers run the reference op, named, when TVM is missing.
    ``store`` is not used: the codes go to the GPU with the model (``model.to('cuda')``)."""
    from .runtime.qlinear import SqcLinear
    from .runtime.status import KernelStatus

    notes = notes if notes is not None else []
    missing = compiler_missing()
    if missing is not None:
        for m in model.modules():
            if isinstance(m, SqcLinear):
                m.set_kernel(None, KernelStatus.reference(f"TVM unavailable: {missing}"))
        return None
    from .codegen.cuda import build_bundle

    bundle = build_bundle(model, spec, tune=tune, notes=notes)
    if bundle is not None:
        notes.append(f"CUDA kernels generated for {spec} ({len(bundle.plan['kernels'])} kernels); "
                     "they run on an NVIDIA GPU once the model is moved there (model.to('cuda'))"
                     + ("; tuning candidates are built in but untimed: `sqc tune-gpu ARTIFACT` on the GPU times them"
                        if tune else ""))
    return bundle


def _load_cuda(model, folder: str, entry: dict[str, Any], spec):
    # no TVM, JAX or nvcc needed: the kernels were built when the artifact was written
    from .runtime.cuda.kernels import CudaBundle

    bundle = CudaBundle.read(folder)
    bundle.attach(model, str(spec))
    return bundle


#: target kind -> its backend
BACKENDS: dict[str, Backend] = {
    "llvm": Backend("llvm", _attach_cpu, _load_cpu, "kernels/cpu", rebuild_on_load=True),
    "cuda": Backend("cuda", _attach_cuda, _load_cuda, "cuda", rebuild_on_load=False),
}


def backend(kind: str) -> Backend:
    try:
        return BACKENDS[kind]
    except KeyError:
        raise ValueError(f"no kernel backend for target kind {kind!r}; sqc has {', '.join(sorted(BACKENDS))}") from None


def compiler_missing() -> str | None:
    """Why the kernel compiler (TVM) cannot run here, or None when it is installed (checked without importing it)."""
    try:
        if importlib.util.find_spec("tvm") is None:
            return "the kernel compiler (apache-tvm) is not installed"
    except (ImportError, ValueError) as e:
        return f"the kernel compiler (apache-tvm) cannot be found ({e})"
    return None
