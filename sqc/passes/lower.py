"""Lower: every quantized linear call becomes a call to ``torch.ops.sqc.lut_linear``.

Reads ``sqc.site``, ``sqc.packed``; writes ``sqc.lowered`` on the new op nodes.

Two rewrites happen together so that they cannot disagree:

* in the traced graph, ``aten.linear(x, W, b)`` becomes
  ``sqc.lut_linear(x, codes, lut, crow, col, val, b, bits, in_features)``
  reading buffers registered on the owning submodule; the float weight
  attribute is deleted;
* in the eager model, the owning ``nn.Linear`` is replaced by an
  :class:`sqc.runtime.qlinear.SqcLinear` holding the same tensors, which is
  what keeps Hugging Face ``generate()`` and dynamic shapes working.

The graph records the op's semantics: it calls the reference op. The eager
modules run the generated kernels attached after lowering (see
:func:`sqc.runtime.cpu.kernels.attach_cpu_kernels`), which compute the same function
up to fp32 summation order; with no kernel attached they call the very same op.
"""
from __future__ import annotations

import torch

from ..runtime.layout import PackedLinear
from ..runtime.modules import replace_module
from ..runtime.qlinear import SqcLinear
from ..trace import SITE
from .base import CompileContext, Pass, PassResult, require_meta, unique_sites

__all__ = ["Lower"]

OP = torch.ops.sqc.lut_linear.default


class Lower(Pass):
    name = "Lower"
    requires = (SITE, "sqc.packed")
    ensures = ("sqc.lowered",)

    def run(self, gm, ctx: CompileContext) -> PassResult:
        graph = gm.graph
        kernel = "reference"  # what the graph calls; generated kernels are attached to the modules after lowering
        n_calls = 0
        for site, nodes in unique_sites(gm, ctx.scope):
            packed: PackedLinear = ctx.store.get("packed", require_meta(nodes[0], "sqc.packed"))
            owner = gm.get_submodule(site.module) if site.module else gm
            for tname in PackedLinear.TENSORS:
                owner.register_buffer(f"sqc_{tname}", getattr(packed, tname))
            for node in nodes:
                x, w_node = node.args[0], node.args[1]
                b_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
                with graph.inserting_before(node):
                    getters = [
                        graph.get_attr(f"{site.module}.sqc_{t}" if site.module else f"sqc_{t}")
                        for t in PackedLinear.TENSORS
                    ]
                    new = graph.call_function(
                        OP, (x, *getters, b_node, packed.bits, packed.in_features)
                    )
                new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
                if "val" in node.meta:
                    new.meta["val"] = node.meta["val"]
                new.meta["sqc.lowered"] = kernel
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                if not w_node.users:
                    graph.erase_node(w_node)
                n_calls += 1
            # free the float weight held by the graph module
            wname = site.weight.rsplit(".", 1)[-1]
            if wname in owner._parameters:
                del owner._parameters[wname]
            # swap the eager module
            old = ctx.model.get_submodule(site.module)
            bias = old.bias if getattr(old, "bias", None) is not None else None
            replace_module(ctx.model, site.module, SqcLinear(packed, bias))
            ctx.layer(site).kernel = kernel
        ctx.store.drop("packed")
        graph.lint()
        gm.recompile()
        return PassResult(gm, True, {"lowered_calls": n_calls})
