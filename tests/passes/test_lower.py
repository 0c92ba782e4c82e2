import pytest
import torch

import sqc
from sqc.runtime.qlinear import SqcLinear
from sqc.runtime.status import REFERENCE

OP = torch.ops.sqc.lut_linear.default


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


@pytest.mark.slow
def test_every_quantized_call_lowered(llama, tmp_path):
    ids = torch.randint(0, 128, (1, 12))
    # Lower on its own: no sibling fusion, the head left in float (those passes have their own tests)
    cfg = sqc.QuantConfig(bits=4, outlier_pct=0.0, sensitive_pct=0.0, fuse=False, head="float")
    compiled = sqc.compile(llama, (ids,), config=cfg, dump_ir=str(tmp_path / "ir"))
    gm = compiled.graph_module  # kept because the IR was asked for
    n_quantized = sum(r.quantized for r in compiled.layers)
    assert n_quantized == 14
    assert count(gm, OP) == n_quantized
    assert count(gm, torch.ops.aten.linear.default) == 1  # lm_head, kept in float
    assert all(n.meta["sqc.lowered"] == "reference" for n in gm.graph.nodes if n.target is OP)
    # a report entry for every linear, the unquantized one with its reason
    assert len(compiled.layers) == 15
    (kept,) = [r for r in compiled.layers if not r.quantized]
    assert kept.module == "lm_head" and "output embedding" in kept.reason
    # the eager model runs the generated kernels of the same weights: equal up to fp32 summation order
    assert len(compiled.quantized_modules()) == 14
    assert not any(isinstance(m, torch.nn.Linear) for n, m in compiled.model.named_modules() if n != "lm_head")
    out_graph = gm(ids, use_cache=False).logits
    torch.testing.assert_close(out_graph, compiled(ids).logits, rtol=1e-4, atol=1e-5)
    # with the kernels detached, the eager modules run the very op the graph calls: bit-identical
    for m in compiled.quantized_modules().values():
        m.set_kernel(None, REFERENCE)
    torch.testing.assert_close(out_graph, compiled(ids).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_float_weights_released(mlp):
    x = torch.randn(2, 100)
    import weakref

    ref = weakref.ref(mlp[0].weight)
    compiled = sqc.compile(mlp, (x,), config="w3")
    import gc

    gc.collect()
    assert ref() is None
    assert isinstance(compiled.model[0], SqcLinear)
    wb = compiled.weight_bytes()
    assert wb["float_before"] == 4 * (100 * 53 + 53 * 33 + 33 * 3)
    assert 0 < wb["packed_after"] < wb["float_before"]


def test_the_rewritten_graph_is_dropped_unless_the_ir_was_asked_for(mlp):
    compiled = sqc.compile(mlp, (torch.randn(2, 100),), config="w4", kernels=False)
    assert compiled.graph_module is None  # what runs is compiled.model; no second copy of the program
