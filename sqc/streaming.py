"""Layer-streamed calibration and quantization of decoder stacks.

The whole-model path (:class:`~sqc.passes.annotate_sensitivity.AnnotateSensitivity`
and the per-weight passes after it) backpropagates through the whole model for
every sample and keeps one fp32 Fisher buffer per quantized weight until the
fit: memory grows with the model. For a model whose quantized linears all live
in the layers of one ``nn.ModuleList`` (a decoder stack, found from the traced
graph's linear sites), this module does the same work one layer at a time:

1. **Forward.** Each layer runs on every sample in turn, from the bottom; the
   input of every layer is kept (in memory, or in a temporary file when the
   boundaries would take more than ``SQC_STREAM_MEMORY_MB``, default 256).
   The layers' other arguments (masks, rotary tables) are recorded per layer
   and sample by stand-in modules, with the model's own code computing them.
2. **Top.** The model's part above the stack (final norm, head, loss) runs
   from the last layer's output, which yields d loss / d output of the stack.
3. **Down, layer by layer.** Recompute the layer's forward from its stored
   input, backpropagate the stored output gradient, add each sample's squared
   weight gradient into the layer's Fisher (the guided Hessians likewise),
   hand the input gradient down; then split, fit, pack and lower that layer's
   linears (the ordinary passes, scoped to the layer) and release its float
   weights and statistics before the next layer.

The Fisher is the same sum over samples of the squared gradient of each
sample's own loss as the whole-model pass (the chain rule applied in pieces;
``tests/test_streaming.py`` compares them). With a lazy weight source
(:mod:`sqc.lazy`) a layer's float weights are read from the checkpoint when
the layer runs and dropped after, so peak memory is one layer plus the
boundary activations plus the parts outside the stack.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .config import FitMode
from .passes.annotate_sensitivity import (GUIDED_NEEDS_DATA, StatisticHooks, attach, check_loss, check_sample,
                                          resolve_loss)
from .parallel import Group
from .passes.base import CompileContext, PassManager, unique_sites
from .quant.reduce import TreeSum
from .runtime.memory import release_memory
from .trace import LinearSite

__all__ = ["DecoderStack", "StreamingUnsupported", "StreamingRequired", "find_decoder_stack", "BoundaryStore", "run_streamed", "spill_layer",
           "streamed_statistics", "WeightSource"]


class StreamingUnsupported(RuntimeError):
    """The model's layers cannot be run one at a time; the message says why."""


class StreamingRequired(ValueError):
    """``sqc.compile`` was asked for something only the layer-streamed pipeline does (a lazily loaded model,
    a data-parallel compile, ``stream=True``, ``spill=True``) and that pipeline cannot run; the message says
    why and what needed it."""


@dataclasses.dataclass
class DecoderStack:
    path: str  # the ModuleList, e.g. "model.layers"
    layers: list[str]  # its children in order, e.g. "model.layers.0"
    weights: list[list[str]]  # the quantized weights of each layer, in graph order


def find_decoder_stack(model: nn.Module, sites: Sequence[LinearSite]) -> tuple[DecoderStack | None, str]:
    """The ``nn.ModuleList`` whose children hold every quantized linear of the traced graph, or
    ``(None, why)``. Found from the graph's linear sites (their owning modules), not from names
    of architectures."""
    quantized = [s for s in sites if s.quantized]
    if not quantized:
        return None, "no quantized linears"
    candidates: dict[str, dict[int, list[str]]] = {}
    for s in quantized:
        parts = s.module.split(".")
        found = False
        for i in range(len(parts) - 1, 0, -1):
            if not parts[i].isdigit():
                continue
            prefix = ".".join(parts[:i])
            try:
                holder = model.get_submodule(prefix)
            except AttributeError:
                continue
            if isinstance(holder, nn.ModuleList):
                candidates.setdefault(prefix, {}).setdefault(int(parts[i]), []).append(s.weight)
                found = True
                break
        if not found:
            return None, f"quantized linear {s.module} is not inside an nn.ModuleList of layers"
    if len(candidates) != 1:
        return None, f"the quantized linears span {len(candidates)} module lists ({', '.join(sorted(candidates))})"
    (path, by_index), = candidates.items()
    holder = model.get_submodule(path)
    n = len(holder)
    layers = [f"{path}.{i}" for i in range(n)]
    return DecoderStack(path, layers, [by_index.get(i, []) for i in range(n)]), ""


