"""Continuous batching: sequences decoded together give the tokens each gives alone, whenever they join, however
their prompts are chunked; cancelled and failed sequences free their slots; bad requests are refused."""
import os
import sys

import pytest
import torch

import sqc
from sqc.runtime.engine import Engine, Sequence
from sqc.runtime.sampling import SamplingParams

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import tiny_llama  # noqa: E402

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def compiled():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    return sqc.compile(model, (ids,), config="w4", tune=False)


def prompts(*lengths):
    return [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]


def alone(engine_args, p, n, params=GREEDY, model=None):
    return Engine(model, **engine_args).generate([p], max_new_tokens=n, params=params)[0]


@pytest.mark.slow
@pytest.mark.parametrize("compile_step", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_batched_greedy_equals_compiled_generate(compiled, compile_step):
    ps = prompts(12, 5, 9, 20, 3)
    want = [compiled.generate(p[None], max_new_tokens=10, min_new_tokens=10)[0, len(p):].tolist() for p in ps]
    eng = Engine(compiled.model, max_batch=8, ctx=64, prefill_chunk=4, compile_step=compile_step)
    assert eng.generate(ps, max_new_tokens=10) == want
    assert eng.stats["tokens_out"] == 50 and eng.stats["tokens_in"] == sum(len(p) for p in ps)
    assert eng.idle and all(s is None for s in eng.slots)
    if compile_step:
        assert eng.stats["compiles"] == 1  # one bucket (8 rows), greedy


@pytest.mark.parametrize("compile_step", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_seeded_sampling_in_a_batch_equals_alone(compiled, compile_step):
    ps = prompts(7, 11, 4, 15)
    params = [SamplingParams(temperature=1.2, top_k=30, top_p=0.9, seed=1),
              SamplingParams(temperature=0.8, min_p=0.1, seed=2),
              SamplingParams(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5, seed=3),
              GREEDY]
    args = dict(max_batch=4, ctx=48, prefill_chunk=5, compile_step=compile_step)
    batch = Engine(compiled.model, **args).generate(ps, max_new_tokens=12, params=params)
    for p, q, got in zip(ps, params, batch):
        assert got == alone(args, p, 12, q, compiled.model)
    again = Engine(compiled.model, **args).generate(ps, max_new_tokens=12, params=params)
    assert again == batch


def test_sequences_join_and_leave_between_steps(compiled):
    """A sequence added while others decode (into a freed slot, a larger bucket) gets its own tokens."""
    ps = prompts(6, 13, 8, 10)
    args = dict(max_batch=4, ctx=64, prefill_chunk=3, compile_step=False)
    want = [alone(args, p, n, model=compiled.model) for p, n in zip(ps, (4, 12, 9, 7))]
    eng = Engine(compiled.model, **args)
    first = [eng.add(Sequence(ps[0], 4, GREEDY)), eng.add(Sequence(ps[1], 12, GREEDY))]
    for _ in range(6):
        eng.step()
    assert first[0].done and first[0].finish_reason == "length" and eng.slots[0] is None
    late = [eng.add(Sequence(ps[2], 9, GREEDY)), eng.add(Sequence(ps[3], 7, GREEDY))]
    eng.run_until_idle()
    assert [s.tokens for s in first + late] == want
    assert late[0].slot == 0 and late[1].slot == 2  # the freed slot is reused first


def test_stop_ids_cancel_and_errors_free_the_slot(compiled):
    eng = Engine(compiled.model, max_batch=2, ctx=32, prefill_chunk=8, compile_step=False)
    p = prompts(6)[0]
    ref = alone(dict(max_batch=2, ctx=32, compile_step=False), p, 8, model=compiled.model)
    stop = eng.add(Sequence(p, 8, GREEDY, stop_ids=frozenset({ref[2]})))
    gone = eng.add(Sequence(p, 8, GREEDY))
    eng.step()
    eng.step()
    eng.cancel(gone)
    eng.run_until_idle()
    assert stop.tokens == ref[:ref.index(ref[2]) + 1] and stop.finish_reason == "stop"
    assert gone.finish_reason == "cancelled" and eng.slots == [None, None]
    # a sequence whose settings break sampling fails alone; the engine goes on
    ok = eng.add(Sequence(p, 3, GREEDY))
    bad = eng.add(Sequence(p, 3, GREEDY))
    bad.prompt = torch.tensor([1, 2, 500])  # out of the vocabulary after the checks of add(): admission fails
    eng.run_until_idle()
    assert ok.tokens == ref[:3] and bad.finish_reason == "error" and bad.error is not None
    assert eng.slots == [None, None]


def test_context_full_ends_with_length(compiled):
    eng = Engine(compiled.model, max_batch=1, ctx=16, compile_step=False)
    s = eng.add(Sequence(prompts(12)[0], 100, GREEDY))
    eng.run_until_idle()
    assert s.finish_reason == "length" and s.pos == 16 and len(s.tokens) == 5


@pytest.mark.parametrize("seq,match", [
    (Sequence(torch.tensor([], dtype=torch.long), 4), "prompt is empty"),
    (Sequence(torch.arange(16), 4), "at most 15"),
    (Sequence(torch.arange(4), 0), "max_tokens=0"),
    (Sequence(torch.tensor([1, 999]), 4), "token id 999"),
])
def test_bad_requests_are_refused(compiled, seq, match):
    eng = Engine(compiled.model, max_batch=1, ctx=16, compile_step=False)
    with pytest.raises(ValueError, match=match):
        eng.add(seq)
    assert eng.idle
