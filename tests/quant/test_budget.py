"""The bits budget's knapsack (sqc/quant/budget.py): within budget, optimal, and clear errors."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sqc.quant.budget import allocate


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(2, 3), st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_never_over_budget_and_as_good_as_brute_force(units, options, seed, slack):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(100, 1000, size=(units, options)).astype(float)
    losses = rng.random((units, options)) * 10
    least, most = sizes.min(axis=1).sum(), sizes.max(axis=1).sum()
    budget = least + slack * (most - least)
    a = allocate(sizes, losses, budget)
    assert a.bits == sizes[np.arange(units), a.choice].sum() <= budget
    assert a.loss == pytest.approx(losses[np.arange(units), a.choice].sum())
    # the optimum among choices that fit once every size above the unit's smallest is rounded up to the
    # program's step (the room above the smallest choice over 2**17)
    base = sizes.min(axis=1)
    step = 1.0 if budget - least <= (1 << 17) else (budget - least) / (1 << 17)
    best = min(sum(losses[u, c] for u, c in enumerate(ch))
               for ch in itertools.product(range(options), repeat=units)
               if sum(np.ceil((sizes[u, c] - base[u]) / step - 1e-9) for u, c in enumerate(ch)) * step
               <= budget - least)
    assert a.loss <= best + 1e-9


def test_bits_go_where_the_loss_falls_most():
    # two units alike in size; one loses 100x more per bit taken away: it keeps the wide option
    sizes = [[2, 3, 4], [2, 3, 4]]
    losses = [[400.0, 200.0, 100.0], [4.0, 2.0, 1.0]]
    assert allocate(sizes, losses, 6).choice.tolist() == [2, 0]
    assert allocate(sizes, losses, 8).choice.tolist() == [2, 2]
    assert allocate(sizes, losses, 4).choice.tolist() == [0, 0]


def test_errors():
    with pytest.raises(ValueError, match="below the 4 bits"):
        allocate([[2, 3], [2, 3]], [[1.0, 0.5], [1.0, 0.5]], 3)
    with pytest.raises(ValueError, match="equal shape"):
        allocate([[2, 3]], [[1.0]], 10)
    with pytest.raises(ValueError, match="finite"):
        allocate([[2, 3]], [[1.0, float("nan")]], 10)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_model_sized_budgets_lose_at_most_one_step_per_unit(units, seed, slack):
    # sizes of real layers (millions of bits): the program runs in steps of room / 2**17 bits
    rng = np.random.default_rng(seed)
    sizes = rng.integers(10**6, 10**8, size=(units, 3)).astype(float)
    losses = rng.random((units, 3)) * 10
    least, most = sizes.min(axis=1).sum(), sizes.max(axis=1).sum()
    budget = least + slack * (most - least)
    a = allocate(sizes, losses, budget)
    assert a.bits <= budget
    step = (budget - least) / (1 << 17)
    best = min(sum(losses[u, c] for u, c in enumerate(ch)) for ch in itertools.product(range(3), repeat=units)
               if sum(sizes[u, c] for u, c in enumerate(ch)) <= budget - units * step)
    assert a.loss <= best + 1e-9
