"""Checking generated CUDA kernels against the reference op on a GPU (used by tests and benchmarks).

Needs torch with a GPU, no TVM: the kernels come as a fatbin plus plan
(:func:`sqc.codegen.cuda.build_check_bundle` writes one where TVM and nvcc
are). Every check draws fresh random layers and inputs, poisons the output
with NaN first, and compares with the reference op (:func:`torch.ops.sqc.lut_linear`)
evaluated in fp32 on the same fp16 inputs.
"""
from __future__ import annotations

from typing import Any

import torch

from .runtime import ops  # noqa: F401  (registers torch.ops.sqc.lut_linear)
from .runtime.cuda.chunks import to_chunk_words
from .runtime.layout import PackedLinear, pack_codes

__all__ = ["random_packed", "run_kernel", "check_kernel", "TOLERANCE", "CHECK_KEYS"]

#: the layer keys every kernel variant is checked on: odd row counts, in_features not a multiple of
#: a chunk, every width, every table / column / value dtype, one K wide enough for 288 threads along it
CHECK_KEYS = [
    {"rows": r, "in_features": k, "bits": b, "sparse": sp, "lut_dtype": lt, "col_dtype": ct, "val_dtype": vt}
    for r, k, b, sp, lt, ct, vt in [
        (53, 100, 3, True, "float16", "uint8", "float16"),
        (3, 33, 4, False, "float16", "uint8", "float32"),
        (1, 576, 2, True, "float16", "int16", "float32"),
        (576, 1536, 3, True, "float16", "int16", "float32"),
        (40, 1300, 4, True, "bfloat16", "int16", "bfloat16"),
        (130, 11008, 3, True, "float32", "int16", "float16"),
    ]
]

#: relative error ||y - ref|| / ||ref|| allowed against the fp32 reference on the same fp16 inputs
TOLERANCE = 1e-3

_DT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "uint8": torch.uint8,
       "int16": torch.int16, "int32": torch.int32}


def random_packed(key: dict[str, Any], gen: torch.Generator, density: float = 0.0045) -> PackedLinear:
    """A random packed layer for ``key`` (rows, in_features, bits, sparse, dtypes), drawn on ``gen``'s device:
    uniform codes, small per-row tables and, when sparse, each entry sparse with probability ``density`` (every
    row's count binomial; the first row keeps at least one)."""
    R, K, b = key["rows"], key["in_features"], key["bits"]
    dev = gen.device
    codes = torch.randint(0, 1 << b, (R, K), generator=gen, device=dev, dtype=torch.uint8)
    lut = (torch.randn((R, 1 << b), generator=gen, device=dev) * 0.05).to(_DT[key["lut_dtype"]])
    if key["sparse"]:
        mask = torch.rand((R, K), generator=gen, device=dev) < density
        mask[0, 0] = True  # at least one non-zero
        rows, cols = mask.nonzero(as_tuple=True)  # row by row, each row's columns ascending
        col = cols.to(_DT[key["col_dtype"]])
        crow = torch.zeros(R + 1, dtype=torch.int32, device=dev)
        crow[1:] = torch.bincount(rows, minlength=R).cumsum(0)
        val = (torch.randn(len(cols), generator=gen, device=dev) * 0.2).to(_DT[key["val_dtype"]])
    else:
        crow = torch.zeros(R + 1, dtype=torch.int32, device=dev)
        col = torch.zeros(0, dtype=_DT[key["col_dtype"]], device=dev)
        val = torch.zeros(0, dtype=_DT[key["val_dtype"]], device=dev)
    return PackedLinear(b, K, R, pack_codes(codes, b), lut, crow, col, val)


def run_kernel(module, symbol: str, packed: PackedLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Launch one kernel symbol on GPU tensors; y is poisoned with NaN first."""
    dev = x.device
    codes = packed.unpack()
    rows, cols = packed.sparse_coo()
    words = to_chunk_words(codes, packed.bits).to(dev)
    scode = codes[rows, cols].to(torch.uint8).to(dev)
    b16 = (bias if bias is not None else torch.zeros(packed.out_features)).to(dev, torch.float16)
    y = torch.full((x.shape[0], packed.out_features), float("nan"), dtype=torch.float16, device=dev)
    tensors = {"x": x, "w": words, "lut": packed.lut.to(dev), "crow": packed.crow.to(dev), "col": packed.col.to(dev),
               "val": packed.val.to(dev), "sc": scode, "bias": b16, "y": y}
    module.launch(symbol, x.shape[0], tensors, dev.index or 0)
    torch.cuda.synchronize(dev)
    return y


def check_kernel(module, symbol: str, key: dict[str, Any], n: int, gen: torch.Generator,
                 with_bias: bool = True) -> dict[str, Any]:
    """One fresh random layer and x (n rows): relative error of ``symbol`` against the reference op."""
    packed = random_packed(key, gen)
    bias = torch.randn(packed.out_features, generator=gen) * 0.1 if with_bias else None
    x = torch.randn((n, packed.in_features), generator=gen).to(torch.float16)
    y = run_kernel(module, symbol, packed, x.cuda(), bias)
    ref = torch.ops.sqc.lut_linear(
        x.float(), packed.codes, packed.lut, packed.crow, packed.col, packed.val,
        bias.to(torch.float16).float() if bias is not None else None, packed.bits, packed.in_features,
    )
    yf = y.float().cpu()
    unwritten = int(torch.isnan(yf).sum())
    err = float((yf - ref).norm() / ref.norm().clamp_min(1e-30))
    return {"symbol": symbol, "n": n, "rel_err": err, "unwritten": unwritten,
            "ok": unwritten == 0 and err <= TOLERANCE}
