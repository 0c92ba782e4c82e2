"""Sibling linears that read the same input, run as one packed layer and one kernel call.

The per-row codebook format concatenates along rows: stacking the members'
codes, tables and CSR rows (row pointers shifted by the earlier members'
non-zeros) gives a packed weight whose rows ``start:end`` are exactly member
``i``'s, so ``fused(x)[..., start:end] == member_i(x)`` up to nothing (each
output row is computed by the same kernel arithmetic either way).

:func:`fuse_layers` builds the fused :class:`~sqc.runtime.qlinear.SqcLinear`
from the members and turns every member into a view of it: a member keeps its
canonical tables and sparse part (``state_dict`` and artifacts stay per
member, unchanged) but not its codes, which live once, in the fused layer's
kernels. A member called with the input its siblings were called with gets
its slice of one shared result; called alone (or on another input) it runs
the fused layer itself, so results never depend on call order.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .layout import PackedLinear, col_dtype_for

__all__ = ["concat_packed", "FusedGroup", "fuse_layers", "FusedMember", "group_name", "fused_groups", "kernel_layers",
           "refuse"]


def concat_packed(parts: Sequence[PackedLinear]) -> PackedLinear:
    """Stack packed weights with equal ``in_features`` and ``bits`` along rows."""
    first = parts[0]
    for p in parts[1:]:
        if (p.in_features, p.bits) != (first.in_features, first.bits):
            raise ValueError(f"cannot fuse layers of {first.in_features} inputs at {first.bits} bits with "
                             f"{p.in_features} inputs at {p.bits} bits")
        if (p.lut.dtype, p.val.dtype) != (first.lut.dtype, first.val.dtype):
            raise ValueError("cannot fuse layers whose tables or sparse values have different dtypes")
    crows, offset = [parts[0].crow[:1]], 0
    for p in parts:
        crows.append(p.crow[1:] + offset)
        offset += int(p.crow[-1])
    return PackedLinear(  # rows of equal width and bits pack to the same words: the words stack as they are
        bits=first.bits, in_features=first.in_features, out_features=sum(p.out_features for p in parts),
        codes=torch.cat([p.codes for p in parts]), lut=torch.cat([p.lut for p in parts]).contiguous(),
        crow=torch.cat(crows).to(torch.int32), col=torch.cat([p.col for p in parts]).to(col_dtype_for(first.in_features)),
        val=torch.cat([p.val for p in parts]),
    )


class FusedGroup:
    """One fused layer and the row range of each member; caches the last shared result.

    The cache holds one input and its output until every member has taken its
    slice (then it lets go of both); an input modified in place in between
    (its version counter moved) is recomputed.
    """

    def __init__(self, layer, names: Sequence[str], bounds: Sequence[tuple[int, int]]) -> None:
        self.layer = layer
        self.names = list(names)
        self.bounds = list(bounds)
        self._x = None
        self._version = -1
        self._y = None
        self._served: set[int] = set()
        self.members: list = []  # the member modules (set by fuse_layers)

    def update_member(self, i: int, packed: PackedLinear, bias) -> None:
        """Restack the fused layer with member ``i``'s new packed weight and bias (the others as they are)."""
        parts, biases = [], []
        for j, m in enumerate(self.members):
            parts.append(packed if j == i else m.packed)
            biases.append(bias if j == i else m.bias)
        new = concat_packed(parts)
        layer = self.layer
        for t in ("lut", "crow", "col", "val"):
            layer._buffers[t] = getattr(new, t)
        stacked_bias = _stack_bias(self.members, biases)
        if stacked_bias is not None:
            layer._buffers["bias"] = stacked_bias
        if layer._kernels is not None:
            layer._kernels.rebind(new, stacked_bias)
            layer._bind()
        else:
            layer._buffers["codes"] = new.codes
        self._x = self._y = None

    def slice(self, i: int, x: torch.Tensor) -> torch.Tensor:
        # inference tensors (torch.inference_mode) and traced ones have no version counter: there the cache is
        # keyed by the input's identity alone (the siblings' shared input is not modified in place in between)
        versioned = not torch.compiler.is_compiling() and not x.is_inference()
        if self._x is not x or i in self._served or (versioned and x._version != self._version):
            self._y = self.layer(x)
            self._x = x
            self._version = x._version if versioned else -1
            self._served = set()
        self._served.add(i)
        y = self._y
        if len(self._served) == len(self.bounds):
            self._x = self._y = None
        s, e = self.bounds[i]
        return y[..., s:e]


