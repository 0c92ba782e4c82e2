"""The layer-streamed pipeline (sqc.streaming) against the whole-model one."""
import pytest
import torch

import sqc
from sqc.passes.annotate_sensitivity import calibration_statistics
from sqc.runtime.qlinear import SqcLinear
from sqc.streaming import find_decoder_stack, streamed_statistics
from sqc.trace import trace

from conftest import tiny_llama


def _calib(n=3, T=12, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (1, T), generator=g),) for _ in range(n)]


def _stack(model, calib):
    traced = trace(model, calib[0])
    stack, why = find_decoder_stack(model, list(traced.sites.values()))
    assert stack is not None, why
    return stack, traced


def test_decoder_stack_is_found_from_the_graph():
    model = tiny_llama()
    stack, traced = _stack(model, _calib())
    assert stack.path == "model.layers" and stack.layers == ["model.layers.0", "model.layers.1"]
    assert stack.weights[0] == [f"model.layers.0.{n}.weight" for n in
                                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def test_no_stack_in_a_plain_mlp(mlp):
    traced = trace(mlp, (torch.randn(2, 100),))
    stack, why = find_decoder_stack(mlp, list(traced.sites.values()))
    assert stack is None and "ModuleList" in why


@pytest.mark.slow
@pytest.mark.parametrize("offload", [False, True])
def test_streamed_statistics_equal_the_whole_model_pass(monkeypatch, offload):
    if offload:  # every boundary goes through the temporary file
        monkeypatch.setenv("SQC_STREAM_MEMORY_MB", "0")
    model = tiny_llama()
    calib = _calib()
    stack, _ = _stack(model, calib)
    weights = [w for ws in stack.weights for w in ws]
    whole = calibration_statistics(model, calib, weights, call_kwargs={"use_cache": False},
                                   hessian_modules={w: w.rsplit(".", 1)[0] for w in weights})
    streamed = streamed_statistics(model, stack, calib, hessian=True, call_kwargs={"use_cache": False})
    assert set(streamed.fisher) == set(weights)
    for w in weights:
        a, b = whole.fisher[w], streamed.fisher[w]
        assert a.abs().max() > 0
        # the same sums; only the fp32 rounding of the pieces' order may differ
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 * float(a.abs().max()))
        torch.testing.assert_close(streamed.hessian[w], whole.hessian[w], rtol=1e-4,
                                   atol=1e-6 * float(whole.hessian[w].abs().max()))
    # the model is left as it was: every layer back in place, no gradients, no hooks
    assert all(type(m).__name__ == "LlamaDecoderLayer" for m in model.model.layers)
    assert all(p.grad is None for p in model.parameters())


def _packed(compiled):
    return {n: (m.lut.clone(), m.codes.clone(), m.val.clone(), m.col.clone())
            for n, m in compiled.quantized_modules().items()}


@pytest.mark.slow
def test_streamed_compile_equals_the_whole_model_compile():
    calib = _calib(n=4, T=16)
    a = sqc.compile(tiny_llama(), config="w3-s0.45", calibration=calib, kernels=False, stream=False)
    b = sqc.compile(tiny_llama(), config="w3-s0.45", calibration=calib, kernels=False)
    assert any("layer-streamed pipeline" in n for n in b.notes)
    assert any("whole-model calibration" in n for n in a.notes)
    pa, pb = _packed(a), _packed(b)
    assert pa.keys() == pb.keys() and len(pa) == 14
    for name in pa:
        (la, *rest_a), (lb, *rest_b) = pa[name], pb[name]
        # the streamed Fisher sums samples in a fixed pairwise tree (the data-parallel order), the
        # whole-model one sample after sample: a centroid may move by one fp16 step, the codes stay
        torch.testing.assert_close(lb, la, rtol=1e-3, atol=0.0)
        for x, y in zip(rest_a, rest_b):
            assert torch.equal(x, y), name
    ids = calib[0][0]
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    torch.testing.assert_close(lb, la, rtol=0, atol=1e-4 * float(la.abs().max()))  # those fp16 steps only
    assert [r.module for r in a.layers] == [r.module for r in b.layers]


