"""A Hugging Face-native surface for sqc models: ``save_pretrained`` / ``from_pretrained``.

:func:`save_pretrained` writes a compiled Hugging Face causal LM as an
ordinary Hugging Face folder::

    config.json              the model's config plus a ``quantization_config``
                             with ``quant_method: "sqc"``: the sqc settings
                             (``QuantConfig.to_dict()``) and, per quantized layer,
                             bits, in/out features, sparse count, bias and dtypes;
                             ``fused``: the groups of sibling layers that run as one
                             (:mod:`sqc.runtime.fused`); ``heads``: the output
                             projections stored int8 per row (:mod:`sqc.runtime.int8`)
    model.safetensors        the model's state dict: for each quantized layer its
                             ``codes``, ``lut``, ``crow``, ``col``, ``val`` (and
                             ``bias``) in the canonical layout of
                             :mod:`sqc.runtime.layout` (per layer, fused or not);
                             for each int8 head its ``qweight``, ``scale`` (and
                             ``bias``); float tensors as usual
    generation_config.json   the model's generation config
    tokenizer files          when a tokenizer is passed

After :func:`register_with_transformers` (``import sqc`` calls it),
``transformers.AutoModelForCausalLM.from_pretrained(folder)`` rebuilds the
model: the quantizer puts empty :class:`~sqc.runtime.qlinear.SqcLinear`
layers (sized from ``quantization_config``) in place of the ``nn.Linear``
modules and empty :class:`~sqc.runtime.int8.Int8Linear` heads in place of the
output projections before the weights load (a head tied to the input
embedding is untied: the embedding loads its own float weight), keeps the
tables' stored dtype, fuses the recorded sibling groups again and attaches
the generated CPU kernels afterwards, so the loaded ``PreTrainedModel``
computes what the compiled model does.

>>> import sqc, sqc.hf                                        # doctest: +SKIP
>>> compiled = sqc.compile(model, (ids,), config="w3-s0.45", calibration=[(ids,)])
>>> sqc.hf.save_pretrained(compiled, "out/smol-hf", tokenizer=tok)
>>> from transformers import AutoModelForCausalLM, pipeline
>>> m = AutoModelForCausalLM.from_pretrained("out/smol-hf")   # SqcLinear layers, CPU kernels
>>> pipeline("text-generation", model=m, tokenizer=tok)("def main():", max_new_tokens=20)

The transformers classes (:class:`SqcQuantizationConfig`,
:class:`SqcHfQuantizer`) are built on first use, so importing this module
imports neither transformers nor TVM.
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

import torch
from torch import nn

from .folders import clean_leftovers, swap_into_place, umask

__all__ = [
    "register_with_transformers",
    "save_pretrained",
    "SqcCheckpointError",
    "SqcQuantizationConfig",
    "SqcHfQuantizer",
    "QUANT_METHOD",
    "FORMAT_VERSION",
]

QUANT_METHOD = "sqc"
#: version of the ``quantization_config`` schema below; a reader refuses newer versions and ones older than
#: :data:`MIN_FORMAT_VERSION`. 2: ``fused`` (sibling groups) and ``heads`` (int8 output projections)
FORMAT_VERSION = 2
#: the oldest schema this sqc reads (1: no ``fused`` / ``heads``, every output projection left float)
MIN_FORMAT_VERSION = 1
CONFIG = "config.json"
_AUTO = "transformers.quantizers.auto"
_TMP_PREFIX = ".sqc-hf-tmp-"
_OLD_PREFIX = ".sqc-hf-old-"
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_COL_DTYPES = ("uint8", "int16", "int32")
_LAYER_INT_KEYS = ("bits", "in_features", "out_features", "nnz")
_HEAD_INT_KEYS = ("in_features", "out_features")
# safetensors header dtype codes of the dtypes an sqc layer stores
_ST_DTYPE = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64",
             "int32": "I32", "int16": "I16", "uint8": "U8", "int8": "I8"}
_REMAKE = ("re-create the folder from the compiled model with sqc.hf.save_pretrained(compiled, path) "
           "(or compiled.save_pretrained(path))")


class SqcCheckpointError(ValueError):
    """An sqc Hugging Face folder cannot be loaded; the message names the problem and the fix."""


# -- quantization_config: the per-layer description ------------------------------------------------------------


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _layer_entry(m) -> dict[str, Any]:
    entry = {
        "bits": m.bits,
        "in_features": m.in_features,
        "out_features": m.out_features,
        "nnz": int(m.col.numel()),
        "bias": m.bias is not None,
        "lut_dtype": _dtype_name(m.lut),
        "val_dtype": _dtype_name(m.val),
        "col_dtype": _dtype_name(m.col),
    }
    if m.bias is not None:
        entry["bias_dtype"] = _dtype_name(m.bias)
    return entry


def _head_entry(m) -> dict[str, Any]:
    """How an :class:`~sqc.runtime.int8.Int8Linear` head is described in ``quantization_config["heads"]``."""
    entry = {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
    if m.bias is not None:
        entry["bias_dtype"] = _dtype_name(m.bias)
    return entry


def _validate_fields(d: dict[str, Any]) -> None:
    """Check a ``quantization_config`` dict (as read from config.json); raise :class:`SqcCheckpointError`."""
    from .config import QuantConfig

    where = f"config.json's quantization_config (quant_method {QUANT_METHOD!r})"
    version = d.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SqcCheckpointError(f"{where} has no integer format_version (got {version!r}); {_REMAKE}")
    if version > FORMAT_VERSION:
        raise SqcCheckpointError(f"{where} has format_version {version}, newer than this sqc reads "
                                 f"({FORMAT_VERSION}): upgrade sqc")
    if version < MIN_FORMAT_VERSION:
        raise SqcCheckpointError(f"{where} has format_version {version}, older than this sqc reads "
                                 f"({MIN_FORMAT_VERSION} to {FORMAT_VERSION}); {_REMAKE}")
    if not isinstance(d.get("sqc_config"), dict):
        raise SqcCheckpointError(f"{where} has no sqc_config object (the sqc settings); {_REMAKE}")
    try:
        QuantConfig.from_dict(d["sqc_config"])
    except (ValueError, TypeError, KeyError) as e:
        raise SqcCheckpointError(f"{where}: sqc_config is not a valid sqc QuantConfig ({e}); {_REMAKE}") from e
    layers = d.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise SqcCheckpointError(
            f"{where} lists no quantized layers (\"layers\" is {type(layers).__name__}); sqc models are made by "
            f"sqc.compile, not by from_pretrained(quantization_config=...): {_REMAKE}")
    for name, info in layers.items():
        if not isinstance(info, dict):
            raise SqcCheckpointError(f"{where}: layers[{name!r}] is not an object; {_REMAKE}")
        for key in _LAYER_INT_KEYS:
            v = info.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key == "nnz" else 1):
                raise SqcCheckpointError(f"{where}: layers[{name!r}][{key!r}] must be a "
                                         f"{'non-negative' if key == 'nnz' else 'positive'} integer, got {v!r}; {_REMAKE}")
        if not 2 <= info["bits"] <= 8:
            raise SqcCheckpointError(f"{where}: layers[{name!r}]['bits'] = {info['bits']} is outside 2..8; {_REMAKE}")
        if info["nnz"] > info["in_features"] * info["out_features"]:
            raise SqcCheckpointError(f"{where}: layers[{name!r}] has nnz {info['nnz']} > in_features * "
                                     f"out_features; {_REMAKE}")
        if not isinstance(info.get("bias"), bool):
            raise SqcCheckpointError(f"{where}: layers[{name!r}]['bias'] must be true or false, got "
                                     f"{info.get('bias')!r}; {_REMAKE}")
        dtype_keys = [("lut_dtype", _FLOAT_DTYPES), ("val_dtype", _FLOAT_DTYPES), ("col_dtype", _COL_DTYPES)]
        if info["bias"]:
            dtype_keys.append(("bias_dtype", _FLOAT_DTYPES))
        for key, allowed in dtype_keys:
            if info.get(key) not in allowed:
                raise SqcCheckpointError(f"{where}: layers[{name!r}][{key!r}] must be one of {list(allowed)}, "
                                         f"got {info.get(key)!r}; {_REMAKE}")
    _validate_fused(d.get("fused"), layers, where)
    _validate_heads(d.get("heads"), layers, where)


def _validate_fused(fused: Any, layers: dict[str, Any], where: str) -> None:
    """``fused``: absent / null (format 1: nothing fused) or a list of groups, each a list of two or more
    quantized layers (names in ``layers``) with equal inputs, bits and table dtypes, no layer in two groups."""
    if fused is None:
        return
    if not isinstance(fused, list):
        raise SqcCheckpointError(f"{where}: \"fused\" must be a list of layer-name lists, got "
                                 f"{type(fused).__name__}; {_REMAKE}")
    seen: dict[str, int] = {}
    for i, group in enumerate(fused):
        if (not isinstance(group, list) or len(group) < 2 or not all(isinstance(n, str) for n in group)):
            raise SqcCheckpointError(f"{where}: fused[{i}] must be a list of two or more layer names, got "
                                     f"{group!r}; {_REMAKE}")
        for n in group:
            if n not in layers:
                raise SqcCheckpointError(f"{where}: fused[{i}] names {n!r}, which is not one of the quantized "
                                         f"\"layers\"; {_REMAKE}")
            if n in seen:
                raise SqcCheckpointError(f"{where}: layer {n!r} is in fused[{seen[n]}] and fused[{i}]; a layer "
                                         f"belongs to one fused group at most; {_REMAKE}")
            seen[n] = i
        first = layers[group[0]]
        for n in group[1:]:
            for key in ("in_features", "bits", "lut_dtype", "val_dtype"):
                if layers[n][key] != first[key]:
                    raise SqcCheckpointError(
                        f"{where}: fused[{i}] joins {group[0]!r} ({key} {first[key]!r}) and {n!r} ({key} "
                        f"{layers[n][key]!r}); fused layers share inputs, bits and table dtypes; {_REMAKE}")


def _validate_heads(heads: Any, layers: dict[str, Any], where: str) -> None:
    """``heads``: absent / null (format 1: none) or ``{module path: {in_features, out_features, bias[,
    bias_dtype]}}`` of the int8 output projections."""
    if heads is None:
        return
    if not isinstance(heads, dict):
        raise SqcCheckpointError(f"{where}: \"heads\" must be an object (module path -> sizes), got "
                                 f"{type(heads).__name__}; {_REMAKE}")
    for name, info in heads.items():
        if name in layers:
            raise SqcCheckpointError(f"{where}: {name!r} is both a quantized layer and an int8 head; {_REMAKE}")
        if not isinstance(info, dict):
            raise SqcCheckpointError(f"{where}: heads[{name!r}] is not an object; {_REMAKE}")
        for key in _HEAD_INT_KEYS:
            v = info.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SqcCheckpointError(f"{where}: heads[{name!r}][{key!r}] must be a positive integer, got "
                                         f"{v!r}; {_REMAKE}")
        if not isinstance(info.get("bias"), bool):
            raise SqcCheckpointError(f"{where}: heads[{name!r}]['bias'] must be true or false, got "
                                     f"{info.get('bias')!r}; {_REMAKE}")
        if info["bias"] and info.get("bias_dtype") not in _FLOAT_DTYPES:
            raise SqcCheckpointError(f"{where}: heads[{name!r}]['bias_dtype'] must be one of {list(_FLOAT_DTYPES)}, "
                                     f"got {info.get('bias_dtype')!r}; {_REMAKE}")


def _expected_tensors(name: str, info: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor key: (dtype name, shape)}`` that layer ``name`` stores."""
    from .runtime.layout import words_per_row

    R, K, b = info["out_features"], info["in_features"], info["bits"]
    out = {
        f"{name}.codes": ("int32", (R, words_per_row(K, b))),
        f"{name}.lut": (info["lut_dtype"], (R, 1 << b)),
        f"{name}.crow": ("int32", (R + 1,)),
        f"{name}.col": (info["col_dtype"], (info["nnz"],)),
        f"{name}.val": (info["val_dtype"], (info["nnz"],)),
    }
    if info["bias"]:
        out[f"{name}.bias"] = (info["bias_dtype"], (R,))
    return out


