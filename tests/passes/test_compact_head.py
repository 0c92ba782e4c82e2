"""CompactHead: the output projection becomes int8 per row; its kernel against the reference op; tied
embeddings keep working; save/load; opting out."""
import pytest
import torch

import sqc
from sqc.passes.compact_head import output_projections
from sqc.runtime.int8 import Int8Linear, quantize_int8_rows
from sqc.runtime.ops import int8_linear_reference


def test_quantize_int8_rows_roundtrip_bound():
    w = torch.randn(37, 50) * torch.logspace(-3, 2, 37)[:, None]
    w[3] = 0
    q, s = quantize_int8_rows(w)
    assert q.dtype == torch.int8 and s.shape == (37,) and s[3] == 1
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= s[:, None] / 2 + 1e-6 * w.abs()).all()


@pytest.mark.parametrize("K", [64, 100, 576])
def test_int8_kernel_against_reference(K):
    from sqc.runtime.target import parse_target
    from sqc.codegen.tune import build_cpu_kernels

    R = 203
    head = Int8Linear.from_float(torch.randn(R, K), torch.randn(R))
    build_cpu_kernels(torch.nn.Sequential(head), parse_target("llvm"), tune=False)
    assert head.kernel.startswith("tvm-int8"), head.kernel
    for shape in ((1, K), (1, 1, K), (5, K), (2, 3, K)):
        x = torch.randn(shape)
        want = int8_linear_reference(x.double(), head.qweight, head.scale.double(), head.bias.double())
        torch.testing.assert_close(head(x).double(), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="features"):
        head(torch.randn(1, K + 1))
    assert head(torch.randn(1, K).bfloat16()).dtype == torch.bfloat16


@pytest.mark.slow
def test_llama_head_is_int8_and_tied_embedding_kept(llama, tmp_path):
    llama.config.tie_word_embeddings = True
    llama.lm_head.weight = llama.model.embed_tokens.weight
    emb = llama.model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        want = llama(ids).logits
    compiled = sqc.compile(llama, (ids,), config="w4", dump_ir=str(tmp_path / "ir"), tune=False)
    assert isinstance(compiled.model.lm_head, Int8Linear)
    assert compiled.model.lm_head.kernel.startswith("tvm-int8")
    assert torch.equal(compiled.model.model.embed_tokens.weight, emb)  # the input embedding keeps its table
    gm = compiled.graph_module
    assert sum(n.target is torch.ops.sqc.int8_linear.default for n in gm.graph.nodes) == 1
    assert output_projections(gm) == []  # no float output projection left
    (head,) = [r for r in compiled.layers if r.module == "lm_head"]
    assert head.packed_bytes["qweight"] == 128 * 64 and "int8" in compiled.report()
    with torch.no_grad():
        got = compiled(ids).logits
    assert (got - want).abs().max() < 0.1 * want.abs().max()
    sqc.save(compiled, tmp_path / "a", decode_steps=None)
    loaded = sqc.load(tmp_path / "a")
    assert isinstance(loaded.model.lm_head, Int8Linear) and loaded.model.lm_head.kernel.startswith("tvm-int8")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, got, rtol=0, atol=0)


def test_head_float_opt_out(llama):
    ids = torch.randint(0, 128, (1, 12))
    compiled = sqc.compile(llama, (ids,), config=sqc.QuantConfig(bits=4, head="float"), kernels=False)
    assert isinstance(compiled.model.lm_head, torch.nn.Linear)
    with pytest.raises(ValueError, match="head"):
        sqc.QuantConfig(head="int4")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_batch_path_spans_row_blocks(dtype):
    """Batches above 1 de-quantize the head in row blocks (1100 rows: two full blocks and a partial one)."""
    from sqc.runtime.int8 import ROW_BLOCK, _blocked_linear

    R, K = 2 * ROW_BLOCK + 76, 48
    head = Int8Linear.from_float(torch.randn(R, K), torch.randn(R))
    x = torch.randn(2, 7, K).to(dtype)
    got = _blocked_linear(x, head.qweight, head.scale, head.bias)
    want = int8_linear_reference(x.double(), head.qweight, head.scale.double(), head.bias.double())
    assert got.shape == (2, 7, R) and got.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(got.double(), want, **tol)
