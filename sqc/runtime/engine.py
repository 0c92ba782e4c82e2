"""Continuous batching: many sequences decoded together by one compiled step, joining and leaving between steps.

An :class:`Engine` owns a KV cache of ``max_batch`` *slots* (:class:`SlotCache`: one row of every layer's key and
value tensors per sequence, ``ctx`` positions each, plus one scratch position). A :class:`Sequence` is given a
free slot when it is admitted; its prompt is written into the slot in chunks of ``prefill_chunk`` tokens (an eager
forward over the chunk: the batched sqc kernels), one chunk per :meth:`Engine.step`, between the decode steps of
the sequences already running, so a long prompt does not stall them. Once its prompt is in, it decodes with the
others.

A decode step runs every slot below the bucket ``B`` (the next power of two above the highest busy slot, at most
``max_batch``) in one forward: ``[B, 1]`` tokens, each row at its own position (``position_ids [B, 1]``), a
``[B, 1, 1, ctx + 1]`` mask that lets row ``b`` see its positions ``0..pos_b``, the new key/value written at
``(b, pos_b)``. The weights are read once per step, whatever ``B``: the sqc batch kernels run all rows. A slot
that is free or still prefilling runs along with a dummy token and writes the scratch position, which nobody
reads. The step is ``torch.compile``'d once per ``(B, mode)`` (modes: greedy, sample, sample with penalties;
:mod:`sqc.runtime.sampling`), so the shapes never change within a bucket.

Determinism: a sequence's sampled tokens depend on its own seed (its noise comes from its own generator), not on
the rows around it; its logits are the same up to the kernels' rounding at another batch size.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections import deque
from typing import Any, Callable

import torch

from .decode import _GraphCapture, cache_kwarg, own_code, use_gqa_attention
from .sampling import SamplingParams, SamplerState, sample_tokens

__all__ = ["Engine", "Sequence", "SlotCache"]


class _SlotLayer:
    """One decoder layer's keys and values for a range of slots, written at per-row positions.

    ``keys`` / ``values`` are the whole cache's ``[slots, heads, ctx + 1, head_dim]`` tensors; ``rows`` is the
    slot range this view covers and ``pos`` the ``[rows, tokens]`` positions the next update writes."""

    is_compileable = True
    is_sliding = False
    is_croppable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: slice, pos: torch.Tensor) -> None:
        self.keys, self.values = keys[rows], values[rows]
        self.pos = pos
        self.rows = torch.arange(self.keys.shape[0])[:, None]
        self.is_initialized = True
        self.device = keys.device

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # [rows, heads, tokens, dim] -> rows x positions index the cache; the heads and dims follow
        self.keys[self.rows, :, self.pos] = key_states.transpose(1, 2).to(self.keys.dtype)
        self.values[self.rows, :, self.pos] = value_states.transpose(1, 2).to(self.values.dtype)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return self.keys.shape[2]

    def get_query_offset(self) -> int:
        return 0

    def reset(self) -> None:
        pass


class SlotCache:
    """The engine's KV cache: ``slots`` rows of ``ctx + 1`` positions per layer (the last one is the scratch
    position free rows write). :meth:`view` gives a ``transformers`` cache over a range of slots."""

    def __init__(self, config, slots: int, ctx: int, dtype: torch.dtype) -> None:
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (slots, heads, ctx + 1, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.ctx = ctx

    @property
    def scratch(self) -> int:
        return self.ctx

    def view(self, rows: slice, pos: torch.Tensor):
        """A ``transformers`` ``Cache`` over slots ``rows`` whose updates write at ``pos [rows, tokens]``."""
        from transformers.cache_utils import Cache

        layer_cls = _view_layer_class()
        layers = [layer_cls(k, v, rows, pos) for k, v in zip(self.keys, self.values)]
        return Cache(layers=layers)


@functools.cache
def _view_layer_class():
    """:class:`_SlotLayer` as a subclass of transformers' ``CacheLayerMixin`` (imported on first use)."""
    from transformers.cache_utils import CacheLayerMixin

    return type("SlotLayer", (_SlotLayer, CacheLayerMixin), {"__init__": _SlotLayer.__init__})


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request: its prompt, settings and what it has produced so far.

    ``on_token(seq, token_id)`` is called for each new token, ``on_finish(seq)`` once when it ends
    (``finish_reason``: ``"stop"`` on a stop token, ``"length"`` at ``max_new_tokens`` or a full context,
    ``"cancelled"``, or ``"error"`` with ``error`` set). Both run on the engine's thread."""

    prompt: torch.Tensor
    max_new_tokens: int
    params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    stop_ids: frozenset = frozenset()
    on_token: Callable[["Sequence", int], None] | None = None
    on_finish: Callable[["Sequence"], None] | None = None
    # state (the engine's)
    id: int = -1
    slot: int = -1
    filled: int = 0  # prompt tokens written into the slot
    tokens: list = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None
    cancelled: bool = False

    @property
    def pos(self) -> int:
        """The position the next token is written at."""
        return self.filled + max(len(self.tokens) - 1, 0)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """Decode many :class:`Sequence` objects at once on one model (module docstring).

    Example
    -------
    >>> eng = Engine(compiled.model, max_batch=8, ctx=1024)              # doctest: +SKIP
    >>> outs = eng.generate([ids_a, ids_b], max_new_tokens=32)           # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, max_batch: int = 8, ctx: int = 2048, prefill_chunk: int = 256,
                 compile_step: bool = True) -> None:
        cfg = getattr(model, "config", None)
        if cfg is None or not hasattr(cfg, "num_hidden_layers"):
            raise ValueError(f"Engine: {type(model).__name__} is not a transformers causal LM (it has no config)")
        if max_batch < 1 or ctx < 2 or prefill_chunk < 1:
            raise ValueError(f"Engine: max_batch={max_batch}, ctx={ctx} and prefill_chunk={prefill_chunk} must be "
                             "positive (ctx at least 2)")
        self.model, self.max_batch, self.ctx, self.chunk = model, max_batch, ctx, prefill_chunk
        self.vocab = cfg.vocab_size
        self.compile_step = compile_step
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.cache = SlotCache(cfg, max_batch, ctx, dtype)
        self.sampler = SamplerState(max_batch, self.vocab, penalties=True)
        self._cache_kw = cache_kwarg(model)
        if compile_step:
            use_gqa_attention(model)
        self.slots: list[Sequence | None] = [None] * max_batch
        self.waiting: deque[Sequence] = deque()
        self._ids = itertools.count()
        self._steps: dict[tuple[int, str], tuple] = {}
        self._bufs: dict[int, tuple] = {}
        self._positions = torch.arange(ctx + 1)
        #: counters for /metrics and benchmarks
        self.stats: dict[str, Any] = {"steps": 0, "prefill_chunks": 0, "tokens_out": 0, "tokens_in": 0,
                                      "compiles": 0}
        #: called as ``on_step(seconds, rows)`` after every decode step (a server's latency histogram)
        self.on_step: Callable[[float, int], None] | None = None

    # -- requests ------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> Sequence:
        """Queue ``seq``; it is admitted to a free slot at a later :meth:`step`. Checks it first (:meth:`check`)."""
        self.check(seq)
        seq.prompt = seq.prompt.reshape(-1).long()
        seq.id = next(self._ids)
        self.waiting.append(seq)
        return seq

    def check(self, seq: Sequence) -> None:
        """Raise ValueError, naming the field, when ``seq`` cannot run here (an empty or too long prompt, a token
        outside the vocabulary, no tokens asked for)."""
        n = int(seq.prompt.numel())
        if n == 0:
            raise ValueError("the prompt is empty; it needs at least one token")
        if n >= self.ctx:
            raise ValueError(f"the prompt has {n} tokens; the context holds {self.ctx}, so a prompt may have at "
                             f"most {self.ctx - 1}")
        if seq.max_new_tokens < 1:
            raise ValueError(f"max_tokens={seq.max_new_tokens} must be at least 1")
        if (bad := seq.prompt[(seq.prompt < 0) | (seq.prompt >= self.vocab)]).numel():
            raise ValueError(f"the prompt has token id {int(bad[0])}, outside the vocabulary of {self.vocab}")

    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq``: it leaves its slot (or the queue) at the next :meth:`step`."""
        seq.cancelled = True

    @property
    def active(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.active

    # -- the loop ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """One round: drop cancelled sequences, admit waiting ones, write one prompt chunk, decode one token for
        every sequence whose prompt is in."""
        for s in list(self.waiting):
            if s.cancelled:
                self.waiting.remove(s)
                self._finish(s, "cancelled")
        for s in self.active:
            if s.cancelled:
                self._finish(s, "cancelled")
        while self.waiting and None in self.slots:
            s = self.waiting.popleft()
            s.slot = self.slots.index(None)
            self.slots[s.slot] = s
            self._guarded(s, lambda s: self.sampler.set_row(s.slot, s.params, s.prompt))
        filling = [s for s in self.active if s.filled < s.prompt.numel()]
        if filling:
            self._guarded(min(filling, key=lambda s: s.id), self._prefill_chunk)
        decoding = [s for s in self.active if s.filled == s.prompt.numel() and not s.done]
        if decoding:
            try:
                self._decode(decoding)
            except Exception as e:  # a failing step fails the sequences in it, not the engine
                for s in decoding:
                    s.error = e
                    self._finish(s, "error")

    def run_until_idle(self) -> None:
        while not self.idle:
            self.step()

    def generate(self, prompts: list[torch.Tensor], max_new_tokens: int = 20,
                 params: SamplingParams | list[SamplingParams] | None = None, stop_ids=()) -> list[list[int]]:
        """Run ``prompts`` to completion together; each one's new tokens."""
        ps = params if isinstance(params, list) else [params or SamplingParams(temperature=0)] * len(prompts)
        seqs = [self.add(Sequence(torch.as_tensor(p), max_new_tokens, q, frozenset(stop_ids)))
                for p, q in zip(prompts, ps)]
        self.run_until_idle()
        for s in seqs:
            if s.error is not None:
                raise s.error
        return [list(s.tokens) for s in seqs]

    # -- internals -----------------------------------------------------------------------------
    def _guarded(self, seq: Sequence, fn) -> None:
        try:
            fn(seq)
        except Exception as e:
            seq.error = e
            self._finish(seq, "error")

    def _forward(self, ids, pos, mask, cache):
        """The last position's logits of ``ids`` at positions ``pos`` under ``mask``, writing ``cache``."""
        return self.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True, logits_to_keep=1,
                          **{self._cache_kw: cache}).logits[:, -1]

    def _prefill_chunk(self, seq: Sequence) -> None:
        n = int(seq.prompt.numel())
        a, b = seq.filled, min(seq.filled + self.chunk, n)
        pos = torch.arange(a, b)[None]
        mask = (self._positions[None, :] <= pos[0][:, None])[None, None]  # [1, 1, T, ctx+1]: causal
        cache = self.cache.view(slice(seq.slot, seq.slot + 1), pos)
        logits = self._forward(seq.prompt[None, a:b], pos, mask, cache)
        seq.filled = b
        self.stats["prefill_chunks"] += 1
        self.stats["tokens_in"] += b - a
        if b == n:  # the prompt is in: its last logits give the first new token
            if not seq.params.greedy:
                self.sampler.draw([seq.slot])
            tok = sample_tokens(logits, *self.sampler.tensors(slice(seq.slot, seq.slot + 1)))
            self._emit(seq, int(tok))

    def _bucket(self) -> int:
        top = max(i for i, s in enumerate(self.slots) if s is not None) + 1
        b = 1
        while b < top:
            b *= 2
        return min(b, self.max_batch)

    def _buffers(self, B: int):
        bufs = self._bufs.get(B)
        if bufs is None:
            tok = torch.zeros(B, 1, dtype=torch.long)
            pos = torch.full((B, 1), self.cache.scratch, dtype=torch.long)
            cache = self.cache.view(slice(0, B), pos)
            views = {"greedy": (), "sample": self.sampler.tensors(slice(0, B), penalties=False),
                     "sample+penalties": self.sampler.tensors(slice(0, B))}  # the step's arguments after (tok, pos)
            bufs = self._bufs[B] = (tok, pos, cache, views)
        return bufs

    def _step_fn(self, B: int, mode: str):
        entry = self._steps.get((B, mode))
        if entry is None:
            tok, pos, cache, _ = self._buffers(B)
            positions = self._positions

            def step(tok, pos, *sampler):
                mask = (positions[None, :] <= pos)[:, None, None, :]  # row b sees 0..pos_b
                logits = self._forward(tok, pos, mask, cache)
                if mode == "greedy":
                    return logits.argmax(-1, keepdim=True)
                return sample_tokens(logits, *sampler)

            capture = _GraphCapture() if self.compile_step else None
            if capture is not None:  # each (engine, bucket, mode) step its own Dynamo cache (own_code says why)
                step = own_code(step, f"sqc_step_{id(self):x}_b{B}_{mode.replace('+', '_')}")
            fn = step if capture is None else torch.compile(step, backend=capture, fullgraph=True, dynamic=False)
            entry = self._steps[(B, mode)] = [fn, capture, False]
        return entry

    def _decode(self, rows: list[Sequence]) -> None:
        B = self._bucket()
        tok, pos, _, views = self._buffers(B)
        pos.fill_(self.cache.scratch)
        tok.zero_()
        for s in rows:
            tok[s.slot, 0] = s.tokens[-1]
            pos[s.slot, 0] = s.pos
        if all(s.params.greedy for s in rows):
            mode = "greedy"
        else:
            mode = "sample+penalties" if any(s.params.penalized for s in rows) else "sample"
            self.sampler.draw([s.slot for s in rows])
        args = (tok, pos, *views[mode])
        entry = self._step_fn(B, mode)
        fn, capture, replay = entry
        t0 = time.perf_counter()
        if replay:
            out = capture.replay()
        else:
            out = fn(*args)
            self.stats["compiles"] += capture is not None
            entry[2] = capture is not None and capture.replayable(out)
        self.stats["steps"] += 1
        if self.on_step is not None:
            self.on_step(time.perf_counter() - t0, len(rows))
        out = out.tolist()
        for s in rows:
            self._emit(s, out[s.slot][0])

    def _emit(self, seq: Sequence, token: int) -> None:
        seq.tokens.append(token)
        self.stats["tokens_out"] += 1
        if seq.on_token is not None:
            seq.on_token(seq, token)
        if token in seq.stop_ids:
            self._finish(seq, "stop")
        elif len(seq.tokens) >= seq.max_new_tokens or seq.pos >= self.ctx:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.done:
            return
        seq.finish_reason = reason
        if 0 <= seq.slot < len(self.slots) and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None
        if seq.on_finish is not None:
            seq.on_finish(seq)
