"""SplitOutliers: choose the entries kept exactly in the sparse part.

Reads ``sqc.site``, ``sqc.fisher``; writes ``sqc.sparse`` (store key of a
boolean mask). Per matrix: the top ``outlier_pct`` % of ``|w|`` united with the
top ``sensitive_pct`` % of Fisher values; exact counts, ties by index
(:mod:`sqc.quant.sparse`).
"""
from __future__ import annotations

import torch

from ..quant.sparse import sparse_mask
from ..trace import SITE
from .base import CompileContext, Pass, PassResult, require_meta, unique_sites

__all__ = ["SplitOutliers", "check_finite"]


def check_finite(module: str, weight: torch.Tensor) -> None:
    bad = ~torch.isfinite(weight)
    if bad.any():
        r, c = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"layer {module}: weight has {int(bad.sum())} NaN/Inf values (first at [{r}, {c}]); "
            "sqc cannot quantize it. Fix the checkpoint or skip the layer with QuantConfig(skip=(...))."
        )


class SplitOutliers(Pass):
    name = "SplitOutliers"
    requires = (SITE, "sqc.fisher")
    ensures = ("sqc.sparse",)

    def run(self, gm, ctx: CompileContext) -> PassResult:
        cfg = ctx.config
        params = dict(ctx.model.named_parameters())
        total_nnz = 0
        for site, nodes in unique_sites(gm, ctx.scope):
            w = params[site.weight].detach()
            check_finite(site.module, w)
            fkey = require_meta(nodes[0], "sqc.fisher")
            fisher = ctx.store.get("fisher", fkey) if fkey is not None else None
            mask = sparse_mask(w, fisher, cfg.outlier_pct, cfg.sensitive_pct)
            key = ctx.store.put("sparse", site.weight, mask)
            for n in nodes:
                n.meta["sqc.sparse"] = key
            nnz = int(mask.sum())
            total_nnz += nnz
            rep = ctx.layer(site)
            rep.sparse_nnz = nnz
            rep.sparse_pct = 100.0 * nnz / w.numel()
            if fisher is None and cfg.sensitive_pct > 0:
                rep.notes.append("no Fisher information: sensitive_pct ignored")
        return PassResult(gm, False, {"sparse_nnz": total_nnz})
