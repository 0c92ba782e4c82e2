import json
import os

import pytest
import torch

import sqc
from sqc.artifact import ArtifactError, artifact_bits_per_weight
from sqc.runtime.cpu.kernels import host_lanes
from sqc.runtime.fused import kernel_layers
from tests.conftest import tiny_llama


@pytest.fixture
def saved_llama(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 10))
    compiled = sqc.compile(model, (ids,), config="w3-s0.45", calibration=[(ids,)])
    path = sqc.save(compiled, tmp_path / "art", decode_steps=None)
    return compiled, path, ids


@pytest.mark.slow
def test_hf_round_trip_bit_exact(saved_llama):
    compiled, path, ids = saved_llama
    loaded = sqc.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, compiled(ids).logits)
    assert loaded.quant_config == compiled.quant_config == sqc.PRESETS["w3-s0.45"]
    # Hugging Face code reads model.config: the compiled model's config is the model's own
    assert loaded.config is loaded.model.config and compiled.config.hidden_size == 64
    assert len(loaded.quantized_modules()) == 14
    assert loaded.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 13)
    assert "lm_head" in loaded.report()


@pytest.mark.slow
def test_tied_weights_saved_once(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 6))
    twin = LlamaForCausalLM(cfg).eval()
    twin.load_state_dict(model.state_dict())
    # a float head stays tied to the embedding, and is stored once
    compiled = sqc.compile(model, (ids,), config=sqc.QuantConfig(bits=4, head="float"))
    path = sqc.save(compiled, tmp_path / "tied", decode_steps=None)
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = sqc.load(path)
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, compiled(ids).logits)
    # the default int8 head gets its own copy; the embedding keeps the float table
    compiled = sqc.compile(twin, (ids,), config="w4")
    path = sqc.save(compiled, tmp_path / "tied-int8", decode_steps=None)
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    assert manifest["aliases"] == {} and list(manifest["heads"]) == ["lm_head"]
    loaded = sqc.load(path)
    assert loaded.model.lm_head.qweight.dtype == torch.int8
    assert torch.equal(loaded.model.model.embed_tokens.weight, model.model.embed_tokens.weight)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, compiled(ids).logits)


@pytest.mark.slow
def test_plain_module_needs_model_and_accepts_meta(tmp_path, mlp):
    x = torch.randn(3, 100)
    compiled = sqc.compile(mlp, (x,), config="w4")
    path = sqc.save(compiled, tmp_path / "mlp", decode_steps=None)
    with pytest.raises(ArtifactError, match="pass model="):
        sqc.load(path)
    with torch.device("meta"):
        fresh = torch.nn.Sequential(
            torch.nn.Linear(100, 53), torch.nn.ReLU(), torch.nn.Linear(53, 33, bias=False), torch.nn.ReLU(), torch.nn.Linear(33, 3)
        )
    loaded = sqc.load(path, model=fresh)
    assert torch.equal(loaded(x), compiled(x))


def _mlp(hidden=53, extra=False):
    layers = [torch.nn.Linear(100, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 33, bias=False), torch.nn.ReLU(),
              torch.nn.Linear(33, 3)]
    if extra:
        layers += [torch.nn.ReLU(), torch.nn.Linear(3, 3)]
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("case", ["extra_layer", "other_hidden", "extra_hf_layer"])
def test_load_refuses_a_model_the_artifact_does_not_cover(tmp_path, mlp, case):
    if case == "extra_hf_layer":
        model = tiny_llama()
        ids = torch.randint(0, 128, (1, 10))
        path = sqc.save(sqc.compile(model, (ids,), config="w4", kernels=False), tmp_path / "a", decode_steps=None)
        bigger = tiny_llama()
        bigger.config.num_hidden_layers = 3
        from transformers import LlamaForCausalLM

        other = LlamaForCausalLM(bigger.config)
        with pytest.raises(ArtifactError, match="has no data for .* tensors of the model"):
            sqc.load(path, model=other)
        return
    x = torch.randn(3, 100)
    path = sqc.save(sqc.compile(mlp, (x,), config="w4", kernels=False), tmp_path / "mlp", decode_steps=None)
    model = _mlp(extra=True) if case == "extra_layer" else _mlp(hidden=60)
    match = "has no data for" if case == "extra_layer" else "compiled as 53x100, the model.s Linear is 60x100"
    with pytest.raises(ArtifactError, match=match):
        sqc.load(path, model=model)


