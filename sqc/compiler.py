"""``sqc.compile``: trace, run the pass pipeline, return a drop-in compiled model."""
from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .backends import backend
from .compiled import CompiledModel
from .runtime.target import parse_target
from .config import FitMode, HeadFormat, QuantConfig, resolve_config
from .passes.allocate_bits import AllocateBits
from .passes.annotate_sensitivity import AnnotateSensitivity, AttachSensitivity, Sensitivity
from .passes.base import CompileContext, IRDumpInstrument, PassManager, TimingInstrument
from .passes.fit_codebook import FitCodebook
from .passes.fit_guided import FitGuided
from .passes.compact_head import CompactHead
from .passes.fuse_siblings import FuseSiblingLinears
from .passes.lower import Lower
from .passes.pack_layout import PackLayout
from .passes.split_outliers import SplitOutliers
from .parallel import Group, current_group
from .streaming import StreamingRequired, StreamingUnsupported, find_decoder_stack, run_streamed
from .runtime.memory import release_memory
from .runtime.spill import Spill
from .trace import trace

__all__ = ["compile", "default_pipeline"]


_release_memory = release_memory  # the helper lives in the runtime; the name stays for callers


def layer_pipeline(config: QuantConfig | None = None, fuse: bool = False) -> list:
    """The per-weight passes after the statistics, in order: each works on one weight at a time, so the
    streamed pipeline (:mod:`sqc.streaming`) runs them one decoder layer at a time. ``fuse``: end with
    FuseSiblingLinears scoped to the layer (the streamed pipeline fuses a layer before it moves on; the
    whole-model pipeline fuses in :func:`graph_pipeline`)."""
    guided = config is not None and config.fit is FitMode.GUIDED
    fuse = fuse and (config is None or config.fuse)
    return [
        # dense-and-sparse decomposition
        SplitOutliers(),
        *([AllocateBits()] if config is not None and config.bits_per_weight is not None else []),
        FitCodebook(),
        *([FitGuided()] if guided else []),
        # representation
        PackLayout(),
        # graph rewrite
        Lower(),
        *([FuseSiblingLinears()] if fuse else []),
    ]


def graph_pipeline(config: QuantConfig | None = None, fuse: bool = True) -> list:
    """The passes over the whole lowered graph (after every layer is lowered). A disabled pass is left out;
    ``fuse=False`` leaves out FuseSiblingLinears (the streamed pipeline has fused each layer already)."""
    return [
        *([FuseSiblingLinears()] if fuse and (config is None or config.fuse) else []),
        *([CompactHead()] if config is None or config.head is HeadFormat.INT8 else []),
    ]


def default_pipeline(sensitivity: "dict[str, torch.Tensor] | Sensitivity | None" = None,
                     config: QuantConfig | None = None) -> list:
    """The whole-model pass list, in order. A disabled pass is left out of this list."""
    guided = config is not None and config.fit is FitMode.GUIDED
    return [
        # analysis: Fisher (and guided Hessians) from calibration data, or computed earlier
        AnnotateSensitivity(guided) if sensitivity is None else AttachSensitivity(sensitivity, guided),
        *layer_pipeline(config),
        *graph_pipeline(config),
    ]


