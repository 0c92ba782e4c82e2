"""The compiled step's attention (sdpa on grouped K/V heads) equals transformers' sdpa attention."""
import copy

import torch

from sqc.runtime.decode import GQA_SDPA, use_gqa_attention
from tests.conftest import tiny_llama


def _decode_logits(model, ids):
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        model(input_ids=ids[:, :-1], past_key_values=cache, cache_position=torch.arange(ids.shape[1] - 1))
        pos = torch.tensor([ids.shape[1] - 1])
        return model(input_ids=ids[:, -1:], past_key_values=cache, cache_position=pos).logits


def test_grouped_attention_matches_sdpa_on_a_decode_step():
    model = tiny_llama()  # 4 query heads, 2 K/V heads
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    ref = _decode_logits(model, ids)
    switched = copy.deepcopy(model)
    assert use_gqa_attention(switched) and switched.config._attn_implementation == GQA_SDPA
    torch.testing.assert_close(_decode_logits(switched, ids), ref, rtol=1e-5, atol=1e-5)
    assert use_gqa_attention(switched)  # idempotent


def test_other_attention_implementations_are_left_alone():
    model = tiny_llama()
    model.config._attn_implementation = "eager"
    assert not use_gqa_attention(model) and model.config._attn_implementation == "eager"
