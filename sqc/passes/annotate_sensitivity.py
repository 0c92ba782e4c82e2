"""AnnotateSensitivity: the Fisher-information diagonal of every quantized weight.

Reads ``sqc.site``; writes ``sqc.fisher`` (the store key, or ``None`` when no
calibration data was given, which means plain unweighted k-means) and, for a
guided fit (``QuantConfig(fit="guided")``), ``sqc.hessian``: the store key of
the layer's guided Hessian ``H = sum_t mean_j (dL/dz_tj)^2 x_t x_t^T``
(``in x in`` fp32, :mod:`sqc.quant.guided`).

Fisher = sum over calibration samples of the squared gradient of that
sample's loss with respect to each weight. Gradients are requested only for
the weights being quantized; a post-accumulate-grad hook squares each
gradient into one fp32 buffer per weight and frees it at once, so memory is
one extra copy of the quantized weights, never one per sample.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from ..quant.guided import accumulate_guided_hessian
from ..trace import SITE, is_hf_model
from .base import CompileContext, Pass, PassResult, unique_sites

__all__ = ["AnnotateSensitivity", "AttachSensitivity", "Sensitivity", "StatisticHooks", "calibration_statistics",
           "causal_lm_loss", "fisher_information", "resolve_loss"]


def causal_lm_loss(output, sample: tuple) -> torch.Tensor:
    """Next-token cross entropy of a causal LM on its own input ids."""
    logits = output.logits if hasattr(output, "logits") else output[0]
    ids = sample[0]
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
    )


def _is_causal_lm(model: nn.Module) -> bool:
    return is_hf_model(model) and type(model).__name__.endswith("ForCausalLM")


def fisher_information(
    model: nn.Module,
    calibration,
    weights: list[str],
    loss_fn=None,
    call_kwargs: dict | None = None,
    progress=None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information of the named ``weights``.

    Sum over calibration samples of the squared gradient of each sample's
    loss, accumulated in place into one fp32 buffer per weight
    (:func:`calibration_statistics` also gives the guided Hessians).
    """
    return calibration_statistics(model, calibration, weights, loss_fn, call_kwargs, progress).fisher


@dataclasses.dataclass
class Sensitivity:
    """What calibration measured, by weight name: Fisher diagonals and (guided fits) layer Hessians."""

    fisher: dict[str, torch.Tensor]
    hessian: dict[str, torch.Tensor] | None = None


def resolve_loss(model: nn.Module, loss_fn):
    """``loss_fn``, or the next-token loss for a Hugging Face causal LM; an error names what to pass."""
    if loss_fn is not None:
        return loss_fn
    if not _is_causal_lm(model):
        raise ValueError(
            f"calibration data was given for {type(model).__name__}, which is not a causal LM: "
            "pass loss_fn(output, sample) -> scalar loss to sqc.compile"
        )
    return causal_lm_loss


def check_sample(i: int, sample) -> tuple:
    if not isinstance(sample, (tuple, list)):
        raise TypeError(
            f"calibration sample {i} is a {type(sample).__name__}; pass a list of input tuples, "
            "e.g. [(input_ids,), ...]"
        )
    return tuple(sample)