def compile(  # noqa: A001 - the public name
    model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
    *,
    config: QuantConfig | str | dict | None = None,
    calibration: Sequence[tuple] | None = None,
    loss_fn: Callable[[Any, tuple], torch.Tensor] | None = None,
    target: Any = "llvm",
    example_kwargs: dict[str, Any] | None = None,
    dump_ir: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    sensitivity: "dict[str, torch.Tensor] | Sensitivity | None" = None,
    tune: bool = True,
    tune_trials: int | None = None,
    kernels: bool = True,
    stream: bool | None = None,
    weight_source: Any = None,
    group: Group | None = None,
    spill: bool | None = None,
) -> CompiledModel:
    """Quantize every linear layer of ``model`` to a dense-and-sparse codebook.

    Parameters
    ----------
    model : the float model; it is modified in place (its quantized
        ``nn.Linear`` modules are replaced and their float weights released).
    example_inputs : a tuple of ``forward`` arguments used for tracing. For a
        model calibrated with ``calibration`` it defaults to the first sample.
    config : a :class:`QuantConfig`, a preset name (``"w3-s0.45"``...) or a dict.
    calibration : a list of input tuples; ``None`` means no Fisher information
        (plain k-means, no sensitive weights).
    loss_fn : ``loss_fn(output, sample) -> scalar``; required with calibration
        unless the model is a Hugging Face causal LM (next-token loss).
    target : ``"llvm"``, ``"llvm -mcpu=..."``, ``"cuda -arch=sm_86"``, a dict or
        a ``tvm.target.Target``.
    dump_ir : a folder to write the graph after every pass; the compiled model
        then keeps the rewritten graph as ``graph_module`` (otherwise None).
    progress : ``progress(stage, done, total)`` callback.
    sensitivity : Fisher diagonals by weight name, computed earlier with
        :func:`sqc.passes.annotate_sensitivity.fisher_information`, or a
        :class:`~sqc.passes.annotate_sensitivity.Sensitivity` (Fisher and
        guided Hessians, from ``calibration_statistics``; guided presets need
        the Hessians); replaces the calibration pass (e.g. to try several bit
        widths on one calibration).
    tune : search each kernel's schedule knobs (results persist in the tuning
        database, so a second compile tunes nothing); ``False`` uses the
        database's choice when there is one, else the default knobs.
    tune_trials : at most this many candidates per kernel (``None``: the
        ``SQC_TUNE_TRIALS`` environment variable if set, else all).
    kernels : attach generated kernels (``False``: every layer runs the
        reference op; for work that only needs the packed weights, such as
        measuring storage).
    stream : calibrate, fit and pack one decoder layer at a time
        (:mod:`sqc.streaming`; same Fisher, memory bounded by a layer plus
        the layer-boundary activations). ``None`` (default): whenever every
        quantized linear sits in one ``nn.ModuleList`` of layers and no
        ``sensitivity`` is given; ``True``: required (an error says why not);
        ``False``: the whole-model pass. The report's notes say which ran.
    weight_source : where the layers' float weights come from when the model
        was built on the meta device (:func:`sqc.compile_pretrained` passes a
        :class:`sqc.lazy.CheckpointSource`); needs the streamed pipeline.
    group : the data-parallel job (:class:`sqc.parallel.Group`; default: the
        one :func:`sqc.parallel.init_from_env` joined, else one process). Each
        rank calibrates its share of the samples and fits its share of each
        layer's rows; every rank returns the same quantized model, and only
        rank 0 builds kernels (the others return it with ``kernels=False``).
    spill : keep each decoder layer's packed tensors (and the CPU kernels' copies
        of its codes) in a temporary file as they are finished, mapped back into
        the model (:class:`sqc.runtime.spill.Spill`), so the compile's memory does
        not grow with depth. ``None`` (default): with a ``weight_source`` (a model
        larger than memory); needs the streamed pipeline.

    Examples
    --------
    >>> import torch, sqc
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    >>> x = torch.randn(4, 64)
    >>> compiled = sqc.compile(mlp, (x,), config="w4")
    >>> compiled(x).shape
    torch.Size([4, 8])
    """
    cfg = resolve_config(config)
    spec = parse_target(target)
    if calibration is not None:
        calibration = list(calibration)
        if not calibration:
            raise ValueError("calibration is an empty list: pass None for no calibration, or some samples")
    if sensitivity is not None and calibration is not None:
        raise ValueError("pass either calibration (Fisher is computed) or sensitivity (Fisher given), not both")
    if example_inputs is None:
        if not calibration:
            raise ValueError("sqc.compile needs example_inputs (a tuple of forward() arguments) to trace the model")
        example_inputs = tuple(calibration[0])

    if weight_source is not None:  # a meta-device model traces on meta inputs
        example_inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in example_inputs)
    t0 = time.perf_counter()
    traced = trace(model, example_inputs, example_kwargs, skip=cfg.skip)
    trace_s = time.perf_counter() - t0

    ctx = CompileContext(
        model=model,
        config=cfg,
        calibration=calibration,
        loss_fn=loss_fn,
        call_kwargs={k: v for k, v in traced.example_kwargs.items() if k == "use_cache"},
        target=spec,
        progress=progress,
    )
    ctx.stage_seconds["trace"] = trace_s
    for site in traced.sites.values():
        ctx.layer(site)
    float_bytes = 0
    params = dict(model.named_parameters())
    for site in traced.sites.values():
        if site.quantized:
            w = params[site.weight]
            float_bytes += w.nbytes

    del params
    instruments: list = [TimingInstrument()]
    if dump_ir:
        instruments.append(IRDumpInstrument(dump_ir))
    group = group or current_group()
    if group.distributed:
        ctx.group = group
        if group.rank != 0:
            kernels = False  # rank 0 builds the kernels and writes the artifact
    stack, why = _choose_driver(model, traced, cfg, stream, sensitivity)
    streaming_error = functools.partial(_cannot_stream, model, weight_source, group)
    if stack is None and (stream or weight_source is not None or group.distributed):
        raise streaming_error(why)
    gm = traced.graph_module
    del traced
    if weight_source is not None:
        weight_source.prepare(stack.layers)
    if spill is None:
        spill = weight_source is not None
    if spill and stack is None:
        raise streaming_error(why, for_spill=True)
    spilled = Spill() if spill else None
    if stack is not None:
        try:
            run_streamed(gm, ctx, stack, layer_pipeline(cfg, fuse=True), instruments, weight_source, spilled)
        except StreamingUnsupported as e:
            if weight_source is not None or stream or group.distributed:
                raise streaming_error(str(e)) from e
            if spilled is not None:
                raise streaming_error(str(e), for_spill=True) from e
            why, stack = str(e), None  # raised before any layer was changed: the whole-model path runs
    if stack is None:
        if calibration is not None:
            ctx.notes.append(f"whole-model calibration (not layer-streamed: {why})")
        gm = PassManager(default_pipeline(sensitivity, cfg), instruments).run(gm, ctx)
    else:
        gm = PassManager(graph_pipeline(cfg, fuse=False), instruments).run(gm, ctx)
    if not dump_ir:
        gm = None  # what runs is ``model``; the rewritten graph is kept only for the IR that was asked for
    if kernels:
        kernel_set = _kernel_stage(model, spec, ctx, tune, tune_trials, progress, spilled)
    else:
        kernel_set = None
        ctx.notes.append("compiled with kernels=False: every quantized layer runs the reference op")
    _release_memory()
    compiled = CompiledModel(model, cfg, spec, list(ctx.layers.values()), ctx.notes, ctx.stage_seconds, gm,
                             float_bytes, kernel_set.records() if kernel_set is not None else [], kernels=kernel_set,
                             spill=spilled)
    compiled.refresh_kernel_names()
    fallback = sorted({m.status.why or "no generated kernel for this target"
                       for m in compiled.quantized_modules().values() if not m.status.generated})
    for why in fallback:
        compiled.notes.append(f"some layers run the reference op: {why}")
    return compiled