@pytest.mark.slow
def test_streamed_compile_without_calibration_and_guided():
    model = tiny_llama()
    c = sqc.compile(model, (torch.zeros(1, 8, dtype=torch.long),), config="w4", kernels=False)
    assert len(c.quantized_modules()) == 14 and any("layer-streamed" in n for n in c.notes)
    calib = _calib(n=2, T=16)
    g1 = sqc.compile(tiny_llama(), config="w3-g", calibration=calib, kernels=False)
    g0 = sqc.compile(tiny_llama(), config="w3-g", calibration=calib, kernels=False, stream=False)
    for (n, x), y in zip(_packed(g1).items(), _packed(g0).values()):
        assert torch.equal(x[1], y[1]), n


def test_stream_true_names_why_it_cannot_run(mlp):
    x = torch.randn(4, 100)
    with pytest.raises(ValueError, match="layer-streamed pipeline cannot run on Sequential.*ModuleList"):
        sqc.compile(mlp, (x,), config="w4", kernels=False, stream=True)
    c = sqc.compile(mlp, (x,), config="w4", kernels=False, calibration=[(x,)], loss_fn=lambda o, s: o.pow(2).mean())
    assert any("whole-model calibration (not layer-streamed" in n for n in c.notes)
    assert all(isinstance(m, SqcLinear) for m in c.quantized_modules().values())


@pytest.mark.slow
def test_compile_pretrained_reads_a_safetensors_folder_layer_by_layer(tmp_path):
    from sqc.lazy import load_lazy

    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    lazy, source, _ = load_lazy(str(tmp_path / "m"))
    assert all(p.is_meta for p in lazy.parameters())
    calib = _calib(n=3, T=16)
    reads = []
    real_read = source.reader.read

    def spy(names):
        reads.append(sorted(names))
        return real_read(names)

    source.reader.read = spy
    c_lazy = sqc.compile(lazy, config="w3-s0.45", calibration=calib, kernels=False, weight_source=source)
    source.check_complete()
    # the parts outside the stack once, then each layer twice (forward, then backward and fit), one at a time
    assert reads[0] == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    layer_of = [{n.split(".")[2] for n in r} for r in reads[1:]]
    assert layer_of == [{"0"}, {"1"}, {"1"}, {"0"}]
    assert not any(p.is_meta for p in c_lazy.model.parameters())
    c_whole = sqc.compile(tiny_llama(), config="w3-s0.45", calibration=calib, kernels=False)
    for (n, x), y in zip(_packed(c_lazy).items(), _packed(c_whole).values()):
        for a, b in zip(x, y):
            assert torch.equal(a, b), n
    ids = calib[1][0]
    torch.testing.assert_close(c_lazy(ids).logits, c_whole(ids).logits, rtol=0, atol=0)
    # the public entry point does the same
    c2 = sqc.compile_pretrained(str(tmp_path / "m"), config="w3-s0.45", calibration=calib, kernels=False)
    torch.testing.assert_close(c2(ids).logits, c_whole(ids).logits, rtol=0, atol=0)


