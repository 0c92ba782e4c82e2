"""Kernel generation (TVM, imported lazily) and target handling."""
from .target import TargetSpec, parse_target

__all__ = ["TargetSpec", "parse_target"]
