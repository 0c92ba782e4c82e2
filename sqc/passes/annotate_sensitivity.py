"""AnnotateSensitivity: the Fisher-information diagonal of every quantized weight.

Reads ``sqc.site``; writes ``sqc.fisher`` (the store key, or ``None`` when no
calibration data was given, which means plain unweighted k-means).

Fisher = sum over calibration samples of the squared gradient of that
sample's loss with respect to each weight. Gradients are requested only for
the weights being quantized; a post-accumulate-grad hook squares each
gradient into one fp32 buffer per weight and frees it at once, so memory is
one extra copy of the quantized weights, never one per sample.
"""
from __future__ import annotations

import torch
from torch import nn

from ..trace import SITE, is_hf_model
from .base import CompileContext, Pass, PassResult, unique_sites

__all__ = ["AnnotateSensitivity", "AttachSensitivity", "causal_lm_loss", "fisher_information"]


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
    loss, accumulated in place into one fp32 buffer per weight.
    """
    if loss_fn is None:
        if not _is_causal_lm(model):
            raise ValueError(
                f"calibration data was given for {type(model).__name__}, which is not a causal LM: "
                "pass loss_fn(output, sample) -> scalar loss to sqc.compile"
            )
        loss_fn = causal_lm_loss
    call_kwargs = dict(call_kwargs or {})
    params = dict(model.named_parameters())
    fisher = {name: torch.zeros(params[name].shape, dtype=torch.float32) for name in weights}
    saved_flags = {name: p.requires_grad for name, p in params.items()}
    handles = []

    def make_hook(buf: torch.Tensor):
        def hook(p: torch.Tensor) -> None:
            g = p.grad.detach().float()
            buf.addcmul_(g, g)
            p.grad = None

        return hook

    was_training = model.training
    model.eval()
    try:
        for name, p in params.items():
            p.requires_grad_(name in fisher)
        for name in fisher:
            handles.append(params[name].register_post_accumulate_grad_hook(make_hook(fisher[name])))
        total = len(calibration)
        for i, sample in enumerate(calibration):
            if not isinstance(sample, (tuple, list)):
                raise TypeError(
                    f"calibration sample {i} is a {type(sample).__name__}; pass a list of input tuples, "
                    "e.g. [(input_ids,), ...]"
                )
            with torch.enable_grad():
                out = model(*sample, **call_kwargs)
                loss = loss_fn(out, tuple(sample))
                if not torch.isfinite(loss):
                    raise ValueError(f"calibration sample {i} gave a non-finite loss ({float(loss)})")
                loss.backward()
            if progress is not None:
                progress("calibration", i + 1, total)
    finally:
        for h in handles:
            h.remove()
        for name, p in params.items():
            p.requires_grad_(saved_flags[name])
            p.grad = None
        model.train(was_training)
    return fisher


class AnnotateSensitivity(Pass):
    name = "AnnotateSensitivity"
    requires = (SITE,)
    ensures = ("sqc.fisher",)

    def run(self, gm, ctx: CompileContext) -> PassResult:
        sites = unique_sites(gm)
        if ctx.calibration is None:
            for site, nodes in sites:
                for n in nodes:
                    n.meta["sqc.fisher"] = None
            ctx.notes.append("no calibration data: unweighted k-means, no sensitive weights split off")
            return PassResult(gm, False, {"samples": 0})
        fisher = fisher_information(
            ctx.model, ctx.calibration, [s.weight for s, _ in sites], ctx.loss_fn, ctx.call_kwargs, ctx.tick
        )
        _attach(sites, fisher, ctx)
        return PassResult(gm, False, {"samples": len(ctx.calibration)})


def _attach(sites, fisher: dict[str, torch.Tensor], ctx: CompileContext) -> None:
    for site, nodes in sites:
        key = ctx.store.put("fisher", site.weight, fisher[site.weight])
        for n in nodes:
            n.meta["sqc.fisher"] = key


class AttachSensitivity(Pass):
    """Use Fisher diagonals computed earlier (e.g. once for several bit widths).

    Reads ``sqc.site``; writes ``sqc.fisher``. Fails naming the first
    quantized weight the given dict lacks or whose shape differs.
    """

    name = "AttachSensitivity"
    requires = (SITE,)
    ensures = ("sqc.fisher",)

    def __init__(self, fisher: dict[str, torch.Tensor]) -> None:
        self.fisher = fisher

    def run(self, gm, ctx: CompileContext) -> PassResult:
        sites = unique_sites(gm)
        for site, _ in sites:
            f = self.fisher.get(site.weight)
            if f is None:
                raise ValueError(f"sensitivity has no Fisher diagonal for {site.weight}; recompute it for this model")
            if tuple(f.shape) != (site.out_features, site.in_features):
                raise ValueError(
                    f"sensitivity for {site.weight} has shape {tuple(f.shape)}, the weight is "
                    f"{(site.out_features, site.in_features)}"
                )
        _attach(sites, {s.weight: self.fisher[s.weight].float() for s, _ in sites}, ctx)
        return PassResult(gm, False, {})
