import pytest
import torch

from sqc.config import QuantConfig
from sqc.passes import AnnotateSensitivity, SplitOutliers
from sqc.passes.base import CompileContext, PassManager
from sqc.quant.sparse import count_for
from sqc.trace import trace


def test_exact_union_counts(mlp):
    calib = [(torch.randn(3, 100),) for _ in range(2)]
    t = trace(mlp, calib[0])
    cfg = QuantConfig(outlier_pct=2.0, sensitive_pct=1.0)
    ctx = CompileContext(model=mlp, config=cfg, calibration=calib, loss_fn=lambda o, s: o.pow(2).sum())
    PassManager([AnnotateSensitivity(), SplitOutliers()]).run(t.graph_module, ctx)
    w = mlp[0].weight
    mask = ctx.store.get("sparse", "0.weight")
    f = ctx.store.get("fisher", "0.weight")
    n_out, n_sens = count_for(2.0, w.numel()), count_for(1.0, w.numel())
    assert n_out == 106 and n_sens == 53
    assert max(n_out, n_sens) <= int(mask.sum()) <= n_out + n_sens
    # the largest |w| and the largest Fisher entries are in
    assert mask.flatten()[w.abs().flatten().argmax()] and mask.flatten()[f.flatten().argmax()]
    assert ctx.layers["0"].sparse_nnz == int(mask.sum())


def test_nan_weight_names_layer(mlp):
    with torch.no_grad():
        mlp[2].weight[3, 4] = float("nan")
    t = trace(mlp, (torch.randn(2, 100),))
    ctx = CompileContext(model=mlp, config=QuantConfig())
    with pytest.raises(ValueError, match=r"layer 2: weight has 1 NaN/Inf values \(first at \[3, 4\]\)"):
        PassManager([AnnotateSensitivity(), SplitOutliers()]).run(t.graph_module, ctx)
