"""Token sampling that runs inside the compiled decode step: fixed shapes, per-row settings, no host sync.

:class:`SamplingParams` holds one sequence's settings; :class:`SamplerState` holds a batch's as tensors (one row
per sequence) beside the buffers the step reads: the penalty counts and one uniform noise draw per vocabulary
entry. :func:`sample_tokens` is the math, a pure function of ``(logits, state tensors)`` that ``torch.compile``
traces as part of the step.

The semantics, in order (Hugging Face's logits processors, plus OpenAI's two penalties):

1. ``repetition_penalty`` (``r``): a logit of a token already in the prompt or the output is divided by ``r``
   when positive, multiplied by ``r`` when negative.
2. ``presence_penalty`` / ``frequency_penalty`` (OpenAI): subtract ``presence`` once and ``frequency`` per
   occurrence for every token already generated (the prompt does not count).
3. ``temperature``: logits divided by it; ``0`` means greedy for that row.
4. ``top_k`` (0 = off): keep the ``k`` largest logits (ties with the ``k``-th kept, as Hugging Face does).
5. ``top_p`` (1 = off): of what is left, keep the smallest set of most likely tokens whose probability reaches
   ``p``: a token is kept when the probability of the tokens above it is below ``p``.
6. ``min_p`` (0 = off): keep tokens whose probability is at least ``min_p`` times the most likely one's.
7. Draw: Gumbel-max, ``argmax(logit + g)`` over the kept tokens with ``g = -log(-log u)`` and ``u`` one uniform
   number per vocabulary entry, drawn from the sequence's own generator. A token's noise belongs to its
   vocabulary id, so the draw depends only on the kept set and the generator, never on the batch around it.

Filters 4-6 reduce to one threshold per row: a token is kept when its logit is at least the threshold.
The usual thresholds lie among the row's :data:`CANDIDATES` largest logits (``top_k`` up to that many, a
nucleus inside it), which one ``topk`` finds. A row whose threshold lies beyond them (a large ``top_k``, or a
flat distribution under ``top_p`` close to 1) is found exactly instead by bisection over the logits' bit
patterns, under ``torch.cond``, so the common step pays only for the ``topk``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

__all__ = ["SamplingError", "SamplingParams", "SamplerState", "sample_tokens", "filter_logits", "as_params", "batch_state", "CANDIDATES"]

#: how many of a row's largest logits the cheap threshold search looks at
CANDIDATES = 256


class SamplingError(ValueError):
    """A sampling setting out of range; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One sequence's sampling settings (see the module docstring for their meaning and order).

    Example
    -------
    >>> SamplingParams(temperature=0.7, top_p=0.9, seed=1).greedy
    False
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: the seed of this sequence's generator; None draws from torch's global generator
    seed: int | None = None

    def __post_init__(self) -> None:
        def bad(field: str, value, want: str):
            raise SamplingError(field, f"sampling: {field}={value!r} is out of range; it must be {want}")

        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            bad("temperature", self.temperature, "a finite number >= 0 (0 means greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "an integer >= 0 (0 turns it off)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            bad("top_p", self.top_p, "in (0, 1] (1 turns it off)")
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1):
            bad("min_p", self.min_p, "in [0, 1] (0 turns it off)")
        if not (isinstance(self.repetition_penalty, (int, float)) and math.isfinite(self.repetition_penalty)
                and self.repetition_penalty > 0):
            bad("repetition_penalty", self.repetition_penalty, "a finite number > 0 (1 turns it off)")
        for f in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and -2 <= v <= 2):
                bad(f, v, "in [-2, 2], as in OpenAI's API (0 turns it off)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", self.seed, "an integer or None")

    @property
    def greedy(self) -> bool:
        """True when these settings pick the most likely token (temperature 0, no penalties)."""
        return self.temperature == 0 and not self.penalized

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A generator on ``device`` seeded with :attr:`seed` (None without one: torch's default generator of
        that device). A seed repeats its tokens on one device; a GPU's stream of numbers is not the CPU's."""
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


class SamplerState:
    """A batch's sampling settings as ``[B, 1]`` tensors, its penalty counts and its noise buffer.

    The tensors are allocated once per batch shape, on ``device`` (the model's); :meth:`set_row` rewrites one
    row in place (a sequence joins), :meth:`draw` refills the noise before each step (on the device, from each
    row's generator there) and :meth:`record` counts tokens, so a captured step keeps reading the same tensors.
    """

    def __init__(self, batch: int, vocab: int, penalties: bool, device: torch.device | str = "cpu") -> None:
        self.batch, self.vocab, self.penalties = batch, vocab, penalties
        self.device = torch.device(device)
        f32 = dict(dtype=torch.float32, device=self.device)
        self.temperature = torch.ones(batch, 1, **f32)
        self.top_k = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.top_p = torch.ones(batch, 1, **f32)
        self.min_p = torch.zeros(batch, 1, **f32)
        self.repetition = torch.ones(batch, 1, **f32)
        self.presence = torch.zeros(batch, 1, **f32)
        self.frequency = torch.zeros(batch, 1, **f32)
        #: per token: 1 once it is in the prompt or the output (repetition penalty); times generated (OpenAI's)
        self.seen = torch.zeros(batch, vocab, **f32) if penalties else None
        self.count = torch.zeros(batch, vocab, **f32) if penalties else None
        self.noise = torch.empty(batch, vocab, **f32)
        self.generators: list[torch.Generator | None] = [None] * batch

    def set_row(self, row: int, params: SamplingParams, prompt: torch.Tensor | None = None) -> None:
        """Give row ``row`` the settings ``params`` (a fresh generator from its seed) and its prompt's tokens."""
        if params.penalized and not self.penalties:
            raise ValueError("sampling: this batch was set up without penalty buffers; make it with penalties=True")
        self.temperature[row] = params.temperature
        self.top_k[row] = params.top_k
        self.top_p[row] = params.top_p
        self.min_p[row] = params.min_p
        self.repetition[row] = params.repetition_penalty
        self.presence[row] = params.presence_penalty
        self.frequency[row] = params.frequency_penalty
        self.generators[row] = params.generator(self.device)
        if self.penalties:
            self.seen[row].zero_()
            self.count[row].zero_()
            if prompt is not None and prompt.numel():
                self.seen[row].index_fill_(0, prompt.reshape(-1).long().to(self.device), 1.0)

    def draw(self, rows=None) -> None:
        """Fresh uniform noise for ``rows`` (default: every row), each from its own generator (or torch's
        global one)."""
        for row in range(self.batch) if rows is None else rows:
            self.noise[row].uniform_(generator=self.generators[row])

    def record(self, tok: torch.Tensor) -> None:
        """Count the chosen tokens ``[B, 1]`` (eager path; the compiled step counts inside the graph)."""
        if self.penalties:
            _count(self.seen, self.count, tok)

    def tensors(self, rows: slice = slice(None), penalties: bool | None = None) -> tuple[torch.Tensor | None, ...]:
        """The arguments :func:`sample_tokens` takes after the logits, in its order, as views of ``rows``;
        ``penalties=False`` leaves the penalty buffers out (None), as a step without penalties takes them."""
        pen = self.penalties if penalties is None else penalties and self.penalties
        return (self.temperature[rows], self.top_k[rows], self.top_p[rows], self.min_p[rows],
                self.repetition[rows], self.presence[rows], self.frequency[rows],
                self.seen[rows] if pen else None, self.count[rows] if pen else None, self.noise[rows])


def _count(seen: torch.Tensor, count: torch.Tensor, tok: torch.Tensor) -> None:
    seen.scatter_(1, tok, 1.0)
    count.scatter_add_(1, tok, torch.ones(tok.shape, dtype=count.dtype, device=count.device))


def _order_key(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 with the same order (the bit pattern, negatives flipped), for an exact bisection."""
    b = x.view(torch.int32)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).to(torch.int64)


def _from_order_key(k: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_order_key`; the bottom of the range (no threshold found) is -inf."""
    b = k.to(torch.int32)
    return torch.where(k == -(2**31), float("-inf"), (b ^ ((b >> 31) & 0x7FFFFFFF)).view(torch.float32))


def _exact_threshold(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The top_k / top_p threshold of every row over the whole vocabulary: bisection on the logits' order keys
    (32 halvings of the int32 range end on an exact logit value). Rows whose filters are off get -inf."""
    key = _order_key(logits)
    B, V = logits.shape
    top_k = top_k.clamp(max=V)
    lo = torch.full((B, 1), -(2**31), dtype=torch.int64, device=logits.device)
    hi = torch.full((B, 1), 2**31 - 1, dtype=torch.int64, device=logits.device)
    for _ in range(32):  # top_k: the largest t with count(key >= t) >= k
        mid = (lo + hi + 1) // 2
        ok = (key >= mid).sum(-1, keepdim=True) >= top_k
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid - 1)
    thr_k = torch.where(top_k > 0, _from_order_key(lo), float("-inf"))
    kept = torch.where(logits >= thr_k, logits, float("-inf"))
    p = torch.softmax(kept, -1)
    lo = torch.full((B, 1), -(2**31), dtype=torch.int64, device=logits.device)
    hi = torch.full((B, 1), 2**31 - 1, dtype=torch.int64, device=logits.device)
    for _ in range(32):  # top_p: the largest t whose tokens at or above it hold at least top_p of the mass
        mid = (lo + hi + 1) // 2
        ok = torch.where(key >= mid, p, 0.0).sum(-1, keepdim=True) >= top_p
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid - 1)
    thr_p = torch.where(top_p < 1, _from_order_key(lo), float("-inf"))
    return torch.maximum(thr_k, thr_p)


def filter_logits(logits: torch.Tensor, temperature, top_k, top_p, min_p, repetition, presence, frequency, seen,
                  count) -> torch.Tensor:
    """Steps 1-6 of the module docstring: ``logits [B, V]`` penalized and divided by the temperature, with every
    token the filters drop set to -inf (a row at temperature 0 is only penalized)."""
    x = logits.float()
    if seen is not None:
        penalized = torch.where(x > 0, x / repetition, x * repetition)
        x = torch.where(seen > 0, penalized, x) - presence * (count > 0).float() - frequency * count
    greedy = temperature == 0
    x = x / torch.where(greedy, 1.0, temperature)
    V = x.shape[-1]
    C = min(CANDIDATES, V)
    cand = torch.topk(x, C, dim=-1).values  # [B, C], descending
    # top_k inside the candidates: the k-th largest value
    top_k = torch.where(top_k < V, top_k, 0)  # keeping V or more tokens keeps them all
    thr_k = torch.where(top_k > 0, cand.gather(1, top_k.clamp(1, C) - 1), float("-inf"))
    # top_p inside the candidates: their probabilities after top_k, out of the whole distribution's mass
    top = cand[:, :1]
    mass = torch.where(x >= thr_k, torch.exp(x - top), 0.0).sum(-1, keepdim=True)
    pc = torch.where(cand >= thr_k, torch.exp(cand - top), 0.0) / mass
    above = torch.cumsum(pc, -1) - pc  # probability of the candidates above each one
    n_p = (above < top_p).sum(-1, keepdim=True)  # how many candidates the nucleus keeps (at least 1)
    thr_p = torch.where(top_p < 1, cand.gather(1, n_p.clamp(1, C) - 1), float("-inf"))
    # beyond the candidates: top_k larger than C, or a nucleus that takes them all without reaching top_p
    beyond = ((top_k > C) | ((top_p < 1) & (n_p >= C) & (thr_k < cand[:, -1:]))) & ~greedy
    if torch.compiler.is_compiling():  # one graph: both branches compiled, the cheap one runs unless needed
        thr = torch.cond(beyond.any(), lambda x, tk, tp: _exact_threshold(x, tk, tp),
                         lambda x, tk, tp: torch.maximum(thr_k, thr_p), (x, top_k, top_p))
    else:
        thr = _exact_threshold(x, top_k, top_p) if bool(beyond.any()) else torch.maximum(thr_k, thr_p)
    # min_p: p / p_max is the same before and after renormalizing, so it is a threshold on the logits
    thr = torch.maximum(thr, torch.where(min_p > 0, top + torch.log(min_p), float("-inf")))
    return torch.where((x >= thr) | greedy, x, float("-inf"))


def sample_tokens(logits: torch.Tensor, temperature, top_k, top_p, min_p, repetition, presence, frequency, seen,
                  count, noise) -> torch.Tensor:
    """The next token ``[B, 1]`` of every row from ``logits [B, V]`` under the row's settings (module docstring).

    ``seen`` / ``count`` are None when no row has a penalty; otherwise the chosen tokens are counted into them
    in place. Shapes never depend on the values, so the function compiles once per ``(B, V)``.
    """
    x = filter_logits(logits, temperature, top_k, top_p, min_p, repetition, presence, frequency, seen, count)
    pick = (x - torch.log(-torch.log(noise))).argmax(-1, keepdim=True)  # Gumbel-max over the kept tokens
    tok = torch.where(temperature == 0, x.argmax(-1, keepdim=True), pick)
    if seen is not None:
        _count(seen, count, tok)
    return tok


def as_params(values: SamplingParams | dict | None, defaults: SamplingParams | None = None) -> SamplingParams:
    """A :class:`SamplingParams` from itself, a dict of its fields, or None (``defaults``)."""
    if isinstance(values, SamplingParams):
        return values
    base = defaults or SamplingParams()
    if values is None:
        return base
    unknown = set(values) - {f.name for f in dataclasses.fields(SamplingParams)}
    if unknown:
        raise ValueError(f"sampling: unknown settings {sorted(unknown)}; the settings are "
                         f"{[f.name for f in dataclasses.fields(SamplingParams)]}")
    return dataclasses.replace(base, **values)


def batch_state(params: Sequence[SamplingParams], vocab: int, prompts: Sequence[torch.Tensor] | None = None,
                device: torch.device | str = "cpu") -> SamplerState:
    """A :class:`SamplerState` for ``params`` (one per row) on ``device``, with penalty buffers when any row
    needs them."""
    state = SamplerState(len(params), vocab, penalties=any(p.penalized for p in params), device=device)
    for i, p in enumerate(params):
        state.set_row(i, p, None if prompts is None else prompts[i])
    return state