def test_lazy_loading_names_what_is_wrong(tmp_path):
    from sqc.lazy import CheckpointError, load_lazy

    with pytest.raises(CheckpointError, match="does not exist"):
        load_lazy(str(tmp_path / "nope"))
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a .gguf"):
        load_lazy(str(tmp_path / "x.bin"))
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "m" / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no tensor for model.layers.1.mlp.up_proj.weight"):
        load_lazy(str(tmp_path / "m"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_model_streams_without_a_float32_copy(dtype):
    # the math upcasts one layer at a time: the Fisher of the half model is the fp32 model's Fisher
    # of the same (rounded) weights, within the half activations' rounding; the model stays half
    ref = tiny_llama().to(dtype).float()  # the half weights, held in fp32
    model = tiny_llama().to(dtype)
    calib = _calib()
    stack, _ = _stack(model, calib)
    weights = [w for ws in stack.weights for w in ws]
    want = streamed_statistics(ref, stack, calib, call_kwargs={"use_cache": False})
    got = streamed_statistics(model, stack, calib, call_kwargs={"use_cache": False})
    assert all(p.dtype == dtype for p in model.parameters())  # put back as it was, not left upcast
    for w in weights:
        a, b = want.fisher[w], got.fisher[w]
        assert b.dtype == torch.float32 and torch.isfinite(b).all()
        # summed relative error over the tensor: half activations move each gradient by ~1e-2
        assert float((b - a).abs().sum() / a.abs().sum()) < 0.1, w
    compiled = sqc.compile(model, config="w3-s0.45", calibration=calib, kernels=False)
    assert any("layer-streamed" in n for n in compiled.notes)
    out = compiled(calib[0][0]).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert all(m.lut.dtype == torch.float16 for m in compiled.quantized_modules().values())
    rest = [p for n, p in compiled.model.named_parameters() if "norm" in n or "embed" in n]
    assert rest and all(p.dtype == dtype for p in rest)


def _all_packed_tensors(compiled):
    """Every packed tensor of the compiled model: the layers' buffers, fused layers' buffers, the CPU
    kernels' lane words and canonical codes."""
    from sqc.runtime.fused import kernel_layers

    out = {}
    for n, m in compiled.quantized_modules().items():
        out.update({f"{n}.{b}": t for b, t in m._buffers.items() if t is not None})
    for n, m in kernel_layers(compiled.model).items():
        out.update({f"{n}.{b}": t for b, t in m._buffers.items() if t is not None})
        k = m.__dict__.get("_kernels")
        if k is not None and hasattr(k, "words"):
            out[f"{n}.words"] = k.words
            if k._canonical is not None:
                out[f"{n}.canonical"] = k._canonical
    return out


@pytest.mark.slow
def test_a_lazy_compile_keeps_its_packed_layers_in_the_spill_file(tmp_path):
    """With a weight source the packed layers (and the kernels' copies of the codes) go to the spill file
    as each layer is finished; the model runs the same and saves the same bytes as without."""
    from sqc.lazy import load_lazy

    tiny_llama().save_pretrained(tmp_path / "m")
    calib = _calib(n=2, T=16)
    compiled = {}
    for spill in (True, False):
        lazy, source, _ = load_lazy(str(tmp_path / "m"))
        compiled[spill] = sqc.compile(lazy, config="w3-s0.45", calibration=calib, weight_source=source, tune=False,
                                      spill=spill)
    c, plain = compiled[True], compiled[False]
    assert c.spill is not None and plain.spill is None
    assert any("kept in a temporary file" in n for n in c.notes)
    tensors = _all_packed_tensors(c)
    assert any(k.endswith(".words") for k in tensors)  # the kernels were attached
    held = {k for k, t in tensors.items() if t.numel() and c.spill.holds(t)}
    assert held == {k for k, t in tensors.items() if t.numel()}
    assert any(k.endswith(".canonical") for k in held)
    assert not any(plain_t.numel() and c.spill.holds(plain_t) for plain_t in _all_packed_tensors(plain).values())
    assert c.report_dict()["fused"] == plain.report_dict()["fused"] != []
    c.spill.evict()  # the pages come back from the file
    ids = calib[1][0]
    torch.testing.assert_close(c(ids).logits, plain(ids).logits, rtol=0, atol=0)
    for spill, cm in compiled.items():
        sqc.save(cm, tmp_path / f"out{spill}", decode_steps=None)
    assert (tmp_path / "outTrue" / "model.safetensors").read_bytes() == \
        (tmp_path / "outFalse" / "model.safetensors").read_bytes()
    loaded = sqc.load(tmp_path / "outTrue")
    torch.testing.assert_close(loaded(ids).logits, plain(ids).logits, rtol=0, atol=0)


def test_spill_needs_the_streamed_pipeline(mlp):
    x = torch.randn(4, 100)
    from sqc.streaming import StreamingRequired

    with pytest.raises(StreamingRequired, match="layer-streamed pipeline cannot run on Sequential.*spill=True needs it"):
        sqc.compile(mlp, (x,), config="w4", kernels=False, spill=True)
