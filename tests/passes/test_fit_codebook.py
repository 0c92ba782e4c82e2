import torch

from sqc.config import QuantConfig
from sqc.passes import AnnotateSensitivity, FitCodebook, SplitOutliers
from sqc.passes.base import CompileContext, PassManager
from sqc.quant.rtn import rtn_quantize
from sqc.trace import trace


def fit(model, cfg, calib=None, loss_fn=None):
    t = trace(model, (torch.randn(2, 100),))
    ctx = CompileContext(model=model, config=cfg, calibration=calib, loss_fn=loss_fn)
    PassManager([AnnotateSensitivity(), SplitOutliers(), FitCodebook()]).run(t.graph_module, ctx)
    return ctx


def test_tables_and_nearest_codes(mlp):
    ctx = fit(mlp, QuantConfig(bits=3))
    lut, codes = ctx.store.get("codebook", "0.weight")
    assert lut.dtype == torch.float16 and lut.shape == (53, 8)
    assert codes.dtype == torch.uint8 and codes.shape == (53, 100)
    assert (lut.float().diff(dim=1) >= 0).all()
    w = mlp[0].weight.detach()
    dist = (w.unsqueeze(-1) - lut.float().unsqueeze(1)).abs()
    chosen = torch.gather(dist, 2, codes.long().unsqueeze(-1)).squeeze(-1)
    assert (chosen <= dist.min(-1).values + 1e-7).all()


def test_beats_rtn_mse_without_calibration(mlp):
    ctx = fit(mlp, QuantConfig(bits=3, outlier_pct=0, sensitive_pct=0))
    for name, mod in (("0", mlp[0]), ("2", mlp[2])):
        w = mod.weight.detach()
        rtn_mse = float(((rtn_quantize(w, 3) - w) ** 2).mean())
        assert ctx.layers[name].mse < rtn_mse
        assert ctx.layers[name].weighted_error == ctx.layers[name].mse  # unweighted: F = 1


def test_fisher_weighting_lowers_weighted_error(mlp):
    calib = [(torch.randn(3, 100),) for _ in range(3)]
    loss = lambda o, s: o.pow(2).sum()  # noqa: E731
    weighted = fit(mlp, QuantConfig(bits=2, outlier_pct=0, sensitive_pct=0), calib, loss)
    f = weighted.store.get("fisher", "0.weight").double()
    lut, codes = weighted.store.get("codebook", "0.weight")
    w = mlp[0].weight.detach().double()
    err_w = float((f * (torch.gather(lut.double(), 1, codes.long()) - w) ** 2).sum())
    plain = fit(mlp, QuantConfig(bits=2, outlier_pct=0, sensitive_pct=0))
    lut2, codes2 = plain.store.get("codebook", "0.weight")
    err_p = float((f * (torch.gather(lut2.double(), 1, codes2.long()) - w) ** 2).sum())
    assert err_w < err_p


def test_bf16_and_fp32_tables(mlp):
    ctx = fit(mlp, QuantConfig(bits=4, table_dtype="float32"))
    assert ctx.store.get("codebook", "2.weight")[0].dtype == torch.float32
