"""Handing freed memory back: after a compile or a load, the transient copies are gone but glibc keeps the pages."""
from __future__ import annotations

import gc

__all__ = ["release_memory"]


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc only)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass
