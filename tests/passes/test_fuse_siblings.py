"""FuseSiblingLinears: structure (op counts, groups), numerics (equal to the unfused layers), GQA, biases,
different sparse counts, the report, save/load, and the ops under torch.compile(fullgraph=True)."""
import copy

import pytest
import torch

import sqc
from sqc.runtime.fused import FusedMember, concat_packed, fused_groups, kernel_layers

OP = torch.ops.sqc.lut_linear.default
SLICE = torch.ops.aten.slice.Tensor


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


class QKVBias(torch.nn.Module):
    """Qwen-style attention projections: q/k/v with biases, GQA-narrow k/v, one without bias; an MLP pair."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(64)
        self.norm2 = torch.nn.LayerNorm(64)
        self.q = torch.nn.Linear(64, 64)
        self.k = torch.nn.Linear(64, 16)
        self.v = torch.nn.Linear(64, 16, bias=False)
        self.gate = torch.nn.Linear(64, 96, bias=False)
        self.up = torch.nn.Linear(64, 96, bias=False)
        self.down = torch.nn.Linear(96, 64)
        self.other = torch.nn.Linear(48, 64)  # reads another tensor: not a sibling

    def forward(self, x, z):
        h = self.norm(x)
        a = self.q(h)[..., :16] * self.k(h) + self.v(h)
        h2 = self.norm2(x)
        m = self.down(torch.nn.functional.silu(self.gate(h2)) * self.up(h2))
        return a.sum(-1, keepdim=True) + m + self.other(z)


def _compile(model, config, **kw):
    x, z = torch.randn(3, 64), torch.randn(3, 48)
    return sqc.compile(model, (x, z), config=config, tune=False, **kw), (x, z)


@pytest.mark.slow
def test_fusion_structure_and_numerics(tmp_path):
    model = QKVBias().eval()
    twin = copy.deepcopy(model)
    cfg = sqc.QuantConfig(bits=4, outlier_pct=1.0, sensitive_pct=0.0)
    fused, (x, z) = _compile(model, cfg, dump_ir=str(tmp_path / "ir"))
    plain, _ = _compile(twin, sqc.QuantConfig(bits=4, outlier_pct=1.0, sensitive_pct=0.0, fuse=False))
    gm = fused.graph_module
    # 7 linears -> q/k/v one op, gate/up one op, down and other their own: 4 ops, 5 slices
    assert count(gm, OP) == 4
    assert count(gm, SLICE) >= 5
    groups = [g.names for g in fused_groups(fused.model)]
    assert groups == [["q", "k", "v"], ["gate", "up"]]
    assert [n.meta["sqc.fused"] for n in gm.graph.nodes if "sqc.fused" in n.meta] == groups
    assert set(kernel_layers(fused.model)) == {"down", "other", "(q+k+v)", "(gate+up)"}
    # the members are views of the fused layer; the unfused model has every layer on its own
    assert all(isinstance(fused.model.get_submodule(n)._kernels, FusedMember) for g in groups for n in g)
    assert fused_groups(plain.model) == []
    # results equal the unfused layers: each row is computed by the same kernel arithmetic
    with torch.no_grad():
        for n in ("q", "k", "v", "gate", "up"):
            h = model.norm(x) if n in "qkv" else model.norm2(x)
            torch.testing.assert_close(fused.model.get_submodule(n)(h), plain.model.get_submodule(n)(h), rtol=0, atol=0)
        torch.testing.assert_close(fused(x, z), plain(x, z), rtol=0, atol=0)
        # the graph records the same program
        torch.testing.assert_close(gm(x, z), plain(x, z), rtol=1e-5, atol=1e-5)
    # sparse counts differ between members and come along, offsets shifted
    g = fused_groups(fused.model)[0]
    nnz = [int(fused.model.get_submodule(n).crow[-1]) for n in g.names]
    assert len(set(nnz)) > 1 and int(g.layer.crow[-1]) == sum(nnz)
    # the report lists the groups
    rep = fused.report()
    assert "fused: q + k + v -> one 96x64 layer" in rep and "fused: gate + up -> one 192x64 layer" in rep
    # a member called alone, or twice on one input, still gives its own rows
    with torch.no_grad():
        h = model.norm(x)
        kk = fused.model.k
        torch.testing.assert_close(kk(h), kk(h), rtol=0, atol=0)
        h2 = h.clone()
        h2 += 1  # same object would be stale after an in-place change: the version counter catches it
        torch.testing.assert_close(fused.model.q(h2)[..., :16] * 0 + fused.model.k(h2), plain.model.k(h2))


@pytest.mark.slow
def test_fused_model_saves_and_loads_per_member(tmp_path):
    model = QKVBias().eval()
    compiled, (x, z) = _compile(model, "w3")
    with torch.no_grad():
        want = compiled(x, z)
    sqc.save(compiled, tmp_path / "a", decode_steps=None)
    loaded = sqc.load(tmp_path / "a", model=QKVBias().eval())
    assert [g.names for g in fused_groups(loaded.model)] == [["q", "k", "v"], ["gate", "up"]]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, z), want, rtol=0, atol=0)
    # the state_dict keeps the per-member canonical layout
    sd = loaded.model.state_dict()
    assert "q.codes" in sd and "k.codes" in sd and not any("fused" in k for k in sd)


def test_concat_packed_refuses_different_widths():
    from sqc.runtime.layout import PackedLinear, pack_codes

    def packed(K):
        return PackedLinear(3, K, 4, pack_codes(torch.zeros(4, K, dtype=torch.long), 3), torch.zeros(4, 8).half(),
                            torch.zeros(5, dtype=torch.int32), torch.zeros(0, dtype=torch.uint8), torch.zeros(0))

    with pytest.raises(ValueError, match="cannot fuse"):
        concat_packed([packed(32), packed(64)])


@pytest.mark.slow  # Inductor compile
def test_sqc_ops_compile_fullgraph_without_graph_breaks():
    model = QKVBias().eval()
    compiled, (x, z) = _compile(model, "w4")
    x1, z1 = x[:1], z[:1]
    with torch.no_grad():
        eager = compiled.model(x1, z1)
        explain = torch._dynamo.explain(compiled.model)(x1, z1)
        assert explain.graph_break_count == 0
        cm = torch.compile(compiled.model, fullgraph=True)
        torch.testing.assert_close(cm(x1, z1), eager, rtol=1e-6, atol=1e-6)
    # the kernels are opaque ops in the graph dynamo captured
    ops = {str(getattr(n, "target", "")) for g in explain.graphs for n in g.graph.nodes}
    assert "sqc.lut_linear_cpu.default" in ops or any("lut_linear_cpu" in o for o in ops)
