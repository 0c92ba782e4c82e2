"""A bits budget as a multiple-choice knapsack: one width per unit, least total loss, stored bits within budget.

Each unit (a layer, or a group of fused siblings that must share a width) has
a few options, each with a stored size in bits and an estimated loss (the
fit's objective at that width). :func:`allocate` picks one option per unit
so that the sum of sizes stays within the budget and the sum of losses is as
small as possible: exact dynamic programming over the sizes above each
unit's smallest option, in ``cells`` steps of the room the budget leaves
above the smallest choice, every size rounded *up*, so the true total never
exceeds the budget (the rounding can leave at most one step per unit unused).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Allocation", "allocate"]


@dataclass(frozen=True)
class Allocation:
    """The chosen option of every unit, its total size and the sum of the chosen losses."""

    choice: np.ndarray  # [U] int, index into each unit's options
    bits: int  # total stored bits of the choice
    loss: float  # sum of the chosen losses


def allocate(sizes, losses, budget: float, cells: int = 1 << 17) -> Allocation:
    """Choose one option per unit: least ``sum(loss)`` with ``sum(size) <= budget``.

    Parameters
    ----------
    sizes : ``[U, W]`` stored bits of option ``w`` of unit ``u`` (non-negative).
    losses : ``[U, W]`` estimated loss of each option (finite).
    budget : most total bits allowed.
    cells : resolution of the sizes in the dynamic program.

    Raises ``ValueError`` when even the smallest option of every unit exceeds the budget.

    Examples
    --------
    >>> a = allocate([[2, 3, 4], [2, 3, 4]], [[9.0, 4.0, 1.0], [5.0, 2.0, 1.5]], budget=7)
    >>> a.choice.tolist(), a.bits
    ([2, 1], 7)
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    if sizes.ndim != 2 or sizes.shape != losses.shape or sizes.shape[0] == 0:
        raise ValueError(f"sizes and losses must be [units, options] of equal shape, got {sizes.shape} and "
                         f"{losses.shape}")
    if (sizes < 0).any() or not np.isfinite(sizes).all() or not np.isfinite(losses).all():
        raise ValueError("sizes must be finite and non-negative, losses finite")
    least = float(sizes.min(axis=1).sum())
    if least > budget:
        raise ValueError(f"the budget of {budget:.0f} bits is below the {least:.0f} bits of the smallest option of "
                         "every unit")
    U, W = sizes.shape
    # the program works on each option's size above its unit's smallest, in steps of the room the budget
    # leaves above the smallest choice of every unit, rounded up: the smallest options cost exactly
    # nothing, so a feasible budget always has a solution and the true total never exceeds the budget
    base = sizes.min(axis=1, keepdims=True)
    room = budget - least
    exact = bool((sizes == np.round(sizes)).all()) and room <= cells  # whole bits and few: steps of one bit
    step = 1.0 if exact or room <= 0 else room / cells
    q = np.ceil((sizes - base) / step - 1e-9).astype(np.int64)
    top = int(np.floor(room)) if exact else (cells if room > 0 else 0)
    dp = np.full(top + 1, np.inf)  # least loss of the units so far at exactly this quantized extra size
    dp[0] = 0.0
    pick = np.zeros((U, top + 1), dtype=np.int8 if W < 128 else np.int32)
    for u in range(U):
        new = np.full(top + 1, np.inf)
        for w in range(W):
            s = int(q[u, w])
            if s > top:
                continue
            cand = np.full(top + 1, np.inf)
            cand[s:] = dp[: top + 1 - s] + losses[u, w]
            better = cand < new
            new[better] = cand[better]
            pick[u, better] = w
        dp = new
    c = int(np.argmin(dp))
    choice = np.zeros(U, dtype=np.int64)
    for u in range(U - 1, -1, -1):
        w = int(pick[u, c])
        choice[u] = w
        c -= int(q[u, w])
    total = int(round(float(sizes[np.arange(U), choice].sum())))
    return Allocation(choice, total, float(losses[np.arange(U), choice].sum()))
