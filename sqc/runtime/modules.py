"""Module surgery shared by the compiler's passes and the loaders: put a module in place of another."""
from __future__ import annotations

import torch

__all__ = ["replace_module"]


def replace_module(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    """Make ``new`` the submodule ``name`` of ``root`` (dotted path; its parent must exist)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
