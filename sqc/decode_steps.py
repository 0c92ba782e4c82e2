"""Storing an artifact's decode steps (``steps/``, :mod:`sqc.runtime.stepstore`) and finding them at load.

:func:`store` runs a child process (``python -m sqc.steptrace FOLDER ...``, :mod:`sqc.steptrace`) that loads the artifact
being written with :func:`sqc.load`, exactly as a user's process will, and traces each step there:

* the stored steps are then traced from the very model a later ``sqc.load`` builds (same module types,
  same kernel arguments), so their fingerprints match;
* the child's Inductor cache is a new, empty folder, so every compiled C++ kernel the steps need is built
  there and nothing else: those libraries are what ``steps/inductor/`` carries;
* the caller's process keeps its own TorchDynamo and Inductor state.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Sequence

from .runtime.decode import CACHE_STEP, MODES
from .runtime.stepstore import DEFAULT_CACHE_LENGTHS, INDEX, StepStoreError, StoredSteps

__all__ = ["store", "open_steps", "normalize_lengths", "FOLDER", "StepsNotStored"]

#: the artifact's folder for its stored decode steps
FOLDER = "steps"


class StepsNotStored(RuntimeError):
    """The child process that traces the decode steps failed; the message carries its error output."""


def normalize_lengths(lengths: Sequence[int] | None | str) -> tuple[int, ...]:
    """The cache lengths to store steps for: ``"default"`` gives :data:`DEFAULT_CACHE_LENGTHS`, ``None`` or
    ``()`` none; each must be a positive multiple of 128."""
    if lengths == "default":
        return DEFAULT_CACHE_LENGTHS
    if lengths is None:
        return ()
    if isinstance(lengths, str):
        raise ValueError(f"decode_steps must be 'default', None or cache lengths, got {lengths!r}")
    out = []
    for n in lengths:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0 or n % CACHE_STEP:
            raise ValueError(f"decode_steps: cache lengths must be positive multiples of {CACHE_STEP}, got {n!r}")
        out.append(n)
    return tuple(sorted(set(out)))


def store(folder: str, lengths: Sequence[int], modes: Sequence[str] = ("greedy",), batch: int = 1,
          timeout: float = 3600) -> dict[str, Any]:
    """Trace and store the decode steps of the artifact in ``folder`` (complete but for its steps) into
    ``folder/steps``; returns the manifest's ``steps`` entry (the folder and the index's sha256)."""
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"decode step modes must be among {MODES}, got {bad}")
    out = os.path.join(folder, FOLDER)
    shutil.rmtree(out, ignore_errors=True)
    inductor = tempfile.mkdtemp(prefix="sqc-steps-inductor-")
    try:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=inductor)
        cmd = [sys.executable, "-m", "sqc.steptrace", folder, "--lengths", *map(str, lengths),
               "--modes", *modes, "--batch", str(batch)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            shutil.rmtree(out, ignore_errors=True)
            raise StepsNotStored(f"tracing the decode steps of {folder} failed (exit {proc.returncode}); save with "
                                 f"decode_steps=None (sqc compile --decode-steps none) to write the artifact "
                                 f"without them. The tracer's output:\n{proc.stderr[-4000:]}")
    finally:
        shutil.rmtree(inductor, ignore_errors=True)
    with open(os.path.join(out, INDEX), "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    return {"folder": FOLDER, "index_sha256": digest}


def open_steps(path: str, entry: Any) -> StoredSteps | None:
    """The stored steps of the artifact at ``path`` given its manifest's ``steps`` entry (None: none stored).
    Raises :class:`StepStoreError` naming the file when the index is missing or was changed."""
    if entry is None:
        return None
    if not isinstance(entry, dict) or entry.get("folder") != FOLDER or not isinstance(entry.get("index_sha256"), str):
        raise StepStoreError(f"{path}: malformed steps entry {entry!r} in the manifest")
    index = os.path.join(path, FOLDER, INDEX)
    try:
        with open(index, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise StepStoreError(f"{index}: unreadable ({e}); re-save the artifact") from e
    if hashlib.sha256(data).hexdigest() != entry["index_sha256"]:
        raise StepStoreError(f"{index}: its sha256 differs from the manifest's; re-save the artifact")
    try:
        steps = StoredSteps(os.path.dirname(index), json.loads(data))
    except ValueError as e:
        raise StepStoreError(f"{index}: not valid JSON ({e})") from e
    steps.verify()
    return steps
