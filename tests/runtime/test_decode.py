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
        out = compiled.generate(ids, max_new_tokens=3, do_sample=True, top_k=5)
    assert out.shape == (1, 15)
    assert "do_sample" in compiled.decode_stats["last_path"]


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
