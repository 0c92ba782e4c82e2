"""FitCodebook: one sensitivity-weighted k-means codebook per output row.

Reads ``sqc.site``, ``sqc.fisher``, ``sqc.sparse`` (and ``sqc.bits``, each
layer's width, where AllocateBits ran); writes ``sqc.codebook``
(store key of ``(lut, codes)``: the table in the config's table dtype and the
``[R, K]`` uint8 codes, each the nearest entry of the *stored* table).

Rows of all layers that share ``in_features`` and width are fitted together in JAX
(:func:`sqc.quant.kmeans.fit_rows`: jit + vmap over rows, in fixed-size
chunks), in batches of whole layers so memory stays bounded. Split-off
entries carry zero weight; without calibration every weight counts equally.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from ..quant.kmeans import fit_rows, part_rows
from ..runtime.layout import row_chunks
from ..trace import SITE
from .base import CompileContext, Pass, PassResult, layer_bits, require_meta, unique_sites

__all__ = ["FitCodebook", "assign_codes", "table_dtype"]

_TABLE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_MAX_ROWS_PER_BATCH = 1 << 17


def table_dtype(config) -> torch.dtype:
    """The torch dtype of ``config.table_dtype``."""
    return _TABLE_DTYPES[config.table_dtype.value]


def assign_codes(w: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table entry for every weight (tables ascending per row)."""
    c = lut.float()
    mid = 0.5 * (c[:, 1:] + c[:, :-1])
    w = w.float()
    if c.shape[1] > 16:
        return torch.searchsorted(mid.contiguous(), w.contiguous(), side="left").to(torch.uint8)
    # code = number of boundaries strictly below w; C - 1 vectorised compares
    # beat a binary search per weight for small tables
    codes = torch.zeros(w.shape, dtype=torch.uint8)
    for k in range(mid.shape[1]):
        codes += w > mid[:, k : k + 1]
    return codes


def _errors(w, lut, codes, active, fisher) -> tuple[float, float, float | None]:
    """Per-weight means over the matrix of the squared error (sparse entries are exact: zero), of
    ``w**2``, and of the Fisher-weighted squared error; in row blocks (no matrix-sized temporaries)."""
    table = lut.float()
    sums = torch.zeros(3, dtype=torch.float64)
    for lo, hi in row_chunks(w.shape[0], w.shape[1]):
        wb = w[lo:hi]
        err = torch.gather(table[lo:hi], 1, codes[lo:hi].long()).sub_(wb).square_().mul_(active[lo:hi])
        sums[0] += err.sum(dtype=torch.float64)
        sums[1] += wb.square().sum(dtype=torch.float64)
        if fisher is not None:
            sums[2] += err.mul_(fisher[lo:hi]).sum(dtype=torch.float64)
    mse, power, weighted = (float(v) / w.numel() for v in sums)
    return mse, power, (None if fisher is None else weighted)


def _batches(members: list, max_rows: int):
    """Consecutive runs of whole layers with at most ``max_rows`` rows (one layer may exceed it)."""
    batch, rows = [], 0
    for item in members:
        if batch and rows + item[0].out_features > max_rows:
            yield batch
            batch, rows = [], 0
        batch.append(item)
        rows += item[0].out_features
    if batch:
        yield batch


def _check_table_range(module: str, cents: torch.Tensor, lut: torch.Tensor, table_dtype: torch.dtype) -> None:
    """A centroid beyond the table dtype's range would be stored as +-inf (NaN outputs): refuse it."""
    bad = ~torch.isfinite(lut)
    if bad.any():
        r = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"layer {module}: row {r} needs a table entry of {float(cents[r].abs().max()):.6g}, beyond "
            f"{str(table_dtype).removeprefix('torch.')}'s range ({torch.finfo(table_dtype).max:.6g}); use "
            "QuantConfig(table_dtype='float32') or 'bfloat16', or skip the layer with QuantConfig(skip=(...))"
        )


class FitCodebook(Pass):
    name = "FitCodebook"
    requires = (SITE, "sqc.fisher", "sqc.sparse")
    ensures = ("sqc.codebook",)

    def run(self, gm, ctx: CompileContext) -> PassResult:
        cfg = ctx.config
        tdt = table_dtype(cfg)
        params = dict(ctx.model.named_parameters())
        groups: dict[tuple[int, int], list] = defaultdict(list)
        for site, nodes in unique_sites(gm, ctx.scope):
            groups[site.in_features, layer_bits(nodes, cfg)].append((site, nodes))

        done = 0
        total = sum(len(v) for v in groups.values())
        for (_, bits), members in sorted(groups.items()):
            for batch in _batches(members, _MAX_ROWS_PER_BATCH):
                self._fit_batch(batch, params, ctx, tdt, bits)
                done += len(batch)
                ctx.tick("fit codebooks", done, total)
        return PassResult(gm, False, {"layers": total})

    def _fit_batch(self, batch, params, ctx: CompileContext, table_dtype, bits: int) -> None:
        cfg = ctx.config
        ws, fs, acts = [], [], []
        any_fisher = False
        for site, nodes in batch:
            w = params[site.weight].detach()  # finite: SplitOutliers checked it
            fkey = require_meta(nodes[0], "sqc.fisher")
            mask = ctx.store.get("sparse", require_meta(nodes[0], "sqc.sparse"))
            f = ctx.store.get("fisher", fkey) if fkey is not None else None
            any_fisher |= f is not None
            ws.append(w.float().numpy())
            fs.append(None if f is None else f.numpy())
            acts.append((~mask).numpy())
        group = ctx.group
        part = (group.rank, group.world) if group is not None else (0, 1)
        res = fit_rows(
            ws, fs if any_fisher else None, acts, bits, iters=cfg.kmeans_iters, chunk_rows=cfg.chunk_rows,
            part=part,
        )
        if part[1] > 1:  # every rank solved its run of row chunks: the others' rows arrive by broadcast
            cents_all = torch.from_numpy(res.centroids)
            group.share_rows(cents_all, part_rows(cents_all.shape[0], cfg.chunk_rows, part[1]))
        start = 0
        for idx, (site, nodes) in enumerate(batch):
            w_np, f_np, act = ws[idx], fs[idx], acts[idx]
            ws[idx] = fs[idx] = acts[idx] = None  # this weight's float copy goes when its loop ends
            R = site.out_features
            cents = torch.from_numpy(res.centroids[start : start + R])
            start += R
            # the solver returns ascending centroids; rounding keeps the order
            lut = cents.to(table_dtype)
            _check_table_range(site.module, cents, lut, table_dtype)
            w = torch.from_numpy(w_np)
            codes = assign_codes(w, lut)
            key = ctx.store.put("codebook", site.weight, (lut, codes))
            for n in nodes:
                n.meta["sqc.codebook"] = key
            mse, power, weighted = _errors(w, lut, codes, torch.from_numpy(act),
                                           None if f_np is None else torch.from_numpy(f_np))
            rep = ctx.layer(site)
            rep.bits = bits
            rep.mse = mse
            rep.weight_power = power
            rep.weighted_error = mse if weighted is None else weighted
