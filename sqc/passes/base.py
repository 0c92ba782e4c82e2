"""Pass infrastructure: contracts, the compile context, the pass manager and its instruments.

A pass maps the traced ``GraphModule`` to itself (or a rewritten one). It
declares the ``node.meta`` keys it ``requires`` on every quantized linear
node and the keys it ``ensures``; the manager checks both. Tensors too large
for node metadata live in :class:`TensorStore`, keyed by the weight's
qualified name; the node's metadata holds the key.

Timing and IR dumps are instruments of the manager, never prints inside passes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..config import QuantConfig
from ..runtime.report import LayerReport
from ..trace import SITE, LinearSite, linear_nodes

__all__ = [
    "Pass",
    "PassResult",
    "PassManager",
    "CompileContext",
    "TensorStore",
    "MissingMetadataError",
    "require_meta",
    "quantized_nodes",
    "TimingInstrument",
    "IRDumpInstrument",
    "BITS",
    "layer_bits",
]

log = logging.getLogger("sqc")

#: a layer's code width where a bits budget chose it (AllocateBits); else QuantConfig.bits applies
BITS = "sqc.bits"


def layer_bits(nodes, config) -> int:
    """The code width of a layer (its call nodes): AllocateBits' choice where it ran, else ``config.bits``."""
    b = nodes[0].meta.get(BITS)
    return config.bits if b is None else int(b)


# which pass writes which key: used to say the fix when a key is missing
PRODUCERS = {
    SITE: "sqc.trace",
    "sqc.fisher": "AnnotateSensitivity",
    "sqc.hessian": "AnnotateSensitivity(guided=True)",
    "sqc.sparse": "SplitOutliers",
    BITS: "AllocateBits",
    "sqc.codebook": "FitCodebook",
    "sqc.packed": "PackLayout",
    "sqc.lowered": "Lower",
}


class MissingMetadataError(RuntimeError):
    pass


def require_meta(node: torch.fx.Node, key: str) -> Any:
    """Read ``node.meta[key]`` or fail with the pass that should have written it."""
    try:
        return node.meta[key]
    except KeyError:
        site = node.meta.get(SITE)
        where = f" (linear {site.module})" if site is not None else ""
        raise MissingMetadataError(
            f"Node {node.name}{where} has no '{key}'. Run {PRODUCERS.get(key, 'the pass that writes it')} first."
        ) from None


def quantized_nodes(gm: torch.fx.GraphModule, scope: "frozenset[str] | None" = None) -> list[torch.fx.Node]:
    """Linear call nodes whose weight is to be quantized (only weights named in ``scope`` when given)."""
    return [n for n in linear_nodes(gm)
            if n.meta[SITE].quantized and (scope is None or n.meta[SITE].weight in scope)]


def unique_sites(gm: torch.fx.GraphModule, scope: "frozenset[str] | None" = None
                 ) -> list[tuple[LinearSite, list[torch.fx.Node]]]:
    """Quantized weights (those in ``scope`` when given) with the nodes that use them, in first-use order."""
    by_weight: dict[str, tuple[LinearSite, list[torch.fx.Node]]] = {}
    for n in quantized_nodes(gm, scope):
        s = n.meta[SITE]
        by_weight.setdefault(s.weight, (s, []))[1].append(n)
    return list(by_weight.values())


class TensorStore:
    """Large per-weight tensors produced by passes, by kind and weight name."""

    def __init__(self) -> None:
        self._data: dict[str, dict[str, Any]] = {}

    def put(self, kind: str, key: str, value: Any) -> str:
        self._data.setdefault(kind, {})[key] = value
        return key

    def get(self, kind: str, key: str) -> Any:
        try:
            return self._data[kind][key]
        except KeyError:
            raise MissingMetadataError(
                f"no '{kind}' entry for {key} in the tensor store. "
                f"Run {PRODUCERS.get('sqc.' + kind, 'the pass that writes it')} first."
            ) from None

    def drop(self, kind: str) -> None:
        """Free a kind once no later pass needs it (keeps peak memory bounded)."""
        self._data.pop(kind, None)

    def kinds(self) -> list[str]:
        return list(self._data)


