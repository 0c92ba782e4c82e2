"""Sums over calibration samples in one fixed order, whoever computes the pieces.

Floating-point addition is not associative: a Fisher summed sample by sample
in one process and the same Fisher summed as two halves on two ranks differ in
the last bits, and a k-means fit that sees different bits may pick different
codes. :class:`TreeSum` fixes the grouping instead: the sum over samples
``0 .. n-1`` is the pairwise tree that splits ``[lo, hi)`` at
``mid = (lo + hi + 1) // 2`` (the left half takes the odd sample), down to
single samples. Any process can compute any subtree; combining subtrees in
the tree's own shape gives the same bits as one process summing everything.

:func:`cover` cuts the tree into at most ``2**depth`` subtrees, the units that
:func:`rank_blocks` hands to ranks. Items are dicts of tensors (one entry per
statistic); a merge adds the right child into the left one in place.
"""
from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["TreeSum", "cover", "rank_blocks"]

Item = dict[str, torch.Tensor]
Node = tuple[int, int]


def _children(lo: int, hi: int) -> tuple[Node, Node]:
    mid = (lo + hi + 1) // 2
    return (lo, mid), (mid, hi)


def cover(n: int, depth: int) -> list[Node]:
    """The tree over ``n`` samples cut ``depth`` levels below the root: subtrees ``(lo, hi)`` in order."""
    if n < 1:
        raise ValueError("a sum needs at least one sample")

    def walk(lo: int, hi: int, d: int) -> list[Node]:
        if d == 0 or hi - lo <= 1:
            return [(lo, hi)]
        a, b = _children(lo, hi)
        return walk(*a, d - 1) + walk(*b, d - 1)

    return walk(0, n, depth)


def rank_blocks(n: int, world: int) -> list[list[Node]]:
    """The subtrees each of ``world`` ranks sums: the cover at the depth that gives every rank at
    least one (where ``n`` allows), handed out in contiguous runs."""
    if world < 1:
        raise ValueError(f"world size {world} < 1")
    depth = max(0, (world - 1).bit_length())
    nodes = cover(n, depth)
    c = len(nodes)
    return [nodes[r * c // world:(r + 1) * c // world] for r in range(world)]


class TreeSum:
    """Accumulates per-sample items of a sum over ``n`` samples in the fixed tree order.

    :meth:`add` takes samples in increasing index order within each subtree a caller
    owns; a completed pair of siblings is merged at once, so at most one partial per
    tree level is held. :meth:`push` takes a whole subtree's sum (another rank's piece).
    :meth:`result` is the root once every sample is in.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self._parent: dict[Node, Node] = {}
        todo = [(0, n)]
        while todo:
            lo, hi = todo.pop()
            if hi - lo > 1:
                for child in _children(lo, hi):
                    self._parent[child] = (lo, hi)
                    todo.append(child)
        self._stack: list[tuple[Node, Item]] = []
        self._early: tuple[int, Item] | None = None  # (sample, entries absorbed ahead of its add)

    def _chain(self, node: Node) -> list[Item]:
        """The held items ``node`` merges into when it goes in, innermost first."""
        out, idx = [], len(self._stack) - 1
        while idx >= 0:
            a = self._stack[idx][0]
            p = self._parent.get(a)
            if p is None or p != self._parent.get(node):
                break
            out.append(self._stack[idx][1])
            node, idx = p, idx - 1
        return out

    def absorb(self, i: int, key: str, t: torch.Tensor) -> None:
        """Sample ``i``'s entry ``key`` ahead of the rest of it: merged at once into the held
        partials that :meth:`add` would merge it into (the same additions in the same order, so
        the same bits), so a sample's entries need not all be held at once. ``add(i, ...)``
        follows with the entries not absorbed."""
        if self._early is not None and self._early[0] != i:
            raise ValueError(f"sample {self._early[0]} was absorbed in part and not added before sample {i}")
        if self._early is None:
            self._early = (i, {})
        for left in self._chain((i, i + 1)):
            left[key].add_(t)
            t = left[key]
        self._early[1][key] = t

    def add(self, i: int, item: Item) -> None:
        early: Item = {}
        if self._early is not None:
            if self._early[0] != i:
                raise ValueError(f"sample {self._early[0]} was absorbed in part; add it before sample {i}")
            early, self._early = self._early[1], None
            if early.keys() & item.keys():
                raise ValueError(f"entries {sorted(early.keys() & item.keys())} of sample {i} came twice")
        self.push((i, i + 1), {**item, **early}, merged=frozenset(early))

    def push(self, node: Node, item: Item, merged: frozenset = frozenset()) -> None:
        """Take a subtree's sum; entries named in ``merged`` are in their partials already (:meth:`absorb`)."""
        if node != (0, self.n) and node not in self._parent:
            raise ValueError(f"{node} is not a subtree of the sum over {self.n} samples")
        if self._stack and self._stack[-1][0][1] != node[0]:
            raise ValueError(f"subtree {node} does not follow {self._stack[-1][0]}: push subtrees in order")
        self._stack.append((node, item))
        while len(self._stack) >= 2:
            (a, left), (b, right) = self._stack[-2], self._stack[-1]
            p = self._parent.get(a)
            if p is None or p != self._parent.get(b):
                break
            for k, t in left.items():
                if k not in merged:
                    t.add_(right[k])
            self._stack[-2:] = [(p, left)]

    def nodes(self) -> list[tuple[Node, Item]]:
        """The completed subtrees held now, in order (after a rank's samples: its blocks' sums)."""
        return list(self._stack)

    def result(self) -> Item:
        if len(self._stack) != 1 or self._stack[0][0] != (0, self.n):
            held = [node for node, _ in self._stack]
            raise RuntimeError(f"the sum over {self.n} samples is incomplete (holding {held})")
        return self._stack[0][1]

    @classmethod
    def held(cls, n: int, nodes: list[Node]) -> list[Node]:
        """The subtrees :meth:`nodes` holds after ``nodes`` went in (siblings merge): what a rank
        with those blocks hands over, known to every rank without asking it."""
        acc = cls(n)
        for node in nodes:
            acc.push(node, {})
        return [node for node, _ in acc.nodes()]

    @classmethod
    def combine(cls, n: int, pieces: Iterable[tuple[Node, Item]]) -> Item:
        """The root from subtrees that cover ``[0, n)``, given in order."""
        acc = cls(n)
        for node, item in pieces:
            acc.push(node, item)
        return acc.result()
