"""One compiled decode step: greedy generation with a static KV cache and ``torch.compile`` around the step.

:class:`CompiledDecoder` runs a Hugging Face causal LM's generation as

* prefill: one eager forward over the prompt into a ``transformers.StaticCache``
  (the batched sqc kernels; only the last position's logits are computed);
* decode: every new token is one call of a ``torch.compile``'d step (Inductor,
  ``fullgraph=True``): embedding, all decoder layers with the sqc kernels as
  opaque ``torch.library`` ops, the cache update, the head and the argmax.
  The step writes into fixed-size buffers (token, position, cache), so its
  shapes never change and it compiles once per cache length.

The first step of every ``generate`` runs through TorchDynamo (its guards are checked, so a changed model
recompiles); the later steps replay the captured Inductor graph on the same argument tuple
(:class:`_GraphCapture`), which saves the guard checks and the argument rebuilding of every token (about
5 ms of a 25 ms SmolLM2 step). :attr:`CompiledDecoder.stats` says which path the steps took.

The first call pays the compilation (reported in :attr:`CompiledDecoder.stats`);
Inductor caches the compiled graph on disk (``TORCHINDUCTOR_CACHE_DIR``), so a
second process with the same model and shapes loads it instead of compiling.
Greedy decoding only: sampling, beam search, padded batches or other ``generate``
options run Hugging Face's own ``generate`` (eager) and :attr:`stats` says why.
"""
from __future__ import annotations

import functools
import time
import warnings
from typing import Any

import torch

__all__ = ["CompiledDecoder", "CACHE_STEP", "use_gqa_attention"]

#: cache lengths are rounded up to a multiple of this, so nearby lengths share one compiled step. The step's
#: attention reads every slot of the static cache, so the rounding costs time on every token (SmolLM2, 512 + 128
#: tokens: 640 slots at 128, 768 at 256) while a finer one compiles more often (once per length, cached on disk)
CACHE_STEP = 128


#: the attention implementation name the compiled step switches sdpa models to (:func:`use_gqa_attention`)
GQA_SDPA = "sqc_sdpa"


