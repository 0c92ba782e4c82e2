"""The ``quantization_config`` of an sqc Hugging Face folder: its schema, checks and the empty layers the
quantizer puts in place before transformers loads the weights (:mod:`sqc.hf` writes folders,
:mod:`sqc.hf_quantizer` reads them)."""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .runtime.int8 import Int8Linear
from .runtime.layout import PackedLinear, dtype_name, words_per_row
from .runtime.qlinear import SqcLinear
from .runtime.files import SAFETENSORS_DTYPE
from .restore import NOT_ATTACHED

QUANT_METHOD = "sqc"
#: version of the ``quantization_config`` schema below; a reader refuses newer versions and ones older than
#: :data:`MIN_FORMAT_VERSION`. 2: ``fused`` (sibling groups) and ``heads`` (int8 output projections)
FORMAT_VERSION = 2
#: the oldest schema this sqc reads (1: no ``fused`` / ``heads``, every output projection left float)
MIN_FORMAT_VERSION = 1
CONFIG = "config.json"
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_COL_DTYPES = ("uint8", "int16", "int32")
_LAYER_INT_KEYS = ("bits", "in_features", "out_features", "nnz")
_HEAD_INT_KEYS = ("in_features", "out_features")
#: the fix every error about an inconsistent folder names
REMAKE = ("re-create the folder from the compiled model with sqc.hf.save_pretrained(compiled, path) "
           "(or compiled.save_pretrained(path))")


class SqcCheckpointError(ValueError):
    """An sqc Hugging Face folder cannot be loaded; the message names the problem and the fix."""


def layer_entry(m) -> dict[str, Any]:
    entry = {
        "bits": m.bits,
        "in_features": m.in_features,
        "out_features": m.out_features,
        "nnz": int(m.col.numel()),
        "bias": m.bias is not None,
        "lut_dtype": dtype_name(m.lut),
        "val_dtype": dtype_name(m.val),
        "col_dtype": dtype_name(m.col),
    }
    if m.bias is not None:
        entry["bias_dtype"] = dtype_name(m.bias)
    return entry


def head_entry(m) -> dict[str, Any]:
    """How an :class:`~sqc.runtime.int8.Int8Linear` head is described in ``quantization_config["heads"]``."""
    entry = {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
    if m.bias is not None:
        entry["bias_dtype"] = dtype_name(m.bias)
    return entry


def validate_fields(d: dict[str, Any]) -> None:
    """Check a ``quantization_config`` dict (as read from config.json); raise :class:`SqcCheckpointError`."""
    from .config import QuantConfig

    where = f"config.json's quantization_config (quant_method {QUANT_METHOD!r})"
    version = d.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SqcCheckpointError(f"{where} has no integer format_version (got {version!r}); {REMAKE}")
    if version > FORMAT_VERSION:
        raise SqcCheckpointError(f"{where} has format_version {version}, newer than this sqc reads "
                                 f"({FORMAT_VERSION}): upgrade sqc")
    if version < MIN_FORMAT_VERSION:
        raise SqcCheckpointError(f"{where} has format_version {version}, older than this sqc reads "
                                 f"({MIN_FORMAT_VERSION} to {FORMAT_VERSION}); {REMAKE}")
    if not isinstance(d.get("sqc_config"), dict):
        raise SqcCheckpointError(f"{where} has no sqc_config object (the sqc settings); {REMAKE}")
    try:
        QuantConfig.from_dict(d["sqc_config"])
    except (ValueError, TypeError, KeyError) as e:
        raise SqcCheckpointError(f"{where}: sqc_config is not a valid sqc QuantConfig ({e}); {REMAKE}") from e
    layers = d.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise SqcCheckpointError(
            f"{where} lists no quantized layers (\"layers\" is {type(layers).__name__}); sqc models are made by "
            f"sqc.compile, not by from_pretrained(quantization_config=...): {REMAKE}")
    for name, info in layers.items():
        if not isinstance(info, dict):
            raise SqcCheckpointError(f"{where}: layers[{name!r}] is not an object; {REMAKE}")
        for key in _LAYER_INT_KEYS:
            v = info.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key == "nnz" else 1):
                raise SqcCheckpointError(f"{where}: layers[{name!r}][{key!r}] must be a "
                                         f"{'non-negative' if key == 'nnz' else 'positive'} integer, got {v!r}; {REMAKE}")
        if not 2 <= info["bits"] <= 8:
            raise SqcCheckpointError(f"{where}: layers[{name!r}]['bits'] = {info['bits']} is outside 2..8; {REMAKE}")
        if info["nnz"] > info["in_features"] * info["out_features"]:
            raise SqcCheckpointError(f"{where}: layers[{name!r}] has nnz {info['nnz']} > in_features * "
                                     f"out_features; {REMAKE}")
        if not isinstance(info.get("bias"), bool):
            raise SqcCheckpointError(f"{where}: layers[{name!r}]['bias'] must be true or false, got "
                                     f"{info.get('bias')!r}; {REMAKE}")
        dtype_keys = [("lut_dtype", _FLOAT_DTYPES), ("val_dtype", _FLOAT_DTYPES), ("col_dtype", _COL_DTYPES)]
        if info["bias"]:
            dtype_keys.append(("bias_dtype", _FLOAT_DTYPES))
        for key, allowed in dtype_keys:
            if info.get(key) not in allowed:
                raise SqcCheckpointError(f"{where}: layers[{name!r}][{key!r}] must be one of {list(allowed)}, "
                                         f"got {info.get(key)!r}; {REMAKE}")
    validate_fused(d.get("fused"), layers, where)
    validate_heads(d.get("heads"), layers, where)
    kernels = d.get("kernels")
    if kernels is not None and not (isinstance(kernels, dict) and isinstance(kernels.get("kind"), str)
                                    and isinstance(kernels.get("folder"), str)):
        raise SqcCheckpointError(f"{where}: \"kernels\" must be null or an object with the kernels' kind and "
                                 f"folder, got {kernels!r}; {REMAKE}")


