"""Writing files that are complete on disk before anything refers to them, and reading them back checked.

Every sqc writer goes through these: kernel caches, kernel plans, artifacts, Hugging Face folders and
stored decode steps. ``write_synced`` writes and fsyncs a file inside a folder that is renamed into place
as a whole (:mod:`sqc.folders`); ``atomic_write`` replaces one file in place through a temporary and a
rename; ``fsync_file`` / ``fsync_tree`` sync what another library wrote.
"""
from __future__ import annotations

import hashlib
import os
import tempfile

import torch

__all__ = ["write_synced", "atomic_write", "fsync_file", "fsync_tree", "file_sha256", "SAFETENSORS_DTYPE",
           "SAFETENSORS_BYTES", "read_stripped"]

#: torch dtype -> its dtype code in a safetensors header (the dtypes sqc stores)
SAFETENSORS_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                     torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                     torch.uint8: "U8", torch.bool: "BOOL"}
#: safetensors dtype code -> bytes per element
SAFETENSORS_BYTES = {code: dt.itemsize for dt, code in SAFETENSORS_DTYPE.items()}


def write_synced(path: str, data: bytes | str) -> None:
    """Write ``data`` to ``path`` and fsync it (the file is complete on disk before anything refers to it)."""
    with open(path, "wb" if isinstance(data, bytes) else "w") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write(path: str, data: bytes | str) -> None:
    """Replace ``path`` with ``data``: written and fsynced under a temporary name in the same folder, then
    renamed, so a reader sees the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    os.close(fd)
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_file(path: str) -> None:
    """Flush a file another writer closed (a copied library, a file transformers wrote) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """:func:`fsync_file` for every file under ``root``."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            fsync_file(os.path.join(dirpath, f))


def read_stripped(path: str) -> str | None:
    """The text of ``path`` without surrounding whitespace, or None when it cannot be read (a record that
    may be missing, such as a cached library's ``.sha256``)."""
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