@dataclasses.dataclass
class CompileContext:
    """Everything a pass may read besides the graph."""

    model: nn.Module
    config: QuantConfig
    calibration: Sequence[tuple] | None = None
    loss_fn: Callable[[Any, tuple], torch.Tensor] | None = None
    call_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    target: Any = None
    store: TensorStore = dataclasses.field(default_factory=TensorStore)
    layers: dict[str, LayerReport] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    progress: Callable[[str, int, int], None] | None = None
    #: fused sibling groups (:class:`sqc.runtime.fused.FusedGroup`), written by FuseSiblingLinears
    fused: list = dataclasses.field(default_factory=list)
    #: the weights the per-layer passes work on (None: all). The streamed pipeline
    #: (:mod:`sqc.streaming`) runs them one decoder layer at a time
    scope: "frozenset[str] | None" = None
    #: the data-parallel job (:class:`sqc.parallel.Group`: ``rank``, ``world``, ``share_rows``);
    #: None in a one-process compile. FitCodebook splits row chunks across its ranks
    group: Any = None

    def layer(self, site: LinearSite) -> LayerReport:
        rep = self.layers.get(site.module)
        if rep is None:
            rep = LayerReport(site.module, site.in_features, site.out_features, site.quantized, site.skip_reason)
            self.layers[site.module] = rep
        return rep

    def tick(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)


@dataclasses.dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


class Pass:
    """Base class: subclasses set ``name``, ``requires``, ``ensures`` and implement ``run``."""

    name: str = "pass"
    requires: tuple[str, ...] = (SITE,)
    ensures: tuple[str, ...] = ()

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        return self.run(gm, ctx)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class TimingInstrument:
    """Records each pass's wall time into ``ctx.stage_seconds``."""

    def before(self, p: Pass, gm, ctx) -> None:
        self._t0 = time.perf_counter()

    def after(self, p: Pass, result: PassResult, ctx) -> None:
        ctx.stage_seconds[p.name] = ctx.stage_seconds.get(p.name, 0.0) + time.perf_counter() - self._t0


class IRDumpInstrument:
    """Writes the graph's readable form after each pass into ``directory``."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = os.fspath(directory)
        self._i = 0

    def before(self, p: Pass, gm, ctx) -> None:
        pass

    def after(self, p: Pass, result: PassResult, ctx) -> None:
        os.makedirs(self.directory, exist_ok=True)
        self._i += 1
        path = os.path.join(self.directory, f"{self._i:02d}_{p.name}.txt")
        with open(path, "w") as fh:
            fh.write(str(result.graph_module.graph))


class PassManager:
    """Runs a flat list of passes, checking each one's contract."""

    def __init__(self, passes: Iterable[Pass], instruments: Iterable[Any] = ()) -> None:
        self.passes = list(passes)
        self.instruments = list(instruments)

    def _check(self, gm, keys: Sequence[str], p: Pass, when: str, ctx: CompileContext) -> None:
        for node in quantized_nodes(gm, ctx.scope):
            for key in keys:
                if key not in node.meta:
                    if when == "before":
                        require_meta(node, key)  # raises with the fix
                    raise MissingMetadataError(
                        f"pass {p.name} promised '{key}' but node {node.name} "
                        f"({node.meta[SITE].module}) does not have it"
                    )

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> torch.fx.GraphModule:
        for p in self.passes:
            self._check(gm, p.requires, p, "before", ctx)
            for inst in self.instruments:
                inst.before(p, gm, ctx)
            log.info("sqc: running %s", p.name)
            result = p(gm, ctx)
            for inst in self.instruments:
                inst.after(p, result, ctx)
            gm = result.graph_module
            self._check(gm, p.ensures, p, "after", ctx)
        return gm
