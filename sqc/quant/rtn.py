"""Per-row uniform round-to-nearest: the baseline sqc's codebooks must beat."""
from __future__ import annotations

import torch

__all__ = ["rtn_quantize"]


def rtn_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize each row to ``2**bits`` evenly spaced levels between its min and max.

    Returns the de-quantized matrix in float32.
    """
    w = weight.detach().float()
    lo = w.min(dim=1, keepdim=True).values
    hi = w.max(dim=1, keepdim=True).values
    levels = (1 << bits) - 1
    step = (hi - lo) / levels
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.clamp(torch.round((w - lo) / safe), 0, levels)
    return torch.where(step > 0, lo + q * step, w)
