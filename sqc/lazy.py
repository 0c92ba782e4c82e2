"""Compile a checkpoint larger than memory: the model skeleton on the meta device, weights read per layer.

:func:`load_lazy` builds a Hugging Face causal LM from its config with every
parameter on the meta device (buffers such as rotary tables stay real), reads
the parameters outside the decoder stack (embeddings, final norm, head) and
returns a :class:`CheckpointSource` that reads one decoder layer's parameters
from the checkpoint when the layer-streamed pipeline (:mod:`sqc.streaming`)
asks for them and drops them after. Checkpoints: a Hugging Face folder of
safetensors (one file or sharded with ``model.safetensors.index.json``) or a
GGUF file (de-quantized tensor by tensor with the ``gguf`` package and the
same name map and tensor fix-ups transformers uses when it loads GGUF whole).

:func:`compile_pretrained` is the entry point: ``sqc.compile_pretrained(path,
config="w3-s0.45", calibration=[...])``. Peak memory is the parts outside the
stack, one layer, the calibration's layer-boundary activations and the
packed result, not the float model.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .streaming import WeightSource

__all__ = ["CheckpointSource", "load_lazy", "compile_pretrained", "CheckpointError"]


class CheckpointError(ValueError):
    """The checkpoint cannot be read lazily; the message names the file and the fix."""


class _Safetensors:
    """Tensor names of a safetensors folder and the file holding each."""

    def __init__(self, folder: str) -> None:
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.exists(index):
            with open(index) as fh:
                weight_map = json.load(fh).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no weight_map; re-save the model with save_pretrained")
            self.files = {k: os.path.join(folder, v) for k, v in weight_map.items()}
        elif os.path.exists(single):
            from safetensors import safe_open

            with safe_open(single, framework="pt") as fh:
                self.files = {k: single for k in fh.keys()}
        else:
            raise CheckpointError(f"{folder} has neither model.safetensors nor model.safetensors.index.json; "
                                  "sqc reads safetensors checkpoints lazily (re-save with save_pretrained("
                                  "safe_serialization=True)), or load the model whole (`sqc compile --no-lazy`, "
                                  "or sqc.compile on the loaded model)")
        for f in set(self.files.values()):
            if not os.path.exists(f):
                raise CheckpointError(f"{f}, named in {index}, does not exist")

    def names(self) -> set[str]:
        return set(self.files)

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for f, ns in by_file.items():
            # opened per read: the mapping (and the page-cache pages it makes resident) goes with it
            with safe_open(f, framework="pt") as fh:
                for n in ns:
                    out[n] = fh.get_tensor(n)
        return out


class _GGUF:
    """Tensors of a GGUF file under their Hugging Face names, de-quantized on read."""

    def __init__(self, path: str, model: nn.Module, arch: str, hf_config: dict) -> None:
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        self.path = path
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=hf_config)
        self.key_map = get_gguf_hf_weights_map(model, self.processor)
        from gguf import GGUFReader

        # parsing the header (the tokenizer's vocabulary too) takes seconds: one parse. Only the tensor
        # records and the file's map are kept: the reader's metadata fields (a numpy view per token of
        # the vocabulary, ~250k objects for SmolLM2) held 160 MiB for the whole compile
        reader = GGUFReader(path)
        self.data = reader.data
        # Hugging Face name -> GGUF tensor record (the key map is transformers' own)
        self.files = {self.key_map[t.name]: t for t in reader.tensors if t.name in self.key_map}
        del reader

    def _drop_pages(self) -> None:
        """Unmap-like: the file pages a read touched leave this process's resident set (the page cache
        keeps them), so reading layer after layer does not accumulate the whole file in RSS."""
        import mmap

        mm = getattr(self.data, "_mmap", None)
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)

    def names(self) -> set[str]:
        return set(self.files)

    @staticmethod
    def _dequantize(t, block_rows: int = 2048):
        """gguf's de-quantization, a block of rows at a time: its numpy temporaries are several
        times the tensor (half a GiB for a 49152-token embedding done whole)."""
        import numpy as np
        from gguf import dequantize

        data = t.data
        if data.ndim < 2 or data.shape[0] <= block_rows:
            return dequantize(data, t.tensor_type)
        first = dequantize(data[:block_rows], t.tensor_type)
        out = np.empty((data.shape[0], *first.shape[1:]), dtype=first.dtype)
        out[:block_rows] = first
        for r0 in range(block_rows, data.shape[0], block_rows):
            out[r0 : r0 + block_rows] = dequantize(data[r0 : r0 + block_rows], t.tensor_type)
        return out

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        import numpy as np

        out = {}
        for n in names:
            t = self.files[n]
            res = self.processor.process(weights=self._dequantize(t), name=t.name,
                                         tensor_key_mapping=self.key_map, parsed_parameters={"tensors": {}})
            if res.name != t.name or res.weights is None:
                raise CheckpointError(f"{self.path}: transformers splits or renames GGUF tensor {t.name} of this "
                                      "architecture, which sqc does not read lazily; load the model whole "
                                      "(sqc.compile on the loaded model, or `sqc compile --no-lazy`)")
            out[n] = torch.from_numpy(np.copy(res.weights))
        self._drop_pages()
        return out


class CheckpointSource(WeightSource):
    """Reads parameters of a meta-device model from its checkpoint, by module prefix."""

    lazy = True

    def __init__(self, model: nn.Module, reader: Any, where: str) -> None:
        self.model, self.reader, self.where = model, reader, where
        available = reader.names()
        prefix = getattr(model, "base_model_prefix", "") or ""
        # a parameter may sit at several places (tied weights): each place gets the new tensor, and the
        # checkpoint may store it under any of its names
        groups: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        # places are (module name, attribute): a module the pipeline replaces (a lowered linear) is not kept alive
        self._places: dict[str, list[tuple[str, str]]] = {}
        self._key: dict[str, str] = {}
        missing = []
        for names in groups.values():
            canon = names[0]
            places = []
            for name in names:
                mod_name, _, attr = name.rpartition(".")
                places.append((mod_name, attr))
            self._places[canon] = places
            key = next((k for n in names for k in (n, n.removeprefix(prefix + "."), f"{prefix}.{n}")
                        if k in available), None)
            if key is None:
                missing.append(canon)
            else:
                self._key[canon] = key
        if missing:
            raise CheckpointError(f"{where} has no tensor for {missing[0]} (and {len(missing) - 1} more parameters "
                                  "of the model); it does not match the model its config describes")

    def _names(self, prefix: str) -> list[str]:
        pre = prefix + "." if prefix else ""
        return [n for n in self._places if n.startswith(pre)]

    def _owner(self, mod_name: str) -> nn.Module:
        return self.model.get_submodule(mod_name) if mod_name else self.model

    def _set(self, name: str, t: torch.Tensor) -> None:
        param = nn.Parameter(t, requires_grad=False)
        for mod_name, attr in self._places[name]:
            self._owner(mod_name)._parameters[attr] = param

    def _param(self, name: str) -> torch.Tensor | None:
        """The parameter, or None once the pipeline replaced it (a quantized weight)."""
        mod_name, attr = self._places[name][0]
        try:
            return self._owner(mod_name)._parameters.get(attr)
        except AttributeError:
            return None

    def _pending(self, names) -> list[str]:
        return [n for n in names if (p := self._param(n)) is not None and p.is_meta]

    def materialize(self, prefix: str) -> None:
        self._load(self._pending(self._names(prefix)))

    def _load(self, names: list[str]) -> None:
        if not names:
            return
        tensors = self.reader.read(sorted({self._key[n] for n in names}))
        for n in names:
            t = tensors[self._key[n]]
            want = self._param(n)
            if tuple(t.shape) != tuple(want.shape):
                raise CheckpointError(f"{self.where}: tensor {self._key[n]} has shape {tuple(t.shape)}, the model's "
                                      f"{n} is {tuple(want.shape)}")
            self._set(n, t.to(want.dtype) if t.dtype != want.dtype else t)

    def release(self, prefix: str) -> None:
        for n in self._names(prefix):
            p = self._param(n)
            if p is not None and not p.is_meta:
                self._set(n, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    def prepare(self, layers: Sequence[str]) -> None:
        """Read every parameter outside the decoder ``layers``: embeddings, final norm, head."""
        pres = tuple(p + "." for p in layers)
        self._load(self._pending(n for n in self._places if not n.startswith(pres)))

    def check_complete(self) -> None:
        left = self._pending(self._places)
        if left:
            raise RuntimeError(f"after compiling, {left[0]} (and {len(left) - 1} more) were never read from "
                               f"{self.where}: this is a bug in sqc's lazy loading")


def checkpoint_kind(path: str) -> str:
    """``"gguf"`` or ``"folder"`` (a Hugging Face model folder); an error says what ``path`` is instead."""
    if not os.path.exists(path):
        raise CheckpointError(f"model path {path} does not exist (give a Hugging Face model folder or a .gguf file)")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise CheckpointError(f"{path} is a file but not a .gguf model; give a model folder or a .gguf file")
        return "gguf"
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path} has no config.json: it is not a Hugging Face model folder")
    return "folder"


def _skeleton(config, dtype: torch.dtype) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # from_config under init_empty_weights leaves tied weights as two meta tensors
    return model.eval()


def _checkpoint_dtype(config, fallback: torch.dtype) -> torch.dtype:
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) and d.is_floating_point else fallback


def load_lazy(path: str, dtype: torch.dtype | None = None):
    """``(model, source, tokenizer)`` for a Hugging Face safetensors folder or a GGUF file, every
    parameter on the meta device: ``source.prepare(layers)`` reads those outside the decoder layers,
    ``source.materialize(layer)`` one layer's (``sqc.compile(weight_source=source)`` calls both).
    ``dtype``: the model's dtype (default: the checkpoint's; float32 for GGUF, whose blocks
    de-quantize to float32). The tokenizer is None for a folder without tokenizer files."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    transformers.logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if checkpoint_kind(path) == "gguf":
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        d, f = os.path.split(os.path.abspath(path))
        config = AutoConfig.from_pretrained(d, gguf_file=f)
        model = _skeleton(config, dtype or torch.float32)
        parsed = load_gguf_checkpoint(path, return_tensors=False)
        arch = parsed["config"].get("model_type", config.model_type)
        reader = _GGUF(path, model, arch, parsed["config"])
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    else:
        config = AutoConfig.from_pretrained(path)
        model = _skeleton(config, dtype or _checkpoint_dtype(config, torch.float32))
        reader = _Safetensors(path)
        tok = AutoTokenizer.from_pretrained(path) if _has_tokenizer(path) else None
    return model, CheckpointSource(model, reader, path), tok


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                 "tokenizer.model"))


def compile_pretrained(path: str, example_inputs: Sequence[Any] | None = None, *, config: Any = None,
                       calibration: Sequence[tuple] | None = None, dtype: torch.dtype | None = None,
                       progress: Callable[[str, int, int], None] | None = None, **compile_kwargs: Any):
    """:func:`sqc.compile` on a checkpoint read one decoder layer at a time (see the module notes).

    ``example_inputs`` defaults to the first calibration sample (or a short prompt of token 0).
    Returns the :class:`~sqc.compiled.CompiledModel`; ``compiled.model`` holds only real tensors.
    """
    from .compiler import compile as sqc_compile

    model, source, _ = load_lazy(path, dtype)
    calibration = list(calibration) if calibration is not None else None
    if example_inputs is None:
        example_inputs = tuple(calibration[0]) if calibration else (torch.zeros(1, 8, dtype=torch.long),)
    compiled = sqc_compile(model, example_inputs, config=config, calibration=calibration, progress=progress,
                           weight_source=source, **compile_kwargs)
    source.check_complete()
    return compiled
