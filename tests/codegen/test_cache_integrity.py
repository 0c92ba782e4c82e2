"""The kernel cache and the tuning database verify what they read and survive concurrent writers."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tvm  # noqa: F401  (a hard dependency: a missing TVM fails these tests, it does not skip them)

from sqc.codegen import build as B  # noqa: E402
from sqc.codegen.cpu import GemvKnobs  # noqa: E402
from sqc.runtime.target import parse_target  # noqa: E402
from sqc.runtime.cpu.kernels import kernel_key  # noqa: E402
from sqc.runtime.layout import PackedLinear, col_dtype_for, pack_codes  # noqa: E402
from sqc.runtime.qlinear import SqcLinear  # noqa: E402

AVX2 = "llvm -mcpu=haswell"


def packed(R=16, K=64, bits=4):
    codes = torch.randint(0, 1 << bits, (R, K))
    return PackedLinear(bits, K, R, pack_codes(codes, bits), torch.randn(R, 1 << bits).half(),
                        torch.zeros(R + 1, dtype=torch.int32), torch.zeros(0, dtype=col_dtype_for(K)),
                        torch.zeros(0))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "flip", "no_checksum"])
def test_a_damaged_cached_library_is_rebuilt_not_loaded(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("SQC_CACHE_DIR", str(tmp_path))
    key = kernel_key("gemv", SqcLinear(packed(), None), 8)
    B.KernelLibrary(parse_target(AVX2)).get(key, GemvKnobs())
    (so,) = [f for f in os.listdir(tmp_path / "kernels") if f.endswith(".so")]
    path = tmp_path / "kernels" / so
    data = path.read_bytes()

    def replace(new: bytes) -> None:
        # a new file, not an in-place write: this process has the library mapped, and rewriting the
        # mapped pages would crash it at exit
        tmp = path.with_suffix(".new")
        tmp.write_bytes(new)
        os.replace(tmp, path)

    if damage == "truncate":
        replace(data[: len(data) // 2])
    elif damage == "flip":
        replace(data[:200] + bytes([data[200] ^ 0xFF]) + data[201:])
    else:
        os.unlink(str(path) + ".sha256")
    # in a fresh process (dlopen of a damaged library can kill it): rebuilt, and the result is right
    script = textwrap.dedent(f"""
        import torch
        from sqc.codegen import build as B
        from sqc.codegen.cpu import GemvKnobs, KernelKey
        from sqc.runtime.target import parse_target
        key = KernelKey(**{key.as_dict()!r})
        B.KernelLibrary(parse_target({AVX2!r})).get(key, GemvKnobs())
        print(B.STATS["builds"], B.STATS["cache_hits"])
    """)
    out = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, SQC_CACHE_DIR=str(tmp_path)),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "0"]
    assert path.read_bytes() != data[: len(data) // 2] and (tmp_path / "kernels" / (so + ".sha256")).exists()


@pytest.mark.slow
def test_concurrent_writers_keep_every_tuning_entry(tmp_path):
    script = textwrap.dedent("""
        import sys
        from sqc.codegen import build as B
        from sqc.codegen.cpu import KernelKey
        db = B.TuningDB("llvm", "test")
        who = int(sys.argv[1])
        for i in range(60):
            key = KernelKey("gemv", 100 + i, 64, 3, 16, False, "float16", "uint8", "float32")
            db.store(key, str(who), {"knobs": {"rt": 2, "unroll": 1}, "i": i})
    """)
    env = dict(os.environ, SQC_CACHE_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(w)], env=env) for w in range(4)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    db = json.loads((tmp_path / "tuning.json").read_text())
    assert len(db) == 240


def test_tuning_entries_outside_the_candidates_are_not_trusted():
    rec = {"knobs": {"rt": 1 << 20, "unroll": 1}}
    assert B.db_knobs("gemv", rec) is None
    assert B.db_knobs("gemv", {"knobs": {"rt": 4, "unroll": 2}}) == GemvKnobs(4, 2)
    assert B.db_knobs("gemm", {"knobs": {"rt": 4, "bt": 4, "decode": "tile"}}, "2-16") is not None
    assert B.db_knobs("gemm", {"knobs": {"rt": 4, "bt": 99, "decode": "tile"}}, "2-16") is None
