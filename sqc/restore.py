"""One restore path: a compiled model from stored tensors and a description, for ``sqc.load`` and
``from_pretrained``.

Both folders describe the same things: the quantized layers (bits, sizes, bias; a Hugging Face folder also
their tensors' dtypes), the int8 heads, the fused sibling groups, the target the model was compiled for and
the kernels the folder carries (:class:`Stored`). :func:`restore` turns a model whose quantized layers hold
their data into the compiled model that was saved:

1. the quantized layers and int8 heads are checked (in place, real data, the stored dtypes, a consistent
   packed weight);
2. the sibling groups are fused again (:func:`sqc.runtime.fused.refuse`);
3. the kernels attach through the target's backend (:mod:`sqc.backends`): the folder's own kernels when
   they can run here (nothing is built or tuned, no compiler is imported), else kernels built for this
   machine when the compiler is installed, else the reference op, and the layers' statuses and the notes
   say which and why.

``sqc.load`` first puts layers built from the artifact's tensors in place (:func:`build_layers`); the Hugging
Face quantizer puts empty ones in place and lets transformers fill them. Nothing here imports the compiler.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import torch
from torch import nn

from .backends import backend, compiler_missing
from .runtime.fused import kernel_layers, refuse
from .runtime.int8 import Int8Linear
from .runtime.kernels import KernelFileError, KernelsUnusable
from .runtime.layout import PackedLinear, dtype_name
from .runtime.memory import release_memory
from .runtime.modules import replace_module
from .runtime.qlinear import SqcLinear
from .runtime.status import KernelStatus
from .runtime.target import TargetSpec, parse_target

__all__ = ["Stored", "build_layers", "restore", "NOT_ATTACHED"]

#: a restored layer's status until kernels attach
NOT_ATTACHED = KernelStatus.reference("no kernels attached")
#: the tensor dtypes a layer description may record, and the layer's tensor they describe
_DTYPE_KEYS = {"lut_dtype": "lut", "val_dtype": "val", "col_dtype": "col", "bias_dtype": "bias"}


@dataclasses.dataclass
class Stored:
    """What a folder records of a compiled model besides its tensors.

    ``where``: the folder (for messages); ``layers``: per quantized layer (module path) ``bits``,
    ``in_features``, ``out_features``, ``bias`` and optionally ``lut_dtype`` / ``val_dtype`` / ``col_dtype`` /
    ``bias_dtype``; ``heads``: per int8 head ``in_features``, ``out_features``, ``bias``; ``fused``: the
    sibling groups; ``target``: what it was compiled for; ``kernels``: the kernels entry (``kind``, ``folder``
    relative to ``where``, and what the backend recorded), or None when the folder carries none.
    ``fix``: what the user should do when the folder is inconsistent.
    """

    where: str
    layers: dict[str, dict[str, Any]]
    heads: dict[str, dict[str, Any]]
    fused: list[list[str]]
    target: str
    kernels: dict[str, Any] | None
    fix: str
    #: what messages call the folder ("artifact", "folder")
    what: str = "folder"

    def kernels_folder(self) -> str | None:
        """The absolute folder of the carried kernels, or None; raises ValueError for a malformed entry."""
        entry = self.kernels
        if entry is None:
            return None
        folder = entry.get("folder") if isinstance(entry, dict) else None
        if (not isinstance(folder, str) or os.path.isabs(folder) or os.path.normpath(folder).startswith("..")
                or not isinstance(entry.get("kind"), str)):
            raise ValueError(f"malformed kernels entry {entry!r}")
        return os.path.join(self.where, folder)


def build_layers(model: nn.Module, stored: Stored, tensors: dict[str, torch.Tensor],
                 fail: Callable[[str], Exception]) -> None:
    """Put an :class:`SqcLinear` / :class:`Int8Linear` built from ``tensors`` in place of each stored layer and
    head of ``model`` (whose modules there have the stored sizes); raises ``fail(message)``."""
    for name, info in stored.layers.items():
        try:
            packed = PackedLinear(info["bits"], info["in_features"], info["out_features"],
                                  *(tensors[f"{name}.{t}"] for t in PackedLinear.TENSORS))
        except KeyError as e:
            raise fail(f"layer {name} lacks tensor {e}") from e
        except ValueError as e:
            raise fail(f"layer {name}: {e}; {stored.fix}") from e
        _check_shape(model, name, "layer", info, stored, fail)
        bias = tensors.get(f"{name}.bias") if info["bias"] else None
        replace_module(model, name, SqcLinear(packed, bias, _saved_status(info)))
    for name, info in stored.heads.items():
        try:
            head = Int8Linear(tensors[f"{name}.qweight"], tensors[f"{name}.scale"],
                              tensors.get(f"{name}.bias") if info["bias"] else None, NOT_ATTACHED)
        except (KeyError, ValueError) as e:
            raise fail(f"output projection {name} cannot be rebuilt ({type(e).__name__}: {e}); {stored.fix}") from e
        _check_shape(model, name, "output projection", info, stored, fail)
        replace_module(model, name, head)


def _saved_status(info: dict[str, Any]) -> KernelStatus:
    """A restored layer's status before kernels attach: why it ran the reference op when it was saved (a
    layer the carried kernels leave out keeps that reason), else :data:`NOT_ATTACHED`."""
    try:
        saved = KernelStatus.from_dict(info["kernel_status"])
    except (KeyError, ValueError):
        return NOT_ATTACHED
    return KernelStatus.reference(saved.why) if not saved.generated and saved.why else NOT_ATTACHED


def _check_shape(model, name: str, what: str, info: dict[str, Any], stored: Stored, fail) -> None:
    try:
        old = model.get_submodule(name)
    except AttributeError as e:
        raise fail(f"the model has no module {name}; pass the architecture that was compiled") from e
    shape = (getattr(old, "out_features", None), getattr(old, "in_features", None))
    if shape != (info["out_features"], info["in_features"]):
        raise fail(f"{what} {name} was compiled as {info['out_features']}x{info['in_features']}, the model's "
                   f"{type(old).__name__} is {shape[0]}x{shape[1]}: pass the architecture that was compiled "
                   "(same sizes)")


def check_layers(model: nn.Module, stored: Stored, fail: Callable[[str], Exception]) -> None:
    """Every stored layer and head is in place and holds real data of the recorded dtypes; every layer's
    tensors form one packed weight."""
    for name, info in stored.layers.items():
        m = model.get_submodule(name)
        if not isinstance(m, SqcLinear):
            raise fail(f"layer {name} is a {type(m).__name__} after loading, not an SqcLinear; {stored.fix}")
        _check_data(m, name, "layer", PackedLinear.TENSORS + (("bias",) if info["bias"] else ()), stored, fail)
        for key, tensor in _DTYPE_KEYS.items():
            want = info.get(key)
            t = m._buffers.get(tensor)
            if want is not None and t is not None and dtype_name(t) != want:
                # a loader cast a stored table: the kernels and the exact sparse values need it as stored
                raise fail(f"layer {name}: {tensor} loaded as {dtype_name(t)}, stored as "
                           f"{want} (this loader casts buffers of quantized models); load with dtype='auto' or "
                           "use sqc.load on an sqc.save artifact")
        try:
            m.packed  # noqa: B018 - validates the loaded layer (row pointers against the sparse count)
        except ValueError as e:
            raise fail(f"layer {name}: {e}; {stored.fix}") from e
    for name, info in stored.heads.items():
        m = model.get_submodule(name)
        if not isinstance(m, Int8Linear):
            raise fail(f"int8 head {name} is a {type(m).__name__} after loading, not an Int8Linear; {stored.fix}")
        if "weight" in m._parameters or isinstance(m.__dict__.get("weight"), torch.Tensor):
            # something tied a float weight onto the head: it would sit unused next to the int8 one
            raise fail(f"int8 head {name} was given a float weight while loading (weight tying?); it computes "
                       f"from its int8 qweight and scale only; {stored.fix}")
        _check_data(m, name, "int8 head", ("qweight", "scale", "bias") if info["bias"] else ("qweight", "scale"),
                    stored, fail)
        q, s = m._buffers["qweight"], m._buffers["scale"]
        if (q.dtype, s.dtype, tuple(q.shape)) != (torch.int8, torch.float32, (info["out_features"], info["in_features"])):
            raise fail(f"int8 head {name}: qweight / scale loaded as {q.dtype} {list(q.shape)} / {s.dtype}, stored as "
                       f"int8 {[info['out_features'], info['in_features']]} / float32 (this loader casts buffers of "
                       "quantized models); load with dtype='auto' or use sqc.load on an sqc.save artifact")


def _check_data(m: nn.Module, name: str, what: str, keys, stored: Stored, fail) -> None:
    for key in keys:
        t = getattr(m, key, None)  # an SqcLinear's codes come from its kernels once they are attached
        if t is None or t.device.type == "meta":
            raise fail(f"{what} {name}: no data for {key} after loading; {stored.fix}")


def restore(model: nn.Module, stored: Stored, fail: Callable[[str], Exception], notes: list[str], *,
            target: Any = None, tune: bool = False) -> tuple[TargetSpec, Any]:
    """Check, re-fuse and attach kernels to ``model``, whose stored layers hold their data (see the module).

    ``target`` other than the stored one, or ``tune=True``, builds kernels with the compiler instead of
    using the carried ones. Returns (the target the layers run for, the kernel set or None); appends what
    happened to ``notes``.
    """
    check_layers(model, stored, fail)
    try:
        refuse(model, stored.fused)
    except ValueError as e:
        raise fail(f"{e}; {stored.fix}") from e
    release_memory()  # the members' codes and the stacking temporaries, before the kernels' layout is made
    model.eval()
    try:
        own = parse_target(stored.target)
        spec = parse_target(target) if target is not None else own
    except (TypeError, ValueError) as e:
        raise fail(f"invalid target ({e})") from e
    return attach_kernels(model, stored, own, spec, target is not None, tune, notes, fail)


def attach_kernels(model: nn.Module, stored: Stored, own: TargetSpec, spec: TargetSpec, explicit: bool, tune: bool,
                   notes: list[str], fail: Callable[[str], Exception]) -> tuple[TargetSpec, Any]:
    """The carried kernels through the target's backend, else kernels built here, else the reference op."""
    be = backend(spec.kind)
    unusable = None  # why the folder's own kernels do not run here
    if tune:
        requested = "tune=True asks for the kernels to be tuned again"
    elif explicit and spec != own:
        requested = f"target {spec} differs from the stored {own}"
    else:
        requested = None
    if requested is None:
        try:
            folder = stored.kernels_folder()
        except ValueError as e:
            raise fail(str(e)) from e
        if folder is None or stored.kernels["kind"] != spec.kind:
            unusable = f"the {stored.what} carries no {spec.kind} kernels"
        elif not os.path.isdir(folder):
            unusable = f"its {spec.kind} kernels ({os.path.relpath(folder, stored.where)}/) are missing"
        else:
            try:
                return spec, be.load(model, folder, stored.kernels, spec)
            except KernelsUnusable as e:
                unusable = str(e)
            except (KernelFileError, OSError, ValueError, KeyError, TypeError) as e:
                raise fail(f"unreadable {spec.kind} kernels: {e}; {stored.fix}") from e
    why = requested or unusable
    missing = compiler_missing()
    if not be.rebuild_on_load or missing is not None:
        blocker = missing or f"{spec.kind} kernels are not rebuilt at load"
        for m in kernel_layers(model).values():  # fused members report their group's layer
            m.set_kernel(None, KernelStatus.reference(f"{why}; {blocker}"))
        notes.append(f"the quantized layers run the reference op: {why}; {blocker}")
        return spec, None
    # the compiler is here: build for the requested target, or for this machine when the stored ones cannot run
    build_for = spec if explicit else parse_target(spec.kind)
    kernels = be.attach(model, build_for, tune=tune, notes=notes)
    notes.append(f"kernels built at load for {build_for}: {why}")
    if unusable is not None:
        for m in kernel_layers(model).values():
            if m.status.generated:
                m.status = m.status.with_note(f"built at load: {unusable}")
    return build_for, kernels