def validate_fused(fused: Any, layers: dict[str, Any], where: str) -> None:
    """``fused``: absent / null (format 1: nothing fused) or a list of groups, each a list of two or more
    quantized layers (names in ``layers``) with equal inputs, bits and table dtypes, no layer in two groups."""
    if fused is None:
        return
    if not isinstance(fused, list):
        raise SqcCheckpointError(f"{where}: \"fused\" must be a list of layer-name lists, got "
                                 f"{type(fused).__name__}; {REMAKE}")
    seen: dict[str, int] = {}
    for i, group in enumerate(fused):
        if (not isinstance(group, list) or len(group) < 2 or not all(isinstance(n, str) for n in group)):
            raise SqcCheckpointError(f"{where}: fused[{i}] must be a list of two or more layer names, got "
                                     f"{group!r}; {REMAKE}")
        for n in group:
            if n not in layers:
                raise SqcCheckpointError(f"{where}: fused[{i}] names {n!r}, which is not one of the quantized "
                                         f"\"layers\"; {REMAKE}")
            if n in seen:
                raise SqcCheckpointError(f"{where}: layer {n!r} is in fused[{seen[n]}] and fused[{i}]; a layer "
                                         f"belongs to one fused group at most; {REMAKE}")
            seen[n] = i
        first = layers[group[0]]
        for n in group[1:]:
            for key in ("in_features", "bits", "lut_dtype", "val_dtype"):
                if layers[n][key] != first[key]:
                    raise SqcCheckpointError(
                        f"{where}: fused[{i}] joins {group[0]!r} ({key} {first[key]!r}) and {n!r} ({key} "
                        f"{layers[n][key]!r}); fused layers share inputs, bits and table dtypes; {REMAKE}")


def validate_heads(heads: Any, layers: dict[str, Any], where: str) -> None:
    """``heads``: absent / null (format 1: none) or ``{module path: {in_features, out_features, bias[,
    bias_dtype]}}`` of the int8 output projections."""
    if heads is None:
        return
    if not isinstance(heads, dict):
        raise SqcCheckpointError(f"{where}: \"heads\" must be an object (module path -> sizes), got "
                                 f"{type(heads).__name__}; {REMAKE}")
    for name, info in heads.items():
        if name in layers:
            raise SqcCheckpointError(f"{where}: {name!r} is both a quantized layer and an int8 head; {REMAKE}")
        if not isinstance(info, dict):
            raise SqcCheckpointError(f"{where}: heads[{name!r}] is not an object; {REMAKE}")
        for key in _HEAD_INT_KEYS:
            v = info.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SqcCheckpointError(f"{where}: heads[{name!r}][{key!r}] must be a positive integer, got "
                                         f"{v!r}; {REMAKE}")
        if not isinstance(info.get("bias"), bool):
            raise SqcCheckpointError(f"{where}: heads[{name!r}]['bias'] must be true or false, got "
                                     f"{info.get('bias')!r}; {REMAKE}")
        if info["bias"] and info.get("bias_dtype") not in _FLOAT_DTYPES:
            raise SqcCheckpointError(f"{where}: heads[{name!r}]['bias_dtype'] must be one of {list(_FLOAT_DTYPES)}, "
                                     f"got {info.get('bias_dtype')!r}; {REMAKE}")


