"""Target parsing: the user's target string, dict or ``tvm.target.Target`` -> :class:`TargetSpec`.

TVM 0.27 refuses CLI-form strings such as ``"cuda -arch=sm_86"``; sqc accepts
them and converts them to the dict form TVM takes
(``{"kind": "cuda", "arch": "sm_86"}``). TVM itself is imported only when a
``tvm.target.Target`` is actually built.
"""
from __future__ import annotations

import dataclasses
import shlex
from typing import Any, Mapping

__all__ = ["TargetSpec", "parse_target", "KNOWN_KINDS"]

KNOWN_KINDS = ("llvm", "cuda")


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    kind: str
    attrs: tuple[tuple[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dict(self.attrs)}

    def __str__(self) -> str:
        parts = [self.kind] + [f"-{k}={v}" for k, v in self.attrs]
        return " ".join(parts)

    def to_tvm(self):  # pragma: no cover - needs TVM
        import tvm

        d = self.as_dict()
        if d["kind"] == "llvm" and d.get("mcpu") in (None, "native"):
            d["mcpu"] = tvm.get_global_func("target.llvm_get_system_cpu")()
        return tvm.target.Target(d)


def _coerce(v: str) -> Any:
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    try:
        return int(v)
    except ValueError:
        return v


def parse_target(target: Any) -> TargetSpec:
    """Accept ``"llvm"``, ``"llvm -mcpu=znver4"``, ``"cuda -arch=sm_86"``, a dict, or a TVM Target."""
    if target is None:
        target = "llvm"
    if isinstance(target, TargetSpec):
        return target
    if isinstance(target, Mapping):
        d = dict(target)
        kind = _SYNONYMS.get(d.get("kind"), d.get("kind"))
        d.pop("kind", None)
        if kind not in KNOWN_KINDS:
            raise ValueError(f"target dict needs 'kind' in {KNOWN_KINDS}, got {kind!r}")
        return _validated(kind, d)
    if not isinstance(target, str):
        export = getattr(target, "export", None)
        if callable(export):  # tvm.target.Target
            d = dict(export())
            kind = d.pop("kind")
            keep = {k: v for k, v in d.items() if k in ("mcpu", "arch", "mtriple", "mattr", "max_num_threads")}
            return parse_target({"kind": kind, **keep})
        raise TypeError(f"target must be a string, dict or tvm.target.Target, got {type(target).__name__}")
    tokens = shlex.split(target)
    if tokens:
        tokens[0] = _SYNONYMS.get(tokens[0], tokens[0])
    if not tokens or tokens[0] not in KNOWN_KINDS:
        raise ValueError(
            f"unknown target {target!r}: the target kind must be one of {', '.join(KNOWN_KINDS)} "
            "(e.g. 'llvm', 'llvm -mcpu=znver4', 'cuda -arch=sm_86')"
        )
    attrs: dict[str, Any] = {}
    for tok in tokens[1:]:
        if not tok.startswith("-") or "=" not in tok:
            raise ValueError(f"target option {tok!r} in {target!r} is not of the form -key=value")
        k, v = tok.lstrip("-").split("=", 1)
        attrs[k] = _coerce(v)
    return _validated(tokens[0], attrs)


#: what users write for a kind TVM spells otherwise
_SYNONYMS = {"cpu": "llvm"}
#: the CUDA kernels use mma.sync.m16n8k16 on fp16 (Ampere's tensor cores) and cp.async
MIN_CUDA_ARCH = 80


def _validated(kind: str, attrs: dict[str, Any]) -> TargetSpec:
    if kind == "cuda" and "arch" in attrs:
        arch = str(attrs["arch"])
        if not arch.startswith("sm_") or not arch[3:].rstrip("a").isdigit():
            raise ValueError(f"cuda -arch must look like sm_86, got {attrs['arch']!r}")
        if int(arch[3:].rstrip("a")) < MIN_CUDA_ARCH:
            raise ValueError(
                f"target cuda -arch={arch}: sqc's CUDA kernels need sm_{MIN_CUDA_ARCH} or newer (tensor-core "
                "mma.sync m16n8k16 on fp16); compile for sm_80/86/89/90, or use target='llvm' for the CPU"
            )
    return TargetSpec(kind, tuple(sorted(attrs.items())))
