import pytest
import torch

from sqc.trace import TraceError, linear_nodes, trace


def test_mlp_sites(mlp):
    t = trace(mlp, (torch.randn(2, 100),))
    assert [s.module for s in t.sites.values()] == ["0", "2", "4"]
    s = t.sites["2.weight"]
    assert (s.in_features, s.out_features, s.bias) == (53, 33, None)
    assert t.sites["0.weight"].bias == "0.bias"
    assert len(linear_nodes(t.graph_module)) == 3
    assert all(s.quantized for s in t.sites.values())


def test_llama_sites(llama):
    t = trace(llama, (torch.randint(0, 128, (1, 8)),))
    assert t.example_kwargs["use_cache"] is False
    names = [s.module for s in t.sites.values()]
    assert len(names) == 2 * 7 + 1
    assert t.sites["lm_head.weight"].skip_reason.startswith("output embedding")
    q = t.sites["model.layers.1.mlp.down_proj.weight"]
    assert (q.in_features, q.out_features, q.quantized) == (100, 64, True)
    assert q.module_type.endswith("Linear")


def test_skip_patterns(mlp):
    t = trace(mlp, (torch.randn(2, 100),), skip=("2",))
    assert t.sites["2.weight"].skip_reason == "matched QuantConfig.skip"


def test_functional_linear_is_reported_not_quantized():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 8))
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.nn.functional.linear(self.lin(x), self.w)

    t = trace(M(), (torch.randn(1, 8),))
    assert "not the weight of an nn.Linear" in t.sites["w"].skip_reason
    assert t.sites["lin.weight"].quantized


def test_untraceable_model_says_why():
    class Bad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.lin(x)
            return x

    with pytest.raises(TraceError, match="(?s)could not trace Bad.*Possible solutions"):
        trace(Bad(), (torch.randn(1, 4),))


def test_bad_example_inputs():
    with pytest.raises(TraceError, match="tuple of forward"):
        trace(torch.nn.Linear(2, 2), torch.randn(1, 2))


def test_no_linears():
    with pytest.raises(TraceError, match="no linear layers"):
        trace(torch.nn.ReLU(), (torch.randn(2),))