def _gqa_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, *,
                        _hf_sdpa, **kwargs):
    """Hugging Face's sdpa attention, except that a one-token query attends to the grouped K/V heads directly
    (``enable_gqa``): under ``torch.compile`` transformers repeats every K/V head ``num_key_value_groups`` times
    instead, copying the whole cache once per layer and token (SmolLM2: 3 x 9 x 768 x 64 floats twice per layer).
    Anything else (prompts, position biases, softcaps) runs transformers' own function (``_hf_sdpa``, bound at
    registration so that an eager layer call imports nothing)."""
    if query.shape[2] != 1 or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return _hf_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def use_gqa_attention(model: torch.nn.Module) -> bool:
    """Switch a transformers model that runs ``sdpa`` attention to :func:`_gqa_sdpa_attention` (registered as
    ``"sqc_sdpa"``, with sdpa's masks); True when it now runs it. Numerically the same attention."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    if impl == GQA_SDPA:
        return True
    if impl != "sdpa":
        return False
    AttentionInterface.register(GQA_SDPA, functools.partial(_gqa_sdpa_attention, _hf_sdpa=sdpa_attention_forward))
    AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)
    cfg._attn_implementation = GQA_SDPA
    return True


class _GraphCapture:
    """A ``torch.compile`` backend: Inductor, plus a record of what the compiled graph was last called with.

    TorchDynamo checks its guards on every call of a compiled function (on SmolLM2's step: 1597 tensors, about
    5 ms of the step's 20-30 ms) and rebuilds the graph's argument list from the frame. Inside one
    :meth:`CompiledDecoder.generate` nothing it guards can change between steps: the step reads the same
    module tensors, the same static cache and the same token/position buffers every time. So the first step
    of a generation runs through Dynamo (guards checked, recompiling if anything changed), this backend
    records the compiled graph and the argument tuple Dynamo built, and the later steps replay that graph on
    those arguments. :meth:`replayable` says whether the graph's single output *is* the step's return value
    (so nothing happens around the graph that a replay would skip); otherwise every step goes through Dynamo.
    """

    def __init__(self) -> None:
        self.fn = None
        self.args: tuple = ()
        self.out = None

    def __call__(self, gm, example_inputs):
        compiled = torch._dynamo.lookup_backend("inductor")(gm, example_inputs)

        def run(*args):
            out = compiled(*args)
            self.fn, self.args, self.out = compiled, args, out
            return out

        return run

    def replayable(self, result) -> bool:
        out = self.out
        return self.fn is not None and isinstance(out, (list, tuple)) and len(out) == 1 and out[0] is result

    def replay(self) -> torch.Tensor:
        return self.fn(*self.args)[0]

    def release(self) -> None:
        """Drop the recorded arguments (they hold the step's token buffers)."""
        self.args, self.out = (), None


class CompiledDecoder:
    def __init__(self, model: torch.nn.Module, compile_step: bool = True) -> None:
        self.model = model
        self.compile_step = compile_step
        self._cache = None
        self._cache_len = 0
        self._steps: dict[int, tuple] = {}
        self._first = False
        #: set to a list to collect the wall time of every decode step (benchmarks; off by default)
        self.step_times: list[float] | None = None
        self.stats: dict[str, Any] = {"mechanism": "torch.compile (inductor, fullgraph) around one decode step"
                                      if compile_step else "eager decode step", "compiles": 0}

    # -- the step ------------------------------------------------------------------------------
    def _cache_for(self, batch: int, length: int):
        from transformers import StaticCache

        need = -(-length // CACHE_STEP) * CACHE_STEP
        if self._cache is None or self._cache_len < need or self._batch != batch:
            cfg = self.model.config
            self._cache = StaticCache(config=cfg, max_cache_len=need, max_batch_size=batch) if batch > 1 else \
                StaticCache(config=cfg, max_cache_len=need)
            self._cache_len, self._batch = need, batch
            self._steps.clear()
        else:
            self._cache.reset()
        return self._cache

    def _step_fn(self):
        """(the step for the current cache length, its :class:`_GraphCapture` or None when eager)."""
        key = self._cache_len
        entry = self._steps.get(key)
        if entry is None:
            model, cache = self.model, self._cache
            if self.compile_step and use_gqa_attention(model):
                self.stats["attention"] = "sdpa on the grouped K/V heads (enable_gqa), no repeated cache"

            def step(tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
                out = model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True, logits_to_keep=1)
                return out.logits[:, -1].argmax(-1, keepdim=True)

            capture = _GraphCapture() if self.compile_step else None
            fn = step if capture is None else torch.compile(step, backend=capture, fullgraph=True, dynamic=False)
            entry = self._steps[key] = (fn, capture)
            self._first = True
        return entry

    # -- generation ----------------------------------------------------------------------------
    def unsupported(self, input_ids, kwargs: dict[str, Any]) -> str | None:
        """Why this call cannot take the compiled path (None when it can)."""
        extra = {k for k, v in kwargs.items() if v is not None and k not in ("attention_mask", "pad_token_id", "do_sample")}
        if kwargs.get("do_sample"):
            extra.add("do_sample")
        if extra:
            return f"generate options {sorted(extra)} (the compiled step decodes greedily)"
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            return "a padded batch (attention_mask has zeros)"
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            return "input_ids that are not a [batch, tokens] tensor"
        if not getattr(self.model, "_supports_static_cache", True) or not hasattr(self.model, "config"):
            return f"{type(self.model).__name__} has no static KV cache"
        return None

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, min_new_tokens: int = 0,
                 eos_token_id: int | list[int] | None = None, **kwargs: Any) -> torch.Tensor:
        why = self.unsupported(input_ids, kwargs)
        if why is not None:
            self.stats["last_path"] = f"transformers generate (eager): {why}"
            warnings.warn(f"sqc: compiled decode step not used for {why}; running transformers' generate", stacklevel=3)
            return self.model.generate(input_ids, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                       eos_token_id=eos_token_id, **{k: v for k, v in kwargs.items() if v is not None})
        if eos_token_id is None:
            eos_token_id = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        B, P = input_ids.shape
        cache = self._cache_for(B, P + max_new_tokens)
        out = self.model(input_ids=input_ids, past_key_values=cache, cache_position=torch.arange(P), use_cache=True,
                         logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        del out
        step, capture = self._step_fn()
        toks = [tok]
        tokbuf = tok.clone()
        posbuf = torch.zeros(1, dtype=torch.long)
        done = torch.zeros(B, dtype=torch.bool)
        eos_ids = torch.tensor(sorted(eos), dtype=torch.long)
        replay = False
        try:
            for i in range(max_new_tokens - 1):
                if eos and i + 1 >= min_new_tokens:
                    done |= torch.isin(toks[-1][:, 0], eos_ids)
                    if bool(done.all()):
                        break
                tokbuf.copy_(toks[-1])
                posbuf.fill_(P + i)
                t0 = time.perf_counter()
                nxt = capture.replay() if replay else step(tokbuf, posbuf)
                dt = time.perf_counter() - t0
                if self._first:  # this step compiled (or loaded from Inductor's cache)
                    self.stats["first_step_s"] = dt
                    self.stats["compiles"] += 1
                    self._first = False
                if self.step_times is not None:
                    self.step_times.append(dt)
                if capture is not None and i == 0:
                    # the first step went through Dynamo (guards checked): replay its graph from here on
                    replay = capture.replayable(nxt)
                    self.stats["replay"] = ("later steps replay the compiled graph on the first step's arguments "
                                            "(no guard checks)" if replay else
                                            "every step through TorchDynamo (the graph's output is not the step's)")
                if eos:
                    pad = toks[-1].new_full(toks[-1].shape, next(iter(eos)))
                    nxt = torch.where(done[:, None], pad, nxt)
                toks.append(nxt.clone())
        finally:
            if capture is not None:
                capture.release()
        self.stats["last_path"] = self.stats["mechanism"]
        return torch.cat([input_ids, *toks], dim=1)
