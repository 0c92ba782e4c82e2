"""The on-disk artifact: ``model.safetensors`` + ``manifest.json``, written atomically.

Layout of an artifact folder::

    manifest.json        format name + version, QuantConfig, target, model
                         description, quantized layers, per-tensor sha256,
                         tensor aliases (tied weights), the compile report
    model.safetensors    every tensor of the compiled model (packed codes,
                         tables, CSR parts, the float layers left unquantized,
                         non-persistent buffers too)
    report.json          the compile report (human and tool readable)
    tokenizer/           optional: the model's tokenizer (``sqc compile`` writes it)

The folder is first written under a temporary name next to the destination
and renamed into place, so a crash never leaves a half-written artifact.
Loading reads JSON and safetensors only (no pickle), checks the format
version and every tensor's checksum.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import torch
from torch import nn

from ..config import QuantConfig
from .layout import PackedLinear
from .qlinear import SqcLinear

__all__ = ["save", "load", "ArtifactError", "FORMAT_NAME", "FORMAT_VERSION", "artifact_bits_per_weight"]

FORMAT_NAME = "sqc-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "model.safetensors"


class ArtifactError(RuntimeError):
    """The artifact cannot be read; the message names the file and the fix."""


def _sha256(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def _model_description(model: nn.Module) -> dict[str, Any]:
    from ..trace import is_hf_model

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


def _collect_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All parameters and buffers (non-persistent ones too), tied tensors stored once."""
    named: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        named[name] = p.detach()
    for name, b in model.named_buffers(remove_duplicate=False):
        if b is not None:
            named[name] = b.detach()
    for name, t in model.state_dict().items():  # tensors a module rebuilds on demand (SqcLinear codes)
        named.setdefault(name, t.detach())
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
    return tensors, aliases


