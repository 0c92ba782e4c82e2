"""The compiled model a user holds: :class:`CompiledModel`, what ``sqc.compile`` and ``sqc.load`` return.

It needs only the runtime: loading an artifact or a Hugging Face folder builds one without importing the
compiler (:mod:`sqc.compiler`, ``sqc.passes``, ``sqc.codegen``).
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import torch
from torch import nn

from .config import QuantConfig
from .runtime.decode import CompiledDecoder
from .runtime.fused import fused_groups
from .runtime.int8 import Int8Linear
from .runtime.qlinear import SqcLinear
from .runtime.report import LayerReport
from .runtime.spill import Spill
from .runtime.target import TargetSpec

__all__ = ["CompiledModel"]


class CompiledModel(nn.Module):
    """A compiled model: call it like the original; attributes fall through to it.

    ``quant_config`` holds the sqc settings (a :class:`QuantConfig`);
    ``config`` is the wrapped model's own config, as Hugging Face code expects.

    ``compiled.generate(...)`` works for Hugging Face causal LMs because the
    wrapped model is the original class with its linears replaced by
    :class:`~sqc.runtime.qlinear.SqcLinear`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: QuantConfig,
        target: TargetSpec,
        layers: Sequence[LayerReport],
        notes: Sequence[str] = (),
        stage_seconds: dict[str, float] | None = None,
        graph_module: torch.fx.GraphModule | None = None,
        float_weight_bytes: int = 0,
        tuning: Sequence[dict[str, Any]] = (),
        kernels: Any = None,
        spill: Spill | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        #: the sqc settings; ``compiled.config`` is the wrapped model's own config (Hugging Face code reads it)
        self.quant_config = config
        self.target = target
        self.layers = list(layers)
        self.notes = list(notes)
        self.stage_seconds = dict(stage_seconds or {})
        #: the rewritten graph, kept only when ``sqc.compile(..., dump_ir=...)`` asked for the IR (else None):
        #: the model that runs is ``model``. Not a submodule: it shares every tensor with ``model``
        self.__dict__["graph_module"] = graph_module
        self.float_weight_bytes = float_weight_bytes
        self.tuning = list(tuning)
        #: the kernel set the layers run (:class:`sqc.runtime.cpu.plan.CpuKernelPlan` for CPU targets,
        #: :class:`sqc.runtime.cuda.kernels.CudaBundle` for CUDA), written into artifacts by ``sqc.save``; None
        #: when every layer runs the reference op
        self.kernels = kernels
        #: the temporary file that holds the packed layers of a compile larger than memory
        #: (:class:`sqc.runtime.spill.Spill`), or None; ``sqc.save`` drops its pages as it writes them
        self.__dict__["spill"] = spill
        #: the decode steps an artifact carries (:class:`sqc.runtime.stepstore.StoredSteps`, set by ``sqc.load``):
        #: ``generate`` restores them instead of tracing the model; None when there are none
        self.__dict__["stored_steps"] = None

    @property
    def cuda(self):
        """The CUDA kernels and plan (:class:`sqc.runtime.cuda.kernels.CudaBundle`) for CUDA targets, else None."""
        return self.kernels if self.target.kind == "cuda" else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self._modules.get("model")
            if model is None:
                raise
            return getattr(model, name)

    def generate(self, input_ids=None, **kwargs: Any):
        """Greedy generation with one compiled decode step (:class:`sqc.runtime.decode.CompiledDecoder`): a static
        KV cache and ``torch.compile`` around the step, the sqc kernels as opaque ops. Other ``generate`` options
        (sampling, beams, padded batches) run the wrapped model's own ``generate`` and ``decode_stats`` says so."""
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        dec = self.__dict__.get("_decoder")
        if dec is None:
            dec = self.__dict__["_decoder"] = CompiledDecoder(self.model, stored=self.__dict__.get("stored_steps"))
        return dec.generate(input_ids, **kwargs)

    @property
    def decode_stats(self) -> dict[str, Any]:
        """How the last ``generate`` ran: the mechanism, the first compiled step's seconds, or why it fell back."""
        dec = self.__dict__.get("_decoder")
        return dict(dec.stats) if dec is not None else {}

    def save_pretrained(self, path, tokenizer=None) -> str:
        """Write a Hugging Face folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads
        (after ``import sqc``) into an sqc model running the same kernels; see :func:`sqc.hf.save_pretrained`."""
        from .hf import save_pretrained

        return save_pretrained(self, path, tokenizer=tokenizer)

    # -- reporting ---------------------------------------------------------------
    def quantized_modules(self) -> dict[str, SqcLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, SqcLinear)}

    def weight_bytes(self) -> dict[str, int]:
        """Resident bytes of the quantized layers' weights, before (float) and after (packed)."""
        after = sum(m.resident_bytes() for m in self.quantized_modules().values())
        return {"float_before": self.float_weight_bytes, "packed_after": after}

    def tuning_report(self, fmt: str = "dict"):
        """The kernels this model runs and how they were chosen: ``fmt`` is "dict", "json" or "markdown"."""
        from .tuning_report import tuning_markdown

        data = {"target": str(self.target), "kernels": self.tuning}
        if fmt == "dict":
            return data
        if fmt == "json":
            return json.dumps(data, indent=1)
        if fmt == "markdown":
            return tuning_markdown(data)
        raise ValueError(f"tuning_report fmt must be 'dict', 'json' or 'markdown', got {fmt!r}")

    def refresh_kernel_names(self) -> None:
        """Copy each module's running kernel (and its tuned batch-1 latency) into the layer reports."""
        mods = self.quantized_modules()
        mods.update({n: m for n, m in self.model.named_modules() if isinstance(m, Int8Linear)})
        lat = {}
        for rec in self.tuning:
            if rec.get("bucket") == "1":
                for name in rec.get("layers", []):
                    lat[name] = rec.get("best_ms")
        for r in self.layers:
            if r.module in mods:
                r.kernel = mods[r.module].kernel
                r.tuned_ms = lat.get(r.module)

    def report_dict(self) -> dict[str, Any]:
        return {
            "config": self.quant_config.to_dict(),
            "target": str(self.target),
            "notes": self.notes,
            "stage_seconds": self.stage_seconds,
            "weight_bytes": self.weight_bytes(),
            "fused": [list(g.names) for g in fused_groups(self.model)],
            "layers": [
                {
                    "module": r.module,
                    "shape": [r.out_features, r.in_features],
                    "quantized": r.quantized,
                    "reason": r.reason,
                    "bits": r.bits,
                    "sparse_nnz": r.sparse_nnz,
                    "sparse_pct": r.sparse_pct,
                    "weighted_error": r.weighted_error,
                    "mse": r.mse,
                    "weight_power": r.weight_power,
                    "bytes": r.packed_bytes,
                    "bits_per_weight": r.bits_per_weight,
                    "kernel": r.kernel,
                    "tuned_ms": r.tuned_ms,
                    "notes": r.notes,
                }
                for r in self.layers
            ],
        }

    def report(self) -> str:
        """A per-layer table: bits, sparse %, weighted error, bytes, kernel used."""
        lines = [
            f"sqc compile report  config={self.quant_config.to_json()}  target={self.target}",
            f"{'layer':<44} {'shape':>12} {'bits':>4} {'sparse%':>8} {'w.error':>10} {'bytes':>10} {'b/w':>6}  kernel",
        ]
        for r in self.layers:
            shape = f"{r.out_features}x{r.in_features}"
            if not r.quantized and r.packed_bytes:  # the int8 output projection
                nbytes = sum(r.packed_bytes.values())
                lines.append(f"{r.module:<44} {shape:>12} {8:>4} {'-':>8} {'-':>10} {nbytes:>10} {'8.06':>6}  "
                             f"int8 per row: {r.kernel}")
                continue
            if not r.quantized:
                lines.append(f"{r.module:<44} {shape:>12} {'-':>4} {'-':>8} {'-':>10} {'-':>10} {'-':>6}  float (not quantized: {r.reason})")
                continue
            nbytes = sum(r.packed_bytes.values())
            err = f"{r.weighted_error:.3e}" if r.weighted_error is not None else "-"
            bpw = f"{r.bits_per_weight:.3f}" if r.bits_per_weight is not None else "-"
            kern = r.kernel or "-"
            lines.append(f"{r.module:<44} {shape:>12} {r.bits:>4} {r.sparse_pct:>8.3f} {err:>10} {nbytes:>10} {bpw:>6}  {kern}")
        wb = self.weight_bytes()
        nq = sum(r.quantized for r in self.layers)
        lines.append(
            f"{nq} of {len(self.layers)} linear layers quantized; weights of quantized layers: "
            f"{wb['float_before'] / 2**20:.1f} MiB float -> {wb['packed_after'] / 2**20:.1f} MiB packed"
        )
        kinds: dict[tuple, int] = {}  # one line per kind of group (members' leaf names, shape, kernel)
        for g in fused_groups(self.model):
            key = (tuple(n.rpartition(".")[2] for n in g.names), g.layer.out_features, g.layer.in_features,
                   g.layer.kernel)
            kinds[key] = kinds.get(key, 0) + 1
        for (leaves, rows, cols, kernel), count in kinds.items():
            where = f" in {count} layers" if count > 1 else ""
            lines.append(f"fused: {' + '.join(leaves)}{where} -> one {rows}x{cols} layer each, one kernel call "
                         f"({kernel})")
        for note in self.notes:
            lines.append(f"note: {note}")
        if self.stage_seconds:
            lines.append("stage seconds: " + json.dumps({k: round(v, 2) for k, v in self.stage_seconds.items()}))
        return "\n".join(lines)