def check_loss(i: int, loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise ValueError(f"calibration sample {i} gave a non-finite loss ({float(loss)})")


class StatisticHooks:
    """While active: gradients flow to the named ``weights`` only, and each backward pass adds its
    squared gradient into that weight's fp32 Fisher buffer (a post-accumulate-grad hook, so the
    gradient is freed at once); for ``hessian_modules`` (weight name -> owning module name) a
    forward hook folds the layer input and its output gradient into the guided Hessian.

    The whole-model pass (:func:`calibration_statistics`) and the layer-streamed one
    (:mod:`sqc.streaming`) accumulate through this one class, so their statistics are the same sums.
    """

    def __init__(self, model: nn.Module, weights, hessian_modules: dict[str, str] | None = None) -> None:
        self.model = model
        params = dict(model.named_parameters())
        self.params = params
        self.weights = list(weights)
        self.hessian_modules = dict(hessian_modules or {})
        self.fisher: dict[str, torch.Tensor] = {}
        self.hessian: dict[str, torch.Tensor] | None = None if hessian_modules is None else {}
        # ``sink(key, tensor)``, when set: each backward's squared gradient goes there as it is made
        # (:meth:`TreeSum.absorb <sqc.quant.reduce.TreeSum.absorb>`), and :meth:`take` omits it
        self.sink: Callable[[str, torch.Tensor], None] | None = None
        self._sunk: set[str] = set()
        self._zero()
        self._handles: list = []
        self._flags: dict[str, bool] = {}

    def _zero(self) -> None:
        # a Fisher buffer is made by the first gradient that reaches it (that gradient squared in
        # place: no zeros held beside it); a weight no gradient reached reads as zeros
        self.fisher = {}
        if self.hessian is not None:
            shapes = {name: p.shape for name, p in self.params.items()}
            self.hessian = {w: torch.zeros((shapes[w][1],) * 2, dtype=torch.float32) for w in self.hessian_modules}

    def _fisher(self) -> dict[str, torch.Tensor]:
        return {name: self.fisher[name] if name in self.fisher else
                torch.zeros(self.params[name].shape, dtype=torch.float32) for name in self.weights
                if name not in self._sunk}

    def layout(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """The (shape, dtype) of every entry :meth:`take` returns, without making any."""
        out = {f"fisher:{w}": (self.params[w].shape, torch.float32) for w in self.weights}
        out.update({f"hessian:{k}": (v.shape, v.dtype) for k, v in (self.hessian or {}).items()})
        return out

    def take(self) -> dict[str, torch.Tensor]:
        """For a caller that sums samples in its own order (:class:`~sqc.quant.reduce.TreeSum`):
        the statistics since the last call (``fisher:<weight>``, ``hessian:<weight>``), then fresh zeros."""
        item = {f"fisher:{k}": v for k, v in self._fisher().items()}
        item.update({f"hessian:{k}": v for k, v in (self.hessian or {}).items()})
        self._zero()
        self._sunk = set()
        return item

    @staticmethod
    def split(item: dict[str, torch.Tensor], hessian: bool) -> "Sensitivity":
        """A :meth:`take` item (or a sum of them) as a :class:`Sensitivity`."""
        fisher = {k[7:]: v for k, v in item.items() if k.startswith("fisher:")}
        hess = {k[8:]: v for k, v in item.items() if k.startswith("hessian:")} if hessian else None
        return Sensitivity(fisher, hess)

    def _fisher_hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            g = p.grad.detach()
            owned = g.dtype != torch.float32 or (g._base is None and g.is_contiguous())
            g = g.float()
            acc = self.fisher.get(name)
            if self.sink is not None:  # one sample's square goes straight to the caller's sum
                self.sink(f"fisher:{name}", g.mul_(g) if owned else g * g)
                self._sunk.add(name)
            elif acc is None:  # g * g, the same bits as 0 + g * g
                self.fisher[name] = g.mul_(g) if owned else g * g
            else:
                acc.addcmul_(g, g)
            p.grad = None

        return hook

    def _hessian_hook(self, name: str):
        def forward_hook(module, args, output) -> None:
            if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            x = args[0]
            output.register_hook(lambda g: accumulate_guided_hessian(self.hessian[name], x, g))

        return forward_hook

    def __enter__(self) -> "StatisticHooks":
        params = self.params
        self._flags = {name: p.requires_grad for name, p in params.items()}
        try:
            wanted = set(self.weights)
            for name, p in params.items():
                p.requires_grad_(name in wanted)
            for name in self.weights:
                self._handles.append(params[name].register_post_accumulate_grad_hook(self._fisher_hook(name)))
            for wname, mname in self.hessian_modules.items():
                module = self.model.get_submodule(mname)
                self._handles.append(module.register_forward_hook(self._hessian_hook(wname)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name, p in self.params.items():
            if name in self._flags:
                p.requires_grad_(self._flags[name])
            p.grad = None

    def result(self) -> "Sensitivity":
        return Sensitivity(self._fisher(), self.hessian)


def calibration_statistics(
    model: nn.Module,
    calibration,
    weights: list[str],
    loss_fn=None,
    call_kwargs: dict | None = None,
    progress=None,
    hessian_modules: dict[str, str] | None = None,
) -> Sensitivity:
    """Fisher diagonals of ``weights`` and, for ``hessian_modules`` (weight name -> owning module
    name), the guided Hessian of each, all from the same forward/backward pass per sample.

    The Hessian hooks keep one layer input per call until its output gradient
    arrives in the backward pass (autograd holds that tensor anyway), then fold
    it into the layer's ``in x in`` fp32 matrix and drop it.
    """
    loss_fn = resolve_loss(model, loss_fn)
    call_kwargs = dict(call_kwargs or {})
    was_training = model.training
    model.eval()
    try:
        with StatisticHooks(model, weights, hessian_modules) as hooks:
            total = len(calibration)
            for i, sample in enumerate(calibration):
                sample = check_sample(i, sample)
                with torch.enable_grad():
                    out = model(*sample, **call_kwargs)
                    loss = loss_fn(out, sample)
                    check_loss(i, loss)
                    loss.backward()
                if progress is not None:
                    progress("calibration", i + 1, total)
    finally:
        model.train(was_training)
    return hooks.result()


GUIDED_NEEDS_DATA = (
    "QuantConfig(fit='guided') fits each layer to its gradient-weighted output error, which needs "
    "calibration data: pass calibration=[...] (or sensitivity=Sensitivity(fisher, hessian)), "
    "or use a k-means preset such as 'w3-s0.45' instead of 'w3-s0.45-g'"
)


class AnnotateSensitivity(Pass):
    """Fisher diagonals from the calibration data; with ``guided=True`` also the guided Hessians."""

    name = "AnnotateSensitivity"
    requires = (SITE,)
    ensures = ("sqc.fisher",)

    def __init__(self, guided: bool = False) -> None:
        self.guided = guided
        if guided:
            self.ensures = ("sqc.fisher", "sqc.hessian")

    def run(self, gm, ctx: CompileContext) -> PassResult:
        sites = unique_sites(gm, ctx.scope)
        if ctx.calibration is None:
            if self.guided:
                raise ValueError(GUIDED_NEEDS_DATA)
            for site, nodes in sites:
                for n in nodes:
                    n.meta["sqc.fisher"] = None
            ctx.notes.append("no calibration data: unweighted k-means, no sensitive weights split off")
            return PassResult(gm, False, {"samples": 0})
        sens = calibration_statistics(
            ctx.model, ctx.calibration, [s.weight for s, _ in sites], ctx.loss_fn, ctx.call_kwargs, ctx.tick,
            hessian_modules={s.weight: s.module for s, _ in sites} if self.guided else None,
        )
        attach(sites, sens, ctx)
        return PassResult(gm, False, {"samples": len(ctx.calibration)})


def attach(sites, sens: Sensitivity, ctx: CompileContext) -> None:
    """Put the statistics of ``sites`` into the store and point their nodes at them."""
    for site, nodes in sites:
        key = ctx.store.put("fisher", site.weight, sens.fisher[site.weight])
        for n in nodes:
            n.meta["sqc.fisher"] = key
        if sens.hessian is not None:
            hkey = ctx.store.put("hessian", site.weight, sens.hessian[site.weight])
            for n in nodes:
                n.meta["sqc.hessian"] = hkey


class AttachSensitivity(Pass):
    """Use calibration statistics computed earlier (e.g. once for several bit widths).

    Reads ``sqc.site``; writes ``sqc.fisher`` (and ``sqc.hessian`` with
    ``guided=True``). ``sensitivity`` is a dict of Fisher diagonals by weight
    name or a :class:`Sensitivity`. Fails naming the first quantized weight
    it lacks or whose shape differs.
    """

    name = "AttachSensitivity"
    requires = (SITE,)
    ensures = ("sqc.fisher",)

    def __init__(self, sensitivity: "dict[str, torch.Tensor] | Sensitivity", guided: bool = False) -> None:
        self.sensitivity = sensitivity if isinstance(sensitivity, Sensitivity) else Sensitivity(sensitivity)
        self.guided = guided
        if guided:
            self.ensures = ("sqc.fisher", "sqc.hessian")

    def run(self, gm, ctx: CompileContext) -> PassResult:
        sites = unique_sites(gm, ctx.scope)
        sens = self.sensitivity
        if self.guided and sens.hessian is None:
            raise ValueError(GUIDED_NEEDS_DATA + " (the given sensitivity has no hessian: compute it with "
                             "calibration_statistics(..., hessian_modules=...))")
        for site, _ in sites:
            f = sens.fisher.get(site.weight)
            if f is None:
                raise ValueError(f"sensitivity has no Fisher diagonal for {site.weight}; recompute it for this model")
            if tuple(f.shape) != (site.out_features, site.in_features):
                raise ValueError(
                    f"sensitivity for {site.weight} has shape {tuple(f.shape)}, the weight is "
                    f"{(site.out_features, site.in_features)}"
                )
            if self.guided:
                h = sens.hessian.get(site.weight)
                if h is None or tuple(h.shape) != (site.in_features,) * 2:
                    got = "none" if h is None else f"shape {tuple(h.shape)}"
                    raise ValueError(f"sensitivity has no [{site.in_features}, {site.in_features}] guided Hessian "
                                     f"for {site.weight} (got {got}); recompute it for this model")
        fisher = {s.weight: sens.fisher[s.weight].float() for s, _ in sites}
        hessian = {s.weight: sens.hessian[s.weight].float() for s, _ in sites} if self.guided else None
        attach(sites, Sensitivity(fisher, hessian), ctx)
        return PassResult(gm, False, {})
