"""Decode steps traced once and stored with the artifact, so a fresh process restores them instead of tracing.

A compiled decode step (:class:`sqc.runtime.decode.CompiledDecoder`) costs a fresh process about 15 s the
first time it runs: TorchDynamo traces transformers' Python code again in every process (about 10 s on
SmolLM2), even when Inductor's on-disk cache holds the compiled graph. This module keeps the whole result:
``torch.compile(step, fullgraph=True).aot_compile(...)`` (TorchDynamo's precompile: the transformed bytecode,
the graph and Inductor's compiled module, serialized with ``save_compiled_function``), plus the shared
libraries Inductor built for the graph's C++ kernels, so a machine with an empty Inductor cache compiles
nothing either.

Why this mechanism (measured on SmolLM2-135M, 2 cores): restoring a stored step takes about 2 s and its
first call runs at steady-state speed; the step is the same Inductor graph as a freshly traced one, so the
steady state is unchanged. ``torch.export`` of the step would also store a traced program, but running it
at steady-state speed needs Inductor again (an AOTInductor package): a C++ build of the whole model per
bucket, with the weights either copied into the library or reloaded through its constant map, and the sqc
ops reached through AOTInductor's proxy executor. The precompiled function keeps the model's own tensors as
graph inputs and the sqc ops as they are.

A stored step is specialized to everything its graph depends on, recorded as its *fingerprint*
(:func:`fingerprint`): the torch and transformers versions, the CPU instruction set Inductor compiled for,
the model's config, every module's type and every tensor's shape, dtype and strides (including the kernel
arguments the sqc layers bind), and the batch size, cache length and mode. TorchDynamo's own guards are not
stored (they cannot be serialized for a model whose modules hold tensors outside ``_parameters`` /
``_buffers``); the fingerprint replaces them, and a step whose fingerprint differs from the restoring model's
is not used: the decoder traces as before and says why in its stats.

Files, in an artifact's ``steps/`` folder::

    index.json                 the fingerprint's shared part, each step's batch / cache length / mode /
                               file / sha256, and the libraries with their sha256
    b1-c512-greedy.bin ...     one serialized step each (a pickle: load artifacts you trust)
    inductor/<sub>/<name>.so   the compiled C++ kernels, copied into Inductor's cache when absent there

The kernels the sqc ops run are found through the tensors they are called with
(:func:`sqc.runtime.kernels.register_kernels`), so a stored graph holds no process-specific constant.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import threading
from typing import Any

import torch

from .files import file_sha256, write_synced

__all__ = ["STEP_FORMAT", "INDEX", "LIBRARIES", "DEFAULT_CACHE_LENGTHS", "StepEntry", "StoredSteps", "fingerprint",
           "step_file_name", "write_index", "warm_restore", "StepStoreError"]

#: bump when the step's code or the sqc ops' schemas change: older stored steps are then not used
STEP_FORMAT = 1
INDEX = "index.json"
LIBRARIES = "inductor"
#: the cache lengths ``sqc compile`` and ``sqc.save`` store greedy batch-1 steps for
DEFAULT_CACHE_LENGTHS = (512, 1024, 2048, 4096)


class StepStoreError(RuntimeError):
    """A stored step folder that is damaged or does not match its index; the message names the file."""


def _tensor_sig(h, name: str, t: torch.Tensor) -> None:
    h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{tuple(t.stride())}:{t.device.type};".encode())


#: the CPU flags that decide which instructions Inductor's compiled kernels may use
_ISA_FLAG = re.compile(r"^(avx|amx|fma|f16c|sse|ssse|bmi|gfni|vaes|vpclmul)")


def cpu_isa() -> str:
    """torch's CPU capability and the vector-ISA flags of this CPU (``/proc/cpuinfo``). Cheap, unlike
    Inductor's own ISA probe, which compiles test programs when its cache is empty (about 7 s)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = {f for f in line.split(":", 1)[1].split() if _ISA_FLAG.match(f)}
                    break
    except OSError:  # pragma: no cover - not Linux: the capability alone
        pass
    return f"{torch.backends.cpu.get_cpu_capability()}:{','.join(sorted(flags))}"


def fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """What a decode step traced from ``model`` depends on, besides its batch, cache length and mode."""
    import transformers

    h = hashlib.sha256()
    for name, m in model.named_modules():
        h.update(f"{name}:{type(m).__module__}.{type(m).__qualname__}:{m.training};".encode())
        for i, a in enumerate(m.__dict__.get("_args") or ()):  # the kernel arguments sqc layers bind
            if torch.is_tensor(a):
                _tensor_sig(h, f"{name}._args[{i}]", a)
    for name, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                   model.named_buffers(remove_duplicate=False)):
        if t is not None:
            _tensor_sig(h, name, t)
    cfg = getattr(model, "config", None)
    cfg_json = json.dumps(cfg.to_dict() if cfg is not None else {}, sort_keys=True, default=str)
    return {
        "format": STEP_FORMAT,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "isa": cpu_isa(),
        "attention": str(getattr(cfg, "_attn_implementation", None)),
        "config_sha256": hashlib.sha256(cfg_json.encode()).hexdigest(),
        "tensors_sha256": h.hexdigest(),
    }


_WARMING: threading.Thread | None = None


def _warm() -> None:
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    valid_vec_isa_list()
    # what a restored step's compiled module imports first thing (about 0.7 s of imports)
    import torch._inductor.async_compile  # noqa: F401
    import torch._inductor.select_algorithm  # noqa: F401


