"""Writing a folder atomically: build it under a temporary name beside the destination, then swap it in.

Used by ``sqc.save`` (:mod:`sqc.artifact`) and ``sqc.hf.save_pretrained``: a
crash never leaves a half-written folder, and the leftovers of a killed save
(``<prefix><pid>-*`` folders whose process is gone) are removed by the next one.
"""
from __future__ import annotations

import os
import shutil
import tempfile

__all__ = ["swap_into_place", "umask", "clean_leftovers"]


def swap_into_place(tmp: str, path: str, old_prefix: str) -> None:
    """Rename the finished folder ``tmp`` to ``path``; an existing ``path`` is moved aside first (into
    ``<old_prefix><pid>-*`` in the same parent) and removed only once the new one is in place."""
    if os.path.lexists(path):
        old = tempfile.mkdtemp(prefix=f"{old_prefix}{os.getpid()}-", dir=os.path.dirname(path))
        os.rename(path, os.path.join(old, "a"))
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def clean_leftovers(parent: str, prefixes: tuple[str, ...] = (".sqc-tmp-", ".sqc-old-")) -> None:
    """Remove ``<prefix><pid>-*`` folders of saves whose process is gone (killed mid-save)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        pid = name[len(prefix):].split("-", 1)[0] if prefix else ""
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # a save in progress
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