def _expected_head_tensors(name: str, info: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor key: (dtype name, shape)}`` that int8 head ``name`` stores."""
    R, K = info["out_features"], info["in_features"]
    out = {f"{name}.qweight": ("int8", (R, K)), f"{name}.scale": ("float32", (R,))}
    if info["bias"]:
        out[f"{name}.bias"] = (info["bias_dtype"], (R,))
    return out


def _empty_head(info: dict[str, Any]):
    """An :class:`Int8Linear` of the described sizes whose tensors are on the meta device."""
    from .runtime.int8 import Int8Linear

    meta = {k.lstrip("."): torch.empty(shape, dtype=getattr(torch, dt), device="meta")
            for k, (dt, shape) in _expected_head_tensors("", info).items()}
    return Int8Linear(meta["qweight"], meta["scale"], meta.get("bias"), kernel="reference (no kernels attached)")


def _untie(model: nn.Module, local: str) -> None:
    """Drop the tie declarations that name module ``local`` (an int8 head), so transformers' ``tie_weights``
    (at load, or later with the mapping recomputed) neither puts the embedding's float weight on the head nor
    the head's into the embedding: the embedding loads its own weight, the head its int8 buffers."""
    import re

    for prefix, sub in model.named_modules():
        base = f"{prefix}." if prefix else ""
        if not local.startswith(base):
            continue
        rel = local[len(base):]
        params = (rel, f"{rel}.weight", f"{rel}.bias")

        def names_head(key: Any, params=params, rel=rel) -> bool:
            if not isinstance(key, str):
                return False
            if key == rel or key.startswith(f"{rel}."):
                return True
            try:  # _tied_weights_keys may hold patterns (transformers matches them with re.search("^" + key))
                return any(re.search(f"^{key}", p) for p in params)
            except re.error:
                return False

        for attr in ("all_tied_weights_keys", "_tied_weights_keys"):
            tied = sub.__dict__.get(attr) if attr == "all_tied_weights_keys" else getattr(sub, attr, None)
            if not isinstance(tied, dict) or not tied:
                continue
            keep = {k: v for k, v in tied.items() if not (names_head(k) or names_head(v))}
            if len(keep) != len(tied):
                if attr == "all_tied_weights_keys":
                    tied.clear()
                    tied.update(keep)
                else:  # a class attribute: shadow it on this instance
                    setattr(sub, attr, keep)


