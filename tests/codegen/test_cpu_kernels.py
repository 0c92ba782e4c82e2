"""Generated CPU kernels against the reference op: awkward shapes, poisoned outputs, identity inputs,
misaligned and non-contiguous views, the kernel cache and the tuning database."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tvm  # a hard dependency: a missing TVM fails these tests, it does not skip them

from sqc.codegen import build as B  # noqa: E402
from sqc.codegen.cpu import GemvKnobs, LaneLayout, gemm_candidates, gemv_candidates  # noqa: E402
from sqc.runtime.target import parse_target  # noqa: E402
from sqc.codegen.tune import attach_cpu_kernels  # noqa: E402
from sqc.runtime.cpu.kernels import CpuLutKernels, host_lanes, kernel_key  # noqa: E402
from sqc.runtime.cpu.lanes import from_lane_words, to_lane_words  # noqa: E402
from sqc.runtime.ops import lut_linear_reference  # noqa: E402
from sqc.runtime.qlinear import SqcLinear  # noqa: E402
from sqc.runtime.status import REFERENCE  # noqa: E402
from tests.conftest import module_with_kernels, random_packed  # noqa: E402

AVX512 = "llvm -mcpu=skylake-avx512"  # AVX-512F without VBMI: the fp32 lane kernels (the byte kernels: test_vnni_kernels)
AVX2 = "llvm -mcpu=haswell"
HOST = tvm.get_global_func("target.llvm_get_system_cpu")()
HOST_HAS_AVX512 = "avx512f" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else False
TARGETS = [AVX2] + ([AVX512] if HOST_HAS_AVX512 else [])


def reference(packed, x, bias=None):
    p = packed
    return lut_linear_reference(x.double(), p.codes, p.lut, p.crow, p.col, p.val, bias, p.bits, p.in_features)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bits", [3, 4])
# every K (tail only, whole blocks of 16 or 32 lanes, blocks + tail, an LLM width) and every R (one row,
# fewer rows than a task, several tasks with a partial last one) appears; building each pair's kernels is
# what this test costs, so not all twelve pairs are built
# the fast tier builds one pair (blocks + tail, several tasks with a partial last one); the full suite all six
@pytest.mark.parametrize("R,K", [pytest.param(*rk, marks=pytest.mark.slow) for rk in ((1, 576), (3, 33), (3, 96),
                                                                                    (53, 96))]
                         + [(53, 100), pytest.param(53, 576, marks=pytest.mark.slow)])
def test_kernels_match_reference(target, bits, R, K):
    for sparse in (0.0, 0.03):
        packed = random_packed(R, K, bits, frac=sparse)
        bias = torch.randn(R)
        m, _ = module_with_kernels(packed, target, bias)
        for n in (1, 2, 7, 64):
            x = torch.randn(n, K)  # fresh data per case
            got = m(x).double()
            want = reference(packed, x, bias)
            tol = 1e-5 * (1 + x.abs().sum(1, keepdim=True) * packed.dequantize().abs().max())
            assert ((got - want).abs() <= tol).all(), (target, bits, R, K, sparse, n, (got - want).abs().max())


def test_two_bit_codes_use_the_same_kernels():
    packed = random_packed(7, 100, 2)
    m, _ = module_with_kernels(packed, TARGETS[-1])
    x = torch.randn(3, 100)
    torch.testing.assert_close(m(x).double(), reference(packed, x), rtol=1e-5, atol=1e-5)


def test_kernels_are_found_through_the_codes_they_are_bound_to():
    """The op finds a layer's kernels through its code tensor: a traced call holds no process-specific
    constant, new codes (a reload) rebind the kernels, and codes no live kernels are bound to are refused."""
    packed = random_packed(9, 64, 3, frac=0.05)
    m, _ = module_with_kernels(packed, TARGETS[-1])
    x = torch.randn(1, 64)
    gm = torch.fx.experimental.proxy_tensor.make_fx(m)(x)
    calls = [n for n in gm.graph.nodes if n.target is torch.ops.sqc.lut_linear_cpu.default]
    assert len(calls) == 1 and all(isinstance(a, torch.fx.Node) for a in calls[0].args)  # no int constant
    ep = torch.export.export(m, (x,))  # torch.export sees the same single opaque op, and its program runs
    assert [n.target for n in ep.graph.nodes if n.op == "call_function"] == [torch.ops.sqc.lut_linear_cpu.default]
    torch.testing.assert_close(ep.module()(x), m(x))
    old = m._args
    m._kernels.rebind(packed)  # new lane words, as load_state_dict makes
    m._bind()
    assert m._args[0].data_ptr() != old[0].data_ptr()
    torch.testing.assert_close(m(x).double(), reference(packed, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="no kernels are bound"):
        torch.ops.sqc.lut_linear_cpu(x, *old)  # the old words: their kernels were rebound
    stray = m._args[0].clone()
    with pytest.raises(RuntimeError, match="no kernels are bound"):
        torch.ops.sqc.lut_linear_cpu(x, stray, *m._args[1:])


def _direct(k: CpuLutKernels, packed, x, y):
    """Call the compiled function itself, on caller-provided (possibly poisoned or misaligned) outputs."""
    if x.shape[0] == 1:
        k.fns["1"](x[0], k.words, packed.lut, packed.crow, packed.col, packed.val, k.scode, k.bias, y[0])
    else:
        k.fns["2-16" if x.shape[0] <= 16 else "17+"](x, k.words, packed.lut, packed.crow, packed.col, packed.val, k.scode, k.bias, y)


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bits", [3, 4])
def test_poisoned_outputs_are_all_written(target, bits):
    R, K = 53, 100
    packed = random_packed(R, K, bits)
    m, _ = module_with_kernels(packed, target)
    k = m._kernels
    for n in (1, 2, 17):
        x = torch.zeros(n, k.layout.x_width)
        x[:, :K] = torch.randn(n, K)
        y = torch.full((n, R), float("nan"))
        _direct(k, packed, x, y)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y.double(), reference(packed, x[:, :K]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bits", [3, 4])
def test_identity_input_reproduces_w_hat(target, bits):
    R, K = 53, 100
    packed = random_packed(R, K, bits, frac=0.05)
    m, _ = module_with_kernels(packed, target)
    w_hat = packed.dequantize(torch.float32)
    # batched: the decoded tile (with the exact sparse values written in) times the identity
    got = m(torch.eye(K))
    assert torch.equal(got.T, w_hat)
    # batch 1, one column at a time: exact on the dense part; the sparse correction (val - lut, then added)
    # costs at most two fp32 roundings, of the size of the table entry it corrects
    dense = torch.ones(R, K, dtype=torch.bool)
    r, c = packed.sparse_coo()
    dense[r, c] = False
    for j in range(0, K, 7):
        e = torch.zeros(1, K)
        e[0, j] = 1
        col = m(e)[0]
        assert torch.equal(col[dense[:, j]], w_hat[dense[:, j], j])
        torch.testing.assert_close(col, w_hat[:, j], rtol=2**-21, atol=2**-21 * float(packed.lut.float().abs().max()))


@pytest.mark.parametrize("target", TARGETS)
def test_misaligned_and_noncontiguous_views(target):
    bits = 4
    lay = LaneLayout(100, bits, 16 if target == AVX512 else 8)
    K = lay.k_pad  # a width the kernel takes without a copy, so the misaligned view reaches it
    R = 19
    packed = random_packed(R, K, bits)
    m, _ = module_with_kernels(packed, target)
    for n in (1, 5, 20):
        base = torch.randn(n * K + 1)
        x = base[1:].view(n, K)  # 4 bytes past a 64-byte boundary
        assert x.data_ptr() % 64 != 0
        want = reference(packed, x)
        torch.testing.assert_close(m(x).double(), want, rtol=1e-5, atol=1e-5)
        ybase = torch.empty(n * R + 1)
        y = ybase[1:].view(n, R)
        _direct(m._kernels, packed, x, y)
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
        xt = torch.randn(K, n).T  # non-contiguous
        torch.testing.assert_close(m(xt).double(), reference(packed, xt), rtol=1e-5, atol=1e-5)
        # half precision in, half precision out
        xh = x.to(torch.bfloat16)
        assert m(xh).dtype == torch.bfloat16


@pytest.mark.slow
@pytest.mark.parametrize("lut_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("val_dtype", [torch.float16, torch.float32])
def test_table_and_value_dtypes(lut_dtype, val_dtype):
    packed = random_packed(9, 300, 3, frac=0.05, lut_dtype=lut_dtype, val_dtype=val_dtype)
    m, _ = module_with_kernels(packed, TARGETS[-1])
    for n in (1, 4):
        x = torch.randn(n, 300)
        torch.testing.assert_close(m(x).double(), reference(packed, x), rtol=1e-5, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_every_candidate_schedule_is_correct(target):
    packed = random_packed(53, 100, 3, frac=0.03)
    spec = parse_target(target)
    lib = B.KernelLibrary(spec)
    lanes = 16 if target == AVX512 else 8
    k = CpuLutKernels(packed, lanes, {}, "probe")
    x = torch.zeros(9, k.layout.x_width)
    x[:, :100] = torch.randn(9, 100)
    want = reference(packed, x[:, :100])
    for kn in gemv_candidates():
        k.fns["1"] = lib.get(kernel_key("gemv", packed_module(packed), lanes), kn)
        y = torch.full((1, 53), float("nan"))
        _direct(k, packed, x[:1], y)
        torch.testing.assert_close(y.double(), want[:1], rtol=1e-5, atol=1e-5, msg=str(kn))
    for kn in gemm_candidates("2-16"):
        k.fns["2-16"] = k.fns["17+"] = lib.get(kernel_key("gemm", packed_module(packed), lanes), kn)
        y = torch.full((9, 53), float("nan"))
        _direct(k, packed, x, y)
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5, msg=str(kn))


def packed_module(packed):
    return SqcLinear(packed, None)


@settings(max_examples=40, deadline=None)
@given(
    R=st.integers(1, 20), K=st.integers(1, 400), bits=st.sampled_from([2, 3, 4]), lanes=st.sampled_from([8, 16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_lane_layout_round_trip(R, K, bits, lanes, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (R, K), generator=g)
    words = to_lane_words(codes, bits, lanes)
    lay = LaneLayout(K, bits, lanes)
    assert words.dtype == torch.int32 and words.shape == (-(-R // 8) * 8, lay.words)
    assert torch.equal(from_lane_words(words, bits, lanes, R, K), codes)


def test_module_keeps_one_copy_of_the_codes_and_saves_canonical(tmp_path):
    packed = random_packed(21, 100, 3)
    m, _ = module_with_kernels(packed, TARGETS[-1])
    assert "codes" not in m._buffers  # the lane words replace the canonical codes in memory
    assert torch.equal(m.codes, packed.codes)
    assert torch.equal(m.state_dict()["codes"], packed.codes)
    m.set_kernel(None, REFERENCE)
    assert torch.equal(m._buffers["codes"], packed.codes)


def test_unsupported_widths_and_targets_fall_back_and_say_so():
    m5 = SqcLinear(random_packed(4, 40, 5), None)
    attach_cpu_kernels(torch.nn.Sequential(m5), parse_target(TARGETS[-1]), tune=False)
    assert m5._kernels is None and m5.kernel == "reference (no LUT kernel for 5-bit codes)"
    m3 = SqcLinear(random_packed(4, 40, 3), None)
    attach_cpu_kernels(torch.nn.Sequential(m3), parse_target("llvm -mcpu=x86-64"), tune=False)
    assert m3._kernels is None and "no AVX2/AVX-512" in m3.kernel
    x = torch.randn(2, 40)
    torch.testing.assert_close(m3(x).double(), reference(m3.packed, x), rtol=1e-5, atol=1e-5)


def test_kernel_cache_hit_counts_no_build(tmp_path, monkeypatch):
    monkeypatch.setenv("SQC_CACHE_DIR", str(tmp_path))
    packed = random_packed(16, 64, 4)
    key = kernel_key("gemv", SqcLinear(packed, None), 8)
    before = dict(B.STATS)
    B.KernelLibrary(parse_target(AVX2)).get(key, GemvKnobs())
    assert B.STATS["builds"] == before["builds"] + 1
    B.KernelLibrary(parse_target(AVX2)).get(key, GemvKnobs())  # a new library object: from disk
    assert B.STATS["builds"] == before["builds"] + 1
    assert B.STATS["cache_hits"] == before["cache_hits"] + 1
    # a different schedule is a different library
    B.KernelLibrary(parse_target(AVX2)).get(key, GemvKnobs(rt=4))
    assert B.STATS["builds"] == before["builds"] + 2
    assert not [f for f in os.listdir(tmp_path / "kernels") if f.startswith(".tmp")]


@pytest.mark.slow
def test_tuning_db_is_reused_across_processes(tmp_path):
    script = textwrap.dedent(
        """
        import json, torch, sqc
        from sqc.codegen import build as B
        torch.manual_seed(0)
        mlp = torch.nn.Sequential(torch.nn.Linear(100, 53), torch.nn.ReLU(), torch.nn.Linear(53, 33))
        c = sqc.compile(mlp, (torch.randn(2, 100),), config="w3", target="llvm -mcpu=haswell", tune_trials=3)
        rep = c.tuning_report()
        print(json.dumps({"stats": B.STATS, "n": len(rep["kernels"]),
                          "from_db": [k["from_db"] for k in rep["kernels"]],
                          "tried": [len(k["candidates"]) for k in rep["kernels"]]}))
        """
    )
    env = dict(os.environ, SQC_CACHE_DIR=str(tmp_path), SQC_TUNE_TRIALS="")
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["n"] == 6 and first["stats"]["searches"] == 6 and first["stats"]["builds"] >= 6
    assert all(t == 3 for t in first["tried"])  # the trial budget
    assert second["stats"]["searches"] == 0 and second["stats"]["builds"] == 0  # nothing tuned, nothing built
    assert second["stats"]["cache_hits"] == 6 and all(second["from_db"])
    db = json.loads((tmp_path / "tuning.json").read_text())
    assert len(db) == 6


@pytest.mark.slow
def test_thread_count_follows_affinity():
    script = "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); " \
             "from sqc.codegen.build import import_tvm; tvm = import_tvm(); " \
             "print(tvm.get_global_func('runtime.NumThreads')())"
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "1"


@pytest.mark.slow
def test_tuning_report_lists_kernels_and_layers():
    import sqc

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(100, 53), torch.nn.ReLU(), torch.nn.Linear(53, 33))
    c = sqc.compile(mlp, (torch.randn(2, 100),), config="w4", target=AVX2, tune_trials=2)
    rep = c.tuning_report()
    assert {k["bucket"] for k in rep["kernels"]} == {"1", "2-16", "17+"}
    for k in rep["kernels"]:
        assert k["best_ms"] <= k["default_ms"] and k["gbps"] > 0 and 0 < k["bw_ratio"]
        assert k["layers"] and all(name in ("0", "2") for name in k["layers"])
    md = c.tuning_report("markdown")
    assert md.count("\n| tvm-lut-avx2") == 6
    assert [r.tuned_ms is not None for r in c.layers] == [True, True]


def test_a_kernel_tvm_cannot_build_falls_back_to_the_reference_op(monkeypatch):
    def refuse(self, key, knobs):
        raise RuntimeError("LLVM ERROR: simulated codegen failure")

    monkeypatch.setattr(B.KernelLibrary, "get", refuse)
    packed = random_packed(5, 40, 3)
    m = SqcLinear(packed, None)
    recs = attach_cpu_kernels(torch.nn.Sequential(m), parse_target(AVX2), tune=False)
    assert recs == [] and m._kernels is None
    assert m.kernel.startswith("reference (TVM could not build gemv_5x40_b3_l8") and "simulated codegen failure" in m.kernel
    x = torch.randn(3, 40)
    torch.testing.assert_close(m(x).double(), reference(packed, x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_tuning_progress_counts_trials(tmp_path, monkeypatch):
    import sqc

    monkeypatch.setenv("SQC_CACHE_DIR", str(tmp_path))
    seen = []
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(100, 53), torch.nn.ReLU(), torch.nn.Linear(53, 33))
    sqc.compile(mlp, (torch.randn(2, 100),), config="w4", target=AVX2, tune_trials=2,
                progress=lambda stage, done, total: seen.append((stage, done, total)))
    tune = [(d, t) for s, d, t in seen if s == "tune"]
    assert tune and tune[-1][0] == tune[-1][1] == 2 * 3 * 2  # 2 kernels x 3 buckets x 2 trials
    assert [d for d, _ in tune] == sorted(d for d, _ in tune)


def test_target_wider_than_this_cpu_runs_the_reference_op(monkeypatch):
    import sqc.codegen.tune as tune

    monkeypatch.setattr(tune, "host_lanes", lambda: 8)  # pretend this CPU has AVX2 only
    packed = random_packed(5, 40, 3)
    m = SqcLinear(packed, None)
    attach_cpu_kernels(torch.nn.Sequential(m), parse_target(AVX512), tune=False)
    assert m._kernels is None and m.kernel == "reference (target skylake-avx512 needs avx512f, which this CPU lacks)"
    m3 = SqcLinear(packed, None)
    monkeypatch.setenv("SQC_CPU_KERNELS", "vnni")  # the byte kernels name every flag they need
    attach_cpu_kernels(torch.nn.Sequential(m3), parse_target("llvm -mcpu=znver4"), tune=False)
    assert m3._kernels is None and m3.kernel == ("reference (target znver4 needs avx512f, avx512bw, avx512vbmi, "
                                                 "avx512_vnni, which this CPU lacks)")
    m2 = SqcLinear(packed, None)
    attach_cpu_kernels(torch.nn.Sequential(m2), parse_target(AVX2), tune=False)
    assert m2.kernel == "tvm-lut-avx2"


def test_host_lanes_reads_the_cpu_flags_without_tvm():
    from sqc.codegen.cpu import cpu_lanes

    assert host_lanes(frozenset({"sse2", "avx2", "avx512f"})) == 16
    # the byte kernels need VBMI and VNNI as well: a CPU without them keeps the fp32 lane kernels
    assert host_lanes(frozenset({"avx2", "avx512f", "avx512bw", "avx512vbmi", "avx512_vnni"})) == 64
    assert host_lanes(frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni"})) == 16
    assert host_lanes(frozenset({"sse2", "avx2"})) == 8
    assert host_lanes(frozenset({"sse2"})) == 0
    # /proc/cpuinfo agrees with what TVM's LLVM makes of this machine's CPU
    # the byte kernels (64) are opt-in: without SQC_CPU_KERNELS=vnni the target gets the fp32 lane kernels
    assert min(host_lanes(), 16) == cpu_lanes(tvm.target.Target({"kind": "llvm", "mcpu": HOST}))
