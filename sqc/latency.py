"""Per-shape latency of the kernel each quantized layer runs, against torch ``F.linear``.

Measured in one run, same threads: for every distinct (out, in, bits) of the
compiled model and batch sizes 1 / 8 / 64, the median of ``repeats`` calls of
the layer's op, of ``F.linear`` on the fp32 de-quantized weight and on its
bf16 copy.
"""
from __future__ import annotations

from typing import Any

import torch

from .codegen.build import median_ms

__all__ = ["measure_kernels"]


@torch.no_grad()
def measure_kernels(compiled, batches=(1, 8, 64), repeats: int = 15) -> list[dict[str, Any]]:
    seen: dict[tuple, list[str]] = {}
    mods = {}
    for name, m in compiled.quantized_modules().items():
        key = (m.out_features, m.in_features, m.bits)
        seen.setdefault(key, []).append(name)
        mods.setdefault(key, m)
    rows = []
    for key, m in mods.items():
        w32 = m.packed.dequantize(torch.float32)
        w16 = w32.to(torch.bfloat16)
        for b in batches:
            x = torch.randn(b, m.in_features)
            x16 = x.to(torch.bfloat16)
            rows.append({
                "shape": [key[0], key[1]],
                "bits": key[2],
                "batch": b,
                "kernel": m.kernel,
                "layers": seen[key],
                "sqc_ms": median_ms(lambda: m(x), repeats),
                "torch_fp32_ms": median_ms(lambda: torch.nn.functional.linear(x, w32), repeats),
                "torch_bf16_ms": median_ms(lambda: torch.nn.functional.linear(x16, w16), repeats),
                "threads": torch.get_num_threads(),
            })
    return rows
