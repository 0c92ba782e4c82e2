"""Decode steps stored with the artifact: a fresh process restores them without tracing, on an empty Inductor
cache without compiling, and generates the eager model's tokens; damage and mismatches are caught."""
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sqc
from sqc.artifact import ArtifactError
from sqc.decode_steps import normalize_lengths
from sqc.runtime.decode import CompiledDecoder
from sqc.runtime.stepstore import StoredSteps, cpu_isa, fingerprint
from tests.conftest import tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = [[5, 17, 3, 99, 42, 8, 61, 23]]
NEW = 12


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """(the compiled tiny model, the eager model's greedy tokens, an artifact with a step for 128 tokens)."""
    model = tiny_llama()
    ids = torch.tensor(PROMPT)
    eager = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    compiled = sqc.compile(model, (ids,), config="w4", tune=False)
    path = sqc.save(compiled, tmp_path_factory.mktemp("steps") / "a", decode_steps=[128])
    return compiled, eager, path


FRESH = textwrap.dedent("""
    import json, os, sys, torch
    import sqc
    from torch._dynamo.utils import counters
    c = sqc.load(sys.argv[1])
    out = c.generate(torch.tensor({prompt}), max_new_tokens={new}, min_new_tokens={new})
    print(json.dumps({{"tokens": out.tolist(), "stats": c.decode_stats,
                      "dynamo_frames": sum(counters["frames"].values())}}))
""")


def _fresh(path, env_extra):
    env = dict(os.environ, PYTHONPATH=ROOT, **env_extra)
    code = FRESH.format(prompt=PROMPT, new=NEW)
    proc = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_fresh_process_restores_the_stored_step_without_tracing_or_compiling(stored, tmp_path):
    compiled, eager, path = stored
    index = json.load(open(os.path.join(path, "steps", "index.json")))
    assert [(e["batch"], e["cache_len"], e["mode"]) for e in index["steps"]] == [(1, 128, "greedy")]
    assert index["libraries"], "the step's compiled C++ kernels travel with it"
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    assert manifest["steps"]["lengths"] == [128]
    inductor = tmp_path / "empty-inductor-cache"
    got = _fresh(path, {"TORCHINDUCTOR_CACHE_DIR": str(inductor)})
    st = got["stats"]
    assert got["tokens"] == eager.tolist()
    assert st.get("restores") == 1 and st["compiles"] == 0 and "restored" in st["stored_step"], st
    assert st["replay"].startswith("later steps replay")
    assert got["dynamo_frames"] == 0  # TorchDynamo traced no frame in that process
    # nothing was compiled: the only libraries in the empty cache are the ones the artifact carries
    built = {os.path.relpath(os.path.join(r, f), inductor) for r, _, fs in os.walk(inductor) for f in fs
             if f.endswith(".so")}
    assert built == set(index["libraries"])
    # the freshly traced step (this process, no stored steps) gives the same tokens
    traced = compiled.generate(torch.tensor(PROMPT), max_new_tokens=NEW, min_new_tokens=NEW)
    assert torch.equal(traced, eager) and "stored_step" not in compiled.decode_stats


@pytest.mark.slow
def test_a_restored_step_runs_under_inference_mode(stored):
    _, eager, path = stored
    c = sqc.load(path)
    with torch.inference_mode():
        got = c.generate(torch.tensor(PROMPT), max_new_tokens=NEW, min_new_tokens=NEW)
    assert torch.equal(got, eager) and c.decode_stats.get("restores") == 1, c.decode_stats


@pytest.mark.slow
def test_a_step_that_does_not_fit_is_traced_and_says_why(stored):
    _, eager, path = stored
    c = sqc.load(path)
    c.stored_steps.fp["torch"] = "0.0.0"  # as if stored by another torch
    got = c.generate(torch.tensor(PROMPT), max_new_tokens=NEW, min_new_tokens=NEW)
    assert torch.equal(got, eager)
    st = c.decode_stats
    assert "not used: torch differs" in st["stored_step"] and st["compiles"] == 1 and "restores" not in st
    # a generation longer than every stored step traces its own cache length
    c2 = sqc.load(path)
    c2.generate(torch.tensor(PROMPT), max_new_tokens=130)
    assert "none stored for batch 1, cache 256" in c2.decode_stats["stored_step"]
    # an artifact loaded with decode_steps=False reads no stored step
    c3 = sqc.load(path, decode_steps=False)
    assert c3.stored_steps is None
    assert torch.equal(c3.generate(torch.tensor(PROMPT), max_new_tokens=NEW, min_new_tokens=NEW), eager)
    assert "stored_step" not in c3.decode_stats


