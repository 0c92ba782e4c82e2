"""The generated CPU kernels run their parallel loops on torch's OpenMP team (one thread pool, not two)."""
import os
import tempfile

import pytest
import torch

import tvm  # a hard dependency: a missing TVM fails these tests, it does not skip them

from sqc.codegen.build import LAUNCHER, KernelLibrary  # noqa: E402
from sqc.codegen.cpu import build_gemv  # noqa: E402
from sqc.runtime.target import parse_target  # noqa: E402
from sqc.runtime.cpu import threads  # noqa: E402
from sqc.runtime.cpu.kernels import kernel_key  # noqa: E402
from sqc.runtime.cpu.lanes import GemvKnobs  # noqa: E402
from sqc.runtime.ops import lut_linear_reference  # noqa: E402
from sqc.runtime.qlinear import SqcLinear  # noqa: E402

from tests.conftest import module_with_kernels, random_packed  # noqa: E402

AVX2 = "llvm -mcpu=haswell"


def test_openmp_entry_points_are_torchs():
    entry = threads.openmp_entry_points()
    assert entry is not None and len(entry) == 4 and all(entry)


def test_built_kernels_run_on_torch_openmp_and_agree_across_thread_counts():
    packed = random_packed(200, 576, 3, seed=3)
    m, _ = module_with_kernels(packed, AVX2)
    libs = [p for p in threads.MODES if os.path.basename(p).startswith("gemv_200x576")]
    assert libs and all(threads.MODES[p] == "torch_openmp" for p in libs), {p: threads.MODES[p] for p in libs}
    x = torch.randn(1, 576)
    ref = lut_linear_reference(x.double(), packed.codes, packed.lut, packed.crow, packed.col, packed.val, None,
                               3, 576)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):  # 1: the serial path; 3 on 2 cores: a team larger than the cores
            torch.set_num_threads(n)
            outs.append(m(x))
    finally:
        torch.set_num_threads(before)
    for y in outs:
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
        # each task computes the same rows whatever thread runs it: the results are bitwise equal
        assert torch.equal(y, outs[0])


def test_library_without_the_launcher_keeps_tvms_pool_and_says_so():
    packed = random_packed(64, 96, 3, seed=1)
    spec = parse_target(AVX2)
    layer = SqcLinear(packed, None)
    key = kernel_key("gemv", layer, 8)
    func = build_gemv(key, GemvKnobs(rt=2, unroll=1))
    ex = tvm.compile(tvm.IRModule({"gemv": func}), target=spec.to_tvm())
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "old.so")
        ex.export_library(path)  # no launcher: what an older sqc built
        tvm.runtime.load_module(path)
        with pytest.warns(RuntimeWarning, match="TVM's own thread pool.*older sqc"):
            assert threads.use_torch_threads(path) is False
        assert threads.MODES[path].startswith("tvm_pool: ")
        report = threads.thread_pools()
        assert report["tvm_pool"] >= 1 and report["why_tvm_pool"]


def test_the_launcher_is_part_of_the_kernel_digest():
    lib = KernelLibrary(parse_target(AVX2))
    with open(LAUNCHER) as fh:
        assert "sqc_parallel_launch" in fh.read()
    a = lib.digest("script")
    from sqc.codegen import build as B

    B._launcher_source.cache_clear()
    orig = B.LAUNCHER
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".c", delete=False) as fh:
            fh.write("/* another launcher */")
        B.LAUNCHER = fh.name
        assert lib.digest("script") != a  # a changed launcher rebuilds the cached libraries
    finally:
        B.LAUNCHER = orig
        B._launcher_source.cache_clear()
        os.unlink(fh.name)
