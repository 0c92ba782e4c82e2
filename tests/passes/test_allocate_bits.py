"""AllocateBits: a bits budget gives each layer 2, 3 or 4 bits by sensitivity, within the stored size."""
import pytest
import torch

import sqc
from sqc.artifact import artifact_bits_per_weight
from sqc.passes.allocate_bits import stored_bits
from sqc.passes.annotate_sensitivity import calibration_statistics
from sqc.runtime.fused import fused_groups

from tests.conftest import tiny_llama

# tiny layers (64 inputs): a 2-bit table alone costs a bit per weight, so budgets sit higher than on real models
BUDGET = 5.2


def samples():
    ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(3))
    return [(ids[i : i + 1],) for i in range(3)]


def widths(compiled):
    return {r.module: r.bits for r in compiled.layers if r.quantized}


def compile_budget(bpw=BUDGET, fit="kmeans", **kw):
    s = samples()
    cfg = sqc.QuantConfig(bits_per_weight=bpw, fit=fit)
    return sqc.compile(tiny_llama(), s[0], config=cfg, calibration=s, **kw)


@pytest.fixture(scope="module")
def budgeted():
    return compile_budget(kernels=False)


def test_widths_are_mixed_siblings_share_one_and_the_size_is_within_budget(budgeted, tmp_path):
    bits = widths(budgeted)
    assert set(bits.values()) <= {2, 3, 4} and len(set(bits.values())) > 1, bits
    for i in range(2):
        p = f"model.layers.{i}."
        assert bits[p + "self_attn.q_proj"] == bits[p + "self_attn.k_proj"] == bits[p + "self_attn.v_proj"]
        assert bits[p + "mlp.gate_proj"] == bits[p + "mlp.up_proj"]
    # fused as at uniform widths: q/k/v and gate/up of both blocks
    assert len(fused_groups(budgeted.model)) == 4
    for name, m in budgeted.quantized_modules().items():
        assert m.packed.bits == bits.get(name, m.packed.bits)
    assert any("bits budget 5.2 per weight" in n for n in budgeted.notes)
    stored = artifact_bits_per_weight(sqc.save(budgeted, tmp_path / "a", decode_steps=None))["overall"]
    assert BUDGET - 0.35 < stored <= BUDGET


def test_stored_bits_is_what_a_packed_layer_holds(budgeted):
    for m in budgeted.quantized_modules().values():
        p = m.packed
        expect = stored_bits(p.out_features, p.in_features, p.bits, p.val.numel(), p.lut.element_size(),
                             p.val.element_size())
        assert expect == 8 * sum(p.nbytes().values())


def test_a_larger_budget_buys_more_bits_and_less_error():
    lo, hi = compile_budget(4.4, kernels=False), compile_budget(6.5, kernels=False)

    def mean_bits(c):
        rs = [r for r in c.layers if r.quantized]
        return sum(r.bits * r.in_features * r.out_features for r in rs) / sum(r.in_features * r.out_features for r in rs)

    assert mean_bits(lo) < mean_bits(hi)
    err = lambda c: sum(r.weighted_error * r.in_features * r.out_features for r in c.layers if r.quantized)  # noqa: E731
    assert err(hi) < err(lo)


def test_the_bits_go_to_the_sensitive_layer():
    s = samples()
    model = tiny_llama()
    names = [n for n, _ in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")]
    sens = calibration_statistics(model, s, names, call_kwargs={"use_cache": False})
    cfg = sqc.QuantConfig(bits_per_weight=4.4)
    target = "model.layers.1.self_attn.o_proj"
    plain = widths(sqc.compile(tiny_llama(), s[0], config=cfg, sensitivity=sens, kernels=False))
    assert plain[target] < 4, plain
    sens.fisher[target + ".weight"] *= 1e6
    loud = widths(sqc.compile(tiny_llama(), s[0], config=cfg, sensitivity=sens, kernels=False))
    assert loud[target] == 4
    assert sum(loud.values()) <= sum(plain.values())  # the same budget: others gave their bits up


@pytest.mark.slow
def test_guided_budget_round_trips_with_kernels(tmp_path):
    compiled = compile_budget(fit="guided")
    assert "AllocateBits" in compiled.stage_seconds and "FitGuided" in compiled.stage_seconds
    assert len(set(widths(compiled).values())) > 1
    ids = samples()[1][0]
    with torch.no_grad():
        y = compiled(ids).logits
        loaded = sqc.load(sqc.save(compiled, tmp_path / "a", decode_steps=None))
        assert torch.equal(loaded(ids).logits, y)
        assert {n: m.packed.bits for n, m in loaded.quantized_modules().items()} == \
            {n: m.packed.bits for n, m in compiled.quantized_modules().items()}
        import transformers

        assert sqc.hf.register_with_transformers()
        sqc.hf.save_pretrained(compiled, tmp_path / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
        torch.testing.assert_close(hf(ids).logits, y, rtol=1e-5, atol=1e-5)


def test_errors():
    s = samples()
    with pytest.raises(ValueError, match="needs calibration data"):
        sqc.compile(tiny_llama(), s[0], config=sqc.QuantConfig(bits_per_weight=5.0), kernels=False)
    with pytest.raises(ValueError, match=r"below the smallest size this model can be stored in .* 3\.\d+ bits per"):
        sqc.compile(tiny_llama(), s[0], config="b3", calibration=s, kernels=False)
    with pytest.raises(ValueError, match="layer-streamed pipeline cannot run.*bits budget"):
        sqc.compile(tiny_llama(), s[0], config="b3.5", calibration=s, stream=True, kernels=False)
    with pytest.raises(ValueError, match="bits_per_weight is a budget"):
        sqc.QuantConfig(bits_per_weight=1.5)