class FusedMember:
    """A member layer's kernels: its slice of the group's fused layer (the :class:`SqcLinear` kernel protocol)."""

    def __init__(self, group: FusedGroup, index: int) -> None:
        self.group = group
        self.index = index

    @property
    def _rows(self) -> tuple[int, int]:
        return self.group.bounds[self.index]

    def __call__(self, x, lut, crow, col, val, bias) -> torch.Tensor:
        return self.group.slice(self.index, x)

    @property
    def member_status(self):
        """What a member runs: its group's layer's kernel, marked fused (a :class:`KernelStatus`)."""
        return self.group.layer.status.with_fused(tuple(n.rpartition(".")[2] for n in self.group.names))

    def canonical_codes(self) -> torch.Tensor:
        s, e = self._rows
        kernels = self.group.layer.__dict__.get("_kernels")
        rows = getattr(kernels, "canonical_rows", None)
        if rows is not None:  # only this member's rows, from the group's kernel layout
            return rows(s, e)
        return self.group.layer.codes[s:e].clone()  # a copy: a view would keep the whole group's codes alive

    def nbytes(self) -> int:
        s, e = self._rows
        fused = self.group.layer
        return fused._kernels.nbytes() * (e - s) // fused.out_features if fused._kernels is not None else 0

    def rebind(self, packed: PackedLinear, bias) -> None:
        """A member loaded new tensors (``load_state_dict``): the group's stacked layer takes them."""
        self.group.update_member(self.index, packed, bias)


def _stack_bias(members, biases):
    """The members' biases stacked (zeros for a member without one), or None when none has one."""
    if all(b is None for b in biases):
        return None
    dt = next(b.dtype for b in biases if b is not None)
    return torch.cat([torch.zeros(m.out_features, dtype=dt) if b is None else b.detach().to(dt)
                      for m, b in zip(members, biases)])


def fuse_layers(members: Sequence, names: Sequence[str]) -> FusedGroup:
    """Fuse ``members`` (SqcLinear layers with equal input width and bits) into one layer.

    The fused layer takes over the members' kernel: attach kernels to
    ``group.layer`` afterwards (the members already point at it). A bias
    missing on some members is zeros for their rows.
    """
    from .qlinear import SqcLinear

    packed = concat_packed([m.packed for m in members])
    bias = _stack_bias(members, [m.bias for m in members])
    layer = SqcLinear(packed, bias)
    bounds, start = [], 0
    for m in members:
        bounds.append((start, start + m.out_features))
        start += m.out_features
    group = FusedGroup(layer, names, bounds)
    group.members = list(members)
    for i, m in enumerate(members):
        m.set_kernel(FusedMember(group, i))  # its status follows the group's layer
    return group


def group_name(names: Sequence[str]) -> str:
    """The name reports and kernel plans give a fused layer: ``parent.(a+b+c)``."""
    parent = names[0].rpartition(".")[0]
    leaves = "+".join(n.rpartition(".")[2] for n in names)
    return f"{parent}.({leaves})" if parent else f"({leaves})"


def fused_groups(model: torch.nn.Module) -> list[FusedGroup]:
    """The fused groups of ``model``'s layers, in module order."""
    seen: dict[int, FusedGroup] = {}
    for m in model.modules():
        k = m.__dict__.get("_kernels")
        if isinstance(k, FusedMember) and id(k.group) not in seen:
            seen[id(k.group)] = k.group
    return list(seen.values())


def kernel_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every packed layer that runs its own kernels, by name: unfused SqcLinear modules and fused groups'
    layers (named by :func:`group_name`); fused members run their group's layer."""
    from .qlinear import SqcLinear

    out = {}
    for n, m in model.named_modules():
        if isinstance(m, SqcLinear) and not isinstance(m.__dict__.get("_kernels"), FusedMember):
            out[n] = m
    for g in fused_groups(model):
        out[group_name(g.names)] = g.layer
    return out


def refuse(model: torch.nn.Module, groups: Sequence[Sequence[str]]) -> list[FusedGroup]:
    """Fuse the named groups of ``model``'s SqcLinear layers again (after a load); returns the groups."""
    from .qlinear import SqcLinear

    out = []
    for names in groups:
        members = []
        for n in names:
            try:
                m = model.get_submodule(n)
            except AttributeError:
                m = None
            if not isinstance(m, SqcLinear):
                raise ValueError(f"fused group {list(names)}: the model has no quantized layer {n!r}")
            members.append(m)
        out.append(fuse_layers(members, names))
    return out
