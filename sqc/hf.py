"""A Hugging Face-native surface for sqc models: ``save_pretrained`` / ``from_pretrained``.

:func:`save_pretrained` writes a compiled Hugging Face causal LM as an
ordinary Hugging Face folder::

    config.json              the model's config plus a ``quantization_config``
                             with ``quant_method: "sqc"``: the sqc settings
                             (``QuantConfig.to_dict()``) and, per quantized layer,
                             bits, in/out features, sparse count, bias and dtypes;
                             ``fused``: the groups of sibling layers that run as one
                             (:mod:`sqc.runtime.fused`); ``heads``: the output
                             projections stored int8 per row (:mod:`sqc.runtime.int8`);
                             ``kernels``: where the CPU kernels are (below)
    model.safetensors        the model's state dict: for each quantized layer its
                             ``codes``, ``lut``, ``crow``, ``col``, ``val`` (and
                             ``bias``) in the canonical layout of
                             :mod:`sqc.runtime.layout` (per layer, fused or not);
                             for each int8 head its ``qweight``, ``scale`` (and
                             ``bias``); float tensors as usual
    generation_config.json   the model's generation config
    kernels/cpu/             the CPU kernel libraries the layers run and their plan,
                             as an ``sqc.save`` artifact carries them (for a model
                             compiled for a CPU target)
    tokenizer files          when a tokenizer is passed

After :func:`register_with_transformers` (``import sqc`` calls it),
``transformers.AutoModelForCausalLM.from_pretrained(folder)`` rebuilds the
model: the quantizer puts empty :class:`~sqc.runtime.qlinear.SqcLinear`
layers (sized from ``quantization_config``) in place of the ``nn.Linear``
modules and empty :class:`~sqc.runtime.int8.Int8Linear` heads in place of the
output projections before the weights load (a head tied to the input
embedding is untied: the embedding loads its own float weight); afterwards
:func:`sqc.restore.restore`, the path ``sqc.load`` takes too, checks the
layers (tables keep their stored dtype), fuses the recorded sibling groups
again and attaches the kernels in ``kernels/cpu/``: on a machine with the
instruction set they were built for nothing is built or tuned and TVM is not
imported; elsewhere they are built at load (with TVM) or the reference op
runs, and the layers' statuses say which. So the loaded ``PreTrainedModel``
computes what the compiled model does.

>>> import sqc, sqc.hf                                        # doctest: +SKIP
>>> compiled = sqc.compile(model, (ids,), config="w3-s0.45", calibration=[(ids,)])
>>> sqc.hf.save_pretrained(compiled, "out/smol-hf", tokenizer=tok)
>>> from transformers import AutoModelForCausalLM, pipeline
>>> m = AutoModelForCausalLM.from_pretrained("out/smol-hf")   # SqcLinear layers, CPU kernels
>>> pipeline("text-generation", model=m, tokenizer=tok)("def main():", max_new_tokens=20)

The transformers classes (:class:`~sqc.hf_quantizer.SqcQuantizationConfig`,
:class:`~sqc.hf_quantizer.SqcHfQuantizer`) live in :mod:`sqc.hf_quantizer`,
imported on first use, so importing this module imports neither transformers
nor TVM.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import warnings
from typing import Any

from torch import nn

from .backends import backend
from .folders import clean_leftovers, swap_into_place, umask
from .hf_format import (CONFIG, FORMAT_VERSION, QUANT_METHOD, SqcCheckpointError, head_entry, layer_entry,
                        validate_fields)
from .runtime.files import fsync_tree
from .runtime.kernels import KernelFileError

__all__ = [
    "register_with_transformers",
    "save_pretrained",
    "SqcCheckpointError",
    "QUANT_METHOD",
    "FORMAT_VERSION",
]

_AUTO = "transformers.quantizers.auto"
_TMP_PREFIX = ".sqc-hf-tmp-"
_OLD_PREFIX = ".sqc-hf-old-"
_CLASSES = ("SqcQuantizationConfig", "SqcHfQuantizer")


def __getattr__(name: str):
    if name in _CLASSES:  # imports transformers: only when asked for
        from . import hf_quantizer

        return getattr(hf_quantizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- registration ------------------------------------------------------------------------------------------------


def _register_now() -> None:
    from . import hf_quantizer

    auto = importlib.import_module(_AUTO)
    for mapping, cls, register in (
        (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, hf_quantizer.SqcQuantizationConfig, auto.register_quantization_config),
        (auto.AUTO_QUANTIZER_MAPPING, hf_quantizer.SqcHfQuantizer, auto.register_quantizer),
    ):
        existing = mapping.get(QUANT_METHOD)
        if existing is cls:
            continue
        if existing is None:
            register(QUANT_METHOD)(cls)
        elif getattr(existing, "__module__", None) == hf_quantizer.__name__:
            mapping[QUANT_METHOD] = cls  # an earlier copy of this module (reloaded): take its place
        else:
            raise RuntimeError(
                f"transformers already has a quantization method {QUANT_METHOD!r} from "
                f"{existing.__module__}.{existing.__qualname__}; sqc cannot register its own: uninstall the other one")


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Registers sqc when transformers imports its quantizer registry (``transformers.quantizers.auto``, about 3 s
    of imports), so that ``import sqc`` need not import it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _AUTO:
            return None
        _remove_hook()
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            try:
                _register_now()
            except Exception as e:  # never break `import transformers` for models that are not sqc's
                warnings.warn(f"sqc could not register its quantizer with transformers ({type(e).__name__}: {e}); "
                              "from_pretrained cannot load sqc folders", RuntimeWarning, stacklevel=2)

        spec.loader.exec_module = exec_and_register
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterImport)]


def register_with_transformers() -> bool:
    """Teach ``transformers`` the ``quant_method: "sqc"`` checkpoints. Idempotent.

    Returns False (and does nothing) when transformers is not installed. When
    transformers' quantizer registry is already imported, the sqc config and
    quantizer are registered now; otherwise when transformers imports it.

    >>> import sqc.hf
    >>> sqc.hf.register_with_transformers() in (True, False)
    True
    """
    if _AUTO in sys.modules:
        _register_now()
        return True
    try:
        if importlib.util.find_spec("transformers") is None:
            return False
    except (ImportError, ValueError):
        return False
    if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
    return True


# -- saving ------------------------------------------------------------------------------------------------------


def _written_here(path: str) -> bool:
    cpath = os.path.join(path, CONFIG)
    if not (os.path.isdir(path) and not os.path.islink(path) and os.path.isfile(cpath)):
        return False
    try:
        with open(cpath) as fh:
            qc = json.load(fh).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


@contextlib.contextmanager
def _without_gguf_marker(model):
    """A model read from a GGUF file keeps transformers' GGUF quantizer, which refuses to save although its
    weights were de-quantized to float at load: hide it while the float parts are written."""
    q = getattr(model, "hf_quantizer", None)
    is_gguf = q is not None and type(q).__name__.lower().startswith("gguf")
    if not is_gguf:
        yield
        return
    saved = (model.hf_quantizer, getattr(model, "is_quantized", False), getattr(model.config, "quantization_config", None))
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        yield
    finally:
        model.hf_quantizer, model.is_quantized = saved[0], saved[1]
        if saved[2] is not None:
            model.config.quantization_config = saved[2]


def save_pretrained(compiled, path: str | os.PathLike, tokenizer: Any = None) -> str:
    """Write a compiled Hugging Face model as a Hugging Face folder that ``from_pretrained`` loads.

    The folder is written under a temporary name next to ``path`` and renamed
    into place. An existing ``path`` is replaced only if it is a folder this
    function wrote (its ``config.json`` has ``quantization_config.quant_method
    == "sqc"``) and an empty folder (as ``tempfile.mkdtemp()`` makes); anything else raises :class:`FileExistsError`.

    Parameters
    ----------
    compiled : a :class:`sqc.CompiledModel` wrapping a ``transformers.PreTrainedModel``
        (``sqc.compile(hf_model, ...)`` or ``sqc.load(artifact)``). CUDA kernel bundles
        are not written: ``from_pretrained`` attaches CPU kernels.
    path : the folder to write.
    tokenizer : optional, anything with ``save_pretrained``; its files go next to
        ``config.json``, so ``AutoTokenizer.from_pretrained(path)`` finds them.

    Returns
    -------
    The absolute path written.

    Examples
    --------
    >>> sqc.hf.save_pretrained(compiled, "out/tiny-hf", tokenizer=tok)   # doctest: +SKIP
    >>> m = transformers.AutoModelForCausalLM.from_pretrained("out/tiny-hf")
    >>> pipe = transformers.pipeline("text-generation", model=m, tokenizer=tok)

    ``pipeline`` also takes the compiled model itself (``model=compiled.model`` avoids
    transformers' "not supported for text-generation" log line about the wrapper's class name).
    """
    from .runtime.fused import fused_groups
    from .runtime.int8 import Int8Linear
    from .runtime.qlinear import SqcLinear
    from .trace import is_hf_model

    # an sqc CompiledModel (by its fields: importing sqc.compiled here would make the two modules import each other)
    is_compiled = isinstance(compiled, nn.Module) and hasattr(compiled, "quant_config")
    model = compiled._modules.get("model") if is_compiled else None
    if model is None or not is_hf_model(model):
        raise TypeError(
            f"sqc.hf.save_pretrained takes an sqc CompiledModel wrapping a transformers PreTrainedModel, got "
            f"{type(compiled).__name__}" + (f" wrapping {type(model).__name__}" if model is not None else "")
            + "; save other models with sqc.save(compiled, path)")
    layers = {n: layer_entry(m) for n, m in model.named_modules() if isinstance(m, SqcLinear)}
    if not layers:
        raise ValueError("the model has no quantized (SqcLinear) layers; save a float model with model.save_pretrained")
    target = getattr(compiled, "target", None)
    qc = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "sqc_config": compiled.quant_config.to_dict(),
        "target": str(target) if target is not None else "llvm",
        "layers": layers,
        # sibling layers that run as one (sqc.runtime.fused); from_pretrained fuses them again
        "fused": [list(g.names) for g in fused_groups(model)],
        # output projections stored int8 per row (sqc.runtime.int8)
        "heads": {n: head_entry(m) for n, m in model.named_modules() if isinstance(m, Int8Linear)},
        # the CPU kernels the layers run, written below (from_pretrained loads them as sqc.load does)
        "kernels": None,
    }
    validate_fields(qc)  # what is written must read back
    cpu_kernels = compiled.kernels if target is not None and target.kind == "llvm" else None

    path = os.path.abspath(os.fspath(path))
    empty = os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)  # e.g. tempfile.mkdtemp()
    if os.path.lexists(path) and not (empty or _written_here(path)):
        kind = "a folder" if os.path.isdir(path) else "a file"
        raise FileExistsError(
            f"{path} exists and is {kind} that sqc.hf.save_pretrained did not write (no {CONFIG} with "
            f"quantization_config.quant_method {QUANT_METHOD!r}); save_pretrained replaces only its own folders: "
            "remove it yourself or choose another path")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    clean_leftovers(parent, (_TMP_PREFIX, _OLD_PREFIX))
    tmp = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; the folder gets the user's usual mode
        with _without_gguf_marker(model):
            model.save_pretrained(tmp)
        cpath = os.path.join(tmp, CONFIG)
        with open(cpath) as fh:
            config = json.load(fh)
        if cpu_kernels is not None:
            be = backend("llvm")
            try:
                entry = cpu_kernels.write(os.path.join(tmp, be.folder)) or {}
            except KernelFileError as e:
                raise SqcCheckpointError(f"cannot save the kernels: {e}") from e
            qc["kernels"] = {"kind": be.kind, "folder": be.folder, **entry}
        config["quantization_config"] = qc
        with open(cpath, "w") as fh:
            fh.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        fsync_tree(tmp)
        swap_into_place(tmp, path, _OLD_PREFIX)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