def warm_restore() -> None:
    """Start what restoring a stored step waits on, in a background thread: Inductor's probe of the CPU's
    vector instruction sets (it builds and ``dlopen``s a test library per instruction set in child processes,
    about 1 s even when its cache is warm) and the imports of Inductor's runtime. ``sqc.load`` calls this
    first thing, so the work overlaps the load where the load waits on files and native code;
    :meth:`StoredSteps.restore` waits for it."""
    global _WARMING
    if _WARMING is None:
        import torch._inductor.cpu_vec_isa  # noqa: F401  (imported here: the package's import sets up state)

        _WARMING = threading.Thread(target=_warm, name="sqc-restore-warmup", daemon=True)
        _WARMING.start()


def step_file_name(batch: int, cache_len: int, mode: str) -> str:
    return f"b{batch}-c{cache_len}-{mode.replace('+', '_')}.bin"


@dataclasses.dataclass(frozen=True)
class StepEntry:
    batch: int
    cache_len: int
    mode: str
    file: str
    sha256: str


def write_index(folder: str, fp: dict[str, Any], entries: list[StepEntry]) -> None:
    """Write ``index.json`` for the steps and libraries in ``folder``."""
    libs = {}
    lib_root = os.path.join(folder, LIBRARIES)
    for root, _dirs, files in os.walk(lib_root):
        for f in sorted(files):
            p = os.path.join(root, f)
            libs[os.path.relpath(p, lib_root)] = file_sha256(p)
    index = {"fingerprint": fp, "steps": [dataclasses.asdict(e) for e in entries], "libraries": libs}
    write_synced(os.path.join(folder, INDEX), json.dumps(index, indent=1, sort_keys=True))


class StoredSteps:
    """The decode steps an artifact carries (its ``steps/`` folder), restored on demand.

    :meth:`find` picks a stored step for a batch, a needed cache length and a mode; :meth:`why_not` says why
    a step cannot be used for a model; :meth:`restore` deserializes one (checking its sha256 and installing
    the compiled kernels into Inductor's cache first)."""

    def __init__(self, folder: str, index: dict[str, Any]) -> None:
        self.folder = folder
        try:
            self.fp = dict(index["fingerprint"])
            self.entries = [StepEntry(**e) for e in index["steps"]]
            self.libraries = dict(index.get("libraries", {}))
        except (KeyError, TypeError) as e:
            raise StepStoreError(f"{os.path.join(folder, INDEX)}: malformed index ({e})") from e
        for rel in [e.file for e in self.entries] + list(self.libraries):
            if os.path.isabs(rel) or os.path.normpath(rel).startswith(".."):
                raise StepStoreError(f"{os.path.join(folder, INDEX)}: bad file name {rel!r}")
        self._installed = False

    def verify(self) -> None:
        """Check every step file and library against its sha256 in the index (raises :class:`StepStoreError`
        naming the file)."""
        files = [(e.file, e.sha256) for e in self.entries]
        files += [(os.path.join(LIBRARIES, rel), d) for rel, d in self.libraries.items()]
        for rel, digest in files:
            p = os.path.join(self.folder, rel)
            if not os.path.isfile(p):
                raise StepStoreError(f"{p} is missing")
            if file_sha256(p) != digest:
                raise StepStoreError(f"{p}: its sha256 differs from {INDEX} (the file is damaged)")

    def lengths(self, batch: int, mode: str) -> list[int]:
        return sorted(e.cache_len for e in self.entries if e.batch == batch and e.mode == mode)

    def find(self, batch: int, need: int, mode: str) -> StepEntry | None:
        """The stored step with the smallest cache length ≥ ``need`` for ``batch`` and ``mode``, or None."""
        fits = [e for e in self.entries if e.batch == batch and e.mode == mode and e.cache_len >= need]
        return min(fits, key=lambda e: e.cache_len, default=None)

    def why_not(self, model: torch.nn.Module) -> str | None:
        """Why the stored steps do not fit ``model`` as it is now (None when they do). Computed afresh each time
        (a few ms): the model may have changed since the last restore."""
        now = fingerprint(model)
        diff = [k for k in sorted(set(now) | set(self.fp)) if now.get(k) != self.fp.get(k)]
        if not diff:
            return None
        k = diff[0]
        return f"{k} differs (stored {self.fp.get(k)!r}, here {now.get(k)!r})"

    def _install_libraries(self) -> None:
        """Copy the stored compiled kernels into Inductor's cache (those absent there; :meth:`verify` checked
        them when the artifact was loaded)."""
        if self._installed:
            return
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        dest_root = cache_dir()
        src_root = os.path.join(self.folder, LIBRARIES)
        for rel in sorted(self.libraries):
            dest = os.path.join(dest_root, rel)
            if os.path.exists(dest):
                continue
            src = os.path.join(src_root, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = f"{dest}.sqc-{os.getpid()}.tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        self._installed = True

    def restore(self, entry: StepEntry, model: torch.nn.Module, cache: Any):
        """The stored step ``entry`` bound to ``model`` and its KV ``cache`` (an ``AOTCompiledFunction``)."""
        path = os.path.join(self.folder, entry.file)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as e:
            raise StepStoreError(f"{path}: unreadable ({e}); re-save the artifact") from e
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise StepStoreError(f"{path}: its sha256 differs from {INDEX}; the file is damaged, re-save the artifact")
        self._install_libraries()
        if _WARMING is not None:
            _WARMING.join()
        return torch.compiler.load_compiled_function(io.BytesIO(data),
                                                     external_data={"model": model, "cache": cache})
