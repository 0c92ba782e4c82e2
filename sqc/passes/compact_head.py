"""CompactHead: the output projection (``lm_head``) becomes int8 with one fp32 scale per row.

Reads ``sqc.site``; writes ``sqc.head`` on the rewritten node. Matched on the
graph: an ``aten.linear`` left in floating point (the decoder-layer linears are
already lowered) whose result reaches the graph's output through shape-only
ops, projecting to at least as many features as it reads. A weight tied to the
input embedding stays tied there: the embedding keeps the float table (a row
lookup reads one row of it per token), the head gets its own int8 copy.

Why int8: the head reads its whole weight once per generated token (SmolLM2:
49152 x 576, 113 MB in fp32, more than all quantized layers together). On
SmolLM2's tutorial text int8 per row moved perplexity by +0.006 %; the 4-bit
per-row table format (the decoder layers' own, kernels included) moved it by
+45 %. See :mod:`sqc.runtime.int8` for the format and its kernel.
"""
from __future__ import annotations

import torch

from ..runtime.int8 import Int8Linear
from ..runtime.modules import replace_module
from ..trace import SITE
from .base import CompileContext, Pass, PassResult

__all__ = ["CompactHead", "output_projections"]

LINEAR = torch.ops.aten.linear.default
OP = torch.ops.sqc.int8_linear.default
_SHAPE_OPS = {
    torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.slice.Tensor,
    torch.ops.aten.select.int, torch.ops.aten.contiguous.default, torch.ops.aten.alias.default,
    torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype, torch.ops.aten.clone.default,
}


def _reaches_output(node: torch.fx.Node) -> bool:
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        for u in n.users:
            if u.op == "output":
                return True
            if u in seen:
                continue
            seen.add(u)
            if u.op == "call_function" and (u.target in _SHAPE_OPS or u.target.__name__ == "getitem"):
                todo.append(u)
    return False


def output_projections(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Floating-point linear calls whose result is (a reshaped view of) a graph output, widening or square."""
    found = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not LINEAR or SITE not in n.meta:
            continue
        site = n.meta[SITE]
        if site.quantized or site.out_features < site.in_features:
            continue
        if _reaches_output(n):
            found.append(n)
    return found


def _owner(node: torch.fx.Node) -> str | None:
    stack = list(node.meta.get("nn_module_stack", {}).values())
    return stack[-1][0] if stack else None


class CompactHead(Pass):
    name = "CompactHead"
    requires = (SITE,)
    ensures = ()

    def run(self, gm, ctx: CompileContext) -> PassResult:
        graph = gm.graph
        done = []
        for node in output_projections(gm):
            site = node.meta[SITE]
            name = _owner(node)
            try:
                old = ctx.model.get_submodule(name) if name else None
            except AttributeError:
                old = None
            if not isinstance(old, torch.nn.Linear):
                continue
            new_mod = Int8Linear.from_float(old.weight, old.bias)
            replace_module(ctx.model, name, new_mod)
            k = len(done)
            gm.register_buffer(f"sqc_head{k}_qweight", new_mod.qweight)
            gm.register_buffer(f"sqc_head{k}_scale", new_mod.scale)
            x = node.args[0]
            b_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            with graph.inserting_before(node):
                q = graph.get_attr(f"sqc_head{k}_qweight")
                s = graph.get_attr(f"sqc_head{k}_scale")
                new = graph.call_function(OP, (x, q, s, b_node))
            new.meta.update(node.meta)
            new.meta["sqc.head"] = "int8"
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            rep = ctx.layer(site)
            rep.kernel = new_mod.kernel
            rep.packed_bytes = {"qweight": new_mod.qweight.numel(), "scale": 4 * new_mod.scale.numel()}
            rep.notes.append("output projection: int8 per row (QuantConfig.head='float' keeps it in floating point)")
            if name != site.module:
                rep.notes.append(f"runs as module {name}")
            done.append(name)
        graph.lint()
        gm.recompile()
        return PassResult(gm, bool(done), {"heads": done})