@pytest.mark.slow
def test_damaged_step_files_are_refused_at_load(stored, tmp_path):
    import shutil

    _, _, path = stored
    for victim in ("b1-c128-greedy.bin", "index.json"):
        copy = tmp_path / victim
        shutil.copytree(path, copy)
        f = copy / "steps" / victim
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
        with pytest.raises(ArtifactError, match=victim.replace(".", r"\.")):
            sqc.load(copy)
    lib = sorted(json.load(open(os.path.join(path, "steps", "index.json")))["libraries"])[0]
    copy = tmp_path / "lib"
    shutil.copytree(path, copy)
    os.remove(copy / "steps" / "inductor" / lib)
    with pytest.raises(ArtifactError, match="is missing"):
        sqc.load(copy)


@pytest.mark.slow
def test_a_failed_trace_writes_nothing_and_names_the_way_out(stored, tmp_path, monkeypatch):
    import sqc.decode_steps

    compiled, _, _ = stored
    monkeypatch.setattr(sqc.decode_steps.sys, "executable", "/bin/false")  # the tracer's process fails
    with pytest.raises(ArtifactError, match=r"decode_steps=None \(sqc compile --decode-steps none\)"):
        sqc.save(compiled, tmp_path / "a", decode_steps=[128])
    assert os.listdir(tmp_path) == []  # no artifact, no temporary folder


@pytest.mark.slow
def test_step_lengths_are_checked(mlp, tmp_path):
    assert normalize_lengths("default") == (512, 1024, 2048, 4096)
    assert normalize_lengths(None) == () and normalize_lengths([256, 128, 256]) == (128, 256)
    for bad in ([100], [0], [True], "all"):
        with pytest.raises(ValueError, match="decode_steps"):
            normalize_lengths(bad)
    skeleton = copy.deepcopy(mlp)
    compiled = sqc.compile(mlp, (torch.randn(2, 100),), config="w4", kernels=False)
    with pytest.raises(ValueError, match="not a causal LM"):
        sqc.save(compiled, "/nonexistent/never-written", decode_steps=[512])
    path = sqc.save(compiled, tmp_path / "mlp")  # the default stores steps for causal LMs only
    assert json.load(open(os.path.join(path, "manifest.json")))["steps"] is None
    assert not os.path.exists(os.path.join(path, "steps")) and sqc.load(path, model=skeleton).stored_steps is None


def test_the_cache_length_prefers_a_stored_step_within_its_slack(llama):
    fp = fingerprint(llama)
    assert fp["isa"] == cpu_isa() and fp == fingerprint(llama)
    steps = StoredSteps("/nowhere", {"fingerprint": fp, "libraries": {}, "steps": [
        {"batch": 1, "cache_len": n, "mode": "greedy", "file": f"b1-c{n}-greedy.bin", "sha256": "0"}
        for n in (512, 2048)]})
    dec = CompiledDecoder(llama, stored=steps)
    assert dec._cache_length(1, 20, "greedy") == 512  # 128 needed: a stored 512 is within 4x
    assert dec._cache_length(1, 600, "greedy") == 2048
    assert dec._cache_length(1, 300, "sample") == 384  # no stored sampling step: its own rounding
    assert dec._cache_length(2, 20, "greedy") == 128  # nor for batch 2
    assert dec._cache_length(1, 3000, "greedy") == 3072  # longer than every stored step
    assert steps.why_not(llama) is None
    llama.model.layers[0].mlp.up_proj = torch.nn.Linear(64, 100, bias=True)  # another module tree
    assert "tensors_sha256 differs" in steps.why_not(llama)
