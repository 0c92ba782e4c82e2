import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# kernel libraries and the tuning database of this test session live apart from the user's cache
# (subprocesses inherit it, so CLI tests share the session's kernels)
os.environ.setdefault("SQC_CACHE_DIR", tempfile.mkdtemp(prefix="sqc-test-cache-"))
# tuning in tests tries two candidates per kernel (the search itself is tested with its own budget)
os.environ.setdefault("SQC_TUNE_TRIALS", "2")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=100,  # down_proj in_features not a multiple of 32
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    return model


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(100, 53), torch.nn.ReLU(), torch.nn.Linear(53, 33, bias=False), torch.nn.ReLU(), torch.nn.Linear(33, 3)
    ).eval()