def expected_tensors(name: str, info: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor key: (dtype name, shape)}`` that layer ``name`` stores."""
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


def expected_head_tensors(name: str, info: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor key: (dtype name, shape)}`` that int8 head ``name`` stores."""
    R, K = info["out_features"], info["in_features"]
    out = {f"{name}.qweight": ("int8", (R, K)), f"{name}.scale": ("float32", (R,))}
    if info["bias"]:
        out[f"{name}.bias"] = (info["bias_dtype"], (R,))
    return out


def empty_head(info: dict[str, Any]):
    """An :class:`Int8Linear` of the described sizes whose tensors are on the meta device."""
    meta = {k.lstrip("."): torch.empty(shape, dtype=getattr(torch, dt), device="meta")
            for k, (dt, shape) in expected_head_tensors("", info).items()}
    return Int8Linear(meta["qweight"], meta["scale"], meta.get("bias"), NOT_ATTACHED)


def untie(model: nn.Module, local: str) -> None:
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


def empty_layer(info: dict[str, Any]):
    """An :class:`SqcLinear` of the described sizes and dtypes whose tensors are on the meta device."""
    shapes = expected_tensors("", info)
    meta = {k.lstrip("."): torch.empty(shape, dtype=getattr(torch, dt), device="meta") for k, (dt, shape) in shapes.items()}
    # PackedLinear checks crow[-1] == nnz, which a meta tensor cannot answer: the row pointers (R + 1 ints) are
    # a real placeholder; the loader replaces every tensor of the layer
    crow = torch.zeros(info["out_features"] + 1, dtype=torch.int32, device="cpu")
    crow[-1] = info["nnz"]
    packed = PackedLinear(info["bits"], info["in_features"], info["out_features"],
                          meta["codes"], meta["lut"], crow, meta["col"], meta["val"])
    return SqcLinear(packed, meta.get("bias"), NOT_ATTACHED)


def resolve(model: nn.Module, name: str) -> str:
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
        f"load the folder with the class it was saved from (config.json's \"architectures\"), or {REMAKE}")


def check_checkpoint(files, layers: dict[str, dict[str, Any]], heads: dict[str, dict[str, Any]] | None = None) -> None:
    """Every tensor the quantized layers and int8 heads need is in the safetensors files, with the shape and
    dtype config.json promises (read from the headers only)."""
    from safetensors import safe_open

    found: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for f in files:
        f = os.fspath(f)
        if not f.endswith(".safetensors"):
            raise SqcCheckpointError(f"{f}: sqc checkpoints are safetensors files, not {os.path.basename(f)}; {REMAKE}")
        with safe_open(f, framework="pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                found[k] = (sl.get_dtype(), tuple(sl.get_shape()), f)
    wanted = [("quantized layer", name, expected_tensors(name, info)) for name, info in layers.items()]
    wanted += [("int8 head", name, expected_head_tensors(name, info)) for name, info in (heads or {}).items()]
    for what, name, expected in wanted:
        for key, (dt, shape) in expected.items():
            if key not in found:
                raise SqcCheckpointError(f"the checkpoint has no tensor {key}, which {what} {name} needs "
                                         f"(config.json and the weights come from different saves); {REMAKE}")
            got_dt, got_shape, f = found[key]
            if (got_dt, got_shape) != (SAFETENSORS_DTYPE[getattr(torch, dt)], shape):
                raise SqcCheckpointError(
                    f"{f}: tensor {key} is {got_dt} {list(got_shape)}, config.json's quantization_config says "
                    f"{SAFETENSORS_DTYPE[getattr(torch, dt)]} {list(shape)} (config.json and the weights come from different saves); {REMAKE}")
