"""The on-disk artifact: ``model.safetensors`` + ``manifest.json``, written atomically.

Layout of an artifact folder::

    manifest.json        format name + version, QuantConfig, target, model
                         description, quantized layers, per-tensor sha256,
                         tensor aliases (tied weights), the compile report,
                         and ``kernels``: the backend kind, its folder and what
                         it recorded (for the CPU the plan's sha256)
    model.safetensors    every tensor of the compiled model (packed codes,
                         tables, CSR parts, the float layers left unquantized,
                         non-persistent buffers too)
    report.json          the compile report (human and tool readable)
    tuning.json, .md     the tuning report of the kernels
    kernels/cpu/         CPU targets: the built kernel libraries and plan.json
                         (:mod:`sqc.runtime.cpu.plan`)
    cuda/                CUDA targets: kernels.cu, kernels.fatbin, plan.json
                         (:class:`sqc.runtime.cuda.kernels.CudaBundle`)
    tokenizer/           optional: the model's tokenizer (``sqc compile`` writes it)

The folder is first written under a temporary name next to the destination
and renamed into place, so a crash never leaves a half-written artifact.
Loading reads JSON and safetensors only (no pickle), checks the format
version and every tensor's checksum, and attaches the kernels the artifact
carries through the target's backend (:mod:`sqc.backends`): a CPU artifact
loads its libraries with TVM's runtime alone, building and tuning nothing.
Format 1 artifacts (no ``kernels`` entry, no CPU libraries) still load; their
CPU kernels are built at load, as that format did.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable

import torch
from torch import nn

from .backends import backend
from .compiled import CompiledModel
from .config import QuantConfig
from .decode_steps import StepsNotStored, normalize_lengths, open_steps, store as decode_steps_store
from .folders import clean_leftovers, swap_into_place, umask
from .restore import Stored, build_layers, restore
from .runtime.fused import fused_groups
from .runtime.int8 import Int8Linear
from .runtime.files import SAFETENSORS_BYTES, SAFETENSORS_DTYPE, atomic_write, write_synced
from .runtime.kernels import KernelFileError
from .runtime.layout import PackedLinear, dtype_name
from .runtime.memory import release_memory
from .runtime.report import LayerReport
from .runtime.stepstore import StepStoreError, warm_restore

__all__ = ["save", "load", "ArtifactError", "FORMAT_NAME", "FORMAT_VERSION", "artifact_bits_per_weight",
           "tune_artifact", "step_lengths"]

FORMAT_NAME = "sqc-artifact"
#: 2: the manifest's ``kernels`` entry, CPU kernel libraries and plan in ``kernels/cpu/``
FORMAT_VERSION = 2
#: the oldest format this sqc reads
MIN_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "model.safetensors"


class ArtifactError(RuntimeError):
    """The artifact cannot be read; the message names the file and the fix."""


def _sha256(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    # hashed through the buffer protocol: no copy of the tensor (a 113 MB embedding would double at load)
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"").hexdigest()


def _model_description(model: nn.Module) -> dict[str, Any]:
    from .trace import is_hf_model

    if is_hf_model(model):
        desc = {
            "kind": "huggingface",
            "class": type(model).__name__,
            "config": model.config.to_dict(),
        }
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            desc["generation_config"] = gen.to_dict()
        return desc
    return {"kind": "module", "class": f"{type(model).__module__}.{type(model).__qualname__}"}


class _Pacer:
    """Calls ``release`` (a spill's :meth:`~sqc.runtime.spill.Spill.evict`) each time about ``every``
    bytes of tensors were read, so reading every file-backed layer once keeps about that many resident."""

    def __init__(self, release: Callable[[], None] | None, every: int = 64 << 20) -> None:
        self.release, self.every, self.n = release, every, 0

    def __call__(self, t: torch.Tensor) -> None:
        if self.release is None:
            return
        self.n += t.nbytes
        if self.n >= self.every:
            self.release()
            self.n = 0

    def done(self) -> None:
        if self.release is not None:
            self.release()
            self.n = 0


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                      release: Callable[[], None] | None = None) -> None:
    """``tensors`` as a safetensors file, each written from its own memory (``safetensors.torch.save_file``
    first copies every tensor into a bytes object: a second copy of the whole model at the end of a
    compile). Tensors in name order, the header padded to 8 bytes as the format asks. ``release`` is
    called as file-backed tensors are read (see :class:`_Pacer`)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in SAFETENSORS_DTYPE:
            raise ArtifactError(f"tensor {name}: dtype {t.dtype} has no safetensors name; sqc cannot store it")
        n = t.nbytes
        header[name] = {"dtype": SAFETENSORS_DTYPE[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    pace = _Pacer(release)
    with open(path, "wb") as fh:
        fh.write(len(head).to_bytes(8, "little"))
        fh.write(head)
        for name in sorted(tensors):
            t = tensors[name].detach().contiguous().cpu()
            if t.numel():
                fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            pace(t)
        pace.done()
        fh.flush()
        os.fsync(fh.fileno())


def _collect_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """All parameters and buffers (non-persistent ones too), tied tensors stored once; and the
    state_dict's keys (read once: a module may rebuild tensors for it, SqcLinear its codes)."""
    named: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        named[name] = p.detach()
    for name, b in model.named_buffers(remove_duplicate=False):
        if b is not None:
            named[name] = b.detach()
    state = model.state_dict()
    keys = sorted(state)
    for name, t in state.items():  # tensors a module rebuilds on demand (SqcLinear codes)
        named.setdefault(name, t.detach())
    del state
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in named.items():
        if t.device.type == "meta":
            raise ArtifactError(f"tensor {name} is on the meta device; nothing to save")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.contiguous().cpu()
    return tensors, aliases, keys


def save(
    compiled,
    path: str | os.PathLike,
    overwrite: bool = False,
    tokenizer: Any = None,
    source: str | None = None,
    decode_steps: Any = "default",
) -> str:
    """Write ``compiled`` to the folder ``path`` atomically. Returns the path.

    ``tokenizer`` (anything with ``save_pretrained``) is stored under
    ``tokenizer/``; ``source`` records where the float model came from (for
    baselines).

    ``decode_steps``: the cache lengths to trace and store greedy batch-1 decode steps for
    (:mod:`sqc.decode_steps`), so that ``generate`` in a fresh process restores them instead of tracing the
    model (about 15 s on SmolLM2). ``"default"`` stores 512, 1024, 2048 and 4096 tokens for a causal LM
    compiled for the CPU (nothing for other models); ``None`` stores none. Tracing runs in a child process
    and takes 20-40 s per length on a small model.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True or choose another folder")
    check_replaceable(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    model = compiled.model
    lengths = step_lengths(compiled, decode_steps)
    spill = getattr(compiled, "spill", None)  # the packed layers of a compile larger than memory, file-backed
    release = spill.evict if spill is not None else None
    tensors, aliases, state_keys = _collect_tensors(model)
    pace = _Pacer(release)
    digests = {}
    for n, t in tensors.items():
        digests[n] = _sha256(t)
        pace(t)
    pace.done()
    report = compiled.report_dict()
    layers = {
        name: {
            "bits": m.bits,
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
            "kernel": m.kernel,
            "kernel_status": m.status.to_dict(),
        }
        for name, m in compiled.quantized_modules().items()
    }
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": compiled.quant_config.to_dict(),
        "target": str(compiled.target),
        "model": _model_description(model),
        "layers": layers,
        "persistent": state_keys,
        "tensors": {
            n: {"dtype": dtype_name(t), "shape": list(t.shape), "sha256": digests[n]}
            for n, t in tensors.items()
        },
        "aliases": aliases,
        # sibling layers that run as one (sqc.runtime.fused); load fuses them again
        "fused": [list(g.names) for g in fused_groups(model)],
        # output projections stored int8 per row (sqc.runtime.int8)
        "heads": {name: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
                  for name, m in model.named_modules() if isinstance(m, Int8Linear)},
        "float_weight_bytes": compiled.float_weight_bytes,
        "source": source,
        "kernels": None,
        "steps": None,
    }
    clean_leftovers(parent)
    tmp = tempfile.mkdtemp(prefix=f".sqc-tmp-{os.getpid()}-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; an artifact gets the user's usual mode
        write_safetensors(os.path.join(tmp, TENSORS), tensors, {"format": FORMAT_NAME}, release)
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        kernels = getattr(compiled, "kernels", None)
        if kernels is not None:  # the kernels the layers run, as the target's backend stores them
            be = backend(compiled.target.kind)
            try:
                entry = kernels.write(os.path.join(tmp, be.folder)) or {}
            except KernelFileError as e:
                raise ArtifactError(f"cannot save the kernels: {e}") from e
            manifest["kernels"] = {"kind": be.kind, "folder": be.folder, **entry}
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        tuning = compiled.tuning_report("dict")
        with open(os.path.join(tmp, "tuning.md"), "w") as fh:
            fh.write(compiled.tuning_report("markdown"))
        for fname, obj in ((MANIFEST, manifest), ("report.json", report), ("tuning.json", tuning)):
            write_synced(os.path.join(tmp, fname), json.dumps(obj, indent=1, default=str))
        if lengths:  # traced from the artifact as written, in a child process (sqc.decode_steps)
            try:
                manifest["steps"] = {**decode_steps_store(tmp, lengths), "lengths": list(lengths)}
            except StepsNotStored as e:
                raise ArtifactError(f"{path}: {e}") from e
            manifest["manifest_sha256"] = _manifest_digest(manifest)
            write_synced(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1, default=str))
        swap_into_place(tmp, path, ".sqc-old-")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def step_lengths(compiled, decode_steps: Any) -> tuple[int, ...]:
    """The cache lengths ``sqc.save(compiled, ..., decode_steps=...)`` stores decode steps for (see :func:`save`):
    ``"default"`` gives none for a model that is not a CPU causal LM; lengths it cannot store raise."""
    lengths = normalize_lengths(decode_steps)
    if not lengths:
        return ()
    model = compiled.model
    why = None
    if compiled.target.kind != "llvm":
        why = f"its target is {compiled.target.kind} (stored steps are made for CPU targets)"
    elif not (hasattr(model, "generate") and hasattr(model, "config")) or not getattr(model, "_supports_static_cache", True):
        why = f"{type(model).__name__} is not a causal LM with a static KV cache"
    if why is None:
        return lengths
    if decode_steps == "default":
        return ()
    raise ValueError(f"sqc.save: decode_steps={decode_steps!r} cannot be stored: {why}; pass decode_steps=None")


def _manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def check_replaceable(path: str) -> None:
    """Raise unless ``path`` is absent or an sqc artifact (a folder whose manifest names the sqc format):
    ``overwrite=True`` / ``--force`` replace artifacts only, never a source folder or a file."""
    if not os.path.lexists(path):
        return
    mpath = os.path.join(path, MANIFEST)
    ok = False
    if os.path.isdir(path) and not os.path.islink(path) and os.path.isfile(mpath):
        try:
            with open(mpath) as fh:
                ok = json.load(fh).get("format") == FORMAT_NAME
        except (OSError, ValueError, AttributeError):
            ok = False
    if not ok:
        kind = "a folder" if os.path.isdir(path) else "a file"
        raise FileExistsError(
            f"{path} exists and is {kind} that is not an sqc artifact (no {MANIFEST} naming the {FORMAT_NAME!r} "
            "format); overwrite replaces only sqc artifacts: remove it yourself or choose another path"
        )


def _read_manifest(path: str) -> dict[str, Any]:
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise ArtifactError(f"{path} is not a folder; sqc.load takes the folder written by sqc.save")
    if not os.path.exists(mpath):
        raise ArtifactError(f"{mpath} is missing: {path} is not an sqc artifact (or an interrupted save)")
    try:
        with open(mpath) as fh:
            manifest = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is corrupted (not valid JSON: {e}); re-create the artifact with sqc.save") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{mpath} is not an sqc manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise ArtifactError(f"{mpath} has no integer format_version")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has artifact format version {version}, newer than this sqc reads ({FORMAT_VERSION}); upgrade sqc"
        )
    if version < MIN_FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has artifact format version {version}, older than this sqc reads ({MIN_FORMAT_VERSION} to "
            f"{FORMAT_VERSION}); re-create it with sqc.save"
        )
    digest = manifest.get("manifest_sha256")
    if digest is not None and digest != _manifest_digest(manifest):
        raise ArtifactError(f"{mpath} was modified after it was written (its checksum does not match); "
                            "re-create the artifact with sqc.save")
    return manifest


def _read_tensors(path: str, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tpath = os.path.join(path, TENSORS)
    if not os.path.exists(tpath):
        raise ArtifactError(f"{tpath} is missing; re-create the artifact with sqc.save")
    try:
        tensors = load_file(tpath)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{tpath} is truncated or corrupted ({e}); re-create the artifact with sqc.save") from e
    expected = manifest.get("tensors", {})
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ArtifactError(f"{tpath} does not match {MANIFEST}: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, info in expected.items():
        if _sha256(tensors[name]) != info["sha256"]:
            raise ArtifactError(
                f"{tpath}: tensor {name} fails its checksum (the file is corrupted); re-create the artifact"
            )
    return tensors


def _instantiate_hf(desc: dict[str, Any]) -> nn.Module:
    import transformers

    cls = getattr(transformers, desc["class"], None)
    if cls is None:
        raise ArtifactError(f"transformers has no class {desc['class']}; install a transformers that does")
    cfg_dict = dict(desc["config"])
    config = cls.config_class.from_dict(cfg_dict)
    with torch.device("meta"):
        model = cls._from_config(config)
    if "generation_config" in desc:
        model.generation_config = transformers.GenerationConfig.from_dict(desc["generation_config"])
    return model


def _set_tensor(model: nn.Module, name: str, t: torch.Tensor, persistent: bool) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    old = mod._parameters.get(attr) if attr in mod._parameters else mod._buffers.get(attr)
    if old is not None and tuple(old.shape) != tuple(t.shape):
        raise ArtifactError(f"the artifact's {name} has shape {tuple(t.shape)}, the model's {tuple(old.shape)}: "
                            "pass an instance of the architecture that was compiled (same sizes)")
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = t
    else:
        raise ArtifactError(f"the model has no parameter or buffer {name}; is it the architecture that was compiled?")


def load(path: str | os.PathLike, model: nn.Module | None = None, target: Any = None, tune: bool = False,
         decode_steps: bool = True):
    """Load an artifact written by :func:`save`; no re-quantization.

    A Hugging Face model is rebuilt from the config stored in the artifact. Any
    other model must be passed as ``model``: an instance of the original
    architecture (its weights may be on the meta device).

    The layers run the kernels the artifact carries (the libraries and tuning
    choices of the compile; for CUDA the fatbin and plan): nothing is built or
    tuned, and no compiler is imported. Where they cannot run (a CPU without the
    instruction set they were built for, an artifact without kernels for the
    target) a CPU model gets kernels built for this machine when the compiler
    is installed, the layers' kernel names and the notes say so; otherwise the
    reference op runs and the kernel name says why.

    ``target`` (default: the one it was compiled for) other than the artifact's
    own, or ``tune=True``, builds kernels for that target with the compiler
    (``tune=True`` searches knobs missing from the tuning database).

    The decode steps the artifact carries (``steps/``, checked against their sha256 here) are restored by
    ``generate`` instead of traced; they are pickled programs, so ``decode_steps=False`` leaves them unread
    for an artifact you do not trust.
    """
    path = os.path.abspath(os.fspath(path))
    manifest = _read_manifest(path)
    if decode_steps and manifest.get("steps"):
        warm_restore()  # what restoring a step waits on, while the rest loads
    tensors = _read_tensors(path, manifest)
    try:
        config = QuantConfig.from_dict(manifest["config"])
    except (KeyError, ValueError, TypeError) as e:
        raise ArtifactError(f"{path}: invalid config in manifest ({e})") from e
    desc = manifest["model"]
    if model is None:
        if desc.get("kind") != "huggingface":
            raise ArtifactError(
                f"{path} holds a {desc.get('class')} model: pass model=<an instance of that class> to sqc.load "
                "(its weights may be on the meta device)"
            )
        model = _instantiate_hf(desc)
    stored = Stored(path, manifest["layers"], manifest.get("heads", {}), manifest.get("fused", []),
                    manifest.get("target"), _kernels_entry(path, manifest),
                    fix="pass an instance of the architecture that was compiled, or re-create the artifact",
                    what="artifact")

    def fail(message: str) -> ArtifactError:
        return ArtifactError(f"{path}: {message}")

    build_layers(model, stored, tensors, fail)
    persistent = set(manifest.get("persistent", []))
    for name, t in tensors.items():
        _set_tensor(model, name, t, name in persistent)
    for alias, original in manifest.get("aliases", {}).items():
        _set_tensor(model, alias, tensors[original], alias in persistent)
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t is not None and t.device.type == "meta"]
    if leftovers:
        raise ArtifactError(f"{path}: no data for {leftovers[:5]}; the artifact does not match this model")
    # every tensor of the model must come from the artifact: an extra layer would keep its random init
    uncovered = sorted(set(model.state_dict()) - persistent - set(tensors) - set(manifest.get("aliases", {})))
    if uncovered:
        raise ArtifactError(
            f"{path}: the artifact has no data for {len(uncovered)} tensors of the model ({uncovered[:5]}): "
            "pass an instance of the architecture that was compiled (same layers and sizes)")
    # the model holds what it needs; dropping the file's dict lets the fused layers and the kernels' layout
    # replace the per-member codes instead of adding to them
    del tensors
    report = {}
    rpath = os.path.join(path, "report.json")
    if os.path.exists(rpath):
        with open(rpath) as fh:
            report = json.load(fh)
    notes = list(report.get("notes", []))
    spec, kernels = restore(model, stored, fail, notes, target=target, tune=tune)
    compiled = CompiledModel(
        model, config, spec, [LayerReport.from_dict(r) for r in report.get("layers", [])], notes,
        report.get("stage_seconds", {}), None, manifest.get("float_weight_bytes", 0),
        kernels.records() if kernels is not None else [], kernels=kernels,
    )
    compiled.refresh_kernel_names()
    try:
        compiled.__dict__["stored_steps"] = open_steps(path, manifest.get("steps")) if decode_steps else None
    except StepStoreError as e:
        raise ArtifactError(f"{e}; or load it and save it again") from e
    release_memory()
    return compiled


def _kernels_entry(path: str, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """What the manifest records of the artifact's kernels (a format 1 artifact: its cuda/ folder, if any)."""
    entry = manifest.get("kernels")
    if entry is None and manifest["format_version"] == 1 and os.path.isdir(os.path.join(path, "cuda")):
        entry = {"kind": "cuda", "folder": "cuda"}
    return entry


def artifact_bits_per_weight(path: str | os.PathLike) -> dict[str, Any]:
    """Stored bits per weight of every quantized layer, read from the saved file's header.

    Counts codes + tables + sparse values, column indices and row pointers
    (bias and unquantized layers are not weights of the quantized matrices).
    """
    from safetensors import safe_open

    path = os.fspath(path)
    manifest = _read_manifest(path)
    per_layer = {}
    total_bits = 0
    total_weights = 0
    with safe_open(os.path.join(path, TENSORS), framework="pt") as fh:
        for name, info in manifest["layers"].items():
            nbytes = 0
            for t in PackedLinear.TENSORS:
                sl = fh.get_slice(f"{name}.{t}")
                n = 1
                for s in sl.get_shape():
                    n *= s
                nbytes += n * SAFETENSORS_BYTES[sl.get_dtype()]
            n_w = info["in_features"] * info["out_features"]
            per_layer[name] = 8.0 * nbytes / n_w
            total_bits += 8 * nbytes
            total_weights += n_w
    return {"layers": per_layer, "overall": total_bits / max(total_weights, 1)}


def tune_artifact(path: str, model: torch.nn.Module | None = None, repeats: int = 100) -> list[dict[str, Any]]:
    """The GPU half of CUDA tuning: time every candidate kernel of a saved CUDA artifact on this GPU.

    The candidates were generated and built where the artifact was compiled
    (``sqc.compile(..., target="cuda -arch=...", tune=True)``); here they are
    only loaded and timed. The winners and every timing are written back into
    the artifact (``cuda/plan.json``, ``tuning.json``, ``tuning.md``, each
    replaced atomically), so a later ``sqc.load`` runs the tuned kernels.
    Needs neither TVM nor nvcc. Returns the tuning records.
    """
    from .tuning_report import tuning_markdown
    from .runtime.cuda.kernels import CudaUnavailable

    if not torch.cuda.is_available():
        raise CudaUnavailable(f"tuning {path} needs an NVIDIA GPU; torch sees none here")
    compiled = load(path, model=model)
    if compiled.cuda is None:
        raise ValueError(f"{path} holds no CUDA kernels (compiled for '{compiled.target}'); "
                         "compile with target='cuda -arch=sm_XX' to tune for a GPU")
    compiled.to("cuda")
    compiled.cuda.tune(compiled.model, repeats=repeats)
    records = compiled.cuda.records()
    data = {"target": str(compiled.target), "kernels": records}
    atomic_write(os.path.join(path, backend("cuda").folder, "plan.json"), json.dumps(compiled.cuda.plan, indent=1))
    atomic_write(os.path.join(path, "tuning.json"), json.dumps(data, indent=1, default=str))
    atomic_write(os.path.join(path, "tuning.md"), tuning_markdown(data))
    return records

