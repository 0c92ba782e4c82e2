"""What the compile found and chose for each linear layer (:class:`LayerReport`), as a compiled or loaded
model carries it: ``sqc.compile`` fills it, ``sqc.load`` reads it back from ``report.json``."""
from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["LayerReport"]


@dataclasses.dataclass
class LayerReport:
    module: str
    in_features: int
    out_features: int
    quantized: bool
    reason: str | None = None  # why not quantized
    bits: int | None = None
    sparse_nnz: int = 0
    sparse_pct: float = 0.0
    weighted_error: float | None = None  # sum F (W - W_hat)^2 / N
    mse: float | None = None
    float_bytes: int = 0
    packed_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    kernel: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    weight_power: float | None = None  # mean W^2, for the SNR of the report
    tuned_ms: float | None = None  # the tuned batch-1 kernel's latency, when a generated kernel runs
    # guided fits: sum over rows of e^T H e (damped guided Hessian) at the k-means start and at the end
    layer_objective_start: float | None = None
    layer_objective: float | None = None

    @property
    def bits_per_weight(self) -> float | None:
        if not self.packed_bytes:
            return None
        return 8.0 * sum(self.packed_bytes.values()) / (self.in_features * self.out_features)

    @classmethod
    def from_dict(cls, r: dict[str, Any]) -> "LayerReport":
        """A layer's entry of ``report.json`` (as ``CompiledModel.report_dict`` writes it)."""
        out_f, in_f = r["shape"]
        return cls(r["module"], in_f, out_f, r["quantized"], r["reason"], r["bits"], r["sparse_nnz"], r["sparse_pct"],
                   r["weighted_error"], r["mse"], 0, r["bytes"] or {}, r["kernel"], r.get("notes", []),
                   r.get("weight_power"), r.get("tuned_ms"))
