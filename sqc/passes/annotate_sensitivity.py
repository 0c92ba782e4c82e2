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

__all__ = ["AnnotateSensitivity", "causal_lm_loss"]


def causal_lm_loss(output, sample: tuple) -> torch.Tensor:
    """Next-token cross entropy of a causal LM on its own input ids."""
    logits = output.logits if hasattr(output, "logits") else output[0]
    ids = sample[0]
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
    )


def _is_causal_lm(model: nn.Module) -> bool:
    return is_hf_model(model) and type(model).__name__.endswith("ForCausalLM")


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

        loss_fn = ctx.loss_fn
        if loss_fn is None:
            if not _is_causal_lm(ctx.model):
                raise ValueError(
                    f"calibration data was given for {type(ctx.model).__name__}, which is not a causal LM: "
                    "pass loss_fn(output, sample) -> scalar loss to sqc.compile"
                )
            loss_fn = causal_lm_loss

        model = ctx.model
        params = dict(model.named_parameters())
        fisher = {site.weight: torch.zeros(params[site.weight].shape, dtype=torch.float32) for site, _ in sites}
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
            total = len(ctx.calibration)
            for i, sample in enumerate(ctx.calibration):
                if not isinstance(sample, (tuple, list)):
                    raise TypeError(
                        f"calibration sample {i} is a {type(sample).__name__}; pass a list of input tuples, "
                        "e.g. [(input_ids,), ...]"
                    )
                with torch.enable_grad():
                    out = model(*sample, **ctx.call_kwargs)
                    loss = loss_fn(out, tuple(sample))
                    if not torch.isfinite(loss):
                        raise ValueError(f"calibration sample {i} gave a non-finite loss ({float(loss)})")
                    loss.backward()
                ctx.tick("calibration", i + 1, total)
        finally:
            for h in handles:
                h.remove()
            for name, p in params.items():
                p.requires_grad_(saved_flags[name])
                p.grad = None
            model.train(was_training)

        for site, nodes in sites:
            key = ctx.store.put("fisher", site.weight, fisher[site.weight])
            for n in nodes:
                n.meta["sqc.fisher"] = key
        return PassResult(gm, False, {"samples": len(ctx.calibration)})
