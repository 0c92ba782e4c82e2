"""The byte (VBMI + VNNI) CPU kernels against the reference that states their numerics
(:func:`sqc.runtime.cpu.bytelanes.reference`), that reference against the exact op, and the layout's laws."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sqc.codegen import build as B
from sqc.codegen.cpu import KERNELS_ENV, cpu_lanes, gemm_candidates, gemv_candidates
from sqc.runtime.target import parse_target
from sqc.runtime.cpu import bytelanes
from sqc.runtime.cpu.bytelanes import BYTE_LANES, ByteLayout, byte_tables, from_byte_words, quantize_x, to_byte_words
from sqc.runtime.cpu.kernels import CpuLutKernels, host_lanes, kernel_key
from sqc.runtime.ops import lut_linear_reference
from sqc.runtime.qlinear import SqcLinear
from tests.conftest import module_with_kernels, random_packed

VNNI = "llvm -mcpu=znver4"  # AVX-512 with VBMI and VNNI
needs_vnni = pytest.mark.skipif(host_lanes() != BYTE_LANES, reason="this CPU lacks AVX-512 VBMI/VNNI")


@pytest.fixture(autouse=True)
def _opt_in(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "vnni")


def test_the_byte_kernels_are_opt_in(monkeypatch):
    import tvm

    monkeypatch.delenv(KERNELS_ENV)
    assert cpu_lanes(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})) == 16


def byte_reference(packed, x, bias=None):
    p = packed
    return bytelanes.reference(x, p.unpack(torch.int64), p.lut, p.crow, p.col, p.val, bias, p.bits).double()


def exact(packed, x, bias=None):
    p = packed
    return lut_linear_reference(x.double(), p.codes, p.lut, p.crow, p.col, p.val, bias, p.bits, p.in_features)


def tol(packed, x):
    """The kernels against the reference: fp32 summation order, plus two activations rounded the other way (the
    kernels' ``127 / max`` may differ from torch's in the last bit, which moves a value at a rounding tie by one
    step of its group, at most ``max|x| / 127``)."""
    wmax = packed.dequantize().abs().max()
    return 2e-6 * (1 + x.abs().sum(1, keepdim=True) * wmax) + 2 * x.abs().amax(1, keepdim=True) / 127 * wmax


def test_the_target_picks_the_byte_kernels():
    import tvm

    assert cpu_lanes(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})) == BYTE_LANES
    assert cpu_lanes(tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})) == 16  # no VBMI


@pytest.mark.slow
@needs_vnni
@pytest.mark.parametrize("bits", [2, 3, 4])
# K: one partial block, whole blocks (128/168/256), blocks + a tail, an LLM width; R: one row, a partial task
@pytest.mark.parametrize("R,K", [(1, 576), (3, 33), (53, 168), (53, 600)])
def test_kernels_match_their_reference(bits, R, K):
    for frac in (0.0, 0.03):
        packed = random_packed(R, K, bits, frac=frac)
        bias = torch.randn(R)
        m, _ = module_with_kernels(packed, VNNI, bias)
        assert m.kernel == "tvm-lut-vnni"
        for n in (1, 2, 7, 40):
            x = torch.randn(n, K)
            x[:, K // 3] *= 50  # an outlier: its group's scale, not the row's
            got = m(x).double()
            want = byte_reference(packed, x, bias)
            assert ((got - want).abs() <= tol(packed, x)).all(), (bits, R, K, frac, n, (got - want).abs().max())


@pytest.mark.slow
@needs_vnni
def test_every_candidate_schedule_is_correct():
    packed = random_packed(53, 300, 3, frac=0.03)
    lib = B.KernelLibrary(parse_target(VNNI))
    k = CpuLutKernels(packed, BYTE_LANES, {}, "probe")
    k.bind(packed.lut, packed.crow, packed.col, packed.val, None)
    x = torch.randn(9, 300)
    want = byte_reference(packed, x)
    args = k.kernel_args(packed.lut, packed.crow, packed.col, packed.val)
    m = SqcLinear(packed, None)
    for kn in gemv_candidates(BYTE_LANES):
        fn = lib.get(kernel_key("gemv", m, BYTE_LANES), kn)
        y = torch.full((1, 53), float("nan"))
        fn(x[:1], *args, y)
        assert ((y.double() - want[:1]).abs() <= tol(packed, x[:1])).all(), kn
    for kn in gemm_candidates("2-16", BYTE_LANES):
        fn = lib.get(kernel_key("gemm", m, BYTE_LANES), kn)
        y = torch.full((9, 53), float("nan"))  # poisoned: every output is written
        fn(x, *args, y)
        assert ((y.double() - want).abs() <= tol(packed, x)).all(), kn


@needs_vnni
def test_misaligned_views_and_half_precision():
    packed = random_packed(19, 256, 4)
    m, _ = module_with_kernels(packed, VNNI)
    for n in (1, 5):
        base = torch.randn(n * 256 + 1)
        x = base[1:].view(n, 256)  # 4 bytes past a 64-byte boundary
        assert ((m(x).double() - byte_reference(packed, x)).abs() <= tol(packed, x)).all()
        assert m(x.to(torch.bfloat16)).dtype == torch.bfloat16
        with torch.inference_mode():  # as under no_grad
            assert torch.equal(m(x), m(x.clone()))


@needs_vnni
def test_saved_codes_are_canonical_and_reload_rebinds():
    packed = random_packed(21, 200, 3, frac=0.05)
    m, _ = module_with_kernels(packed, VNNI)
    assert m._kernels.words.dtype == torch.uint8 and m._kernels.words.shape == (6, 4 * 64 * ByteLayout(200, 3).n_blocks)
    assert torch.equal(m.state_dict()["codes"], packed.codes)
    other = random_packed(21, 200, 3, frac=0.05, seed=7)
    m.load_state_dict({**m.state_dict(), **{k: v for k, v in SqcLinear(other, None).state_dict().items()}})
    x = torch.randn(3, 200)
    assert ((m(x).double() - byte_reference(other, x)).abs() <= tol(other, x)).all()


def test_the_int8_numerics_stay_close_to_the_exact_op():
    """The stated numerics cost little: the tables move by at most half a step, and the activations by at most
    half of their group's step, so the output error is bounded by those steps times the other operand."""
    torch.manual_seed(0)
    for bits in (2, 3, 4):
        packed = random_packed(40, 600, bits, frac=0.02)
        x = torch.randn(6, 600)
        x[:, 5] = 80.0  # an outlier activation
        got, want = byte_reference(packed, x), exact(packed, x)
        _, t, _ = byte_tables(packed.lut)
        xd = quantize_x(x, ByteLayout(600, bits)).double()
        w = packed.dequantize(torch.float64)
        bound = (xd - x.double()).abs() @ w.abs().T + x.double().abs().sum(1, keepdim=True) * t.double()[None] / 2
        assert ((got - want).abs() <= bound * 1.001 + 1e-4).all()