def save(
    compiled,
    path: str | os.PathLike,
    overwrite: bool = False,
    tokenizer: Any = None,
    source: str | None = None,
) -> str:
    """Write ``compiled`` to the folder ``path`` atomically. Returns the path.

    ``tokenizer`` (anything with ``save_pretrained``) is stored under
    ``tokenizer/``; ``source`` records where the float model came from (for
    baselines).
    """
    from safetensors.torch import save_file

    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True or choose another folder")
    check_replaceable(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    model = compiled.model
    tensors, aliases = _collect_tensors(model)
    report = compiled.report_dict()
    layers = {
        name: {
            "bits": m.bits,
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
            "kernel": m.kernel,
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
        "persistent": sorted(model.state_dict().keys()),
        "tensors": {
            n: {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "sha256": _sha256(t)}
            for n, t in tensors.items()
        },
        "aliases": aliases,
        "float_weight_bytes": compiled.float_weight_bytes,
        "source": source,
    }
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    clean_leftovers(parent)
    tmp = tempfile.mkdtemp(prefix=f".sqc-tmp-{os.getpid()}-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; an artifact gets the user's usual mode
        save_file(tensors, os.path.join(tmp, TENSORS), metadata={"format": FORMAT_NAME})
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        if getattr(compiled, "cuda", None) is not None:
            compiled.cuda.write(os.path.join(tmp, "cuda"))
        tuning = compiled.tuning_report("dict")
        with open(os.path.join(tmp, "tuning.md"), "w") as fh:
            fh.write(compiled.tuning_report("markdown"))
        for fname, obj in ((MANIFEST, manifest), ("report.json", report), ("tuning.json", tuning)):
            with open(os.path.join(tmp, fname), "w") as fh:
                json.dump(obj, fh, indent=1, default=str)
                fh.flush()
                os.fsync(fh.fileno())
        swap_into_place(tmp, path, ".sqc-old-")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def swap_into_place(tmp: str, path: str, old_prefix: str) -> None:
    """Rename the finished folder ``tmp`` to ``path``; an existing ``path`` is moved aside first (into
    ``<old_prefix><pid>-*`` in the same parent) and removed only once the new one is in place."""
    if os.path.lexists(path):
        old = tempfile.mkdtemp(prefix=f"{old_prefix}{os.getpid()}-", dir=os.path.dirname(path))
        os.rename(path, os.path.join(old, "a"))
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def clean_leftovers(parent: str, prefixes: tuple[str, ...] = (".sqc-tmp-", ".sqc-old-")) -> None:
    """Remove ``<prefix><pid>-*`` folders of saves whose process is gone (killed mid-save)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        pid = name[len(prefix):].split("-", 1)[0] if prefix else ""
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # a save in progress
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


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
    if version < FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has artifact format version {version}, older than this sqc reads ({FORMAT_VERSION}); "
            "re-create it with sqc.save"
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


def load(path: str | os.PathLike, model: nn.Module | None = None, target: Any = None, tune: bool = False):
    """Load an artifact written by :func:`save`; no re-quantization.

    A Hugging Face model is rebuilt from the config stored in the artifact. Any
    other model must be passed as ``model``: an instance of the original
    architecture (its weights may be on the meta device).

    Kernels for ``target`` (default: the target it was compiled for; for CPU
    artifacts, this machine's CPU, since the kernels are derived at load) come from
    the on-disk kernel cache and the tuning database; nothing is rebuilt when
    both hold them. ``tune=True`` searches knobs missing from the database.
    """
    from ..codegen.target import parse_target
    from ..compiler import CompiledModel
    from ..passes.base import LayerReport
    from ..passes.lower import replace_module

    path = os.path.abspath(os.fspath(path))
    manifest = _read_manifest(path)
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
    for name, info in manifest["layers"].items():
        try:
            packed = PackedLinear(
                info["bits"], info["in_features"], info["out_features"],
                *(tensors[f"{name}.{t}"] for t in PackedLinear.TENSORS),
            )
        except KeyError as e:
            raise ArtifactError(f"{path}: layer {name} lacks tensor {e}") from e
        bias = tensors.get(f"{name}.bias") if info["bias"] else None
        try:
            target_mod = model.get_submodule(name)
        except AttributeError as e:
            raise ArtifactError(f"{path}: the model has no module {name}; pass the architecture that was compiled") from e
        shape = (getattr(target_mod, "out_features", info["out_features"]), getattr(target_mod, "in_features", info["in_features"]))
        if shape != (info["out_features"], info["in_features"]):
            raise ArtifactError(
                f"{path}: layer {name} was compiled as {info['out_features']}x{info['in_features']}, the model's is "
                f"{shape[0]}x{shape[1]}; pass an instance of the architecture that was compiled (same sizes)")
        # the kernel name says what runs here, set when kernels attach below (not the compiling machine's)
        replace_module(model, name, SqcLinear(packed, bias, kernel="reference (no kernels attached)"))
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
    model.eval()
    report = {}
    rpath = os.path.join(path, "report.json")
    if os.path.exists(rpath):
        with open(rpath) as fh:
            report = json.load(fh)
    layers = []
    for r in report.get("layers", []):
        out_f, in_f = r["shape"]
        layers.append(LayerReport(
            r["module"], in_f, out_f, r["quantized"], r["reason"], r["bits"], r["sparse_nnz"], r["sparse_pct"],
            r["weighted_error"], r["mse"], 0, r["bytes"] or {}, r["kernel"], r.get("notes", []),
            r.get("weight_power"),
        ))
    spec = parse_target(target if target is not None else manifest["target"])
    if target is None and spec.kind == "llvm":
        # CPU kernels are derived at load: build them for this machine's CPU, not the compiling one's
        spec = parse_target("llvm")
    tuning = []
    bundle = None
    if spec.kind == "llvm":
        from .cpu import attach_cpu_kernels

        tuning = attach_cpu_kernels(model, spec, tune=tune)
    elif spec.kind == "cuda" and os.path.isdir(os.path.join(path, "cuda")):
        # no TVM, JAX or nvcc needed: the kernels were built when the artifact was written
        from .cuda import CudaBundle

        try:
            bundle = CudaBundle.read(os.path.join(path, "cuda"))
        except (OSError, ValueError, KeyError) as e:
            raise ArtifactError(f"{path}: unreadable CUDA kernels ({e})") from e
        bundle.attach(model, str(spec))
        tuning = bundle.records()
    compiled = CompiledModel(
        model, config, spec, layers, report.get("notes", []),
        report.get("stage_seconds", {}), None, manifest.get("float_weight_bytes", 0), tuning,
    )
    compiled.cuda = bundle
    compiled.refresh_kernel_names()
    return compiled


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
                nbytes += n * _DTYPE_BYTES[sl.get_dtype()]
            n_w = info["in_features"] * info["out_features"]
            per_layer[name] = 8.0 * nbytes / n_w
            total_bits += 8 * nbytes
            total_weights += n_w
    return {"layers": per_layer, "overall": total_bits / max(total_weights, 1)}


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