@pytest.mark.slow
def test_manifest_edits_are_detected(saved_llama):
    _, path, _ = saved_llama
    mpath = os.path.join(path, "manifest.json")
    with open(mpath) as fh:
        m = json.load(fh)
    m["layers"]["model.layers.0.mlp.down_proj"]["in_features"] = 99
    with open(mpath, "w") as fh:
        json.dump(m, fh)
    with pytest.raises(ArtifactError, match="modified after it was written"):
        sqc.load(path)


@pytest.mark.slow
def test_artifact_mode_follows_umask_and_killed_saves_are_cleaned(saved_llama, tmp_path):
    compiled, path, _ = saved_llama
    assert os.stat(path).st_mode & 0o777 == 0o777 & ~_umask()
    dead = tmp_path / ".sqc-tmp-999999999-abc"  # a save whose process is gone
    dead.mkdir()
    sqc.save(compiled, tmp_path / "again", decode_steps=None)
    assert not dead.exists()


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.slow
@pytest.mark.parametrize("kernels", [True, False])
def test_state_dict_round_trip_between_compiled_models(kernels):
    ids = torch.randint(0, 128, (1, 10))
    a = sqc.compile(tiny_llama(seed=0), (ids,), config="w3-s0.45", calibration=[(ids,)], kernels=kernels)
    b = sqc.compile(tiny_llama(seed=1), (ids,), config="w3-s0.45", calibration=[(ids,)], kernels=kernels)
    with torch.no_grad():
        want = a(ids).logits
        assert not torch.equal(b(ids).logits, want)
        result = b.load_state_dict(a.state_dict())
        assert not result.missing_keys and not result.unexpected_keys
        assert torch.equal(b(ids).logits, want)


@pytest.mark.slow
def test_refuses_existing_folder(saved_llama):
    compiled, path, _ = saved_llama
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sqc.save(compiled, path, decode_steps=None)
    sqc.save(compiled, path, overwrite=True, decode_steps=None)
    assert not [p for p in os.listdir(os.path.dirname(path)) if p.startswith(".sqc-")]


@pytest.mark.slow
def test_overwrite_replaces_only_an_artifact(saved_llama, tmp_path):
    compiled, path, ids = saved_llama
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(b"precious")
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    for target in (src, afile):
        with pytest.raises(FileExistsError, match="not an sqc artifact"):
            sqc.save(compiled, target, overwrite=True, decode_steps=None)
    assert (src / "weights.bin").read_bytes() == b"precious" and afile.read_text() == "keep me"
    assert sqc.save(compiled, path, overwrite=True, decode_steps=None) == path  # an artifact is replaced
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".sqc-")]


@pytest.mark.slow
def test_truncated_file(saved_llama):
    _, path, _ = saved_llama
    f = os.path.join(path, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(ArtifactError, match="model.safetensors is truncated or corrupted"):
        sqc.load(path)


@pytest.mark.slow
def test_flipped_byte(saved_llama):
    _, path, _ = saved_llama
    f = os.path.join(path, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.seek(os.path.getsize(f) - 100)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="fails its checksum"):
        sqc.load(path)


@pytest.mark.slow
def test_future_version(saved_llama):
    _, path, _ = saved_llama
    m = os.path.join(path, "manifest.json")
    d = json.load(open(m))
    d["format_version"] = 99
    json.dump(d, open(m, "w"))
    with pytest.raises(ArtifactError, match="format version 99, newer than this sqc reads"):
        sqc.load(path)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="not an sqc artifact"):
        sqc.load(tmp_path)


