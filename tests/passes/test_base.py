import pytest
import torch

from sqc.config import QuantConfig
from sqc.passes import FitCodebook, Lower
from sqc.passes.base import CompileContext, IRDumpInstrument, MissingMetadataError, PassManager, TimingInstrument
from sqc.trace import trace


def test_missing_meta_says_which_pass(mlp):
    t = trace(mlp, (torch.randn(2, 100),))
    ctx = CompileContext(model=mlp, config=QuantConfig())
    with pytest.raises(MissingMetadataError, match="has no 'sqc.fisher'. Run AnnotateSensitivity first"):
        PassManager([FitCodebook()]).run(t.graph_module, ctx)
    with pytest.raises(MissingMetadataError, match="Run PackLayout first"):
        PassManager([Lower()]).run(t.graph_module, ctx)


def test_instruments(mlp, tmp_path):
    from sqc.compiler import default_pipeline

    t = trace(mlp, (torch.randn(2, 100),))
    ctx = CompileContext(model=mlp, config=QuantConfig(bits=4))
    PassManager(default_pipeline(), [TimingInstrument(), IRDumpInstrument(tmp_path)]).run(t.graph_module, ctx)
    assert set(ctx.stage_seconds) == {"AnnotateSensitivity", "SplitOutliers", "FitCodebook", "PackLayout", "Lower",
                                      "FuseSiblingLinears", "CompactHead"}
    dumps = sorted(p.name for p in tmp_path.iterdir())
    assert dumps[0] == "01_AnnotateSensitivity.txt" and dumps[-1] == "07_CompactHead.txt"
    assert "sqc.lut_linear" in (tmp_path / "05_Lower.txt").read_text()
    assert "aten.linear" in (tmp_path / "04_PackLayout.txt").read_text()
