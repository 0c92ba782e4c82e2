"""Building generated CUDA with nvcc: fatbins for the artifact, resource reports for the tests.

The fatbin holds machine code (cubin) for each requested architecture plus the
PTX of the newest one, so a newer GPU can still JIT it. Builds are cached in
``<cache>/cuda/<sha256 of source + archs + nvcc version>.fatbin`` and written
atomically.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

__all__ = ["find_nvcc", "nvcc_version", "build_fatbin", "resource_report", "NvccError"]


class NvccError(RuntimeError):
    pass


def find_nvcc() -> str | None:
    """Path of nvcc ($SQC_NVCC, PATH, /usr/local/cuda/bin), or None."""
    for cand in (os.environ.get("SQC_NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


@functools.lru_cache(maxsize=None)
def nvcc_version() -> str:
    nvcc = _need_nvcc()
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1]


def _need_nvcc() -> str:
    nvcc = find_nvcc()
    if nvcc is None:
        raise NvccError("nvcc not found: install the CUDA toolkit, put nvcc on PATH or set SQC_NVCC")
    return nvcc


def _run(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    p = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        raise NvccError(f"nvcc failed ({' '.join(args[1:6])} ...):\n{p.stderr.strip()[-3000:]}")
    return p


def _arch_num(arch: str) -> str:
    if not re.fullmatch(r"sm_\d+a?", arch):
        raise ValueError(f"CUDA architecture must look like sm_86, got {arch!r}")
    return arch[3:]


def build_fatbin(source: str, archs: tuple[str, ...]) -> bytes:
    """Compile ``source`` for ``archs`` (e.g. ("sm_80", "sm_90")) into one fatbin (cached)."""
    from ..runtime.files import atomic_write
    from .build import cache_dir

    nvcc = _need_nvcc()
    nums = [_arch_num(a) for a in archs]
    h = hashlib.sha256("\0".join([source, ",".join(archs), nvcc_version()]).encode()).hexdigest()[:24]
    d = os.path.join(cache_dir(), "cuda")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{h}.fatbin")
    if os.path.exists(path):
        with open(path, "rb") as f:
            return f.read()
    gencode = []
    for n in nums:
        gencode += ["-gencode", f"arch=compute_{n},code=sm_{n}"]
    last = nums[-1]
    gencode += ["-gencode", f"arch=compute_{last},code=compute_{last}"]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernels.cu")
        with open(src, "w") as f:
            f.write(source)
        _run([nvcc, "-fatbin", "-O3", "-std=c++17", *gencode, "-o", "kernels.fatbin", "kernels.cu"], tmp)
        with open(os.path.join(tmp, "kernels.fatbin"), "rb") as f:
            data = f.read()
    atomic_write(path, data)
    return data


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+a?)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def resource_report(source: str, archs: tuple[str, ...]) -> dict[str, dict[str, dict[str, int]]]:
    """ptxas's report for each arch and kernel: registers, shared memory, stack frame, spill stores/loads.

    One nvcc run builds every architecture (in parallel threads) with ``-Xptxas -v``.
    """
    nvcc = _need_nvcc()
    gencode = []
    for a in archs:
        n = _arch_num(a)
        gencode += ["-gencode", f"arch=compute_{n},code=sm_{n}"]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "kernels.cu"), "w") as f:
            f.write(source)
        p = _run([nvcc, "-fatbin", "-O3", "-std=c++17", "--threads", "0", *gencode, "-Xptxas", "-v",
                  "-o", "k.fatbin", "kernels.cu"], tmp)
    out: dict[str, dict[str, dict[str, int]]] = {a: {} for a in archs}
    cur = None
    for line in p.stderr.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = out.setdefault(m.group(2), {}).setdefault(m.group(1), {})
            continue
        if cur is None:
            continue
        m = _FRAME.search(line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _USED.search(line)
        if m:
            cur.update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    return out