@pytest.mark.slow
def test_bits_per_weight_from_file(saved_llama):
    compiled, path, _ = saved_llama
    bpw = artifact_bits_per_weight(path)
    assert len(bpw["layers"]) == 14
    assert all(3.0 < v < 10 for v in bpw["layers"].values())


def _storage_check(tmp_path, rows_cap):
    torch.manual_seed(0)
    shapes = [(4096, 4096), (11008, 4096), (4096, 11008)]
    want = {"w3": 3.05, "w3-s0.45": 3.25, "w4": 4.08, "w4-s0.45": 4.30}
    for preset, limit in want.items():
        mods = torch.nn.ModuleList(
            [torch.nn.Linear(i, min(o, rows_cap), bias=False) for o, i in shapes]
        ).half()

        class Par(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.l = mods

            def forward(self, a, b):
                return self.l[0](a), self.l[1](a), self.l[2](b)

        compiled = sqc.compile(Par(), (torch.randn(1, 4096).half(), torch.randn(1, 11008).half()), config=preset,
                               kernels=False)
        assert all(m.kernel.startswith("reference") for m in compiled.quantized_modules().values())
        path = sqc.save(compiled, tmp_path / preset, decode_steps=None)
        bpw = artifact_bits_per_weight(path)
        assert bpw["overall"] <= limit, (preset, bpw)
        for v in bpw["layers"].values():
            assert v <= limit, (preset, bpw)


@pytest.mark.slow
def test_llama7b_row_shaped_bits_per_weight(tmp_path):
    """Storage targets with LLaMA-7B in_features (4096 / 11008) and 256 rows per layer.

    Bits per weight depend on in_features (tables and row pointers are per
    row, sparse counts are a fixed fraction), not on the number of rows; the
    slow test below checks the full shapes.
    """
    _storage_check(tmp_path, rows_cap=256)


@pytest.mark.slow
def test_llama7b_shaped_bits_per_weight(tmp_path):
    _storage_check(tmp_path, rows_cap=1 << 30)


@pytest.mark.slow
def test_the_reported_kernel_is_the_one_running(saved_llama):
    compiled, path, ids = saved_llama
    # a CPU artifact loaded for a CUDA target has no CUDA kernels: the layers say they run the reference op
    loaded = sqc.load(path, target="cuda -arch=sm_90")
    kernels = {m.kernel for m in loaded.quantized_modules().values()}
    assert all(k.startswith("reference") for k in kernels), kernels
    assert not any(m.status.generated for m in loaded.quantized_modules().values())
    assert all(m._kernels is None for m in kernel_layers(loaded.model).values())
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, compiled(ids).logits, rtol=1e-4, atol=1e-4)


# -- the CPU kernels an artifact carries --------------------------------------------------------------------------

needs_avx2 = pytest.mark.skipif(not host_lanes(), reason="this CPU has neither AVX2 nor AVX-512: no generated CPU kernels run here")


def _meta_mlp():
    with torch.device("meta"):
        return _mlp()


@pytest.fixture
def saved_mlp(tmp_path, mlp):
    x = torch.randn(3, 100)
    compiled = sqc.compile(mlp, (x,), config="w3-s0.45", target="llvm")
    return compiled, sqc.save(compiled, tmp_path / "mlp", decode_steps=None), x


@pytest.mark.slow
@needs_avx2
def test_a_cpu_artifact_carries_its_kernel_libraries_and_plan(saved_mlp):
    compiled, path, _ = saved_mlp
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    assert manifest["format_version"] == 2
    entry = manifest["kernels"]
    assert entry["kind"] == "llvm" and entry["folder"] == "kernels/cpu" and entry["isa"] in (["avx2"], ["avx512f"])
    folder = os.path.join(path, entry["folder"])
    plan = json.load(open(os.path.join(folder, "plan.json")))
    assert len(plan["kernels"]) == 3 * 3  # three layers (three keys) x three batch buckets
    for k in plan["kernels"]:
        lib = os.path.join(folder, k["library"])
        assert os.path.isfile(lib) and k["sha256"] and k["layers"] and k["knobs"]
        assert k["bucket"] in ("1", "2-16", "17+") and k["symbol"] == ("gemv" if k["bucket"] == "1" else "gemm")
    # the plan's choices are the compile's tuning choices
    chosen = {(r["key"]["out_features"], r["bucket"]): r["knobs"] for r in compiled.tuning}
    assert {(k["key"]["out_features"], k["bucket"]): k["knobs"] for k in plan["kernels"]} == chosen