def _empty_layer(info: dict[str, Any]):
    """An :class:`SqcLinear` of the described sizes and dtypes whose tensors are on the meta device."""
    from .runtime.layout import PackedLinear
    from .runtime.qlinear import SqcLinear

    shapes = _expected_tensors("", info)
    meta = {k.lstrip("."): torch.empty(shape, dtype=getattr(torch, dt), device="meta") for k, (dt, shape) in shapes.items()}
    # PackedLinear checks crow[-1] == nnz, which a meta tensor cannot answer: the row pointers (R + 1 ints) are
    # a real placeholder; the loader replaces every tensor of the layer
    crow = torch.zeros(info["out_features"] + 1, dtype=torch.int32, device="cpu")
    crow[-1] = info["nnz"]
    packed = PackedLinear(info["bits"], info["in_features"], info["out_features"],
                          meta["codes"], meta["lut"], crow, meta["col"], meta["val"])
    return SqcLinear(packed, meta.get("bias"), kernel="reference (no kernels attached)")


def _resolve(model: nn.Module, name: str) -> str:
    """``name`` as a module path of ``model``: the saved names are the causal LM's; a base model (AutoModel)
    lacks the ``base_model_prefix`` in front."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    for candidate in (name, name[len(prefix):] if name.startswith(prefix) else None):
        if candidate is None:
            continue
        try:
            model.get_submodule(candidate)
            return candidate
        except AttributeError:
            pass
    raise SqcCheckpointError(
        f"config.json's quantization_config names layer {name!r}, which {type(model).__name__} does not have: "
        f"load the folder with the class it was saved from (config.json's \"architectures\"), or {_REMAKE}")


def _check_checkpoint(files, layers: dict[str, dict[str, Any]], heads: dict[str, dict[str, Any]] | None = None) -> None:
    """Every tensor the quantized layers and int8 heads need is in the safetensors files, with the shape and
    dtype config.json promises (read from the headers only)."""
    from safetensors import safe_open

    found: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for f in files:
        f = os.fspath(f)
        if not f.endswith(".safetensors"):
            raise SqcCheckpointError(f"{f}: sqc checkpoints are safetensors files, not {os.path.basename(f)}; {_REMAKE}")
        with safe_open(f, framework="pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                found[k] = (sl.get_dtype(), tuple(sl.get_shape()), f)
    wanted = [("quantized layer", name, _expected_tensors(name, info)) for name, info in layers.items()]
    wanted += [("int8 head", name, _expected_head_tensors(name, info)) for name, info in (heads or {}).items()]
    for what, name, expected in wanted:
        for key, (dt, shape) in expected.items():
            if key not in found:
                raise SqcCheckpointError(f"the checkpoint has no tensor {key}, which {what} {name} needs "
                                         f"(config.json and the weights come from different saves); {_REMAKE}")
            got_dt, got_shape, f = found[key]
            if (got_dt, got_shape) != (_ST_DTYPE[dt], shape):
                raise SqcCheckpointError(
                    f"{f}: tensor {key} is {got_dt} {list(got_shape)}, config.json's quantization_config says "
                    f"{_ST_DTYPE[dt]} {list(shape)} (config.json and the weights come from different saves); {_REMAKE}")


# -- the transformers classes, built on first use ----------------------------------------------------------------

_CLASSES: dict[str, type] = {}


def _classes() -> dict[str, type]:
    if _CLASSES:
        return _CLASSES
    try:
        from transformers.quantizers.base import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError as e:
        raise ImportError(f"sqc's Hugging Face integration needs transformers ({e}): pip install transformers") from e

    class SqcQuantizationConfig(QuantizationConfigMixin):
        """``quantization_config`` of an sqc checkpoint: ``quant_method: "sqc"``.

        Parameters
        ----------
        sqc_config : the sqc settings, ``QuantConfig.to_dict()`` (see :attr:`quant_config`).
        layers : per quantized layer (module path): ``bits``, ``in_features``, ``out_features``,
            ``nnz`` (sparse entries), ``bias``, and the dtypes ``lut_dtype``, ``val_dtype``,
            ``col_dtype`` (and ``bias_dtype``), which the loader keeps as stored.
        fused : the groups of sibling quantized layers (lists of their module paths) that run as one
            fused layer (:func:`sqc.runtime.fused.refuse`); the state dict keeps every member's tensors.
        heads : per int8 output projection (module path): ``in_features``, ``out_features``, ``bias``
            (and ``bias_dtype``); its tensors are ``qweight`` (int8) and ``scale`` (float32).
        format_version : the schema version (:data:`sqc.hf.FORMAT_VERSION`).
        target : the target the model was compiled for (informational: loading attaches
            kernels for this machine's CPU).

        Written by :func:`sqc.hf.save_pretrained`; quantizing a float model through
        ``from_pretrained(quantization_config=...)`` is not supported (use ``sqc.compile``).
        """

        def __init__(self, sqc_config: dict | None = None, layers: dict | None = None,
                     format_version: int = FORMAT_VERSION, target: str = "llvm", fused: list | None = None,
                     heads: dict | None = None, **kwargs: Any) -> None:
            kwargs.pop("quant_method", None)
            self.quant_method = QUANT_METHOD
            self.format_version = format_version
            self.sqc_config = sqc_config
            self.target = target
            self.layers = layers
            self.fused = fused if fused is not None else []  # format 1 wrote neither: nothing fused, no int8 head
            self.heads = heads if heads is not None else {}
            for k, v in kwargs.items():  # fields of a later minor writer are kept, so a re-save preserves them
                setattr(self, k, v)
            _validate_fields(self.__dict__)

        @property
        def quant_config(self):
            """The sqc settings as a :class:`sqc.QuantConfig`."""
            from .config import QuantConfig

            return QuantConfig.from_dict(self.sqc_config)

    class SqcHfQuantizer(HfQuantizer):
        """Loads sqc checkpoints: empty ``SqcLinear`` layers and ``Int8Linear`` heads before the weights load;
        after, the fused groups again and CPU kernels.

        ``kernel_records`` holds what :func:`sqc.codegen.tune.attach_cpu_kernels` reported
        (one record per kernel) once the model has loaded.
        """

        requires_calibration = True  # only pre-quantized (sqc.compile'd) checkpoints

        def __init__(self, quantization_config, **kwargs: Any) -> None:
            super().__init__(quantization_config, **kwargs)
            self.kernel_records: list[dict[str, Any]] = []
            self._names: dict[str, str] = {}
            self._heads: dict[str, str] = {}

        def validate_environment(self, device_map=None, **kwargs: Any) -> None:
            if device_map is None:
                return
            values = list(device_map.values()) if isinstance(device_map, dict) else [device_map]
            cpu_only = all(str(v) == "cpu" or (str(v) == "auto" and not torch.cuda.is_available()) for v in values)
            if not cpu_only:
                raise ValueError(
                    f"sqc checkpoints load through transformers with CPU kernels, but device_map={device_map!r} "
                    "places modules elsewhere: drop device_map (or pass device_map='cpu'); for CUDA, compile with "
                    "target='cuda ...' and use sqc.save / sqc.load")

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs: Any):
            from .passes.lower import replace_module

            layers = self.quantization_config.layers
            heads = self.quantization_config.heads or {}
            self._names = {name: _resolve(model, name) for name in layers}
            self._heads = {name: _resolve(model, name) for name in heads}
            tied = set(getattr(model, "all_tied_weights_keys", None) or {})
            for name, local in self._names.items():
                old = model.get_submodule(local)
                shape = (getattr(old, "out_features", None), getattr(old, "in_features", None))
                info = layers[name]
                if not isinstance(old, nn.Linear) or shape != (info["out_features"], info["in_features"]):
                    raise SqcCheckpointError(
                        f"quantized layer {name} is {info['out_features']}x{info['in_features']} in config.json's "
                        f"quantization_config, but the model's module is {type(old).__name__} {shape[0]}x{shape[1]}: "
                        f"the model config and quantization_config disagree; {_REMAKE}")
                if f"{local}.weight" in tied:
                    raise SqcCheckpointError(
                        f"quantized layer {name} has its weight tied to another tensor in this model's config "
                        "(tie_word_embeddings?); sqc leaves tied weights unquantized: set the config's tie flag to "
                        f"what the compiled model had, or {_REMAKE}")
            for name, local in self._heads.items():
                old = model.get_submodule(local)
                shape = (getattr(old, "out_features", None), getattr(old, "in_features", None))
                info = heads[name]
                if not isinstance(old, nn.Linear) or shape != (info["out_features"], info["in_features"]):
                    raise SqcCheckpointError(
                        f"int8 head {name} is {info['out_features']}x{info['in_features']} in config.json's "
                        f"quantization_config, but the model's module is {type(old).__name__} {shape[0]}x{shape[1]}: "
                        f"the model config and quantization_config disagree; {_REMAKE}")
            if checkpoint_files:
                _check_checkpoint(checkpoint_files, layers, heads)
            for name, local in self._names.items():
                replace_module(model, local, _empty_layer(layers[name]))
            for name, local in self._heads.items():
                # the head has its own int8 copy (a tied embedding keeps the float table): no tying at load
                _untie(model, local)
                replace_module(model, local, _empty_head(heads[name]))
            return model

        def _process_model_after_weight_loading(self, model, **kwargs: Any):
            from .codegen.target import parse_target
            from .codegen.tune import attach_cpu_kernels
            from .runtime.fused import fused_groups, refuse
            from .runtime.int8 import Int8Linear
            from .runtime.qlinear import SqcLinear

            layers = self.quantization_config.layers
            for name, local in self._names.items():
                m = model.get_submodule(local)
                if not isinstance(m, SqcLinear):
                    raise SqcCheckpointError(f"layer {name} is a {type(m).__name__} after loading, not an SqcLinear")
                for key, (dt, shape) in _expected_tensors("", layers[name]).items():
                    t = m._buffers.get(key.lstrip("."))
                    if t is None or t.device.type == "meta":
                        raise SqcCheckpointError(f"layer {name}: no data for {key.lstrip('.')} after loading; {_REMAKE}")
                    if _dtype_name(t) != dt:
                        # the loader cast a stored table: the kernels and the exact sparse values need it as stored
                        raise SqcCheckpointError(
                            f"layer {name}: {key.lstrip('.')} loaded as {_dtype_name(t)}, stored as {dt} (this "
                            "transformers version casts buffers of quantized models); load with dtype='auto' or "
                            "use sqc.load on an sqc.save artifact")
                try:
                    m.packed  # noqa: B018 - validates the loaded layer (row pointers against the sparse count)
                except ValueError as e:
                    raise SqcCheckpointError(f"layer {name}: {e}; {_REMAKE}") from e
            heads = self.quantization_config.heads or {}
            for name, local in self._heads.items():
                m = model.get_submodule(local)
                if not isinstance(m, Int8Linear):
                    raise SqcCheckpointError(f"int8 head {name} is a {type(m).__name__} after loading, not an "
                                             f"Int8Linear; {_REMAKE}")
                if "weight" in m._parameters or isinstance(m.__dict__.get("weight"), torch.Tensor):
                    # something tied a float weight onto the head: it would sit unused next to the int8 one
                    raise SqcCheckpointError(f"int8 head {name} was given a float weight while loading (weight "
                                             "tying?); it computes from its int8 qweight and scale only; " + _REMAKE)
                for key, (dt, shape) in _expected_head_tensors("", heads[name]).items():
                    key = key.lstrip(".")
                    t = m._buffers.get(key)
                    if t is None or t.device.type == "meta":
                        raise SqcCheckpointError(f"int8 head {name}: no data for {key} after loading; {_REMAKE}")
                    if _dtype_name(t) != dt or tuple(t.shape) != shape:
                        raise SqcCheckpointError(
                            f"int8 head {name}: {key} loaded as {_dtype_name(t)} {list(t.shape)}, stored as {dt} "
                            f"{list(shape)} (this transformers version casts buffers of quantized models); load "
                            "with dtype='auto' or use sqc.load on an sqc.save artifact")
            groups = [[self._names.get(n, n) for n in g] for g in (self.quantization_config.fused or [])]
            try:
                refuse(model, groups)  # before the kernels: they attach to the fused layers, not the members
            except ValueError as e:
                raise SqcCheckpointError(f"{e}; {_REMAKE}") from e
            self.kernel_records = attach_cpu_kernels(model, parse_target("llvm"), tune=False)
            for g in fused_groups(model):  # a member runs its group's kernel (as sqc.load names it)
                leaves = "+".join(n.rpartition(".")[2] for n in g.names)
                for n in g.names:
                    model.get_submodule(n).kernel = f"{g.layer.kernel} (fused {leaves})"
            return model

        def _dequantize(self, model, dtype=None):
            """Replace every SqcLinear with an ``nn.Linear`` holding ``W_hat`` and every int8 head with one
            holding ``qweight * scale[:, None]`` (``model.dequantize()``)."""
            from .passes.lower import replace_module
            from .runtime.int8 import Int8Linear
            from .runtime.qlinear import SqcLinear

            for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, SqcLinear)]:
                w = m.packed.dequantize(dtype=dtype or m.val.dtype)
                lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
                lin.weight = nn.Parameter(w)
                if m.bias is not None:
                    lin.bias = nn.Parameter(m.bias.to(w.dtype))
                replace_module(model, name, lin)
            for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, Int8Linear)]:
                w = m.dequantize(dtype=dtype or m.scale.dtype)
                lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
                lin.weight = nn.Parameter(w)
                if m.bias is not None:
                    lin.bias = nn.Parameter(m.bias.to(w.dtype))
                replace_module(model, name, lin)
            return model

        def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
            return True  # the state dict holds the canonical codes: a loaded model re-saves as it was loaded

        @property
        def is_trainable(self) -> bool:
            return False

    SqcQuantizationConfig.__module__ = SqcHfQuantizer.__module__ = __name__
    _CLASSES.update(SqcQuantizationConfig=SqcQuantizationConfig, SqcHfQuantizer=SqcHfQuantizer)
    return _CLASSES


def __getattr__(name: str):
    if name in ("SqcQuantizationConfig", "SqcHfQuantizer"):
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- registration ------------------------------------------------------------------------------------------------


def _register_now() -> None:
    auto = importlib.import_module(_AUTO)
    classes = _classes()
    for mapping, cls, register in (
        (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, classes["SqcQuantizationConfig"], auto.register_quantization_config),
        (auto.AUTO_QUANTIZER_MAPPING, classes["SqcHfQuantizer"], auto.register_quantizer),
    ):
        existing = mapping.get(QUANT_METHOD)
        if existing is cls:
            continue
        if existing is None:
            register(QUANT_METHOD)(cls)
        elif getattr(existing, "__module__", None) == __name__:
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


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


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

    # an sqc CompiledModel (by its fields: importing sqc.compiler here would make the two modules import each other)
    is_compiled = isinstance(compiled, nn.Module) and hasattr(compiled, "quant_config")
    model = compiled._modules.get("model") if is_compiled else None
    if model is None or not is_hf_model(model):
        raise TypeError(
            f"sqc.hf.save_pretrained takes an sqc CompiledModel wrapping a transformers PreTrainedModel, got "
            f"{type(compiled).__name__}" + (f" wrapping {type(model).__name__}" if model is not None else "")
            + "; save other models with sqc.save(compiled, path)")
    layers = {n: _layer_entry(m) for n, m in model.named_modules() if isinstance(m, SqcLinear)}
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
        "heads": {n: _head_entry(m) for n, m in model.named_modules() if isinstance(m, Int8Linear)},
    }
    _validate_fields(qc)  # what is written must read back

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
        config["quantization_config"] = qc
        with open(cpath, "w") as fh:
            fh.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _fsync_tree(tmp)
        swap_into_place(tmp, path, _OLD_PREFIX)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
