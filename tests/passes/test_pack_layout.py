import torch

from sqc.config import QuantConfig
from sqc.passes import AnnotateSensitivity, FitCodebook, PackLayout, SplitOutliers
from sqc.passes.base import CompileContext, PassManager
from sqc.trace import trace


def test_packed_reconstruction(mlp):
    t = trace(mlp, (torch.randn(2, 100),))
    ctx = CompileContext(model=mlp, config=QuantConfig(bits=3, outlier_pct=1.0, sensitive_pct=0))
    m = PassManager([AnnotateSensitivity(), SplitOutliers(), FitCodebook()])
    m.run(t.graph_module, ctx)
    lut, codes = ctx.store.get("codebook", "0.weight")
    mask = ctx.store.get("sparse", "0.weight")
    PassManager([PackLayout()]).run(t.graph_module, ctx)
    p = ctx.store.get("packed", "0.weight")
    assert p.codes.shape == (53, 4 * 3)  # 100 columns padded to 128 = 4 groups of 3 words
    assert p.col.dtype == torch.uint8 and p.crow.dtype == torch.int32
    assert p.val.dtype == torch.float32 and p.nnz == int(mask.sum()) == 53
    assert torch.equal(p.unpack(), codes.long())
    w = mlp[0].weight.detach()
    expected = torch.where(mask, w, torch.gather(lut.float(), 1, codes.long()))
    assert torch.equal(p.dequantize(), expected)
    assert "fisher" not in ctx.store.kinds() and "codebook" not in ctx.store.kinds()
    assert ctx.layers["0"].packed_bytes == p.nbytes()
