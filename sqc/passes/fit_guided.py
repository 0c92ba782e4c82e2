"""FitGuided: refit every codebook to the layer's gradient-weighted output error.

Reads ``sqc.site``, ``sqc.hessian``, ``sqc.sparse``, ``sqc.codebook`` (the
k-means start); writes ``sqc.codebook`` (same store kind, same format: a
table in the config's table dtype and ``[R, K]`` uint8 codes, which need not
be the nearest entries any more). Runs after :class:`FitCodebook` in guided
mode only (``QuantConfig(fit="guided")``); the math is
:func:`sqc.quant.guided.guided_fit`. Sparse positions are excluded from the
objective and stay exact. Each layer's report gets the objective at the
start and at the end; the Hessians are freed afterwards.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from ..quant.guided import guided_fit
from ..quant.kmeans import _workers
from ..trace import SITE
from .base import CompileContext, Pass, PassResult, require_meta, unique_sites

__all__ = ["FitGuided"]


class FitGuided(Pass):
    name = "FitGuided"
    requires = (SITE, "sqc.hessian", "sqc.sparse", "sqc.codebook")
    ensures = ("sqc.codebook",)

    def run(self, gm, ctx: CompileContext) -> PassResult:
        cfg = ctx.config
        params = dict(ctx.model.named_parameters())
        sites = unique_sites(gm, ctx.scope)

        def fit_layer(item):
            site, nodes = item
            w = params[site.weight].detach().float()
            h = ctx.store.get("hessian", require_meta(nodes[0], "sqc.hessian"))
            mask = ctx.store.get("sparse", require_meta(nodes[0], "sqc.sparse"))
            lut0, codes0 = ctx.store.get("codebook", require_meta(nodes[0], "sqc.codebook"))
            fit = guided_fit(w, h, ~mask, lut0, codes0, iters=cfg.guided_iters, damp=cfg.guided_damp,
                             shrink=cfg.guided_shrink, table_dtype=lut0.dtype)
            return w, mask, fit

        start = end = 0.0
        # layers are independent; the column loops run single-threaded in XLA, so one layer per core
        with ThreadPoolExecutor(max_workers=_workers()) as pool:
            for i, ((site, nodes), (w, mask, fit)) in enumerate(zip(sites, pool.map(fit_layer, sites))):
                ctx.store.put("codebook", require_meta(nodes[0], "sqc.codebook"), (fit.lut.contiguous(), fit.codes))
                rep = ctx.layer(site)
                rep.layer_objective_start, rep.layer_objective = fit.objective_start, fit.objective
                # the per-weight figures of the report describe the final codebook
                err = (torch.gather(fit.lut.float(), 1, fit.codes.long()) - w) ** 2
                err.mul_(~mask)
                rep.mse = float(err.sum(dtype=torch.float64)) / w.numel()
                fkey = require_meta(nodes[0], "sqc.fisher")
                if fkey is not None:
                    fisher = ctx.store.get("fisher", fkey)
                    rep.weighted_error = float(err.mul_(fisher).sum(dtype=torch.float64)) / w.numel()
                start += fit.objective_start
                end += fit.objective
                ctx.tick("guided fit", i + 1, len(sites))
        ctx.store.drop("hessian")
        return PassResult(gm, False, {"layers": len(sites), "objective_start": start, "objective": end})
