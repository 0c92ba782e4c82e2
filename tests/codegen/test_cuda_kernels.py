"""CUDA target: TVM-generated kernels built with nvcc in every run; run against the reference op on a GPU.

Without a GPU (CI): the source is generated for every check key, built with
nvcc for sm_80, sm_86, sm_89 and sm_90, and ptxas's resource report must show no
local-memory spills in the gemv and registers and shared memory within a block's
limits; a CUDA-compiled model saves its source and fatbin, loads
without TVM or JAX, and running it on the CPU is a clear error.

With a GPU (``gpu`` marker): every kernel of the check bundle (every batch
bucket and every tuning candidate) runs on fresh random data against the
reference op, outputs poisoned with NaN first, relative error at most 1e-3
against fp32 on the same fp16 inputs. The bundle is built here when TVM and
nvcc are installed, or read from ``$SQC_CUDA_BUNDLE`` (a GPU machine without
TVM: ``python benchmarks/kernel_speed.py --device cuda --prepare DIR`` writes it).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sqc.runtime.cuda.chunks import from_chunk_words, to_chunk_words
from sqc.runtime.cuda.kernels import CudaUnavailable
from sqc.runtime.decode import CompiledDecoder
from tests.conftest import ops_called

HAVE_TVM = True
try:  # noqa: SIM105
    import tvm  # noqa: F401
except ImportError:
    HAVE_TVM = False

from sqc.codegen.nvcc import find_nvcc  # noqa: E402
from sqc.runtime.status import REFERENCE  # noqa: E402

needs_tvm = pytest.mark.skipif(not HAVE_TVM, reason="TVM is not installed (kernels are generated where it is)")
needs_nvcc = pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found (set SQC_NVCC or put it on PATH)")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def check_keys():
    from sqc.codegen.cuda import CudaKey
    from sqc.cuda_check import CHECK_KEYS

    return [CudaKey(**k) for k in CHECK_KEYS]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 300), st.sampled_from([2, 3, 4]), st.integers(0, 2**31 - 1))
def test_chunk_layout_round_trip_and_bit_positions(rows, k, bits, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, k), generator=g)
    words = to_chunk_words(codes, bits)
    p = 32 // bits
    assert words.dtype == torch.int32 and words.shape == (rows, 4 * -(-k // (4 * p)))
    assert torch.equal(from_chunk_words(words, bits, k), codes)
    # the documented law: column c is word c // P at bits (c % P) * bits
    c = int(torch.randint(0, k, (1,), generator=g))
    w = int(words[0, c // p]) & 0xFFFFFFFF
    assert (w >> ((c % p) * bits)) & ((1 << bits) - 1) == int(codes[0, c])


@pytest.fixture(scope="module")
def check_source():
    from sqc.codegen.cuda import GEMM_BATCH_TILES, gemm_candidates, gemv_candidates, generate_source

    reqs = []
    for key in check_keys():
        reqs += [("gemv", key, kn) for kn in gemv_candidates(key)]
        for tile in GEMM_BATCH_TILES.values():
            reqs += [("gemm", key, kn) for kn in gemm_candidates(key, tile)]
    return generate_source(reqs, "sm_90")


@pytest.mark.slow
@needs_tvm
def test_generated_source_declares_every_kernel_with_its_parameters(check_source):
    source, specs = check_source
    assert len(specs) == len({s.name for s in specs})
    for s in specs:
        assert f"void __launch_bounds__({s.threads}) {s.name}(" in source
        base = {"bias", "lut", "w", "x", "y"} | ({"col", "crow", "sc", "val"} if s.key.sparse else set())
        assert set(s.params) == base | ({"n"} if s.op == "gemm" else set()), s.params
    gemv = [s for s in specs if s.op == "gemv"]
    assert all("uint4" in source.split(s.name + "(")[2].split("extern \"C\"")[0] for s in gemv), "16-byte code loads"
    assert "mma.sync.aligned.m16n8k16" in source and "sqc_mma_16816(" in source


@pytest.mark.slow
@needs_tvm
@needs_nvcc
def test_every_kernel_builds_with_nvcc_without_spills(check_source):
    """Every check kernel (all candidates) for every architecture sqc builds for (sm_80, sm_86, sm_89, sm_90),
    from one nvcc run."""
    from sqc.codegen.cuda import CUDA_ARCHS
    from sqc.codegen.nvcc import resource_report

    source, specs = check_source
    archs = CUDA_ARCHS
    assert set(archs) >= {"sm_80", "sm_86", "sm_89", "sm_90"}
    report = resource_report(source, archs)
    for arch in archs:
        assert set(report[arch]) == {s.name for s in specs}, arch
        for s in specs:
            r = report[arch][s.name]
            assert r["smem"] <= 48 * 1024, (arch, s.name, r)
            # the block fits one SM's register file (64 Ki 32-bit registers) at ptxas's count, at most 255 each
            assert r["registers"] <= 255 and r["registers"] * s.threads <= 65536, (arch, s.name, s.threads, r)
            if s.op == "gemv":  # no local memory at all in the gemv: no spills, no stack arrays
                assert r["spill_stores"] == r["spill_loads"] == r["stack"] == 0, (arch, s.name, r)
            else:  # ptxas spills up to 40 bytes in a few gemm variants (it picks 32 registers for some); bounded
                assert r["spill_stores"] <= 64 and r["spill_loads"] <= 64, (arch, s.name, s.knobs, r)


@needs_nvcc
def test_fatbin_builds_for_two_architectures_and_is_cached():
    from sqc.codegen.cuda import PRELUDE
    from sqc.codegen.nvcc import build_fatbin

    src = PRELUDE + 'extern "C" __global__ void k(float* y) { y[threadIdx.x] = 1.0f; }\n'
    fb = build_fatbin(src, ("sm_80", "sm_90"))
    assert len(fb) > 500
    assert build_fatbin(src, ("sm_80", "sm_90")) == fb  # served from the cache


def test_bad_arch_is_rejected():
    from sqc.codegen.nvcc import _arch_num

    with pytest.raises(ValueError, match="sm_86"):
        _arch_num("compute_86")


@pytest.mark.slow
@needs_tvm
@needs_nvcc
def test_cuda_compile_save_load_without_gpu(tmp_path, mlp):
    import sqc

    x = torch.randn(5, 100)
    ref = mlp(x)
    compiled = sqc.compile(mlp, (x,), config="w3-s0.45", target="cuda -arch=sm_86", tune=False)
    kinds = {m.kernel for m in compiled.quantized_modules().values()}
    assert kinds == {"tvm-cuda-sm_86"}
    assert compiled.cuda is not None and len(compiled.cuda.fatbin) > 1000
    recs = compiled.tuning_report()["kernels"]
    assert {r["bucket"] for r in recs} == {"1", "2-16", "17+"} and all(r["best_ms"] is None for r in recs)
    assert "not timed" in compiled.tuning_report("markdown")
    if not torch.cuda.is_available():
        with pytest.raises(CudaUnavailable, match=r"layer '0' was compiled for 'cuda -arch=sm_86'.*target='llvm'"):
            compiled(x)
    out = sqc.save(compiled, tmp_path / "a")
    assert sorted(os.listdir(os.path.join(out, "cuda"))) == ["kernels.cu", "kernels.fatbin", "plan.json"]
    # a fresh process with TVM and JAX made unimportable loads it; packed weights survive the round trip
    code = textwrap.dedent(f"""
        import sys, torch
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('tvm', 'tvm_ffi', 'jax', 'jaxlib'):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        import sqc
        m = torch.nn.Sequential(torch.nn.Linear(100, 53), torch.nn.ReLU(), torch.nn.Linear(53, 33, bias=False),
                                torch.nn.ReLU(), torch.nn.Linear(33, 3))
        c = sqc.load({str(out)!r}, model=m)
        print(sorted({{q.kernel for q in c.quantized_modules().values()}}))
        w = c.quantized_modules()['0'].packed.dequantize()
        torch.save(w, {str(tmp_path / 'w.pt')!r})
        assert not any(k.split('.')[0] in ('tvm', 'jax') for k in sys.modules), [k for k in sys.modules if 'tvm' in k]
        try:
            c(torch.randn(2, 100))
        except sqc.runtime.cuda.kernels.CudaUnavailable as e:
            print('clear error:', e)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "['tvm-cuda-sm_86']" in p.stdout
    if not torch.cuda.is_available():
        assert "clear error: layer" in p.stdout
    if not torch.cuda.is_available():  # the GPU half of tuning refuses clearly where there is no GPU
        p = subprocess.run([sys.executable, "-m", "sqc", "tune-gpu", out], capture_output=True, text=True, timeout=300)
        assert p.returncode == 1 and "needs an NVIDIA GPU" in p.stderr, p.stderr[-2000:]
    w = torch.load(tmp_path / "w.pt")
    assert torch.equal(w, compiled.quantized_modules()["0"].packed.dequantize())
    assert torch.isfinite(ref).all()