class BoundaryStore:
    """The input of every decoder layer for every sample: in memory, or appended to one temporary
    file per layer (read back when the layer runs; the page cache, not this process, holds it)."""

    def __init__(self, n_layers: int, n_samples: int, offload_dir: str | None) -> None:
        self.n_layers, self.n_samples = n_layers, n_samples
        self.offload_dir = offload_dir
        self._mem: dict[tuple[int, int], torch.Tensor] = {}
        self._where: dict[tuple[int, int], tuple[int, tuple[int, ...], torch.dtype]] = {}
        self._sizes = [0] * n_layers
        self.nbytes = 0

    def _path(self, layer: int) -> str:
        return os.path.join(self.offload_dir, f"layer{layer:05d}.bin")

    def put(self, layer: int, sample: int, t: torch.Tensor) -> None:
        t = t.detach()
        self.nbytes += t.nbytes
        if self.offload_dir is None:
            self._mem[layer, sample] = t
            return
        raw = t.contiguous().view(torch.uint8).reshape(-1).numpy()
        with open(self._path(layer), "ab") as fh:
            fh.write(raw.tobytes())
        self._where[layer, sample] = (self._sizes[layer], tuple(t.shape), t.dtype)
        self._sizes[layer] += raw.size

    def get(self, layer: int, sample: int) -> torch.Tensor:
        if self.offload_dir is None:
            return self._mem[layer, sample]
        off, shape, dtype = self._where[layer, sample]
        count = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        raw = np.fromfile(self._path(layer), dtype=np.uint8, count=count, offset=off)
        return torch.from_numpy(raw).view(dtype).reshape(shape)

    def drop(self, layer: int) -> None:
        for i in range(self.n_samples):
            self._mem.pop((layer, i), None)
            self._where.pop((layer, i), None)
        if self.offload_dir is not None and os.path.exists(self._path(layer)):
            os.remove(self._path(layer))


class WeightSource:
    """Where a layer's float weights come from. The base class: they are already in the model
    (nothing to load, nothing to drop). :class:`sqc.lazy.CheckpointSource` reads them from a
    checkpoint on demand."""

    lazy = False

    def prepare(self, layers: Sequence[str]) -> None:
        """Called once before the pipeline with the decoder layers' module names: make everything
        outside them real."""

    def materialize(self, prefix: str) -> None:
        """Make every parameter under module ``prefix`` real."""

    def release(self, prefix: str) -> None:
        """Drop the float parameters under ``prefix`` (a lazy source can read them again)."""


class _Stop(Exception):
    pass


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    h = kwargs.get("hidden_states")
    if isinstance(h, torch.Tensor):
        return h
    raise StreamingUnsupported("a decoder layer was called without its hidden states as the first argument "
                               "(or as hidden_states=...)")


def _with_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    if args and isinstance(args[0], torch.Tensor):
        return (h, *args[1:]), kwargs
    kw = dict(kwargs)
    kw["hidden_states"] = h
    return args, kw


