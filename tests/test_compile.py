import pytest
import torch

import sqc
from tests.conftest import tiny_llama


@pytest.mark.slow
def test_llama_logits_within_quantization_error():
    ref = tiny_llama()
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    calib = [(torch.randint(0, 128, (1, 16)),) for _ in range(4)]
    with torch.no_grad():
        want = ref(ids).logits
    compiled = sqc.compile(model, (ids,), config="w4-s0.45", calibration=calib)
    with torch.no_grad():
        got = compiled(ids)
    assert type(got).__name__ == "CausalLMOutputWithPast"
    err = (got.logits - want).abs().max()
    assert 0 < err < 0.25 * want.abs().max()
    # more bits, less error
    model8 = tiny_llama()
    c8 = sqc.compile(model8, (ids,), config=sqc.QuantConfig(bits=8, outlier_pct=0.4, sensitive_pct=0.05), calibration=calib)
    with torch.no_grad():
        err8 = (c8(ids).logits - want).abs().max()
    assert err8 < err / 4


@pytest.mark.slow
def test_generate_still_works(llama):
    ids = torch.randint(0, 128, (1, 5))
    compiled = sqc.compile(llama, (ids,), config="w3")
    out = compiled.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11) and torch.equal(out[:, :5], ids)
    # the compiled step's tokens are the wrapped model's own eager greedy tokens (same quantized layers)
    with torch.no_grad():
        eager = compiled.model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, eager), (out, eager)


def test_sqc_calls_raise_no_deprecation_warnings(llama, tmp_path):
    """compile, generate, save and load a Hugging Face model with deprecation warnings as errors (pytest's
    configuration ignores them elsewhere: this test is where sqc's own calls are held to it)."""
    import warnings

    import torch._inductor.compile_fx  # noqa: F401  (torch's own import-time deprecations are not sqc's calls)

    ids = torch.randint(0, 128, (1, 6))
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
            warnings.filterwarnings("error", category=category, module=r"(sqc|torch|transformers)(\.|$)")
        compiled = sqc.compile(llama, (ids,), config="w3", calibration=[(ids,)])
        out = compiled.generate(ids, max_new_tokens=4, do_sample=False)
        loaded = sqc.load(sqc.save(compiled, tmp_path / "a", decode_steps=None))
        assert torch.equal(loaded.generate(ids, max_new_tokens=4, do_sample=False), out)
        compiled.save_pretrained(tmp_path / "hf")


@pytest.mark.slow
def test_report_lists_every_layer(llama):
    compiled = sqc.compile(llama, (torch.randint(0, 128, (1, 8)),), config="w3-s0.45")
    text = compiled.report()
    assert "model.layers.1.mlp.down_proj" in text and "64x100" in text
    assert "lm_head" in text and "int8 per row: tvm-int8-" in text  # the output projection, compacted
    assert "tvm-lut-" in text  # the generated kernel each layer runs
    assert "sensitive_pct ignored" not in text  # a per-layer note lives in the dict form
    d = compiled.report_dict()
    assert len(d["layers"]) == 15
    assert any("unweighted" in n for n in d["notes"])


@pytest.mark.slow
def test_targets_parsed():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 4))
    c = sqc.compile(mlp, (torch.randn(1, 8),), config="w4", target="cuda -arch=sm_86")
    assert c.target.as_dict() == {"kind": "cuda", "arch": "sm_86"}
    with pytest.raises(ValueError, match="unknown target"):
        sqc.compile(torch.nn.Sequential(torch.nn.Linear(8, 4)), (torch.randn(1, 8),), target="metal")


def test_bad_config_in_compile():
    with pytest.raises(ValueError, match="valid presets"):
        sqc.compile(torch.nn.Sequential(torch.nn.Linear(8, 4)), (torch.randn(1, 8),), config="w9")


@pytest.mark.slow
def test_minilm_style_bert_compiles():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48)
    bert = BertModel(cfg).eval()
    ref = BertModel(cfg).eval()
    ref.load_state_dict(bert.state_dict())
    ids = torch.randint(0, 64, (1, 7))
    compiled = sqc.compile(bert, (ids,), config="w4")
    assert sum(r.quantized for r in compiled.layers) == 7  # q, k, v, o, intermediate, output, pooler
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).last_hidden_state, ref(ids).last_hidden_state, atol=0.3, rtol=0)


def test_nan_weight_stops_compile_naming_layer(mlp):
    with torch.no_grad():
        mlp[4].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="layer 4: weight has 1 NaN/Inf"):
        sqc.compile(mlp, (torch.randn(2, 100),), config="w3")


@pytest.mark.slow
def test_precomputed_sensitivity(mlp):
    from sqc.passes.annotate_sensitivity import fisher_information

    calib = [(torch.randn(2, 100),) for _ in range(2)]
    loss = lambda o, s: o.pow(2).sum()  # noqa: E731
    f = fisher_information(mlp, calib, ["0.weight", "2.weight", "4.weight"], loss)
    compiled = sqc.compile(mlp, calib[0], config="w4-s0.45", sensitivity=f)
    assert compiled.stage_seconds.keys() >= {"AttachSensitivity", "FitCodebook"}
    with pytest.raises(ValueError, match="no Fisher diagonal for 0.weight"):
        sqc.compile(torch.nn.Sequential(torch.nn.Linear(100, 4)), calib[0], sensitivity={})
    with pytest.raises(ValueError, match="not both"):
        sqc.compile(mlp, calib[0], calibration=calib, sensitivity=f)