def test_import_sqc_needs_neither_tvm_nor_jax():
    code = ("import sys, sqc, sqc.runtime.cuda.kernels, sqc.cuda_check\n"
            "bad = [k for k in sys.modules if k.split('.')[0] in ('tvm', 'jax')]\nassert not bad, bad\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


# -- on a GPU ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from sqc.runtime.cuda.kernels import CudaBundle

    path = os.environ.get("SQC_CUDA_BUNDLE")
    if path:
        return CudaBundle.read(path)
    if not (HAVE_TVM and find_nvcc()):
        pytest.skip("no $SQC_CUDA_BUNDLE and no TVM + nvcc to build one")
    from sqc.codegen.cuda import build_check_bundle

    major, minor = torch.cuda.get_device_capability()
    return build_check_bundle(check_keys(), f"sm_{major}{minor}")


BATCHES = {"1": (1,), "2-16": (2, 7, 16), "17+": (17, 64, 100)}


@gpu
def test_every_kernel_matches_the_reference_op(bundle):
    g = torch.Generator().manual_seed(1234)
    from sqc.cuda_check import check_kernel

    failures, n_checked = [], 0
    for slot in bundle.plan["slots"]:
        key = slot["key"]
        if key["rows"] * key["in_features"] > 8_000_000:
            continue  # the large benchmark shapes are checked by benchmarks/kernel_speed.py --device cuda
        for sym in slot["candidates"]:
            for n in BATCHES[slot["bucket"]]:
                r = check_kernel(bundle.module, sym, key, n, g)
                n_checked += 1
                if not r["ok"]:
                    failures.append((slot["bucket"], key, bundle.plan["kernels"][sym]["knobs"], r))
    assert n_checked > 50
    assert not failures, failures[:5]


def check_gpu_decode(compiled, ids: torch.Tensor) -> None:
    """A CUDA model (on the GPU) runs its layers through ``sqc::lut_linear_cuda``, and ``generate`` runs the
    compiled step with its buffers on the GPU, later steps replayed as one captured CUDA graph, giving the
    eager step's tokens; sampling there repeats with a seed."""
    assert "lut_linear_cuda" in ops_called(compiled, ids.cuda())
    eager = CompiledDecoder(compiled.model, compile_step=False).generate(ids.cuda(), max_new_tokens=10,
                                                                        min_new_tokens=10)
    got = compiled.generate(ids.cpu(), max_new_tokens=10, min_new_tokens=10)  # the prompt moves to the model
    assert got.is_cuda and torch.equal(got, eager)
    assert compiled.decode_stats["replay"].endswith("captured in one CUDA graph"), compiled.decode_stats
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=True, seed=3)
    assert torch.equal(compiled.generate(ids.cuda(), **kw), compiled.generate(ids.cuda(), **kw))


