"""FuseSiblingLinears: lowered linears that read the same input tensor become one packed layer, one op call.

Reads ``sqc.site``, ``sqc.lowered``; writes ``sqc.fused`` (the group's member
names) on the fused op node. Matching is on the graph: ``sqc.lut_linear``
nodes whose input is the same node (q/k/v after a norm; gate/up in a SwiGLU
MLP), with equal input width, bits and storage dtypes, each weight used once.
Their packed weights are stacked along rows (GQA's narrower k/v and any
biases come along; a member without a bias has zeros there; sparse counts may
differ), so the fused result's column slices are exactly the members' outputs.

Two rewrites happen together, as in :class:`~sqc.passes.lower.Lower`:

* in the graph, the members' op nodes become one op node on the stacked
  buffers, followed by one ``aten.slice`` per member;
* in the eager model, the members become views of one fused
  :class:`~sqc.runtime.qlinear.SqcLinear` (:func:`sqc.runtime.fused.fuse_layers`):
  one kernel call per group when the siblings run on the same input.

The groups are listed in ``ctx.fused`` (and the compile report); kernels are
attached to the fused layers, not to their members.
"""
from __future__ import annotations

import torch

from ..runtime.fused import fuse_layers
from ..runtime.qlinear import SqcLinear
from ..trace import SITE
from .base import CompileContext, Pass, PassResult

__all__ = ["FuseSiblingLinears", "sibling_groups"]

OP = torch.ops.sqc.lut_linear.default
SLICE = torch.ops.aten.slice.Tensor


def _signature(gm, node):
    """What must agree for two lowered calls to share one kernel: input node, width, bits, storage dtypes."""
    owner = node.args[1].target.rpartition(".")[0]
    sub = gm.get_submodule(owner) if owner else gm
    return (node.args[0], node.args[8], node.args[7], sub.sqc_lut.dtype, sub.sqc_val.dtype)


def sibling_groups(gm: torch.fx.GraphModule, scope=None) -> list[list[torch.fx.Node]]:
    """Groups (in graph order, two or more nodes each) of lowered linear calls that can be fused; with
    ``scope`` (a set of weight names) only calls of those weights."""
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP and SITE in n.meta
             and (scope is None or n.meta[SITE].weight in scope)]
    uses: dict[str, int] = {}
    for n in calls:
        uses[n.meta[SITE].weight] = uses.get(n.meta[SITE].weight, 0) + 1
    groups: dict[tuple, list[torch.fx.Node]] = {}
    for n in calls:
        if uses[n.meta[SITE].weight] == 1:  # a weight called twice (tied, shared) stays on its own
            groups.setdefault(_signature(gm, n), []).append(n)
    return [g for g in groups.values() if len(g) > 1]


class FuseSiblingLinears(Pass):
    name = "FuseSiblingLinears"
    requires = (SITE, "sqc.lowered")
    ensures = ()

    def run(self, gm, ctx: CompileContext) -> PassResult:
        graph = gm.graph
        fused_groups = []
        k = 0  # the streamed pipeline fuses one decoder layer at a time: names stay unique across runs
        for nodes in sibling_groups(gm, ctx.scope):
            names = [n.meta[SITE].module for n in nodes]
            members = [ctx.model.get_submodule(name) for name in names]
            if not all(isinstance(m, SqcLinear) for m in members):
                continue
            group = fuse_layers(members, names)
            fused_groups.append(group)
            # the graph: register the stacked buffers once, one op node, a slice per member
            stacked = group.layer.packed
            while f"sqc_fused{k}_codes" in gm._buffers:
                k += 1
            prefix = f"sqc_fused{k}"
            for t in ("codes", "lut", "crow", "col", "val"):
                gm.register_buffer(f"{prefix}_{t}", getattr(stacked, t))
            if group.layer.bias is not None:
                gm.register_buffer(f"{prefix}_bias", group.layer.bias)
            x = nodes[0].args[0]
            with graph.inserting_before(nodes[0]):  # sibling_groups lists nodes in graph order
                getters = [graph.get_attr(f"{prefix}_{t}") for t in ("codes", "lut", "crow", "col", "val")]
                b = graph.get_attr(f"{prefix}_bias") if group.layer.bias is not None else None
                new = graph.call_function(OP, (x, *getters, b, stacked.bits, stacked.in_features))
            new.meta["sqc.lowered"] = nodes[0].meta.get("sqc.lowered")
            new.meta["sqc.fused"] = list(names)
            for node, (s, e) in zip(nodes, group.bounds):
                with graph.inserting_after(new):
                    sl = graph.call_function(SLICE, (new, -1, s, e))
                sl.meta.update({key: v for key, v in node.meta.items() if key not in ("sqc.lowered",)})
                dead = [a for a in node.args[1:7] if isinstance(a, torch.fx.Node)]
                node.replace_all_uses_with(sl)
                graph.erase_node(node)
                for a in dead:  # the member's own graph buffers: the stacked ones replace them
                    if not a.users:
                        owner, _, attr = a.target.rpartition(".")
                        graph.erase_node(a)
                        sub = gm.get_submodule(owner) if owner else gm
                        if attr.startswith("sqc_") and attr in sub._buffers:
                            del sub._buffers[attr]
            for name in names:
                ctx.layers[name].notes.append(f"fused with {[n for n in names if n != name]}")
        ctx.fused = ctx.fused + fused_groups
        graph.lint()
        gm.recompile()
        return PassResult(gm, bool(fused_groups), {"fused_groups": len(fused_groups),
                                                   "fused_layers": sum(len(g.names) for g in fused_groups)})
