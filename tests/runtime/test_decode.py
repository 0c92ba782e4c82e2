"""The compiled decode step: greedy tokens equal the eager path's; fallbacks are reported."""
import pytest
import torch

import sqc

pytestmark = pytest.mark.slow  # torch.compile of a decode step: about half a minute on 2 cores


@pytest.fixture(scope="module")
def compiled_llama():
    import sys, os
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from conftest import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    return sqc.compile(model, (ids,), config="w4", tune=False), ids


def test_compiled_step_matches_eager_generate(compiled_llama):
    compiled, ids = compiled_llama
    eager = compiled.model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    got = compiled.generate(ids, max_new_tokens=10, min_new_tokens=10)
    assert torch.equal(got, eager)
    st = compiled.decode_stats
    assert st["last_path"].startswith("torch.compile") and st["compiles"] == 1 and st["first_step_s"] > 0
    # steps after the first replay the captured graph (no guard checks) and give the same tokens
    assert st["replay"].startswith("later steps replay")
    # a second call with the same cache length reuses the compiled step
    again = compiled.generate(ids, max_new_tokens=10, min_new_tokens=10)
    assert torch.equal(again, eager) and compiled.decode_stats["compiles"] == 1


def test_unsupported_options_fall_back_and_say_so(compiled_llama):
    compiled, ids = compiled_llama
    with pytest.warns(UserWarning, match="compiled decode step not used"):
        out = compiled.generate(ids, max_new_tokens=3, num_beams=2)
    assert out.shape == (1, 15)
    assert "num_beams" in compiled.decode_stats["last_path"]


def test_sampling_runs_in_the_compiled_step(compiled_llama, recwarn):
    """do_sample takes the compiled path: a seed repeats its tokens, the replayed steps give what the eager step
    gives, penalties and per-row settings work, and temperature 0 is greedy."""
    compiled, ids = compiled_llama
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=True, temperature=1.3, top_k=40, top_p=0.95, seed=5)
    a = compiled.generate(ids, **kw)
    st = compiled.decode_stats
    assert st["last_path"].endswith("sample in the step") and st["replay"].startswith("later steps replay")
    assert not [w for w in recwarn if "compiled decode step not used" in str(w.message)]
    assert torch.equal(a, compiled.generate(ids, **kw))
    assert not torch.equal(a, compiled.generate(ids, **{**kw, "seed": 6}))
    eager = sqc.runtime.decode.CompiledDecoder(compiled.model, compile_step=False)
    assert torch.equal(a, eager.generate(ids, **kw))
    # penalties: another compiled step; same seed, same tokens, eager equal
    pk = {**kw, "repetition_penalty": 1.5, "presence_penalty": 0.5, "frequency_penalty": 0.3}
    b = compiled.generate(ids, **pk)
    assert compiled.decode_stats["last_path"].endswith("sample+penalties in the step")
    assert torch.equal(b, eager.generate(ids, **pk)) and torch.equal(b, compiled.generate(ids, **pk))
    greedy = compiled.generate(ids, max_new_tokens=12, min_new_tokens=12)
    cold = compiled.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=True, temperature=0.0)
    assert torch.equal(cold, greedy)


def test_stop_strings_end_a_row(compiled_llama):
    compiled, ids = compiled_llama

    class Letters:  # a tokenizer: token t is the letter 'a' + t % 26
        def batch_decode(self, rows):
            return ["".join(chr(97 + int(t) % 26) for t in r) for r in rows]

    full = compiled.generate(ids, max_new_tokens=12, min_new_tokens=12)
    text = Letters().batch_decode(full[:, ids.shape[1]:])[0]
    stop = text[4:6]
    first = text.index(stop) + len(stop)  # tokens up to the end of the first match
    got = compiled.generate(ids, max_new_tokens=12, stop_strings=[stop], tokenizer=Letters())
    assert torch.equal(got[0, :ids.shape[1] + first], full[0, :ids.shape[1] + first])
    assert got.shape[1] == ids.shape[1] + first
    with pytest.raises(ValueError, match="stop_strings needs the tokenizer"):
        compiled.generate(ids, max_new_tokens=3, stop_strings=["x"])


def test_forward_and_generate_under_inference_mode(compiled_llama):
    compiled, ids = compiled_llama
    want_logits = compiled(ids).logits
    want = compiled.generate(ids, max_new_tokens=8, min_new_tokens=8)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(ids).logits, want_logits, rtol=0, atol=0)
        assert torch.equal(compiled.generate(ids, max_new_tokens=8, min_new_tokens=8), want)
        sampled = compiled.generate(ids, max_new_tokens=8, do_sample=True, seed=1)
    # and back outside it: the cache made under inference_mode is not reused
    assert torch.equal(compiled.generate(ids, max_new_tokens=8, min_new_tokens=8), want)
    assert torch.equal(compiled.generate(ids, max_new_tokens=8, do_sample=True, seed=1), sampled)


def test_replay_follows_a_new_prompt_and_a_changed_model(compiled_llama):
    """Each generate's first step goes through TorchDynamo again, so a new prompt (same cache length) and weights
    changed in place between calls are seen by the replayed steps."""
    compiled, ids = compiled_llama
    other = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    eager = compiled.model.generate(other, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(compiled.generate(other, max_new_tokens=8, min_new_tokens=8), eager)
    norm = compiled.model.model.norm.weight
    saved = norm.detach().clone()
    try:
        with torch.no_grad():
            norm.mul_(-1.5)
        eager2 = compiled.model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert torch.equal(compiled.generate(ids, max_new_tokens=8, min_new_tokens=8), eager2)
    finally:
        with torch.no_grad():
            norm.copy_(saved)


def test_more_decoders_than_dynamos_recompile_limit(compiled_llama):
    """Every decoder's step has its own code object, so TorchDynamo's limit of 8 compiled entries per code object
    is never shared between models or decoders (the full suite once hit it on its ninth compiled model)."""
    from sqc.runtime.decode import CompiledDecoder

    compiled, ids = compiled_llama
    want = compiled.generate(ids, max_new_tokens=3, min_new_tokens=3)
    for _ in range(torch._dynamo.config.recompile_limit + 2):
        dec = CompiledDecoder(compiled.model)
        assert torch.equal(dec.generate(ids, max_new_tokens=3, min_new_tokens=3), want)

