import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# kernel libraries and the tuning database of this test session live apart from the user's cache
# (subprocesses inherit it, so CLI tests share the session's kernels): in SQC_TEST_CACHE_DIR when it is set
# (kept between runs: the fast tier's warm cache, see the README), else in a fresh folder
os.environ.setdefault("SQC_CACHE_DIR", os.environ.get("SQC_TEST_CACHE_DIR") or tempfile.mkdtemp(prefix="sqc-test-cache-"))
# tuning in tests times one candidate per kernel bucket (the search itself is tested with its own budgets):
# building kernels from an empty cache is most of the suite's time
os.environ.setdefault("SQC_TUNE_TRIALS", "1")


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


def random_packed(R, K, bits, frac=0.02, lut_dtype=torch.float16, val_dtype=torch.float32, seed=None):
    """A random packed layer: R x K codes, per-row tables, about ``frac`` sparse entries."""
    from sqc.runtime.layout import PackedLinear, col_dtype_for, pack_codes

    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, (1,))))
    codes = torch.randint(0, 1 << bits, (R, K), generator=g)
    lut = torch.randn(R, 1 << bits, generator=g).to(lut_dtype)
    mask = torch.rand(R, K, generator=g) < frac
    rows, cols = mask.nonzero(as_tuple=True)
    crow = torch.zeros(R + 1, dtype=torch.int32)
    crow[1:] = torch.bincount(rows, minlength=R).cumsum(0)
    val = (torch.randn(len(cols), generator=g) * 4).to(val_dtype)
    return PackedLinear(bits, K, R, pack_codes(codes, bits), lut, crow, cols.to(col_dtype_for(K)), val)


def ops_called(fn, *args, **kwargs) -> set[str]:
    """The sqc ops ``fn(*args, **kwargs)`` dispatched to (``"lut_linear_cpu"``: a layer's generated CPU kernels,
    ``"lut_linear"``: the reference op; ``"int8_linear_cpu"`` / ``"int8_linear"`` for int8 heads)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set[str] = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "sqc":
                seen.add(func._opname)
            return func(*args, **(kwargs or {}))

    with Record(), torch.no_grad():
        fn(*args, **kwargs)
    return seen


def module_with_kernels(packed, target, bias=None):
    """An SqcLinear on ``packed`` with untuned generated kernels for ``target`` (needs TVM)."""
    from sqc.runtime.target import parse_target
    from sqc.codegen.tune import attach_cpu_kernels
    from sqc.runtime.qlinear import SqcLinear

    m = SqcLinear(packed, bias)
    recs = attach_cpu_kernels(torch.nn.Sequential(m), parse_target(target), tune=False)
    assert m.kernel.startswith("tvm-lut-"), m.kernel
    return m, recs


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def char_tokenizer():
    """A character-level tokenizer for :func:`tiny_llama` (100 ids: 5 specials, printable ASCII and newline;
    ``</s>`` is id 2, the tiny model's eos) with a chat template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  additional_special_tokens=specials[3:])
    tok.chat_template = CHAT_TEMPLATE
    return tok