@settings(max_examples=40, deadline=None)
@given(R=st.integers(1, 12), K=st.integers(1, 700), bits=st.sampled_from([2, 3, 4]), seed=st.integers(0, 2**31 - 1))
def test_byte_layout_round_trip(R, K, bits, seed):
    codes = torch.randint(0, 1 << bits, (R, K), generator=torch.Generator().manual_seed(seed))
    words = to_byte_words(codes, bits)
    assert words.dtype == torch.uint8 and words.shape == (-(-R // 8) * 2, 4 * ByteLayout(K, bits).row_bytes)
    assert torch.equal(from_byte_words(words, bits, R, K), codes)


@settings(max_examples=40, deadline=None)
@given(R=st.integers(1, 6), E=st.sampled_from([4, 8, 16]), scale=st.floats(1e-4, 1e3), seed=st.integers(0, 2**31 - 1))
def test_byte_tables_are_within_half_a_step(R, E, scale, seed):
    lut = (torch.randn(R, E, generator=torch.Generator().manual_seed(seed)) * scale).to(torch.float16)
    tab, t, m = byte_tables(lut)
    assert tab.shape == (R, 64) and torch.equal(tab, tab[:, :E].repeat(1, 64 // E))  # repeated for vpermb
    w = m[:, None] + t[:, None] * tab[:, :E].float()
    assert ((w - lut.float()).abs() <= t[:, None] * 0.5001).all()


@settings(max_examples=40, deadline=None)
@given(K=st.integers(1, 600), bits=st.sampled_from([2, 3, 4]), seed=st.integers(0, 2**31 - 1))
def test_activation_groups_are_within_half_a_step(K, bits, seed):
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(seed)) * 3
    lay = ByteLayout(K, bits)
    xd = quantize_x(x, lay)
    z, p, q, _ = lay.placement()
    group = torch.from_numpy((z * lay.passes + p) * 8 + q).long()
    for g in group.unique():
        cols = group == g
        assert int(cols.sum()) <= 8  # a group is at most one qword's bytes in a pass
        step = x[:, cols].abs().amax(1, keepdim=True) / 127
        assert ((xd[:, cols] - x[:, cols]).abs() <= step * 0.5001 + 1e-7).all()
