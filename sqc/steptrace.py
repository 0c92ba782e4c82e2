"""The child process that traces an artifact's decode steps: ``python -m sqc.steptrace FOLDER --lengths ...``.

Run by :func:`sqc.decode_steps.store` while ``sqc.save`` writes an artifact (see there for why a child):
loads the artifact with :func:`sqc.load`, traces each step ahead of time
(:meth:`sqc.runtime.decode.CompiledDecoder.trace_for_store`), writes them, copies the shared libraries of
the C++ kernels Inductor built for them (its cache folder is new and empty, so they are all it holds), and
writes the index.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from typing import Sequence

from .artifact import load
from .decode_steps import FOLDER
from .runtime.decode import CompiledDecoder
from .runtime.files import write_synced
from .runtime.stepstore import LIBRARIES, StepEntry, step_file_name, write_index

__all__ = ["trace_steps", "main"]


def trace_steps(folder: str, lengths: Sequence[int], modes: Sequence[str], batch: int) -> None:
    """The child's work: load the artifact, trace each step, write them with Inductor's libraries and the index."""
    import torch
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    compiled = load(folder)
    dec = CompiledDecoder(compiled.model)
    out = os.path.join(folder, FOLDER)
    os.makedirs(out, exist_ok=True)
    entries: list[StepEntry] = []
    fp = None
    for mode in modes:
        for n in lengths:
            data, fp = dec.trace_for_store(batch, n, mode)
            name = step_file_name(batch, n, mode)
            write_synced(os.path.join(out, name), data)
            entries.append(StepEntry(batch, n, mode, name, hashlib.sha256(data).hexdigest()))
            torch._dynamo.reset()
    src = cache_dir()
    for root, _dirs, files in os.walk(src):
        for f in files:
            if f.endswith(".so"):
                rel = os.path.relpath(os.path.join(root, f), src)
                dest = os.path.join(out, LIBRARIES, rel)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copyfile(os.path.join(root, f), dest)
    write_index(out, fp, entries)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sqc.steptrace",
                                 description="trace and store an artifact's decode steps (run by sqc.save)")
    ap.add_argument("folder")
    ap.add_argument("--lengths", type=int, nargs="+", required=True)
    ap.add_argument("--modes", nargs="+", default=["greedy"])
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    trace_steps(args.folder, args.lengths, args.modes, args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
