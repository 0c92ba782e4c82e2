"""The Hugging Face surface (sqc/hf.py): save_pretrained -> AutoModelForCausalLM.from_pretrained -> pipeline."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sqc  # noqa: E402
import sqc.hf  # noqa: E402
from sqc.runtime.fused import fused_groups  # noqa: E402
from sqc.runtime.int8 import Int8Linear  # noqa: E402
from sqc.runtime.qlinear import SqcLinear  # noqa: E402

from tests.conftest import ops_called, tiny_llama  # noqa: E402


def char_tokenizer():
    """A character-level tokenizer (98 ids) that fits the tiny LLaMA's 128-token vocabulary, built offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}  # LlamaConfig's default bos / eos ids
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def compile_tiny(tie: bool = False, config="w3-s0.45"):
    model = tiny_llama()
    if tie:  # SmolLM2's layout: lm_head shares embed_tokens' weight
        cfg = model.config
        cfg.tie_word_embeddings = True
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).eval()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    return sqc.compile(model, (ids,), config=config, calibration=[(ids,)]), ids


def groups(model):
    return [list(g.names) for g in fused_groups(model)]


def load_quietly(path):
    """from_pretrained, also returning the loading info and every warning transformers logged or raised."""
    import logging
    import warnings

    logged = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: logged.append(record.getMessage())
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    finally:
        root.removeHandler(handler)
    return model, info, logged + [str(w.message) for w in raised]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def compiled():
    return compile_tiny()


@pytest.fixture(scope="module")
def saved(compiled, tok, tmp_path_factory):
    assert sqc.hf.register_with_transformers()
    path = tmp_path_factory.mktemp("hf") / "tiny-sqc"
    assert sqc.hf.save_pretrained(compiled[0], path, tokenizer=tok) == str(path)
    return path


@pytest.fixture(scope="module")
def loaded(saved):
    return transformers.AutoModelForCausalLM.from_pretrained(saved)