class _OutputForm:
    """What a decoder layer returns: a tensor, or a tuple/list whose first item is the hidden state."""

    def __init__(self, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            self.kind, self.rest = "tensor", ()
        elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            self.kind, self.rest = type(out), tuple(None if isinstance(o, torch.Tensor) else o for o in out[1:])
        else:
            raise StreamingUnsupported(f"a decoder layer returned {type(out).__name__}; sqc streams layers that "
                                       "return the hidden states (or a tuple starting with them)")

    def hidden(self, out: Any) -> torch.Tensor:
        return out if self.kind == "tensor" else out[0]

    def wrap(self, h: torch.Tensor) -> Any:
        return h if self.kind == "tensor" else self.kind((h, *self.rest))


class _StandIn(nn.Module):
    """Takes a decoder layer's place during a capture pass: records its arguments, returns a given
    hidden state (or passes its input through), or stops the model there."""

    def __init__(self, index: int, sink: list, form: _OutputForm | None, stop: bool,
                 output: torch.Tensor | None = None) -> None:
        super().__init__()
        self.index, self.sink, self.form, self.stop, self.output = index, sink, form, stop, output

    def forward(self, *args, **kwargs):
        self.sink.append((self.index, args, kwargs))
        if self.stop:
            raise _Stop
        h = self.output if self.output is not None else _hidden_of(args, kwargs)
        return self.form.wrap(h)


class _Swapped:
    """Puts stand-ins in the stack's places for a with block, restoring the layers after."""

    def __init__(self, holder: nn.ModuleList, stand_ins: dict[int, nn.Module]) -> None:
        self.holder, self.stand_ins = holder, stand_ins
        self.saved: dict[int, nn.Module] = {}

    def __enter__(self):
        for i, m in self.stand_ins.items():
            self.saved[i] = self.holder[i]
            self.holder[i] = m
        return self

    def __exit__(self, *exc) -> None:
        for i, m in self.saved.items():
            self.holder[i] = m


@dataclasses.dataclass
class _Streamed:
    """What the forward phase leaves for the per-layer phase."""

    store: BoundaryStore
    samples: list[int]  # this rank's samples (all of them in a one-process compile)
    calls: list[list[tuple[tuple, dict]]]  # [layer][sample] -> (args without the hidden state's value, kwargs)
    grads: list[torch.Tensor | None]  # d loss / d output of the current layer, per sample
    form: _OutputForm


#: an fp16 model's loss is multiplied by this before the top's backward (divided out after)
_FP16_LOSS_SCALE = 2.0**12


def _memory_budget() -> int:
    return int(float(os.environ.get("SQC_STREAM_MEMORY_MB", "256")) * 2**20)


def _forward_phase(model, stack: DecoderStack, calibration, samples: list[int], call_kwargs, loss_fn,
                   source: WeightSource, tick) -> _Streamed:
    holder = model.get_submodule(stack.path)
    L, S = len(stack.layers), len(calibration)
    # 1. the first layer's arguments for sample 0, and what a layer returns
    sink: list = []
    first = check_sample(0, calibration[0])
    with torch.no_grad(), _Swapped(holder, {0: _StandIn(0, sink, None, stop=True)}):
        try:
            model(*first, **call_kwargs)
        except _Stop:
            pass
    if not sink:
        raise StreamingUnsupported(f"the model's forward did not call {stack.layers[0]}")
    source.materialize(stack.layers[0])
    with torch.no_grad():
        form = _OutputForm(holder[0](*sink[0][1], **sink[0][2]))
    # 2. every layer's arguments for every sample, recorded by stand-ins (the model computes them as usual)
    calls: list[list] = [[None] * S for _ in range(L)]
    for i in samples:
        sample = check_sample(i, calibration[i])
        sink = []
        stand = {j: _StandIn(j, sink, form, stop=(j == L - 1)) for j in range(L)}
        with torch.no_grad(), _Swapped(holder, stand):
            try:
                model(*sample, **call_kwargs)
            except _Stop:
                pass
        order = [j for j, _, _ in sink]
        if order != list(range(L)):
            raise StreamingUnsupported(f"the layers of {stack.path} ran in the order {order[:8]}..., not once each "
                                       "from the first to the last")
        for j, args, kwargs in sink:
            calls[j][i] = (args, kwargs)
    hs: list = [None] * S
    for i in samples:
        hs[i] = _hidden_of(*calls[0][i])
    per_layer = sum(hs[i].nbytes for i in samples)
    store = BoundaryStore(L, S, tempfile.mkdtemp(prefix="sqc-stream-") if per_layer * L > _memory_budget() else None)
    # 3. the layers, from the bottom, on every sample; the input of each is stored
    for j in range(L):
        source.materialize(stack.layers[j])
        layer = holder[j]
        with torch.no_grad():
            for i in samples:
                store.put(j, i, hs[i])
                args, kwargs = _with_hidden(*calls[j][i], hs[i])
                hs[i] = form.hidden(layer(*args, **kwargs)).detach()
        source.release(stack.layers[j])
        if source.lazy:
            release_memory()
        tick("calibration forward", j + 1, L)
    # 4. the top: d loss / d (last layer's output), the model's own code above the stack, as float32
    # (an fp16 model's loss is scaled first, so small gradients do not flush to zero)
    grads: list = [None] * S
    for i in samples:
        sample = check_sample(i, calibration[i])
        scale = _FP16_LOSS_SCALE if hs[i].dtype == torch.float16 else 1.0
        while True:
            top = hs[i].detach().requires_grad_(True)
            sink = []
            stand = {j: _StandIn(j, sink, form, stop=False, output=top if j == L - 1 else None) for j in range(L)}
            # no weight takes a gradient here (StatisticHooks with no weights): only the stack's output does
            with torch.enable_grad(), _Swapped(holder, stand), StatisticHooks(model, []):
                out = model(*sample, **call_kwargs)
                loss = loss_fn(out, sample)
                check_loss(i, loss)
                (loss * scale if scale != 1.0 else loss).backward()
            if top.grad is None:
                raise StreamingUnsupported(f"the loss does not depend on the output of {stack.layers[-1]}")
            if scale == 1.0 or bool(torch.isfinite(top.grad).all()) or scale < 2.0:
                break
            scale /= 16.0  # the scaled gradient overflowed fp16: try a smaller scale
            del out, loss
        grads[i] = top.grad.float() / scale if scale != 1.0 else top.grad.float()
        hs[i] = None
        del out, loss
        release_memory()  # the logits and their gradient are the largest transients of the pass
    return _Streamed(store, samples, calls, grads, form)


_HALF = (torch.float16, torch.bfloat16)


def _upcast(x):
    """fp16/bf16 tensors (also inside tuples, lists and dicts) as float32; everything else as is."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.dtype in _HALF else x
    if isinstance(x, (tuple, list)):
        return type(x)(_upcast(v) for v in x)
    if isinstance(x, dict):
        return {k: _upcast(v) for k, v in x.items()}
    return x


class _Float32Layer:
    """For a with block: the fp16/bf16 parameters and buffers of one layer hold float32 copies (the
    same Parameter objects, so gradient hooks stay attached); afterwards their own dtype again,
    which is exact (every value came from that dtype). The model outside the layer is untouched:
    a half-precision model is never upcast whole."""

    def __init__(self, layer: nn.Module) -> None:
        self.tensors = [t for t in (*layer.parameters(), *layer.buffers()) if t.dtype in _HALF]
        self.dtypes = [t.dtype for t in self.tensors]

    def __enter__(self):
        for t in self.tensors:
            t.data = t.data.float()
        return self

    def __exit__(self, *exc) -> None:
        for t, d in zip(self.tensors, self.dtypes):
            t.data = t.data.to(d)
            if isinstance(t, nn.Parameter):
                t.grad = None


def _layer_statistics(model, stack: DecoderStack, j: int, st: _Streamed, hessian_modules, group: Group):
    """Fisher (and guided Hessians) of layer ``j``'s quantized weights, a
    :class:`~sqc.quant.reduce.TreeSum` over every rank's samples (the same bits on any number of
    ranks); leaves d loss / d input in ``st.grads``. A half-precision layer runs in float32 here:
    its gradients and statistics are float32 math, one layer at a time."""
    layer = model.get_submodule(stack.layers[j])
    n = len(st.grads)
    acc = TreeSum(n)
    with _Float32Layer(layer), StatisticHooks(model, stack.weights[j], hessian_modules) as hooks:
        like = hooks.layout()
        for i in st.samples:
            hooks.sink = lambda key, t, i=i: acc.absorb(i, key, t)  # merged weight by weight
            x = _upcast(st.store.get(j, i)).detach().requires_grad_(j > 0)
            args, kwargs = _with_hidden(*_upcast(st.calls[j][i]), x)
            with torch.enable_grad():
                out = st.form.hidden(layer(*args, **kwargs))
                out.backward(st.grads[i])
            st.grads[i] = x.grad if j > 0 else None
            acc.add(i, hooks.take())
        hooks.sink = None
        del out
    return StatisticHooks.split(group.tree_sum(n, acc, like), hessian_modules is not None)


def streamed_statistics(model, stack: DecoderStack, calibration, hessian: bool = False, loss_fn=None,
                        call_kwargs=None, source: WeightSource | None = None, progress=None,
                        group: Group | None = None):
    """The streamed Fisher (and guided Hessians), layer by layer, without quantizing anything:
    the same figures :func:`~sqc.passes.annotate_sensitivity.calibration_statistics` gives for the
    whole model. Returns a :class:`~sqc.passes.annotate_sensitivity.Sensitivity`."""
    from .passes.annotate_sensitivity import Sensitivity

    out_f: dict = {}
    out_h: dict | None = {} if hessian else None

    def collect(j, sens):
        out_f.update(sens.fisher)
        if out_h is not None:
            out_h.update(sens.hessian)

    _stream(model, stack, list(calibration), resolve_loss(model, loss_fn), dict(call_kwargs or {}),
            source or WeightSource(), progress, hessian, collect, group or Group())
    return Sensitivity(out_f, out_h)


def _stream(model, stack, calibration, loss_fn, call_kwargs, source, progress, guided: bool,
            per_layer: Callable[[int, Any], None], group: Group) -> dict[str, float]:
    """Drive both phases; ``per_layer(j, sensitivity)`` runs from the top layer down. Returns stage seconds."""
    tick = progress or (lambda *a: None)
    was_training = model.training
    model.eval()
    secs = {"forward": 0.0, "backward": 0.0}  # the per-layer passes are timed by the pass manager
    st = None
    try:
        t0 = time.perf_counter()
        samples = group.samples(len(calibration))
        st = _forward_phase(model, stack, calibration, samples, call_kwargs, loss_fn, source, tick)
        secs["forward"] = time.perf_counter() - t0
        L = len(stack.layers)
        for j in range(L - 1, -1, -1):
            t0 = time.perf_counter()
            source.materialize(stack.layers[j])
            hmods = {w: w.rsplit(".", 1)[0] for w in stack.weights[j]} if guided else None
            sens = _layer_statistics(model, stack, j, st, hmods, group)
            st.store.drop(j)
            secs["backward"] += time.perf_counter() - t0
            # the layer's quantized weights leave the model here (lowered); its other parameters stay
            per_layer(j, sens)
            del sens
            release_memory()  # the layer's float weights and statistics are gone: hand their pages back
            tick("calibration backward + fit", L - j, L)
    finally:
        model.train(was_training)
        if st is not None and st.store.offload_dir is not None:
            shutil.rmtree(st.store.offload_dir, ignore_errors=True)
    return secs


def spill_layer(gm, model: nn.Module, prefix: str, spill) -> int:
    """Move the packed tensors of every quantized layer under module ``prefix`` (fused groups' stacked
    layers included) into ``spill`` (a :class:`~sqc.runtime.spill.Spill`), in the model and in the
    graph module that shares them; returns the bytes moved."""
    from .runtime.fused import FusedMember
    from .runtime.qlinear import SqcLinear

    mods: dict[int, nn.Module] = {}
    for _, m in model.get_submodule(prefix).named_modules():
        if isinstance(m, SqcLinear):
            mods[id(m)] = m
            k = m.__dict__.get("_kernels")
            if isinstance(k, FusedMember):
                mods[id(k.group.layer)] = k.group.layer
    moved: dict[int, torch.Tensor] = {}
    total = 0
    for m in mods.values():
        bufs = {n: b for n, b in m._buffers.items() if b is not None}
        new = spill.put_many(bufs)
        for n, b in bufs.items():
            moved[id(b)] = new[n]
            m._buffers[n] = new[n]
            total += b.nbytes
        m._bind()
    for sub in gm.modules():  # Lower and FuseSiblingLinears registered the same tensors on the graph module
        for n, b in list(sub._buffers.items()):
            if b is not None and id(b) in moved:
                sub._buffers[n] = moved[id(b)]
    return total


def run_streamed(gm, ctx: CompileContext, stack: DecoderStack, layer_passes: list, instruments: list,
                 source: WeightSource | None = None, spill=None) -> None:
    """Calibrate, split, fit, pack and lower ``stack`` one layer at a time (top first), with
    ``layer_passes`` (the per-weight passes after AnnotateSensitivity) scoped to each layer.
    A guided fit (``ctx.config.fit``) also accumulates each layer's guided Hessians. With ``spill``
    (a :class:`~sqc.runtime.spill.Spill`) each layer's packed tensors move into it once the layer
    is lowered, so memory does not grow with depth."""
    source = source or WeightSource()
    sites = {s.weight: (s, nodes) for s, nodes in unique_sites(gm)}
    manager = PassManager(layer_passes, instruments)
    guided = ctx.config.fit is FitMode.GUIDED

    def fit_layer(j: int, sens) -> None:
        weights = stack.weights[j]
        if not weights:
            return
        ctx.scope = frozenset(weights)
        try:
            items = [sites[w] for w in weights]
            if sens is None:
                for _, nodes in items:
                    for n in nodes:
                        n.meta["sqc.fisher"] = None
            else:
                attach(items, sens, ctx)
            manager.run(gm, ctx)
        finally:
            ctx.scope = None
        if spill is not None:
            spill_layer(gm, ctx.model, stack.layers[j], spill)

    if ctx.calibration is None:
        if guided:
            raise ValueError(GUIDED_NEEDS_DATA)
        t0 = time.perf_counter()
        for j in range(len(stack.layers) - 1, -1, -1):
            source.materialize(stack.layers[j])
            fit_layer(j, None)
            ctx.tick("fit layers", len(stack.layers) - j, len(stack.layers))
        ctx.notes.append("no calibration data: unweighted k-means, no sensitive weights split off")
        ctx.stage_seconds["streamed layers"] = time.perf_counter() - t0
    else:
        loss_fn = resolve_loss(ctx.model, ctx.loss_fn)
        secs = _stream(ctx.model, stack, ctx.calibration, loss_fn, ctx.call_kwargs, source, ctx.progress, guided,
                       fit_layer, ctx.group or Group())
        ctx.stage_seconds["calibration forward"] = secs["forward"]
        ctx.stage_seconds["calibration backward"] = secs["backward"]
    ctx.notes.append(f"layer-streamed pipeline: {len(stack.layers)} layers of {stack.path} calibrated, fitted and "
                     "packed one at a time (sqc.compile(stream=False) runs the whole-model pass)"
                     + ("" if spill is None else f"; packed layers kept in a temporary file as they were finished "
                        f"({spill.nbytes / 2**20:.0f} MiB by the end of the stack), mapped back, not held in memory"))
