"""PackLayout: codes into int32 words, the sparse set into CSR (the canonical layout).

Reads ``sqc.site``, ``sqc.sparse``, ``sqc.codebook`` (and ``sqc.bits`` where a
budget chose the width); writes ``sqc.packed``
(store key of a :class:`sqc.runtime.layout.PackedLinear`). The bit layout is
documented in :mod:`sqc.runtime.layout`. Sparse values are the original
weights in their own dtype; column indices use the narrowest integer type.
Frees the Fisher, mask and codebook stores afterwards.
"""
from __future__ import annotations

import torch

from ..runtime.layout import PackedLinear, col_dtype_for, pack_codes
from ..trace import SITE
from .base import CompileContext, Pass, PassResult, layer_bits, require_meta, unique_sites

__all__ = ["PackLayout", "to_csr"]


def to_csr(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow int32, col narrow int, val in weight's dtype) of ``weight`` at ``mask``, row-major."""
    R, K = weight.shape
    idx = torch.nonzero(mask, as_tuple=False)  # row-major order
    counts = torch.bincount(idx[:, 0], minlength=R) if idx.numel() else torch.zeros(R, dtype=torch.int64)
    crow = torch.zeros(R + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(counts, 0)
    if int(crow[-1]) >= 1 << 31:
        raise ValueError(f"{int(crow[-1])} sparse values do not fit int32 row pointers")
    col = idx[:, 1].to(col_dtype_for(K))
    val = weight.detach()[mask].clone()
    return crow.to(torch.int32), col, val


class PackLayout(Pass):
    name = "PackLayout"
    requires = (SITE, "sqc.sparse", "sqc.codebook")
    ensures = ("sqc.packed",)

    def run(self, gm, ctx: CompileContext) -> PassResult:
        params = dict(ctx.model.named_parameters())
        for site, nodes in unique_sites(gm, ctx.scope):
            w = params[site.weight].detach()
            mask = ctx.store.get("sparse", require_meta(nodes[0], "sqc.sparse"))
            lut, codes = ctx.store.get("codebook", require_meta(nodes[0], "sqc.codebook"))
            crow, col, val = to_csr(w, mask)
            bits = layer_bits(nodes, ctx.config)
            packed = PackedLinear(
                bits=bits,
                in_features=site.in_features,
                out_features=site.out_features,
                codes=pack_codes(codes, bits),
                lut=lut.contiguous(),
                crow=crow,
                col=col,
                val=val,
            )
            key = ctx.store.put("packed", site.weight, packed)
            for n in nodes:
                n.meta["sqc.packed"] = key
            ctx.layer(site).packed_bytes = packed.nbytes()
        for kind in ("fisher", "sparse", "codebook"):
            ctx.store.drop(kind)
        return PassResult(gm, False, {})
