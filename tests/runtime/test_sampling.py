"""Sampling inside the decode step: the kept set equals Hugging Face's logits processors, the draw follows the
kept distribution, seeds repeat, and the compiled function equals the eager one."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sqc.runtime import sampling
from sqc.runtime.sampling import SamplingParams, batch_state, filter_logits, sample_tokens


def hf_filter(logits, p: SamplingParams, prompt_and_output: torch.Tensor):
    """The reference: transformers' own processors, in generate's order."""
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    x = logits.clone()
    ids = prompt_and_output[None]
    if p.repetition_penalty != 1:
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, x)
    procs = [TemperatureLogitsWarper(p.temperature)]
    if p.top_k:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        procs.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0:
        procs.append(MinPLogitsWarper(p.min_p))
    for proc in procs:
        x = proc(ids, x)
    return x


def one_row(p: SamplingParams, V: int, prompt=None):
    state = batch_state([p], V, None if prompt is None else [prompt])
    return state


settings_st = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.3, 0.7, 1.0, 1.5, 4.0]),
    top_k=st.sampled_from([0, 1, 5, 40, 255, 256, 257, 900]),
    top_p=st.sampled_from([1.0, 0.999, 0.99, 0.9, 0.5, 0.1]),
    min_p=st.sampled_from([0.0, 0.01, 0.1]),
    repetition_penalty=st.sampled_from([1.0, 1.3, 0.8]),
)


@settings(max_examples=150, deadline=None)
@given(p=settings_st, V=st.sampled_from([7, 300, 1000]), scale=st.sampled_from([0.05, 1.0, 8.0]),
       seed=st.integers(0, 2**31 - 1))
def test_kept_set_equals_transformers_processors(p, V, scale, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, V, generator=g) * scale
    prompt = torch.randint(0, V, (5,), generator=g)
    state = one_row(p, V, prompt)
    got = filter_logits(logits, *state.tensors()[:-1])
    ref = hf_filter(logits, p, prompt)
    assert torch.equal(torch.isinf(got), torch.isinf(ref)), (p, V, scale)
    keep = ~torch.isinf(ref)
    torch.testing.assert_close(got[keep], ref[keep], rtol=1e-6, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(top_k=st.integers(1, 600), top_p=st.sampled_from([0.999, 0.9, 0.5, 1.0]), scale=st.sampled_from([0.01, 3.0]),
       seed=st.integers(0, 2**31 - 1))
def test_candidate_thresholds_equal_the_exact_bisection(top_k, top_p, scale, seed):
    """Where the cheap candidate search applies it finds the threshold the whole-vocabulary bisection finds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 700, generator=g) * scale
    tk = torch.tensor([[top_k], [0]])
    tp = torch.tensor([[top_p], [top_p]])
    exact = sampling._exact_threshold(x, tk, tp)
    kept_exact = x >= exact
    state = sampling.SamplerState(2, 700, penalties=False)
    state.top_k.copy_(tk)
    state.top_p.copy_(tp)
    cheap = ~torch.isinf(filter_logits(x, *state.tensors()[:-1]))
    assert torch.equal(cheap, kept_exact)


def test_penalties():
    V = 10
    logits = torch.tensor([[2.0, -2.0, 1.5, 0.5, 0.0, 3.0, -1.0, 0.2, 0.1, 0.3]])
    p = SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    state = one_row(p, V, torch.tensor([0, 1]))  # the prompt counts for the repetition penalty only
    state.record(torch.tensor([[5]]))
    state.record(torch.tensor([[5]]))
    x = filter_logits(logits, *state.tensors()[:-1])
    want = logits.clone()
    want[0, 0], want[0, 1] = 1.0, -4.0  # prompt tokens: divided / multiplied by 2
    want[0, 5] = 3.0 / 2 - 0.5 - 2 * 0.25  # generated twice: repetition, presence, frequency x 2
    torch.testing.assert_close(x, want)
    # greedy with penalties picks the penalized argmax (token 2, not 5)
    assert sample_tokens(logits, *state.tensors()).item() == 2


@pytest.mark.slow
def test_draw_follows_the_kept_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, -8.0]])
    p = SamplingParams(temperature=0.8, top_k=4, seed=3)
    state = one_row(p, 6)
    counts = torch.zeros(6)
    n = 20000
    for _ in range(n):
        state.draw()
        counts[sample_tokens(logits, *state.tensors())] += 1
    ref = torch.softmax(hf_filter(logits, p, torch.tensor([], dtype=torch.long)), -1)[0]
    assert counts[4:].sum() == 0
    torch.testing.assert_close(counts / n, ref, atol=0.012, rtol=0)


def test_a_seed_repeats_and_rows_are_independent():
    V = 400
    logits = torch.randn(3, V)
    params = [SamplingParams(temperature=1.2, top_p=0.95, seed=7), SamplingParams(temperature=0.9, seed=8),
              SamplingParams(temperature=0)]

    def run(ps, rows):
        state = batch_state(ps, V)
        out = []
        for _ in range(6):
            state.draw()
            out.append(sample_tokens(logits[rows], *state.tensors()))
        return torch.cat(out, 1)

    both = run(params, [0, 1, 2])
    assert torch.equal(both, run(params, [0, 1, 2]))
    # a row's tokens depend on its own seed only, not on the rows around it
    assert torch.equal(both[0], run(params[:1], [0])[0])
    assert torch.equal(both[1], run([params[1]], [1])[0])
    assert torch.equal(both[2], logits[2].argmax().repeat(6))  # temperature 0 is greedy


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_k", -3), ("top_p", 0.0), ("top_p", 1.5),
                                         ("min_p", 2), ("repetition_penalty", 0), ("presence_penalty", 3),
                                         ("seed", "x")])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        SamplingParams(**{field: value})


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="unknown settings \\['topk'\\]"):
        sampling.as_params({"topk": 5})


@pytest.mark.slow
def test_compiled_equals_eager_on_both_branches():
    V = 1000
    torch.manual_seed(1)
    params = [SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.2, seed=1),
              SamplingParams(temperature=1.0, top_p=0.5, presence_penalty=0.4, seed=2)]
    f = torch.compile(sample_tokens, fullgraph=True, dynamic=False)
    for flat, wide in ((1.0, 40), (0.001, 900)):  # flat logits with top_k 900: the exact branch
        logits = torch.randn(2, V) * flat
        p = [params[0].__class__(**{**params[0].__dict__, "top_k": wide}), params[1]]
        a, b = batch_state(p, V), batch_state(p, V)
        for _ in range(4):
            a.draw()
            b.noise.copy_(a.noise)
            assert torch.equal(f(logits, *a.tensors()), sample_tokens(logits, *b.tensors()))
        assert torch.equal(a.count, b.count) and torch.equal(a.seen, b.seen)
