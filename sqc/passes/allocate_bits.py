"""AllocateBits: a size budget spent where the loss says (``QuantConfig(bits_per_weight=...)``).

Reads ``sqc.site``, ``sqc.fisher``, ``sqc.sparse`` (and ``sqc.hessian`` in
guided mode); writes ``sqc.bits`` (each node's code width), which FitCodebook
and PackLayout use instead of ``QuantConfig.bits``. Runs after SplitOutliers
(the sparse part's size is known) and before FitCodebook.

1. **Units.** Linears that FuseSiblingLinears will fuse (one call each,
   reading the same input node, equal input width and weight dtype: q/k/v,
   gate/up) share a width; every other quantized linear is a unit of its own.
2. **Sensitivity.** For each width in :data:`sqc.config.BUDGET_WIDTHS`, the
   fit's objective is measured on ``SAMPLE_ROWS`` evenly spaced rows of every
   layer and scaled to the layer's rows (rows are fitted independently, so
   that is an unbiased estimate): the Fisher-weighted squared error of the
   k-means fit (SqueezeLLM's objective), or in guided mode the layer-output
   objective ``e^T H e`` of that k-means fit (the guided fit's start). Both
   estimate the end loss's increase, so they add up across layers.
3. **Knapsack.** Each unit's stored bits at each width (codes, tables and the
   sparse part, exactly as the artifact stores them) and those losses go to
   :func:`sqc.quant.budget.allocate`, which picks the widths with the least
   total loss whose stored bits per weight stay within the budget.

The report gets each layer's bits (``LayerReport.bits``) and a note with the
counts; the estimate runs the sampled rows of all layers of one input width
through one k-means call per width.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch

from ..config import BUDGET_WIDTHS, FitMode
from ..quant.budget import allocate
from ..quant.guided import row_objectives
from ..quant.kmeans import fit_rows
from ..runtime.layout import col_dtype_for, words_per_row
from ..trace import SITE
from .base import BITS, CompileContext, Pass, PassResult, require_meta, unique_sites
from .fit_codebook import assign_codes, table_dtype

__all__ = ["AllocateBits", "budget_units", "stored_bits"]

#: rows per layer whose fits estimate the layer's objective at each width (about 6 % of SmolLM2's rows
#: per width; the estimate's cost is about 5 % of a k-means compile there)
SAMPLE_ROWS = 32

BUDGET_NEEDS_DATA = (
    "a bits budget (QuantConfig.bits_per_weight, the b* presets, --bpw) chooses each layer's width from its "
    "measured sensitivity, which needs calibration data: pass calibration=[...] (or sensitivity=...), or use a "
    "uniform preset such as 'w3-s0.45'"
)


def stored_bits(out_features: int, in_features: int, bits: int, nnz: int, table_bytes: int, val_bytes: int) -> int:
    """Stored bits of a packed layer: codes, tables, sparse values, column indices and row pointers."""
    nbytes = (out_features * words_per_row(in_features, bits) * 4 + out_features * (1 << bits) * table_bytes
              + nnz * (val_bytes + col_dtype_for(in_features).itemsize) + (out_features + 1) * 4)
    return 8 * nbytes


def budget_units(sites, params: dict, fuse: bool) -> list[list[int]]:
    """Indices into ``sites`` grouped into units that share a width (module docstring, step 1)."""
    units: dict[tuple, list[int]] = {}
    for i, (site, nodes) in enumerate(sites):
        node = nodes[0]
        if fuse and len(nodes) == 1 and isinstance(node.args[0], torch.fx.Node):
            key = ("fuse", node.args[0], site.in_features, params[site.weight].dtype)
        else:
            key = ("own", i)
        units.setdefault(key, []).append(i)
    return list(units.values())


def _sample(R: int) -> np.ndarray:
    n = min(R, SAMPLE_ROWS)
    return (np.arange(n, dtype=np.int64) * R) // n


class AllocateBits(Pass):
    name = "AllocateBits"
    requires = (SITE, "sqc.fisher", "sqc.sparse")
    ensures = (BITS,)

    def run(self, gm, ctx: CompileContext) -> PassResult:
        cfg = ctx.config
        if cfg.bits_per_weight is None:
            raise ValueError("AllocateBits runs for a bits budget only: QuantConfig(bits_per_weight=...)")
        guided = cfg.fit is FitMode.GUIDED
        params = dict(ctx.model.named_parameters())
        sites = unique_sites(gm, ctx.scope)
        tdt = table_dtype(cfg)
        widths = BUDGET_WIDTHS
        n_w = len(widths)

        # 2. sensitivity: sampled rows of every layer, one k-means call per (input width, bits)
        by_k: dict[int, list[int]] = defaultdict(list)
        masks, samples = [], []
        for i, (site, nodes) in enumerate(sites):
            if require_meta(nodes[0], "sqc.fisher") is None:
                raise ValueError(BUDGET_NEEDS_DATA)
            masks.append(ctx.store.get("sparse", require_meta(nodes[0], "sqc.sparse")))
            samples.append(_sample(site.out_features))
            by_k[site.in_features].append(i)
        loss = np.zeros((len(sites), n_w))
        for K, members in sorted(by_k.items()):
            ws, fs, acts = [], [], []
            for i in members:
                site, nodes = sites[i]
                rows = torch.from_numpy(samples[i])
                ws.append(params[site.weight].detach()[rows].float().numpy())
                fs.append(ctx.store.get("fisher", require_meta(nodes[0], "sqc.fisher"))[rows].float().numpy())
                acts.append((~masks[i][rows]).numpy())
            fits = [fit_rows(ws, fs, acts, bits, iters=cfg.kmeans_iters, chunk_rows=cfg.chunk_rows)
                    for bits in widths]
            start = 0
            for i, w, f, a in zip(members, ws, fs, acts):
                site, nodes = sites[i]
                n = w.shape[0]
                wt, act = torch.from_numpy(w), torch.from_numpy(a)
                if guided:
                    h = ctx.store.get("hessian", require_meta(nodes[0], "sqc.hessian"))
                for j, res in enumerate(fits):
                    # the error of the stored table and its nearest codes, as FitCodebook makes them
                    lut = torch.from_numpy(res.centroids[start : start + n]).to(tdt)
                    e = (wt - torch.gather(lut.float(), 1, assign_codes(wt, lut).long())) * act
                    if guided:
                        obj = float(row_objectives(e, h, cfg.guided_damp, cfg.guided_shrink).sum())
                    else:
                        obj = float((e * e * torch.from_numpy(f)).sum(dtype=torch.float64))
                    if not math.isfinite(obj):
                        raise ValueError(f"layer {site.module}: its sensitivity estimate at {widths[j]} bits is not "
                                         "finite: the calibration statistics overflowed; check the calibration data")
                    loss[i, j] = obj * site.out_features / n
                start += n

        # 3. knapsack over units, sizes exact
        units = budget_units(sites, params, cfg.fuse)
        size = np.zeros((len(units), n_w))
        uloss = np.zeros((len(units), n_w))
        n_weights = 0
        for u, members in enumerate(units):
            for i in members:
                site, _ = sites[i]
                w = params[site.weight]
                nnz = int(masks[i].sum())
                n_weights += site.in_features * site.out_features
                for j, bits in enumerate(widths):
                    size[u, j] += stored_bits(site.out_features, site.in_features, bits, nnz, tdt.itemsize,
                                              w.element_size())
                uloss[u] += loss[i]
        budget = cfg.bits_per_weight * n_weights
        least = float(size.min(axis=1).sum()) / n_weights
        if least > cfg.bits_per_weight:
            raise ValueError(
                f"QuantConfig.bits_per_weight={cfg.bits_per_weight:g} is below the smallest size this model can be "
                f"stored in with its sparse part: {least:.3f} bits per weight (every layer at {widths[0]} bits); "
                "raise the budget or lower outlier_pct / sensitive_pct")
        alloc = allocate(size, uloss, budget)
        counts = defaultdict(int)
        for u, members in enumerate(units):
            bits = widths[int(alloc.choice[u])]
            for i in members:
                site, nodes = sites[i]
                for n in nodes:
                    n.meta[BITS] = bits
                counts[bits] += 1
        stored = alloc.bits / n_weights
        ctx.notes.append(
            f"bits budget {cfg.bits_per_weight:g} per weight: "
            + ", ".join(f"{counts[b]} layers at {b} bits" for b in widths if counts[b])
            + f" ({stored:.3f} stored bits per weight; widths chosen by the estimated "
            + ("layer-output objective" if guided else "Fisher-weighted error") + f", {len(units)} units)")
        return PassResult(gm, False, {"units": len(units), "bits_per_weight": stored,
                                      **{f"layers_{b}bit": counts[b] for b in widths}})
