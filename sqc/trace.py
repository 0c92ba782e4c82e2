"""Trace a model to an FX graph with ``torch.export`` and find its linear calls.

``torch.fx.symbolic_trace`` fails on Hugging Face models (decorated forward,
data-dependent masks); ``torch.export.export(strict=False)`` works, and its
``.module()`` keeps every parameter as a ``get_attr`` node that shares storage
with the original model. Each ``aten.linear.default`` node gets a
``node.meta["sqc.site"]`` :class:`LinearSite` naming its weight, owning module
and shape, and whether it is quantized (and if not, why).
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["LinearSite", "TracedModel", "TraceError", "trace", "is_hf_model", "linear_nodes"]

SITE = "sqc.site"


class TraceError(RuntimeError):
    """The model could not be traced; the message says why and what to pass."""


@dataclasses.dataclass(frozen=True)
class LinearSite:
    module: str  # qualified name of the owning module ("model.layers.0.mlp.up_proj")
    weight: str  # qualified name of the weight parameter
    bias: str | None
    in_features: int
    out_features: int
    module_type: str  # class of the owning module, from nn_module_stack
    skip_reason: str | None = None  # None: quantized

    @property
    def quantized(self) -> bool:
        return self.skip_reason is None


@dataclasses.dataclass
class TracedModel:
    graph_module: torch.fx.GraphModule
    sites: dict[str, LinearSite]  # by weight name; one entry per distinct weight
    example_kwargs: dict[str, Any]


def is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is optional
        return False
    return isinstance(model, PreTrainedModel)


def linear_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The linear call nodes that carry a site annotation, in graph order."""
    return [n for n in gm.graph.nodes if SITE in n.meta]


def _default_skips(model: nn.Module) -> dict[str, str]:
    """Modules left in float by default, with the reason."""
    skips: dict[str, str] = {}
    if is_hf_model(model):
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out is not None:
            for name, mod in model.named_modules():
                if mod is out:
                    skips[name] = "output embedding (lm_head) is kept in floating point"
    return skips


def _tied_weights(model: nn.Module) -> set[str]:
    """Names of parameters that share storage with another parameter."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        key = ("param", id(p)) if p.is_meta else p.data_ptr()  # meta tensors have no storage to compare
        if key in seen and seen[key] != name:
            tied.add(name)
            tied.add(seen[key])
        seen.setdefault(key, name)
    return tied


def trace(
    model: nn.Module,
    example_args: Sequence[Any],
    example_kwargs: dict[str, Any] | None = None,
    skip: Sequence[str] = (),
) -> TracedModel:
    """Export ``model`` and annotate every linear call with a :class:`LinearSite`.

    Parameters
    ----------
    model : the float model.
    example_args : positional example inputs for ``model.forward`` (a tuple).
    example_kwargs : keyword example inputs. Hugging Face models get
        ``use_cache=False`` unless given (a KV cache object is not a traceable output).
    skip : ``fnmatch`` patterns of module names to leave in floating point.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"sqc.compile needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_args, (tuple, list)):
        raise TraceError(
            f"example inputs must be a tuple of forward() arguments, e.g. (input_ids,), "
            f"got {type(example_args).__name__}"
        )
    kwargs = dict(example_kwargs or {})
    if is_hf_model(model) and hasattr(model.config, "use_cache") and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ep = torch.export.export(model, tuple(example_args), kwargs, strict=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise TraceError(
            f"torch.export could not trace {type(model).__name__}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}\n"
            "Possible solutions: pass example inputs that match forward() exactly "
            "(a tuple of tensors, plus keyword arguments), make data-dependent control "
            "flow static, or move unsupported outputs (cache objects) out of forward."
        ) from e
    finally:
        model.train(was_training)
    gm = ep.module()
    del ep

    default_skips = _default_skips(model)
    tied = _tied_weights(model)
    modules = dict(model.named_modules())
    sites: dict[str, LinearSite] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        w_node = node.args[1]
        b_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        stack = list(node.meta.get("nn_module_stack", {}).values())
        module_type = stack[-1][1] if stack else "?"
        if not isinstance(w_node, torch.fx.Node) or w_node.op != "get_attr":
            continue  # weight computed inside forward: not a stored parameter, nothing to quantize
        weight = str(w_node.target)
        mod_name = weight.rsplit(".", 1)[0] if "." in weight else ""
        w_val = w_node.meta.get("val")
        if w_val is None:
            w_val = gm.get_parameter(weight)
        out_f, in_f = (int(s) for s in w_val.shape)
        bias = str(b_node.target) if isinstance(b_node, torch.fx.Node) and b_node.op == "get_attr" else None
        reason = None
        owner = modules.get(mod_name)
        if not weight.endswith(".weight") or not isinstance(owner, nn.Linear):
            reason = (
                f"weight {weight} is not the weight of an nn.Linear (called via F.linear); "
                "sqc replaces nn.Linear modules"
            )
        elif mod_name in default_skips:
            reason = default_skips[mod_name]
        elif any(fnmatch.fnmatchcase(mod_name, pat) for pat in skip):
            reason = "matched QuantConfig.skip"
        elif weight in tied:
            reason = "weight is tied to another parameter"
        elif b_node is not None and bias is None:
            reason = "bias is computed in forward, not a stored parameter"
        site = sites.get(weight)
        if site is None:
            site = LinearSite(mod_name, weight, bias, in_f, out_f, module_type, reason)
            sites[weight] = site
        node.meta[SITE] = site
    if not sites:
        raise TraceError(
            f"no linear layers found in {type(model).__name__}: sqc quantizes nn.Linear "
            "layers (aten.linear calls); this model has none to compress"
        )
    if not any(s.quantized for s in sites.values()):
        # e.g. GPT-2: its projections are transformers' Conv1D (addmm), only lm_head is an nn.Linear
        other = sorted({type(m).__name__ for m in modules.values()
                        if not isinstance(m, nn.Linear) and isinstance(getattr(m, "weight", None), torch.Tensor)
                        and m.weight.ndim == 2 and type(m).__name__ not in ("Embedding",)})
        found = "; ".join(f"{s.module}: {s.skip_reason}" for s in sites.values())
        raise TraceError(
            f"{type(model).__name__} has no linear layer sqc can quantize ({found})."
            + (f" Its 2-D weights live in {', '.join(other)} modules, which sqc does not rewrite" if other else "")
            + ". sqc compiles architectures built of nn.Linear layers (LLaMA, Mistral, Qwen, SmolLM, ...)."
        )
    return TracedModel(gm, sites, kwargs)