@gpu
def test_compiled_model_runs_on_gpu_and_matches_the_reference(llama):
    if not (HAVE_TVM and find_nvcc()):
        pytest.skip("compiling needs TVM + nvcc")
    import sqc

    ids = torch.randint(0, 128, (1, 12))
    major, minor = torch.cuda.get_device_capability()
    compiled = sqc.compile(llama, (ids,), config="w3-s0.45", target=f"cuda -arch=sm_{major}{minor}", tune=False)
    ref_model = compiled.model
    mods = compiled.quantized_modules()
    assert mods and all(m.kernel.startswith("tvm-cuda") for m in mods.values())
    with torch.no_grad():
        compiled.to("cuda")
        check_gpu_decode(compiled, ids)
        out = compiled(ids.cuda()).logits.float().cpu()
        for m in mods.values():
            m.set_kernel(None, REFERENCE)
        ref = ref_model(ids.cuda()).logits.float().cpu()
    assert ((out - ref).norm() / ref.norm()) < 1e-2


@gpu
def test_cuda_artifact_runs_on_gpu_without_tvm():
    """A CUDA artifact compiled elsewhere (``$SQC_CUDA_ARTIFACT``, a tiny LLaMA) loads and matches the reference op."""
    path = os.environ.get("SQC_CUDA_ARTIFACT")
    if not path:
        pytest.skip("no $SQC_CUDA_ARTIFACT (benchmarks/kernel_speed.py --device cuda --prepare DIR writes DIR/tiny-llama)")
    import sqc

    compiled = sqc.load(path).to("cuda")
    ids = torch.randint(0, 128, (2, 9), device="cuda")
    with torch.no_grad():
        out = {n: compiled(ids[:n]).logits.float() for n in (1, 2)}
        step = compiled.generate(ids[:1], max_new_tokens=4, do_sample=False)
        check_gpu_decode(compiled, ids[:1])
        for m in compiled.quantized_modules().values():
            m.set_kernel(None, REFERENCE)
        ref = {n: compiled(ids[:n]).logits.float() for n in (1, 2)}
    for n in out:
        assert ((out[n] - ref[n]).norm() / ref[n].norm()) < 1e-2
    assert step.shape == (1, 13)


@gpu
def test_tune_gpu_times_every_candidate_and_rewrites_the_plan(tmp_path):
    """``sqc tune-gpu`` on a CUDA artifact (``$SQC_CUDA_ARTIFACT``): every slot timed, the plan rewritten."""
    import json
    import shutil

    src = os.environ.get("SQC_CUDA_ARTIFACT")
    if not src:
        pytest.skip("no $SQC_CUDA_ARTIFACT")
    path = str(tmp_path / "a")
    shutil.copytree(src, path)
    p = subprocess.run([sys.executable, "-m", "sqc", "tune-gpu", path, "--json", "--repeats", "20"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(os.path.join(path, "cuda", "plan.json")) as f:
        plan = json.load(f)
    assert plan["device"] and plan["copy_gbps"] > 0
    for slot in plan["slots"]:
        assert set(slot["ms"]) == set(slot["candidates"]) and slot["chosen"] == min(slot["ms"], key=slot["ms"].get)
    import sqc

    compiled = sqc.load(path).to("cuda")
    ids = torch.randint(0, 128, (1, 7), device="cuda")
    with torch.no_grad():
        assert torch.isfinite(compiled(ids).logits).all()
    assert "not timed" not in open(os.path.join(path, "tuning.md")).read()