@pytest.mark.slow
@needs_avx2
def test_load_in_a_fresh_process_runs_the_saved_kernels_without_tvm(saved_mlp, tmp_path):
    import subprocess
    import sys
    import textwrap

    compiled, path, x = saved_mlp
    with torch.no_grad():
        want = {n: compiled(x[:n] if n < 4 else torch.randn(n, 100, generator=torch.Generator().manual_seed(n)))
                for n in (1, 3, 20)}
    torch.save({"x": x, "want": want}, tmp_path / "io.pt")
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    script = textwrap.dedent(f"""
        import json, sys, torch, sqc
        with torch.device("meta"):
            model = torch.nn.Sequential(torch.nn.Linear(100, 53), torch.nn.ReLU(), torch.nn.Linear(53, 33, bias=False),
                                        torch.nn.ReLU(), torch.nn.Linear(33, 3))
        io = torch.load({str(tmp_path / "io.pt")!r})
        loaded = sqc.load({path!r}, model=model)
        with torch.no_grad():
            got = {{n: loaded(io["x"][:n] if n < 4 else torch.randn(n, 100, generator=torch.Generator().manual_seed(n)))
                    for n in (1, 3, 20)}}
        print(json.dumps({{
            "equal": {{str(n): bool(torch.equal(got[n], io["want"][n])) for n in got}},
            "tvm": "tvm" in sys.modules, "tvm_ffi": "tvm_ffi" in sys.modules,
            "compiler": sorted(k for k in sys.modules if k.startswith(("sqc.passes", "sqc.codegen", "sqc.compiler"))),
            "generated": all(m.status.generated for m in loaded.quantized_modules().values()),
            "kernels": [m.kernel for m in loaded.quantized_modules().values()],
            "tuning": len(loaded.tuning_report()["kernels"]),
        }}))
    """)
    env = dict(os.environ, SQC_CACHE_DIR=str(cache))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["equal"] == {"1": True, "3": True, "20": True}
    assert res["tvm"] is False and res["tvm_ffi"] is True  # TVM's runtime library only, not the compiler
    assert res["compiler"] == [] and res["generated"]  # loading imports no compiler module
    want_kernels = [m.kernel for m in compiled.quantized_modules().values()]
    assert res["kernels"] == want_kernels
    assert res["tuning"] == 9  # the tuning choices came with the artifact
    assert [f for _, _, files in os.walk(cache) for f in files] == []  # nothing built, nothing tuned, nothing cached


@pytest.mark.slow
@needs_avx2
def test_a_damaged_kernel_library_is_named_not_loaded(saved_mlp):
    _, path, _ = saved_mlp
    folder = os.path.join(path, "kernels", "cpu")
    lib = sorted(f for f in os.listdir(folder) if f.endswith(".so"))[0]
    data = open(os.path.join(folder, lib), "rb").read()
    tmp = os.path.join(folder, "new")
    with open(tmp, "wb") as fh:  # a new file, not an in-place write (a loaded library stays mapped)
        fh.write(data[:300] + bytes([data[300] ^ 0xFF]) + data[301:])
    os.replace(tmp, os.path.join(folder, lib))
    with pytest.raises(ArtifactError, match=f"{lib}: fails its checksum"):
        sqc.load(path, model=_meta_mlp())


