"""File-backed tensors: packed weights moved out of the process's anonymous memory into a temporary file.

A compile of a model larger than memory (:func:`sqc.compile_pretrained`, ``sqc compile`` on a
checkpoint) finishes one decoder layer's packed weights every few seconds; held in memory they
would grow the process by the whole artifact (about 80 MiB per LLaMA-7B layer at 3 bits, twice
that while ``sqc.save`` writes). A :class:`Spill` writes each layer's tensors to one temporary
file as they are finished and hands back tensors that *map* that file, the way llama.cpp maps
its GGUF: the same values, readable and writable like any tensor, but their pages belong to the
page cache, which the kernel can drop and re-read, and are in this process's resident set only
while touched. :meth:`Spill.evict` drops the touched pages from the resident set again (the data
stays in the file), so a stage that reads every layer once (kernel attachment, ``sqc.save``)
holds about one layer at a time.

The file is unlinked as soon as it is open: nothing is left on disk when the process ends,
however it ends. The mapping is shared (``MAP_SHARED``) so a write into a mapped tensor goes to
the file and survives :meth:`evict` (a private copy-on-write mapping would silently lose it).
"""
from __future__ import annotations

import mmap
import os
import tempfile
import threading
from typing import Mapping

import numpy as np
import torch

__all__ = ["Spill"]

_PAGE = mmap.ALLOCATIONGRANULARITY
_ALIGN = 64  # every tensor starts on a cache line inside its region


class Spill:
    """One unlinked temporary file in ``folder`` (default: the system's temporary folder, or
    ``SQC_SPILL_DIR``); :meth:`put` / :meth:`put_many` append tensors to it and return mapped
    views of the same dtype and shape. Thread-safe."""

    def __init__(self, folder: str | None = None) -> None:
        folder = folder or os.environ.get("SQC_SPILL_DIR") or tempfile.gettempdir()
        try:
            self._fh = tempfile.TemporaryFile(prefix="sqc-spill-", dir=folder)  # unlinked already
        except OSError as e:
            raise OSError(f"cannot create the temporary file for packed weights in {folder} ({e}); "
                          "set SQC_SPILL_DIR to a writable folder with room for the artifact") from None
        self._size = 0
        self._maps: list[mmap.mmap] = []
        self._spans: list[tuple[int, int]] = []  # address ranges of the maps, for holds()
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes written to the file so far (page padding included)."""
        return self._size

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """``t``'s values in the file, as a mapped tensor (``t`` itself when it already lives there)."""
        return self.put_many({"t": t})["t"]

    def put_many(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write the tensors into one mapped region; the mapped tensors by the same keys. Tensors
        already in the file are returned as they are."""
        out: dict[str, torch.Tensor] = {}
        todo: dict[str, torch.Tensor] = {}
        for k, t in tensors.items():
            if t.device.type != "cpu":
                raise ValueError(f"tensor {k!r} is on {t.device}; only CPU tensors are written to the spill file")
            if self.holds(t):
                out[k] = t
            else:
                todo[k] = t.detach().contiguous()
        if not todo:
            return out
        with self._lock:
            start = self._size
            offsets, pos = {}, 0
            for k, t in todo.items():
                pos += -pos % _ALIGN
                offsets[k] = pos
                pos += t.nbytes
            length = max(pos, 1)
            length += -length % _PAGE  # the next region starts on a page: mmap offsets must be
            fd = self._fh.fileno()
            os.ftruncate(fd, start + length)
            for k, t in todo.items():
                if t.numel():
                    os.pwrite(fd, memoryview(t.reshape(-1).view(torch.uint8).numpy()), start + offsets[k])
            mm = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
            self._size = start + length
            self._maps.append(mm)
            base = np.frombuffer(mm, dtype=np.uint8)
            addr = base.ctypes.data
            self._spans.append((addr, addr + length))
        for k, t in todo.items():
            n = t.nbytes
            raw = torch.from_numpy(base[offsets[k]:offsets[k] + n])  # keeps the map alive
            out[k] = raw.view(t.dtype).reshape(t.shape) if n else torch.empty(t.shape, dtype=t.dtype)
        return {k: out[k] for k in tensors}

    def put_evicting(self, t: torch.Tensor) -> torch.Tensor:
        """:meth:`put`, then :meth:`evict`: the store of a stage that reads each layer once
        (kernel attachment reads the codes to lay them out for the kernels)."""
        out = self.put(t)
        self.evict()
        return out

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s memory lies in this spill file's mappings."""
        if t.device.type != "cpu" or not t.numel():
            return False
        p = t.data_ptr()
        return any(lo <= p < hi for lo, hi in self._spans)

    def evict(self) -> None:
        """Drop this process's resident pages of the file (the values stay in the file and come back
        on the next read)."""
        with self._lock:
            for mm in self._maps:
                mm.madvise(mmap.MADV_DONTNEED)