@pytest.mark.slow
def test_folder_is_a_hugging_face_checkpoint(saved, compiled):
    cfg = json.loads((saved / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "sqc" and qc["format_version"] == sqc.hf.FORMAT_VERSION
    assert qc["sqc_config"] == compiled[0].quant_config.to_dict()
    assert set(qc["layers"]) == set(compiled[0].quantized_modules())
    # q/k/v and gate/up of each block run fused; the head is int8 per row
    assert qc["fused"] == groups(compiled[0].model) and len(qc["fused"]) == 4
    assert qc["heads"] == {"lm_head": {"in_features": 64, "out_features": 128, "bias": False}}
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    for f in ("model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (saved / f).is_file(), f
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".sqc-hf-")]  # no temporary folders left


@pytest.mark.slow
def test_from_pretrained_matches_compiled_and_sqc_load(loaded, compiled, tmp_path):
    model, ids = compiled
    assert isinstance(loaded, transformers.PreTrainedModel) and loaded.is_quantized
    with torch.no_grad():
        want = model(ids).logits
        got = loaded(ids).logits
        sqc.save(model, tmp_path / "art")
        via_load = sqc.load(tmp_path / "art")(ids).logits
    assert torch.equal(got, want)
    assert torch.equal(got, via_load)


def test_loaded_layers_keep_tables_and_run_kernels(loaded, compiled):
    mods = {n: m for n, m in loaded.named_modules() if isinstance(m, SqcLinear)}
    ref = compiled[0].quantized_modules()
    # 7 linears x 2 blocks, fused members included (each keeps its own tensors); lm_head is the int8 head
    assert set(mods) == set(ref) and len(mods) == 14
    for name, m in mods.items():
        assert m.lut.dtype == torch.float16 == ref[name].lut.dtype
        assert m.val.dtype == ref[name].val.dtype == torch.float32
        assert m.col.dtype == ref[name].col.dtype
        assert torch.equal(m.codes, ref[name].codes) and torch.equal(m.lut, ref[name].lut)
    # the fused groups are rebuilt: q/k/v and gate/up of each block
    assert groups(loaded) == groups(compiled[0].model) and len(groups(loaded)) == 4
    head, ref_head = loaded.lm_head, compiled[0].model.lm_head
    assert isinstance(head, Int8Linear) and isinstance(ref_head, Int8Linear)
    assert head.qweight.dtype == torch.int8 and head.scale.dtype == torch.float32
    assert torch.equal(head.qweight, ref_head.qweight) and torch.equal(head.scale, ref_head.scale)
    assert "weight" not in dict(head.named_parameters())
    # the embedding keeps its own float weight
    emb = loaded.model.embed_tokens.weight
    assert emb.dtype == torch.float32 and torch.equal(emb, compiled[0].model.model.embed_tokens.weight)
    if not all(m.status.generated for m in ref.values()):
        pytest.skip(f"no generated kernels on this machine: {next(iter(ref.values())).kernel}")
    # the kernels the folder carries run: the same statuses, records, and the generated kernels' ops dispatched
    assert {n: m.status for n, m in mods.items()} == {n: m.status for n, m in ref.items()}
    assert head.status == ref_head.status and head.status.generated
    assert loaded.hf_quantizer.kernel_records and loaded.hf_quantizer.notes == []
    assert ops_called(loaded, compiled[1]) == {"lut_linear_cpu", "int8_linear_cpu"}


_FRESH_LOAD = """
import sys
sys.modules["tvm"] = None  # TVM unimportable: the folder's kernels must run without the compiler
import torch, transformers
import sqc
folder, ref_path = sys.argv[1], sys.argv[2]
ref = torch.load(ref_path)
m = transformers.AutoModelForCausalLM.from_pretrained(folder)
from sqc.runtime.int8 import Int8Linear
from sqc.runtime.qlinear import SqcLinear
layers = [x for x in m.modules() if isinstance(x, (SqcLinear, Int8Linear))]
assert layers and all(x.status.generated for x in layers), [x.kernel for x in layers]
assert m.hf_quantizer.notes == [], m.hf_quantizer.notes  # nothing built at load
with torch.no_grad():
    torch.testing.assert_close(m(ref["ids"]).logits, ref["logits"], rtol=1e-5, atol=1e-5)
assert torch.equal(m.generate(ref["ids"][:, :5], max_new_tokens=6, do_sample=False), ref["tokens"])
compiler = sorted(k for k in sys.modules if k.startswith(("sqc.passes", "sqc.codegen", "sqc.compiler")))
assert not compiler, compiler
print("ok", sorted({x.kernel for x in layers}))
"""


@pytest.mark.slow
def test_from_pretrained_in_a_fresh_process_runs_the_carried_kernels_without_tvm(compiled, saved, tmp_path):
    model, ids = compiled
    if not all(m.status.generated for m in model.quantized_modules().values()):
        pytest.skip("no generated kernels on this machine")
    assert (saved / "kernels" / "cpu" / "plan.json").is_file()
    with torch.no_grad():
        ref = {"ids": ids, "logits": model(ids).logits,
               "tokens": model.generate(ids[:, :5], max_new_tokens=6, do_sample=False)}
    torch.save(ref, tmp_path / "ref.pt")
    env = dict(os.environ, SQC_CACHE_DIR=str(tmp_path / "empty-cache"))  # nothing cached: nothing to find there
    r = subprocess.run([sys.executable, "-c", _FRESH_LOAD, str(saved), str(tmp_path / "ref.pt")], env=env,
                       capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok"), r.stdout
    assert not (tmp_path / "empty-cache").exists()


def test_generate_matches_compiled(loaded, compiled):
    model, ids = compiled
    kw = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(loaded.generate(ids[:, :5], **kw), model.generate(ids[:, :5], **kw))


def test_pipeline_text_generation(loaded, compiled, tok, saved):
    out = transformers.pipeline("text-generation", model=loaded, tokenizer=tok)("def f(", max_new_tokens=5,
                                                                                 do_sample=False)
    text = out[0]["generated_text"]
    assert text.startswith("def f(")
    # the compiled model works in a pipeline too (its HF model, or the wrapper itself)
    for m in (compiled[0].model, compiled[0]):
        again = transformers.pipeline("text-generation", model=m, tokenizer=tok)("def f(", max_new_tokens=5,
                                                                                  do_sample=False)
        assert again[0]["generated_text"] == text
    # and a folder name alone: model and tokenizer both load from it
    by_name = transformers.pipeline("text-generation", model=str(saved))("def f(", max_new_tokens=5, do_sample=False)
    assert by_name[0]["generated_text"] == text


@pytest.mark.slow
def test_tied_embedding_keeps_its_float_weight(tmp_path):
    # SmolLM2's layout: the head gets its own int8 copy, the tied input embedding keeps the float table
    sqc.hf.register_with_transformers()
    model, ids = compile_tiny(tie=True)
    assert "lm_head" not in model.quantized_modules() and isinstance(model.model.lm_head, Int8Linear)
    sqc.hf.save_pretrained(model, tmp_path / "tied")
    loaded, info, warned = load_quietly(tmp_path / "tied")
    assert loaded.config.tie_word_embeddings
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert not [w for w in warned if "tie" in w.lower() or "missing" in w.lower()], warned
    assert isinstance(loaded.lm_head, Int8Linear) and "weight" not in dict(loaded.lm_head.named_parameters())
    assert torch.equal(loaded.lm_head.qweight, model.model.lm_head.qweight)
    emb = loaded.model.embed_tokens.weight
    assert emb.dtype == torch.float32 and torch.equal(emb, model.model.model.embed_tokens.weight)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        loaded.tie_weights()  # re-deriving the ties from the config does not put the float weight on the head
        assert "weight" not in dict(loaded.lm_head.named_parameters())
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_unfused_float_head_round_trips(tmp_path, tie):
    sqc.hf.register_with_transformers()
    model, ids = compile_tiny(tie=tie, config=sqc.QuantConfig(bits=4, fuse=False, head="float"))
    assert not groups(model.model) and isinstance(model.model.lm_head, torch.nn.Linear)
    sqc.hf.save_pretrained(model, tmp_path / "plain")
    qc = json.loads((tmp_path / "plain" / "config.json").read_text())["quantization_config"]
    assert qc["fused"] == [] and qc["heads"] == {}
    loaded, info, warned = load_quietly(tmp_path / "plain")
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert not groups(loaded) and not any(isinstance(m, Int8Linear) for m in loaded.modules())
    assert isinstance(loaded.lm_head, torch.nn.Linear)
    if tie:  # a float head stays tied to the embedding, as in the compiled model
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    mods = {n: m for n, m in loaded.named_modules() if isinstance(m, SqcLinear)}
    assert set(mods) == set(model.quantized_modules()) and len(mods) == 14
    assert all(m.bits == 4 for m in mods.values())
    with torch.no_grad():
        got = loaded(ids).logits
        sqc.save(model, tmp_path / "art")
        assert torch.equal(got, model(ids).logits)
        assert torch.equal(got, sqc.load(tmp_path / "art")(ids).logits)


def test_resave_and_refuse_foreign_paths(saved, compiled, tmp_path):
    # a folder written by save_pretrained is replaced
    assert sqc.hf.save_pretrained(compiled[0], saved) == str(saved)
    # an existing empty folder (tempfile.mkdtemp(), as Hugging Face tutorials do) is written into
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sqc.hf.save_pretrained(compiled[0], empty) == str(empty)
    assert (empty / "config.json").is_file()
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="did not write"):
        sqc.hf.save_pretrained(compiled[0], foreign)
    assert (foreign / "keep.txt").read_text() == "mine"
    plain = tmp_path / "float"
    tiny_llama().save_pretrained(plain)  # a Hugging Face folder, but not an sqc one
    with pytest.raises(FileExistsError):
        sqc.hf.save_pretrained(compiled[0], plain)
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(FileExistsError, match="a file"):
        sqc.hf.save_pretrained(compiled[0], afile)
    with pytest.raises(TypeError, match="sqc.save"):
        sqc.hf.save_pretrained(tiny_llama(), tmp_path / "x")


def _edit(saved, dst, fn):
    shutil.copytree(saved, dst)
    cfg = json.loads((dst / "config.json").read_text())
    fn(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _first_name(qc):
    return sorted(qc["layers"])[0]


def _first(qc):
    return qc["layers"][_first_name(qc)]


@pytest.mark.parametrize("edit, message", [
    (lambda qc: _first(qc).pop("bits"), r"\['bits'\] must be a positive integer"),
    (lambda qc: qc.update(format_version=99), "newer than this sqc reads .*upgrade sqc"),
    (lambda qc: qc.update(layers={}), "lists no quantized layers"),
    (lambda qc: qc["sqc_config"].update(bitz=3), "sqc_config is not a valid sqc QuantConfig"),
    (lambda qc: _first(qc).update(nnz=_first(qc)["nnz"] + 1), "config.json and the weights come from different saves"),
    (lambda qc: _first(qc).update(lut_dtype="float32"), "config.json and the weights come from different saves"),
    (lambda qc: qc["layers"].update({"model.nope": _first(qc)}), "does not have"),
    (lambda qc: qc.update(fused={}), r"\"fused\" must be a list"),
    (lambda qc: qc["fused"][0].append("model.nope"), r"fused\[0\] names 'model.nope', which is not one of"),
    (lambda qc: qc["fused"].append(qc["fused"][0][:1]), r"fused\[4\] must be a list of two or more"),
    (lambda qc: qc["fused"].append([qc["fused"][0][0], "model.layers.0.self_attn.o_proj"]),
     r"is in fused\[0\] and fused\[4\]"),
    (lambda qc: qc["fused"].append(["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"]),
     "fused layers share inputs, bits and table dtypes"),
    (lambda qc: qc.update(heads=[]), r"\"heads\" must be an object"),
    (lambda qc: qc["heads"]["lm_head"].update(out_features=0),
     r"heads\['lm_head'\]\['out_features'\] must be a positive"),
    (lambda qc: qc["heads"]["lm_head"].update(bias="no"), r"heads\['lm_head'\]\['bias'\] must be true or false"),
    (lambda qc: qc["heads"].update({_first_name(qc): qc["heads"]["lm_head"]}),
     "both a quantized layer and an int8 head"),
    (lambda qc: qc["heads"]["lm_head"].update(in_features=65), "int8 head lm_head is 128x65 .* disagree"),
    (lambda qc: qc["heads"]["lm_head"].update(bias=True, bias_dtype="float32"),
     "no tensor lm_head.bias, which int8 head lm_head needs"),
])
def test_malformed_quantization_config_names_problem_and_fix(saved, tmp_path, edit, message):
    bad = _edit(saved, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=message) as info:
        transformers.AutoModelForCausalLM.from_pretrained(bad)
    assert "save_pretrained" in str(info.value) or "upgrade sqc" in str(info.value)


def test_dequantize_gives_float_linears(saved, compiled):
    model, ids = compiled
    m = transformers.AutoModelForCausalLM.from_pretrained(saved)
    m.dequantize()
    assert not any(isinstance(x, (SqcLinear, Int8Linear)) for x in m.modules()) and not m.is_quantized
    head = compiled[0].model.lm_head
    assert isinstance(m.lm_head, torch.nn.Linear)
    assert torch.equal(m.lm_head.weight, head.qweight.float() * head.scale[:, None])
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_registration_is_idempotent_and_lazy():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert sqc.hf.register_with_transformers() and sqc.hf.register_with_transformers()
    assert AUTO_QUANTIZER_MAPPING["sqc"] is sqc.hf.SqcHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["sqc"] is sqc.hf.SqcQuantizationConfig
    # registering before transformers is imported defers to when its quantizer registry is imported
    code = ("import sys, sqc.hf; assert sqc.hf.register_with_transformers(); "
            "assert 'transformers.quantizers.auto' not in sys.modules; "
            "from transformers import AutoModelForCausalLM; import transformers.modeling_utils; "
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M; "
            "assert M['sqc'] is sqc.hf.SqcHfQuantizer")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_loaded_model_resaves_with_transformers(loaded, compiled, tmp_path):
    # transformers' own save_pretrained on the loaded model writes the same format (codes rebuilt from the kernels)
    loaded.save_pretrained(tmp_path / "again")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    model, ids = compiled
    assert groups(again) == groups(model.model) and isinstance(again.lm_head, Int8Linear)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