def _choose_driver(model: nn.Module, traced, cfg: QuantConfig, stream: bool | None, sensitivity) -> tuple[Any, str]:
    """Which pipeline runs: (the decoder stack the layer-streamed pipeline walks, or None; why not streamed)."""
    if stream is False:
        return None, "stream=False"
    if sensitivity is not None:
        return None, "Fisher given (sensitivity=...)"
    if cfg.bits_per_weight is not None:
        return None, ("a bits budget (QuantConfig.bits_per_weight) chooses every layer's width at once, from all "
                      "layers' statistics")
    return find_decoder_stack(model, list(traced.sites.values()))


def _cannot_stream(model: nn.Module, weight_source, group: Group, why: str, for_spill: bool = False
                   ) -> StreamingRequired:
    """The one error for a compile that needs the layer-streamed pipeline where it cannot run."""
    needs = ("spill=True" if for_spill else
             "a model loaded lazily" if weight_source is not None else
             f"a data-parallel compile on {group.world} ranks (run one process)" if group.distributed else
             "stream=True")
    return StreamingRequired(f"the layer-streamed pipeline cannot run on {type(model).__name__}: {why} "
                             f"({needs} needs it)")


def _kernel_stage(model: nn.Module, spec, ctx: CompileContext, tune: bool, tune_trials: int | None, progress,
                  spilled: Spill | None):
    """The target's backend builds (and tunes) every quantized layer's kernels and attaches them; returns the
    kernel set (None when no layer got one)."""
    t0 = time.perf_counter()
    if tune_trials is None and os.environ.get("SQC_TUNE_TRIALS"):
        tune_trials = int(os.environ["SQC_TUNE_TRIALS"])
    kernel_set = backend(spec.kind).attach(model, spec, tune=tune, trials=tune_trials, progress=progress,
                                           notes=ctx.notes, store=spilled.put_evicting if spilled is not None else None)
    ctx.stage_seconds["kernels"] = time.perf_counter() - t0
    return kernel_set
