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

The step runs where the model is: its buffers live on the model's device (:func:`model_device`). On a GPU the
replayed graph is captured once per ``generate`` in a ``torch.cuda.CUDAGraph`` (every kernel, sqc's ops
included, in one launch), and the host checks whether every row has ended only every
:attr:`CompiledDecoder.SYNC_EVERY` tokens (:class:`_Ending`), so the GPU is never idle waiting for it.

The first call pays the compilation (reported in :attr:`CompiledDecoder.stats`);
Inductor caches the compiled graph on disk (``TORCHINDUCTOR_CACHE_DIR``), but TorchDynamo still traces the
model in every process (about 10 s of SmolLM2's 15). An artifact therefore carries steps traced when it was
written (:mod:`sqc.runtime.stepstore`): a generation whose batch and mode have a stored step with enough
cache slots (at most :attr:`CompiledDecoder.STORED_SLACK` times what it needs) restores it instead of
tracing, and ``stats["stored_step"]`` says which step ran or why none did.
Greedy decoding and sampling (``do_sample=True``: temperature, top_k, top_p, min_p, repetition /
presence / frequency penalties, per-row seeds; :mod:`sqc.runtime.sampling`) run in the step; beam search,
padded batches or other ``generate`` options run Hugging Face's own ``generate`` (eager) and :attr:`stats`
says why.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import time
import types
import warnings
from typing import Any

import torch

from .sampling import SamplingParams, as_params, batch_state, sample_tokens
from .stepstore import StepStoreError, StoredSteps, fingerprint

__all__ = ["CompiledDecoder", "CACHE_STEP", "MODES", "use_gqa_attention", "model_device"]

#: the decode step's modes: argmax, sampling, sampling with the repetition / presence / frequency penalties
MODES = ("greedy", "sample", "sample+penalties")

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


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword a transformers model's forward takes its KV cache by: ``cache`` (transformers 5.2x, where
    ``past_key_values`` is deprecated and warns) or ``past_key_values`` (earlier releases)."""
    fwd = getattr(getattr(model, "model", model), "forward", None)
    try:
        return "cache" if "cache" in inspect.signature(fwd).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def own_code(fn, name: str):
    """``fn`` with a code object of its own, named ``name``. TorchDynamo keeps its compiled entries on the code
    object, at most ``recompile_limit`` (8) of them: every step made from one ``def`` (each model, cache length,
    batch bucket, mode) would share that budget, and a process past eight would fail under ``fullgraph=True``."""
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


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
        self.graph = None  # a torch.cuda.CUDAGraph of one replay, on a GPU (:meth:`capture_cuda_graph`)

    def __call__(self, gm, example_inputs):
        return self.wrap(torch._dynamo.lookup_backend("inductor")(gm, example_inputs))

    def wrap(self, compiled):
        """``compiled`` (a compiled graph), recording each call's arguments and result."""

        def run(*args):
            out = compiled(*args)
            self.fn, self.args, self.out = compiled, args, out
            return out

        return run

    def replayable(self, result) -> bool:
        out = self.out
        return self.fn is not None and isinstance(out, (list, tuple)) and len(out) == 1 and out[0] is result

    def replay(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.out[0]
        return self.fn(*self.args)[0]

    def capture_cuda_graph(self) -> None:
        """Capture one replay (every kernel of the step, sqc's included: they launch on torch's current stream)
        in a CUDA graph, so a later step is one ``cudaGraphLaunch``. Called after the step ran once (that run
        loaded the kernels and warmed the allocator); capturing runs nothing, so the step's in-place effects
        (the cache write, the penalty counts) happen once per replay as before. The graph's output tensor is
        rewritten by every replay: callers copy what they keep."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.fn(*self.args)
        self.graph, self.out = graph, out

    def release(self) -> None:
        """Drop the recorded arguments (they hold the step's token buffers) and the CUDA graph."""
        self.args, self.out, self.graph = (), None, None


class CompiledDecoder:
    """Generation with one compiled decode step per (cache length, mode); ``stored`` (the artifact's
    :class:`sqc.runtime.stepstore.StoredSteps`) holds steps traced when the artifact was written, which are
    restored instead of traced when they fit the model."""

    #: a stored step serves a generation that needs up to this many times fewer cache slots (its attention
    #: reads every slot); shorter generations trace their own step
    STORED_SLACK = 4

    #: on a GPU, the host waits for the step only every this many tokens to see whether every row has ended
    #: (then drops the tokens made past the end); on the CPU it looks after every token (it costs nothing there)
    SYNC_EVERY = 8

    def __init__(self, model: torch.nn.Module, compile_step: bool = True, stored: StoredSteps | None = None,
                 cuda_graphs: bool = True) -> None:
        self.model = model
        self.compile_step = compile_step
        #: on a GPU, replay the compiled step as one captured CUDA graph (the step must be compiled)
        self.cuda_graphs = cuda_graphs
        #: tokens between the host's looks at whether every row has ended; None: 1 on the CPU (and with stop
        #: strings), :attr:`SYNC_EVERY` on a GPU
        self.sync_every: int | None = None
        self.stored = stored if compile_step else None
        self._cache = None
        self._cache_len = 0
        self._batch = 0
        self._inference = False
        self._device: torch.device | None = None  # where the cache was made (a model moved since needs a new one)
        self._steps: dict[tuple[int, str], tuple] = {}
        self._first = False
        #: set to a list to collect the wall time of every decode step (benchmarks; off by default)
        self.step_times: list[float] | None = None
        self.stats: dict[str, Any] = {"mechanism": "torch.compile (inductor, fullgraph) around one decode step"
                                      if compile_step else "eager decode step", "compiles": 0}

    # -- the step ------------------------------------------------------------------------------
    def _cache_length(self, batch: int, length: int, mode: str) -> int:
        """The cache length a generation of ``length`` tokens runs with: a stored step's when one fits (and
        ``length`` is at least 1/:attr:`STORED_SLACK` of it), else ``length`` rounded up to :data:`CACHE_STEP`."""
        need = -(-length // CACHE_STEP) * CACHE_STEP
        if self.stored is not None:
            e = self.stored.find(batch, need, mode)
            if e is not None and e.cache_len <= need * self.STORED_SLACK:
                return e.cache_len
        return need

    def _cache_for(self, batch: int, length: int, mode: str = "greedy", exact: bool = False):
        from transformers import StaticCache

        need = length if exact else self._cache_length(batch, length, mode)
        inference = torch.is_inference_mode_enabled()  # a cache made under inference_mode is read-only outside it
        device = model_device(self.model)
        if (self._cache is None or self._cache_len < need or self._batch != batch or self._device != device
                or self._inference != inference or (exact and self._cache_len != need)):
            cfg = self.model.config
            self._cache = StaticCache(config=cfg, max_cache_len=need, max_batch_size=batch) if batch > 1 else \
                StaticCache(config=cfg, max_cache_len=need)
            self._cache_len, self._batch, self._inference, self._device = need, batch, inference, device
            self._steps.clear()
        else:
            self._cache.reset()
        return self._cache

    def _plain_step(self, mode: str):
        """The decode step as a Python function of (token, position, sampler tensors...), over the current
        cache: ``mode`` is ``"greedy"`` (argmax), ``"sample"`` or ``"sample+penalties"`` (:func:`sample_tokens`
        on the logits, with or without the penalty buffers)."""
        model, cache, kw = self.model, self._cache, cache_kwarg(self.model)
        if self.compile_step and use_gqa_attention(model):
            self.stats["attention"] = "sdpa on the grouped K/V heads (enable_gqa), no repeated cache"

        def step(tok: torch.Tensor, pos: torch.Tensor, *sampler: torch.Tensor | None) -> torch.Tensor:
            logits = model(input_ids=tok, cache_position=pos, use_cache=True, logits_to_keep=1,
                           **{kw: cache}).logits[:, -1]
            return logits.argmax(-1, keepdim=True) if mode == "greedy" else sample_tokens(logits, *sampler)

        return own_code(step, f"sqc_decode_{id(self):x}_{self._cache_len}_{mode.replace('+', '_')}")

    def _restored(self, mode: str):
        """The stored step for the current cache and ``mode`` with a :class:`_GraphCapture` around its graph, or
        None (``stats["stored_step"]`` says why)."""
        entry = self.stored.find(self._batch, self._cache_len, mode)
        if entry is None or entry.cache_len != self._cache_len:
            self.stats["stored_step"] = (f"none stored for batch {self._batch}, cache {self._cache_len}, {mode} "
                                         f"(stored: {self.stored.lengths(self._batch, mode) or 'none'}); traced")
            return None
        if self.compile_step:
            use_gqa_attention(self.model)  # the stored step was traced with it
        why = self.stored.why_not(self.model)
        if why is not None:
            self.stats["stored_step"] = f"{entry.file} not used: {why}; traced"
            return None
        t0 = time.perf_counter()
        try:
            aot = self.stored.restore(entry, self.model, self._cache)
        except StepStoreError as e:
            self.stats["stored_step"] = f"{entry.file} not used: {e}; traced"
            return None
        capture = _GraphCapture()
        fn = aot.fn  # the restored function, called without AOTCompiledFunction's (empty) guard check
        backend_id = aot._artifacts.backend_id
        fn.__globals__[backend_id] = capture.wrap(fn.__globals__[backend_id])  # its own globals dict
        self.stats["stored_step"] = f"{entry.file} restored in {time.perf_counter() - t0:.2f} s (no tracing)"
        return fn, capture

    def _step_fn(self, mode: str = "greedy"):
        """(the step for the current cache length and ``mode``, its :class:`_GraphCapture` or None when eager):
        restored from the stored steps when one fits, else compiled (once per cache length and mode)."""
        key = (self._cache_len, mode)
        entry = self._steps.get(key)
        if entry is None:
            entry = self._restored(mode) if self.stored is not None else None
            self._first = "compiles" if entry is None else "restores"  # what the step's first call counts as
            if entry is None:
                step = self._plain_step(mode)
                if self.compile_step:
                    capture = _GraphCapture()
                    entry = (torch.compile(step, backend=capture, fullgraph=True, dynamic=False), capture)
                else:
                    entry = (step, None)
            self._steps[key] = entry
        return entry

    def _example_args(self, mode: str) -> tuple:
        """Arguments of the right shapes for the step of ``mode`` at the current batch (for tracing)."""
        B, dev = self._batch, model_device(self.model)
        tok, pos = torch.zeros((B, 1), dtype=torch.long, device=dev), torch.zeros(1, dtype=torch.long, device=dev)
        if mode == "greedy":
            return tok, pos
        params = SamplingParams(repetition_penalty=1.1) if mode == "sample+penalties" else SamplingParams()
        return (tok, pos) + batch_state([params] * B, self.model.config.vocab_size, device=dev).tensors()

    def trace_for_store(self, batch: int, cache_len: int, mode: str = "greedy") -> tuple[bytes, dict[str, Any]]:
        """Trace the step for ``batch``, ``cache_len`` and ``mode`` ahead of time: (its serialized form, the
        model's fingerprint) for :mod:`sqc.runtime.stepstore`. Dynamo's guards are dropped (the fingerprint
        stands for them)."""
        if mode not in MODES:
            raise ValueError(f"decode step mode must be one of {MODES}, got {mode!r}")
        if cache_len % CACHE_STEP:
            raise ValueError(f"stored decode steps take cache lengths that are multiples of {CACHE_STEP}, "
                             f"got {cache_len}")
        with torch.no_grad():
            cache = self._cache_for(batch, cache_len, mode, exact=True)
            # transformers allocates a static cache's tensors on its first update: run that update eagerly, as
            # generate's prefill does before every step, or the traced step would allocate a fresh cache each call
            dev = model_device(self.model)
            self.model(input_ids=torch.zeros((batch, 1), dtype=torch.long, device=dev),
                       cache_position=torch.arange(1, device=dev),
                       use_cache=True, logits_to_keep=1, **{cache_kwarg(self.model): cache})
            cache.reset()
            step = self._plain_step(mode)
            fp = fingerprint(self.model)
            compiled = torch.compile(step, fullgraph=True, dynamic=False,
                                     options={"guard_filter_fn": lambda entries: [False] * len(entries)})
            aot = compiled.aot_compile((self._example_args(mode), {}))
        data = type(aot).serialize(aot, {"model": self.model, "cache": cache}).serialized_data
        return data, fp

    # -- generation ----------------------------------------------------------------------------
    #: ``generate`` options the compiled path takes; anything else runs transformers' generate
    HANDLED = frozenset({"attention_mask", "pad_token_id", "do_sample", "temperature", "top_k", "top_p", "min_p",
                         "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "sampling",
                         "stop_strings", "tokenizer"})
    _HF_SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")

    def unsupported(self, input_ids, kwargs: dict[str, Any]) -> str | None:
        """Why this call cannot take the compiled path (None when it can)."""
        extra = {k for k, v in kwargs.items() if v is not None and k not in self.HANDLED}
        if extra:
            return f"generate options {sorted(extra)} (the compiled step decodes greedily or samples)"
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            return "a padded batch (attention_mask has zeros)"
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            return "input_ids that are not a [batch, tokens] tensor"
        if not getattr(self.model, "_supports_static_cache", True) or not hasattr(self.model, "config"):
            return f"{type(self.model).__name__} has no static KV cache"
        return None

    def sampling_params(self, batch: int, kwargs: dict[str, Any]) -> list[SamplingParams] | None:
        """Each row's :class:`SamplingParams` for a ``generate`` call, or None for greedy decoding.

        ``sampling=`` (one :class:`SamplingParams` or dict, or one per row) wins; otherwise ``do_sample=True``
        samples with the keyword settings, falling back to the model's ``generation_config``, then to
        :class:`SamplingParams`' defaults. ``seed=`` is one int (row ``b`` gets ``seed + b``) or one per row."""
        given = kwargs.get("sampling")
        if given is None and not kwargs.get("do_sample"):
            return None
        if given is None:
            gc = getattr(self.model, "generation_config", None)
            fields = {}
            for name in (*self._HF_SAMPLING, "presence_penalty", "frequency_penalty"):
                v = kwargs.get(name)
                if v is None and name in self._HF_SAMPLING:
                    v = getattr(gc, name, None)
                if v is not None:
                    fields[name] = v
            given = fields
        rows = list(given) if isinstance(given, (list, tuple)) else [given] * batch
        if len(rows) != batch:
            raise ValueError(f"generate: sampling has {len(rows)} settings for a batch of {batch} rows")
        seed = kwargs.get("seed")
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [None if seed is None else seed + b
                                                                    for b in range(batch)]
        if len(seeds) != batch:
            raise ValueError(f"generate: seed has {len(seeds)} values for a batch of {batch} rows")
        out = []
        for row, sd in zip(rows, seeds):
            p = as_params(row)
            out.append(p if sd is None else dataclasses.replace(p, seed=sd))
        return out

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
        dev = model_device(self.model)
        input_ids = input_ids.to(dev)
        B, P = input_ids.shape
        params = self.sampling_params(B, kwargs)
        stops = _StopStrings(kwargs.get("stop_strings"), kwargs.get("tokenizer"), B)
        if params is None:
            mode, sampler = "greedy", None
        else:
            sampler = batch_state(params, self.model.config.vocab_size, prompts=list(input_ids), device=dev)
            mode = "sample+penalties" if sampler.penalties else "sample"
        cache = self._cache_for(B, P + max_new_tokens, mode)
        out = self.model(input_ids=input_ids, cache_position=torch.arange(P, device=dev), use_cache=True,
                         logits_to_keep=1, **{cache_kwarg(self.model): cache})
        if sampler is None:
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        else:
            sampler.draw()
            tok = sample_tokens(out.logits[:, -1], *sampler.tensors())
        del out
        step, capture = self._step_fn(mode)
        toks = [tok]
        tokbuf = tok.clone()
        posbuf = torch.zeros(1, dtype=torch.long, device=dev)
        args = (tokbuf, posbuf) + (() if sampler is None else sampler.tensors())
        sync = self.sync_every or (1 if dev.type == "cpu" or stops else self.SYNC_EVERY)
        ending = _Ending(eos, stops, B, dev, kwargs.get("pad_token_id"), sync)
        graphs = self.cuda_graphs and dev.type == "cuda" and capture is not None
        replay = False
        try:
            for i in range(max_new_tokens - 1):
                if ending and i + 1 >= min_new_tokens and ending.update(toks):
                    break
                tokbuf.copy_(toks[-1])
                posbuf.fill_(P + i)
                if sampler is not None:
                    sampler.draw()
                t0 = time.perf_counter()
                nxt = capture.replay() if replay else step(*args)
                dt = time.perf_counter() - t0
                if self._first:  # this step was compiled (or loaded from Inductor's cache), or restored
                    self.stats["first_step_s"] = dt
                    self.stats[self._first] = self.stats.get(self._first, 0) + 1
                    self._first = False
                if self.step_times is not None:
                    self.step_times.append(dt)
                if capture is not None and i == 0:
                    # the first step went through Dynamo (guards checked): replay its graph from here on
                    replay = capture.replayable(nxt)
                    self.stats["replay"] = ("later steps replay the compiled graph on the first step's arguments "
                                            "(no guard checks)" if replay else
                                            "every step through TorchDynamo (the graph's output is not the step's)")
                    if replay and graphs:
                        try:
                            capture.capture_cuda_graph()
                            self.stats["replay"] += ", captured in one CUDA graph"
                        except RuntimeError as e:  # something in the step cannot be captured (a host sync)
                            self.stats["replay"] += f", not captured in a CUDA graph ({e})"
                            warnings.warn(f"sqc: the decode step could not be captured in a CUDA graph ({e}); "
                                          "its steps replay without one", stacklevel=3)
                toks.append(ending.pad(nxt).clone())
            toks = ending.trim(toks)
        finally:
            if capture is not None:
                capture.release()
        self.stats["last_path"] = self.stats["mechanism"] + ("" if sampler is None else f", {mode} in the step")
        return torch.cat([input_ids, *toks], dim=1)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's weights are on (its first parameter's, else its first buffer's; the CPU without
    either): the decode step's buffers live there."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class _Ending:
    """When a generation ends: every row has produced an end-of-sequence token or a stop string.

    The done mask lives on the model's device and is updated after every token without the host waiting; the
    host reads it only every ``sync_every`` tokens (1 on the CPU, where reading costs nothing, and with stop
    strings, whose check decodes text on the host anyway). Tokens made after the last row ended are padding
    (``pad``) and :meth:`trim` drops them, so the result is the one a check after every token gives."""

    def __init__(self, eos: set[int], stops: "_StopStrings", batch: int, device: torch.device, pad_token_id,
                 sync_every: int) -> None:
        self.eos, self.stops, self.sync_every = eos, stops, sync_every
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.eos_ids = torch.tensor(sorted(eos), dtype=torch.long, device=device)
        self.pad_id = next(iter(sorted(eos)), pad_token_id or 0)
        self.ended: list[torch.Tensor] = []  # per check: whether every row had ended (a device bool)
        self.at: list[int] = []  # how many tokens there were at that check

    def __bool__(self) -> bool:
        return bool(self.eos or self.stops)

    def update(self, toks: list[torch.Tensor]) -> bool:
        """Take the newest token into the done mask; True when the host saw that every row has ended."""
        if self.eos:
            self.done |= torch.isin(toks[-1][:, 0], self.eos_ids)
        if self.stops:
            self.done |= self.stops.hit(toks).to(self.done.device)
        self.ended.append(self.done.all())
        self.at.append(len(toks))
        return len(self.ended) % self.sync_every == 0 and bool(self.ended[-1])

    def pad(self, nxt: torch.Tensor) -> torch.Tensor:
        return torch.where(self.done[:, None], torch.full_like(nxt, self.pad_id), nxt) if self else nxt

    def trim(self, toks: list[torch.Tensor]) -> list[torch.Tensor]:
        """``toks`` up to the token with which every row had ended (all of them when some row has not)."""
        if not self.ended:
            return toks
        hit = torch.stack(self.ended).nonzero()
        return toks[:self.at[int(hit[0, 0])]] if hit.numel() else toks


class _StopStrings:
    """Stop strings for ``generate``: a row is done once its generated text contains one of them (checked on
    the text of its last few tokens, each time a token arrives, so the first match is the one that completes).
    Needs the tokenizer (``tokenizer=``), as transformers' ``generate`` does."""

    def __init__(self, strings, tokenizer, batch: int) -> None:
        if isinstance(strings, str):
            strings = [strings]
        self.strings = [s for s in (strings or []) if s]
        if self.strings and tokenizer is None:
            raise ValueError("generate: stop_strings needs the tokenizer: pass tokenizer=... as well")
        self.tokenizer = tokenizer
        self.window = max((len(s) for s in self.strings), default=0) + 2  # tokens: each is at least one character

    def __bool__(self) -> bool:
        return bool(self.strings)

    def hit(self, toks: list[torch.Tensor]) -> torch.Tensor:
        recent = torch.cat(toks[-self.window:], dim=1)
        texts = self.tokenizer.batch_decode(recent)
        return torch.tensor([any(s in t for s in self.strings) for t in texts])
