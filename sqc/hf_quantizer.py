"""The transformers classes that read sqc Hugging Face folders: :class:`SqcQuantizationConfig` and
:class:`SqcHfQuantizer` (importing this module imports transformers; :mod:`sqc.hf` registers them).

Before the weights load, the quantizer puts empty :class:`~sqc.runtime.qlinear.SqcLinear` layers and
:class:`~sqc.runtime.int8.Int8Linear` heads (sized from ``quantization_config``) in place of the
``nn.Linear`` modules; after, :func:`sqc.restore.restore` checks them, fuses the sibling groups again and
attaches the kernels the folder carries (``kernels/cpu/``), as ``sqc.load`` does for an artifact.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .config import QuantConfig
from .hf_format import (FORMAT_VERSION, QUANT_METHOD, REMAKE, SqcCheckpointError, check_checkpoint, empty_head,
                        empty_layer, resolve, untie, validate_fields)
from .restore import Stored, restore
from .runtime.int8 import Int8Linear
from .runtime.modules import replace_module
from .runtime.qlinear import SqcLinear

__all__ = ["SqcQuantizationConfig", "SqcHfQuantizer"]


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
    format_version : the schema version (:data:`sqc.hf_format.FORMAT_VERSION`).
    target : the target the model was compiled for.
    kernels : the kernels the folder carries: ``kind``, ``folder`` (relative to the folder) and what the
        backend recorded (for the CPU the plan's sha256), or None.

    Written by :func:`sqc.hf.save_pretrained`; quantizing a float model through
    ``from_pretrained(quantization_config=...)`` is not supported (use ``sqc.compile``).
    """

    def __init__(self, sqc_config: dict | None = None, layers: dict | None = None,
                 format_version: int = FORMAT_VERSION, target: str = "llvm", fused: list | None = None,
                 heads: dict | None = None, kernels: dict | None = None, **kwargs: Any) -> None:
        kwargs.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.sqc_config = sqc_config
        self.target = target
        self.layers = layers
        self.fused = fused if fused is not None else []  # format 1 wrote neither: nothing fused, no int8 head
        self.heads = heads if heads is not None else {}
        self.kernels = kernels
        for k, v in kwargs.items():  # fields of a later minor writer are kept, so a re-save preserves them
            setattr(self, k, v)
        validate_fields(self.__dict__)

    @property
    def quant_config(self) -> QuantConfig:
        """The sqc settings as a :class:`sqc.QuantConfig`."""
        return QuantConfig.from_dict(self.sqc_config)


class SqcHfQuantizer(HfQuantizer):
    """Loads sqc checkpoints: empty ``SqcLinear`` layers and ``Int8Linear`` heads before the weights load;
    after, :func:`sqc.restore.restore` (checks, the fused groups, the carried kernels).

    ``kernel_records`` holds the kernel set's records (one per kernel) once the model has loaded;
    ``notes`` says where the kernels came from.
    """

    requires_calibration = True  # only pre-quantized (sqc.compile'd) checkpoints

    def __init__(self, quantization_config, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.kernel_records: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self._names: dict[str, str] = {}
        self._heads: dict[str, str] = {}
        self._folder: str | None = None

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
        qc = self.quantization_config
        layers, heads = qc.layers, qc.heads or {}
        self._names = {name: resolve(model, name) for name in layers}
        self._heads = {name: resolve(model, name) for name in heads}
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        for name, local in self._names.items():
            _check_linear(model, name, local, layers[name], "quantized layer")
            if f"{local}.weight" in tied:
                raise SqcCheckpointError(
                    f"quantized layer {name} has its weight tied to another tensor in this model's config "
                    "(tie_word_embeddings?); sqc leaves tied weights unquantized: set the config's tie flag to "
                    f"what the compiled model had, or {REMAKE}")
        for name, local in self._heads.items():
            _check_linear(model, name, local, heads[name], "int8 head")
        if checkpoint_files:
            check_checkpoint(checkpoint_files, layers, heads)
            self._folder = os.path.dirname(os.path.abspath(os.fspath(checkpoint_files[0])))
        for name, local in self._names.items():
            replace_module(model, local, empty_layer(layers[name]))
        for name, local in self._heads.items():
            # the head has its own int8 copy (a tied embedding keeps the float table): no tying at load
            untie(model, local)
            replace_module(model, local, empty_head(heads[name]))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        qc = self.quantization_config
        renamed = any(n != local for n, local in (*self._names.items(), *self._heads.items()))
        # the carried kernel plan names the saved module paths: a model class that names them otherwise (a base
        # model loaded from a causal LM's folder) builds its own
        kernels = qc.kernels if self._folder is not None and not renamed else None
        stored = Stored(
            self._folder or "<transformers checkpoint>",
            {self._names[n]: info for n, info in qc.layers.items()},
            {self._heads[n]: info for n, info in (qc.heads or {}).items()},
            [[self._names.get(n, n) for n in g] for g in (qc.fused or [])],
            "llvm", kernels, fix=REMAKE)
        self.notes = []
        _, kernel_set = restore(model, stored, SqcCheckpointError, self.notes)
        self.kernel_records = kernel_set.records() if kernel_set is not None else []
        return model

    def _dequantize(self, model, dtype=None):
        """Replace every SqcLinear with an ``nn.Linear`` holding ``W_hat`` and every int8 head with one
        holding ``qweight * scale[:, None]`` (``model.dequantize()``)."""
        for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, (SqcLinear, Int8Linear))]:
            w = m.packed.dequantize(dtype=dtype or m.val.dtype) if isinstance(m, SqcLinear) else \
                m.dequantize(dtype=dtype or m.scale.dtype)
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


def _check_linear(model: nn.Module, name: str, local: str, info: dict[str, Any], what: str) -> None:
    old = model.get_submodule(local)
    shape = (getattr(old, "out_features", None), getattr(old, "in_features", None))
    if not isinstance(old, nn.Linear) or shape != (info["out_features"], info["in_features"]):
        raise SqcCheckpointError(
            f"{what} {name} is {info['out_features']}x{info['in_features']} in config.json's quantization_config, "
            f"but the model's module is {type(old).__name__} {shape[0]}x{shape[1]}: the model config and "
            f"quantization_config disagree; {REMAKE}")
