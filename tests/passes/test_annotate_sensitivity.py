import pytest
import torch

from sqc.config import QuantConfig
from sqc.passes import AnnotateSensitivity
from sqc.passes.base import CompileContext, PassManager
from sqc.trace import trace


def run(model, calib, loss_fn=None, skip=()):
    t = trace(model, calib[0] if calib else (torch.randn(2, 100),), skip=skip)
    ctx = CompileContext(model=model, config=QuantConfig(), calibration=calib, loss_fn=loss_fn)
    PassManager([AnnotateSensitivity()]).run(t.graph_module, ctx)
    return t, ctx


def test_fisher_is_sum_of_squared_per_sample_grads(mlp):
    torch.manual_seed(1)
    calib = [(torch.randn(3, 100),) for _ in range(4)]
    loss_fn = lambda out, s: (out ** 2).mean()  # noqa: E731
    expected = {n: torch.zeros_like(p) for n, p in mlp.named_parameters() if n.endswith("weight")}
    for (x,) in calib:
        grads = torch.autograd.grad(loss_fn(mlp(x), (x,)), [p for n, p in mlp.named_parameters() if n.endswith("weight")])
        for (n, _), g in zip([(n, p) for n, p in mlp.named_parameters() if n.endswith("weight")], grads):
            expected[n] += g ** 2
    flags = {n: p.requires_grad for n, p in mlp.named_parameters()}
    t, ctx = run(mlp, calib, loss_fn, skip=("4",))
    for n in ("0.weight", "2.weight"):
        torch.testing.assert_close(ctx.store.get("fisher", n), expected[n], rtol=1e-5, atol=1e-12)
    assert "fisher" in ctx.store.kinds()
    with pytest.raises(Exception, match="no 'fisher' entry for 4.weight"):
        ctx.store.get("fisher", "4.weight")  # skipped layer: no gradient requested
    assert {n: p.requires_grad for n, p in mlp.named_parameters()} == flags
    assert all(p.grad is None for p in mlp.parameters())


def test_causal_lm_default_loss(llama):
    calib = [(torch.randint(0, 128, (1, 16)),) for _ in range(2)]
    t, ctx = run(llama, calib)
    f = ctx.store.get("fisher", "model.layers.0.mlp.up_proj.weight")
    assert f.dtype == torch.float32 and (f >= 0).all() and f.sum() > 0


def test_no_calibration_means_unweighted(mlp):
    t = trace(mlp, (torch.randn(2, 100),))
    ctx = CompileContext(model=mlp, config=QuantConfig(), calibration=None)
    PassManager([AnnotateSensitivity()]).run(t.graph_module, ctx)
    assert all(n.meta["sqc.fisher"] is None for n in t.graph_module.graph.nodes if "sqc.site" in n.meta)
    assert any("unweighted" in note for note in ctx.notes)


def test_non_lm_needs_loss_fn(mlp):
    with pytest.raises(ValueError, match="pass loss_fn"):
        run(mlp, [(torch.randn(2, 100),)])
