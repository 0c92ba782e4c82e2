"""Data-parallel compiles (sqc.parallel): the fixed-order sums, the row split of the fit, and
``torchrun`` jobs of 2 local ranks (gloo) against a one-process compile."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sqc.quant.kmeans import fit_rows, part_rows
from sqc.quant.reduce import TreeSum, cover, rank_blocks

from test_cli import workspace  # noqa: F401 - the tiny LLaMA folder with a tokenizer and a text


def _items(n, shape=(7, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    # non-negative like the statistics (squared gradients), magnitudes spread over decades so the
    # grouping of the sum shows in the last bits
    return [{"a": torch.randn(shape, generator=g).abs() * 10.0 ** torch.randint(-3, 4, shape, generator=g),
             "b": torch.rand(3, generator=g)} for _ in range(n)]


def _one_process(items):
    acc = TreeSum(len(items))
    for i, it in enumerate(items):
        acc.add(i, {k: v.clone() for k, v in it.items()})
    return acc.result()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), world=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_tree_sum_has_the_same_bits_on_any_number_of_ranks(n, world, seed):
    items = _items(n, seed=seed)
    blocks = rank_blocks(n, world)
    assert len(blocks) == world
    # the ranks' blocks cover every sample once, in order
    assert [i for b in blocks for lo, hi in b for i in range(lo, hi)] == list(range(n))
    pieces = []
    for nodes in blocks:  # each rank sums its own subtrees
        acc = TreeSum(n)
        for lo, hi in nodes:
            for i in range(lo, hi):
                acc.add(i, {k: v.clone() for k, v in items[i].items()})
        assert [node for node, _ in acc.nodes()] == TreeSum.held(n, nodes)  # siblings merged
        pieces += acc.nodes()
    got, want = TreeSum.combine(n, pieces), _one_process(items)
    for k in want:
        assert torch.equal(got[k], want[k]), k
        exact = sum(it[k].double() for it in items)
        torch.testing.assert_close(got[k].double(), exact, rtol=1e-5, atol=0.0)



@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 24), seed=st.integers(0, 2**16), early=st.sets(st.sampled_from(["a", "b"])))
def test_absorbing_a_sample_entry_by_entry_gives_the_same_bits(n, seed, early):
    # the streamed backward hands each weight's square over as it is made (TreeSum.absorb)
    items = _items(n, seed=seed)
    acc = TreeSum(n)
    for i, it in enumerate(items):
        for k in sorted(early):
            acc.absorb(i, k, it[k].clone())
        acc.add(i, {k: v.clone() for k, v in it.items() if k not in early})
    want = _one_process(items)
    got = acc.result()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_absorb_refuses_a_sample_left_half_done():
    acc = TreeSum(3)
    acc.absorb(0, "a", torch.ones(1))
    with pytest.raises(ValueError, match="absorbed in part"):
        acc.add(1, {"a": torch.ones(1)})
    with pytest.raises(ValueError, match="came twice"):
        acc.add(0, {"a": torch.ones(1)})

def test_tree_sum_refuses_pieces_out_of_order_or_missing():
    acc = TreeSum(4)
    acc.add(0, {"a": torch.ones(1)})
    with pytest.raises(ValueError, match="does not follow"):
        acc.add(2, {"a": torch.ones(1)})
    with pytest.raises(RuntimeError, match="incomplete"):
        acc.result()
    with pytest.raises(ValueError, match="not a subtree"):
        TreeSum(4).push((1, 3), {"a": torch.ones(1)})
    assert cover(5, 1) == [(0, 3), (3, 5)] and cover(1, 3) == [(0, 1)]


@pytest.mark.parametrize("R,chunk,world", [(100, 16, 2), (100, 16, 3), (40, 64, 2), (7, 2, 5)])
def test_a_rank_s_rows_of_the_fit_equal_the_one_process_fit(R, chunk, world):
    rng = np.random.default_rng(R + world)
    w = rng.standard_normal((R, 48)).astype(np.float32)
    f = rng.random((R, 48)).astype(np.float32)
    act = rng.random((R, 48)) > 0.05
    full = fit_rows(w, f, act, 3, iters=4, chunk_rows=chunk)
    runs = part_rows(R, chunk, world)
    assert runs[0][0] == 0 and runs[-1][1] == R and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
    assert all(lo % chunk == 0 for lo, _ in runs)
    for r, (lo, hi) in enumerate(runs):
        part = fit_rows(w, f, act, 3, iters=4, chunk_rows=chunk, part=(r, world))
        assert np.array_equal(part.centroids[lo:hi], full.centroids[lo:hi])
        others = np.ones(R, bool)
        others[lo:hi] = False
        assert np.isnan(part.centroids[others]).all()


def _torchrun(nproc, *args, env=None, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "sqc", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _compile_args(model_dir, text, out):
    # 5 samples (uneven ranks), 16-row chunks (each rank fits part of every weight), no tuning
    # (the kernels' timing records would differ between any two runs)
    return ["compile", str(model_dir), "--preset", "w3-s0.45", "--calib", str(text), "--calib-samples", "5",
            "--seq-len", "32", "--chunk-rows", "16", "--no-tune", "--out", str(out)]


_TIMINGS = {"ms", "best_ms", "default_ms", "gbps", "copy_gbps", "bw_ratio",
            "plan_sha256", "manifest_sha256"}  # the hashes cover the timed plan; checked on their own below


def _untimed(obj):
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k not in _TIMINGS}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def _files(d):
    return {os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs}


@pytest.mark.slow
def test_two_ranks_write_the_artifact_one_process_writes(workspace, tmp_path):  # noqa: F811
    _, model_dir, text = workspace
    one = subprocess.run([sys.executable, "-m", "sqc", *_compile_args(model_dir, text, tmp_path / "one")],
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _torchrun(2, *_compile_args(model_dir, text, tmp_path / "two"))
    assert two.returncode == 0, (two.stdout[-2000:], two.stderr[-3000:])
    assert "data-parallel compile: 2 ranks" in two.stderr
    assert two.stdout.count("compiled 14/15 linear layers") == 1  # rank 0 reports
    a, b = tmp_path / "one", tmp_path / "two"
    # the stored decode steps are Inductor's output for the same model: the same steps, not the same bytes
    # (Inductor's generated kernels vary between processes); the model and its kernels are the same bits
    steps = [[(e["batch"], e["cache_len"], e["mode"]) for e in json.loads((d / "steps" / "index.json").read_text())
              ["steps"]] for d in (a, b)]
    assert steps[0] == steps[1] and steps[0]
    model_files = [{f for f in _files(d) if not f.startswith("steps/")} for d in (a, b)]
    assert model_files[0] == model_files[1]
    for rel in sorted(model_files[0]):
        if rel in ("report.json", "report.html", "tuning.md"):  # stage timings, notes, kernel timings
            continue
        if rel == "manifest.json":  # its steps entry holds the steps' index checksum
            x, y = (json.loads((d / rel).read_text()) for d in (a, b))
            for m in (x, y):
                m["steps"].pop("index_sha256")
            assert _untimed(x) == _untimed(y), rel
            continue
        x, y = (a / rel).read_bytes(), (b / rel).read_bytes()
        if rel.endswith(".json") and x != y:  # kernel records carry the latencies measured in each run
            x, y = _untimed(json.loads(x)), _untimed(json.loads(y))
        assert x == y, rel
    plan = json.loads((b / "manifest.json").read_text())["kernels"]["plan_sha256"]
    assert plan == hashlib.sha256((b / "kernels" / "cpu" / "plan.json").read_bytes()).hexdigest()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".sqc-")]  # no temporary folder left


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_job_and_writes_nothing(workspace, tmp_path):  # noqa: F811
    _, model_dir, text = workspace
    # rank 1 exits in its first collective (the first layer's statistics)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import torch.distributed as dist\n"
        "    def _die(*a, **k):\n"
        "        os._exit(17)\n"
        "    dist.broadcast = _die\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "art"
    proc = _torchrun(2, *_compile_args(model_dir, text, out), env=env)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "exitcode  : 17" in log and "rank      : 1" in log  # torchrun names the rank that died
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".sqc-")]


def test_compile_under_torchrun_needs_the_streamed_pipeline(workspace, tmp_path):  # noqa: F811
    _, model_dir, text = workspace
    proc = _torchrun(2, *_compile_args(model_dir, text, tmp_path / "x"), "--no-lazy")
    assert proc.returncode != 0 and "data-parallel compile (torchrun) streams the model" in proc.stderr
