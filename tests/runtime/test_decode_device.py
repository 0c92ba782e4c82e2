"""The decode step's device-agnostic parts, on the CPU: buffers on the model's device and the deferred end check
(the GPU's CUDA-graph replay is checked by ``tests/codegen/test_cuda_kernels.py`` on a GPU)."""
import pytest
import torch

from tests.conftest import tiny_llama


@pytest.mark.parametrize("sync_every", [2, 3, 8])
def test_a_deferred_end_check_gives_the_tokens_of_a_check_per_token(sync_every):
    """On a GPU the host looks at the done mask only every few tokens; the tokens made past the end are dropped,
    so the output is the one a check after every token gives (each row padded after its own end)."""
    from sqc.runtime.decode import CompiledDecoder

    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    dec = CompiledDecoder(model, compile_step=False)
    free = dec.generate(ids, max_new_tokens=16, min_new_tokens=16)
    # an end token that row 0 makes early and row 1 later (or never): the rows end apart
    row0, row1 = free[0, 6:].tolist(), free[1, 6:].tolist()
    eos = next(t for t in row0[2:] if t not in row1[:row0.index(t) + 1])
    per_token = dec.generate(ids, max_new_tokens=16, eos_token_id=eos, pad_token_id=0)
    dec.sync_every = sync_every
    deferred = dec.generate(ids, max_new_tokens=16, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(deferred, per_token)
    hf = model.generate(ids, max_new_tokens=16, eos_token_id=eos, pad_token_id=eos, do_sample=False)
    assert torch.equal(per_token[:, :hf.shape[1]], hf) and per_token.shape == hf.shape
    # min_new_tokens holds the end back as before
    dec.sync_every = None
    assert dec.generate(ids, max_new_tokens=16, min_new_tokens=12, eos_token_id=eos).shape[1] >= 6 + 12


def test_the_step_buffers_follow_the_model_device():
    from sqc.runtime.decode import model_device
    from sqc.runtime.sampling import SamplingParams, batch_state

    assert model_device(torch.nn.Linear(2, 3).to("meta")) == torch.device("meta")
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")
    state = batch_state([SamplingParams(repetition_penalty=1.2), SamplingParams()], 50,
                        prompts=[torch.tensor([1, 2]), torch.tensor([3])], device="meta")
    assert {t.device.type for t in state.tensors() if t is not None} == {"meta"}
    assert SamplingParams(seed=3).generator("cpu").initial_seed() == 3


def test_a_model_moved_between_generations_gets_a_new_cache():
    """The static cache lives where the model was at the last generation; once the model is elsewhere the next
    generation makes a new one (and new steps) instead of writing into the old device's tensors."""
    from sqc.runtime.decode import CompiledDecoder

    dec = CompiledDecoder(tiny_llama(), compile_step=False)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(4))
    first = dec.generate(ids, max_new_tokens=6, min_new_tokens=6)
    cache = dec._cache
    assert dec.generate(ids, max_new_tokens=6, min_new_tokens=6).equal(first) and dec._cache is cache  # reused
    dec._device = torch.device("meta")  # as if the model had been on another device at the last generation
    assert dec.generate(ids, max_new_tokens=6, min_new_tokens=6).equal(first)
    assert dec._cache is not cache and dec._device == torch.device("cpu")
