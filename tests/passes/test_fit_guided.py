import pytest
import torch

import sqc
from sqc.compiler import default_pipeline
from sqc.config import PRESETS, FitMode, QuantConfig
from sqc.passes import AnnotateSensitivity, FitCodebook, SplitOutliers
from sqc.passes.annotate_sensitivity import Sensitivity, calibration_statistics
from sqc.passes.base import CompileContext, PassManager
from sqc.passes.fit_guided import FitGuided
from sqc.quant.guided import layer_objective, objective_matrix
from sqc.trace import trace

LOSS = lambda out, s: (out ** 2).mean()  # noqa: E731


def calib(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 100, generator=g),) for _ in range(n)]


def run(model, cfg, samples):
    t = trace(model, samples[0])
    ctx = CompileContext(model=model, config=cfg, calibration=samples, loss_fn=LOSS)
    PassManager([AnnotateSensitivity(guided=True), SplitOutliers(), FitCodebook(), FitGuided()]).run(t.graph_module, ctx)
    return ctx


def test_pipeline_has_the_guided_pass_only_in_guided_mode():
    names = lambda cfg: [type(p).__name__ for p in default_pipeline(None, cfg)]  # noqa: E731
    assert "FitGuided" not in names(PRESETS["w3-s0.45"])
    assert names(PRESETS["w3-s0.45-g"]).index("FitGuided") == names(PRESETS["w3-s0.45-g"]).index("FitCodebook") + 1
    assert PRESETS["w4-g"].fit is FitMode.GUIDED and PRESETS["w4-g"].bits == 4


def test_guided_hessian_is_the_gradient_weighted_input_gram(mlp):
    samples = calib()
    expected = torch.zeros(100, 100, dtype=torch.float64)
    for (x,) in samples:
        x = x.clone().requires_grad_(False)
        z = mlp[0](x)
        z.retain_grad()
        out = mlp[4](mlp[3](mlp[2](mlp[1](z))))
        LOSS(out, (x,)).backward()
        s = (z.grad.double() ** 2).mean(dim=1)
        expected += (x.double() * s[:, None]).T @ x.double()
    mlp.zero_grad()
    sens = calibration_statistics(mlp, samples, ["0.weight"], LOSS, hessian_modules={"0.weight": "0"})
    assert sens.hessian["0.weight"].dtype == torch.float32
    err = (sens.hessian["0.weight"].double() - expected).norm() / expected.norm()
    assert float(err) < 1e-5
    # the Fisher of the same pass is unchanged by the Hessian hooks
    plain = calibration_statistics(mlp, samples, ["0.weight"], LOSS)
    torch.testing.assert_close(sens.fisher["0.weight"], plain.fisher["0.weight"], rtol=1e-6, atol=0)
    assert plain.hessian is None


def test_guided_fit_lowers_each_layer_objective_and_keeps_the_format(mlp):
    samples = calib()
    kctx = CompileContext(model=mlp, config=QuantConfig(bits=3), calibration=samples, loss_fn=LOSS)
    t = trace(mlp, samples[0])
    PassManager([AnnotateSensitivity(guided=True), SplitOutliers(), FitCodebook()]).run(t.graph_module, kctx)
    kmeans = {n: kctx.store.get("codebook", n) for n in ("0.weight", "2.weight", "4.weight")}
    precision = torch.backends.mkldnn.matmul.fp32_precision
    ctx = run(mlp, QuantConfig(bits=3, fit="guided"), samples)
    assert "hessian" not in ctx.store.kinds()  # freed after the fit
    # the fit's layer threads leave the process-wide fp32 matmul setting alone (a toggled flag once leaked
    # bf16 arithmetic into every later matmul on CPUs with AMX)
    assert torch.backends.mkldnn.matmul.fp32_precision == precision
    sens = calibration_statistics(mlp, samples, list(kmeans), LOSS, hessian_modules={"0.weight": "0", "2.weight": "2",
                                                                                    "4.weight": "4"})
    for name, mod in (("0.weight", "0"), ("2.weight", "2"), ("4.weight", "4")):
        lut, codes = ctx.store.get("codebook", name)
        assert lut.dtype == torch.float16 and codes.dtype == torch.uint8 and lut.shape[1] == 8
        mask = ctx.store.get("sparse", name)
        w = dict(mlp.named_parameters())[name].detach()
        h = objective_matrix(sens.hessian[name], 0.01, QuantConfig().guided_shrink)  # the objective the fit lowers
        before = float(layer_objective(w, *kmeans[name], ~mask, h).sum())
        after = float(layer_objective(w, lut, codes, ~mask, h).sum())
        rep = ctx.layers[mod]
        assert after <= before * (1 + 1e-5)
        assert rep.layer_objective == pytest.approx(after, rel=1e-3)
        assert rep.layer_objective <= rep.layer_objective_start


@pytest.mark.slow
def test_compile_guided_end_to_end_and_artifact_round_trip(mlp, tmp_path):
    import copy

    skeleton = copy.deepcopy(mlp)
    samples = calib()
    x = samples[0][0]
    ref = mlp(x).detach()
    compiled = sqc.compile(mlp, samples[0], config="w4-s0.45-g", calibration=samples, loss_fn=LOSS)
    assert "FitGuided" in compiled.stage_seconds
    assert all(r.layer_objective <= r.layer_objective_start for r in compiled.layers if r.quantized)
    y = compiled(x)
    assert float((y - ref).norm() / ref.norm()) < 0.1
    path = sqc.save(compiled, tmp_path / "a")
    torch.testing.assert_close(sqc.load(path, model=skeleton)(x), y)


def test_deterministic_and_same_from_precomputed_statistics(mlp):
    import copy

    samples = calib()
    names = ["0.weight", "2.weight", "4.weight"]
    sens = calibration_statistics(mlp, samples, names, LOSS, hessian_modules={n: n.split(".")[0] for n in names})
    a = sqc.compile(copy.deepcopy(mlp), samples[0], config="w3-g", calibration=samples, loss_fn=LOSS, kernels=False)
    b = sqc.compile(copy.deepcopy(mlp), samples[0], config="w3-g", sensitivity=sens, kernels=False)
    for (n, ma), mb in zip(a.quantized_modules().items(), b.quantized_modules().values()):
        assert torch.equal(ma.lut, mb.lut) and torch.equal(ma.codes, mb.codes), n


def test_guided_needs_calibration(mlp):
    with pytest.raises(ValueError, match="needs calibration data"):
        sqc.compile(mlp, (torch.randn(2, 100),), config="w3-g")
    f = calibration_statistics(mlp, calib(2), ["0.weight", "2.weight", "4.weight"], LOSS).fisher
    with pytest.raises(ValueError, match="has no hessian"):
        sqc.compile(mlp, (torch.randn(2, 100),), config="w3-g", sensitivity=f)
    with pytest.raises(ValueError, match="guided Hessian for 0.weight"):
        sqc.compile(mlp, (torch.randn(2, 100),), config="w3-g", sensitivity=Sensitivity(f, {}))