@pytest.mark.slow
@needs_avx2
def test_an_edited_kernel_plan_is_detected(saved_mlp):
    _, path, _ = saved_mlp
    ppath = os.path.join(path, "kernels", "cpu", "plan.json")
    plan = json.load(open(ppath))
    plan["kernels"][0]["knobs"] = {"rt": 1, "unroll": 2}
    json.dump(plan, open(ppath, "w"))
    with pytest.raises(ArtifactError, match="plan.json: was modified after it was written"):
        sqc.load(path, model=_meta_mlp())


@pytest.mark.slow
@needs_avx2
def test_a_cpu_without_the_instruction_set_rebuilds_with_the_compiler_or_says_why(saved_mlp, monkeypatch):
    compiled, path, x = saved_mlp
    monkeypatch.setattr("sqc.runtime.cpu.plan.cpu_flags", lambda: frozenset({"sse2"}))
    rebuilt = sqc.load(path, model=_meta_mlp())
    kernels = [m.kernel for m in rebuilt.quantized_modules().values()]
    assert all(k.startswith("tvm-lut-") and "built at load" in k and "which this CPU lacks" in k for k in kernels), kernels
    assert any("kernels built at load" in n for n in rebuilt.notes)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), compiled(x), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr("sqc.restore.compiler_missing", lambda: "the kernel compiler (apache-tvm) is not installed")
    plain = sqc.load(path, model=_meta_mlp())
    for m in kernel_layers(plain.model).values():
        assert m._kernels is None
        assert m.kernel.startswith("reference (the artifact's CPU kernels were built for llvm")
        assert "which this CPU lacks; the kernel compiler (apache-tvm) is not installed" in m.kernel
    with torch.no_grad():
        torch.testing.assert_close(plain(x), compiled(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_format_1_artifact_still_loads(tmp_path, mlp):
    x = torch.randn(3, 100)
    compiled = sqc.compile(mlp, (x,), config="w4", kernels=False)
    path = sqc.save(compiled, tmp_path / "v1", decode_steps=None)
    mpath = os.path.join(path, "manifest.json")
    m = json.load(open(mpath))
    m["format_version"] = 1
    del m["kernels"]
    from sqc.artifact import _manifest_digest

    m["manifest_sha256"] = _manifest_digest(m)
    json.dump(m, open(mpath, "w"))
    loaded = sqc.load(path, model=_meta_mlp())  # no CPU kernels in it: built at load, as format 1 did
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), compiled(x), rtol=1e-4, atol=1e-4)
    for k in (m.kernel for m in loaded.quantized_modules().values()):
        assert "the artifact carries no llvm kernels" in k, k
        assert k.startswith("tvm-lut-" if host_lanes() else "reference"), k
    m["format_version"] = 0
    m["manifest_sha256"] = _manifest_digest(m)
    json.dump(m, open(mpath, "w"))
    with pytest.raises(ArtifactError, match="format version 0, older than this sqc reads"):
        sqc.load(path, model=_meta_mlp())


def test_the_streaming_safetensors_writer_reads_back_with_safetensors(tmp_path):
    from safetensors import safe_open

    from sqc.artifact import write_safetensors
    from sqc.runtime.files import SAFETENSORS_DTYPE

    g = torch.Generator().manual_seed(0)
    tensors = {f"t.{str(d).replace('torch.', '')}": (torch.randn(3, 5, generator=g) * 50).to(d)
               for d in SAFETENSORS_DTYPE}
    tensors["empty"] = torch.zeros(0, 4)
    tensors["a.view"] = torch.arange(12, dtype=torch.int32).view(3, 4)[:, 1:]  # not contiguous
    write_safetensors(str(tmp_path / "x.safetensors"), tensors, {"format": "test"})
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as fh:
        assert fh.metadata() == {"format": "test"} and set(fh.keys()) == set(tensors)
        for k, t in tensors.items():
            got = fh.get_tensor(k)
            assert got.dtype == t.dtype and torch.equal(got, t), k
    with pytest.raises(sqc.artifact.ArtifactError, match="complex64"):
        write_safetensors(str(tmp_path / "y.safetensors"), {"c": torch.zeros(2, dtype=torch.complex64)}, {})
