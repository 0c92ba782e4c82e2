"""What a quantized layer's forward pass runs, as a value: :class:`KernelStatus`.

Code asks the value (``status.generated``, ``status.why``); only reports render it
(``str(status)``), so no caller parses a display string.
"""
from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["KernelStatus", "REFERENCE"]


@dataclasses.dataclass(frozen=True)
class KernelStatus:
    """The implementation behind one layer.

    ``name``: the generated kernel's name (for example ``tvm-lut-avx512-…``), or None when the
    plain PyTorch reference op runs; ``why``: why the reference op runs, or None;
    ``note``: how a generated kernel came to run here (``"built at load: …"``), or None;
    ``fused``: the leaf names of the fused group whose kernel this layer runs, or ``()``.
    """

    name: str | None = None
    why: str | None = None
    note: str | None = None
    fused: tuple[str, ...] = ()

    @property
    def generated(self) -> bool:
        """Whether a generated kernel runs (else the reference op)."""
        return self.name is not None

    @classmethod
    def reference(cls, why: str | None = None) -> "KernelStatus":
        return cls(None, why)

    @classmethod
    def kernel(cls, name: str) -> "KernelStatus":
        if not name:
            raise ValueError("a generated kernel's status needs its name")
        return cls(name)

    def check(self, kernels) -> "KernelStatus":
        """This status, after checking it describes ``kernels`` (generated ones, or None for the reference op)."""
        if (kernels is not None) != self.generated:
            raise ValueError(f"kernel status {self} does not describe {'no ' if kernels is None else ''}kernels")
        return self

    def with_fused(self, leaves: tuple[str, ...]) -> "KernelStatus":
        return dataclasses.replace(self, fused=tuple(leaves))

    def with_note(self, note: str) -> "KernelStatus":
        return dataclasses.replace(self, note=note)

    def __str__(self) -> str:
        text = self.name if self.generated else "reference"
        extra = [e for e in (self.why, self.note) if e]
        if self.fused:
            extra.append(f"fused {'+'.join(self.fused)}")
        return text + "".join(f" ({e})" for e in extra)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "why": self.why, "note": self.note, "fused": list(self.fused)}

    @classmethod
    def from_dict(cls, d: Any) -> "KernelStatus":
        """A status as :meth:`to_dict` wrote it; raises ValueError naming the field that is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"a kernel status is a dict with name / why / note / fused, got {type(d).__name__}")
        for key in ("name", "why", "note"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise ValueError(f"kernel status field {key!r} must be a string or null, got {d[key]!r}")
        fused = d.get("fused") or []
        if not isinstance(fused, list) or not all(isinstance(f, str) for f in fused):
            raise ValueError(f"kernel status field 'fused' must be a list of strings, got {fused!r}")
        return cls(d.get("name"), d.get("why"), d.get("note"), tuple(fused))


#: the reference op, for no stated reason (a layer before kernels are attached)
REFERENCE = KernelStatus()
