"""A LLaMA-7B-shaped model compiled on this machine: peak memory and time per stage, by depth and ranks.

    python benchmarks/scale.py [--depths 4,8,16,32] [--ranks 1,2] [--tune]

The model: 32 decoder layers, hidden 4096, MLP 11008, 32 heads, vocab 32000 (LLaMA-7B's shapes),
random bf16 weights (normal, std 0.02; a real 7B checkpoint is not available offline) written once
as a sharded safetensors folder into ``benchmarks/.scale-model/`` (13.5 GB; one shard per decoder
layer, so a shallower model is the same shards under its own index and config), with a byte-level
BPE tokenizer trained on the tutorial text (vocabulary under 32000).

Each run is the user's command in a fresh process tree, ``sqc compile FOLDER --preset w3-s0.45
--calib TEXT --calib-samples 4 --seq-len 128`` (lazy weights, layer-streamed calibration, fit and
packing; kernels built for this CPU, ``--no-tune`` unless ``--tune``), under ``torchrun
--nproc-per-node 2`` for 2 ranks (one thread each, torchrun's default). Measured per run:

* ``peak_rss_mib``: the largest peak resident set of any one process of the run (``wait4``'s
  ``ru_maxrss`` over the process tree), and ``tree_rss_mib``: the largest sum of resident sets over
  the whole tree, sampled every 0.2 s (2 ranks hold two processes' memory at once);
* ``wall_s`` and the compile's ``stage_seconds`` (from the artifact's report), ``other_s`` = wall
  minus the stages (imports, reading the config and tokenizer, tokenizing, saving);
* the sha256 of the artifact's ``model.safetensors``: 1 and 2 ranks must agree.

Per-layer growth is the least-squares slope over the depths; the 7B run must stay within 8 GB.

SmolLM2-135M (``--parts smollm2``): the peak of ``sqc compile smollm2 --preset w3-s0.45`` (lazy GGUF
weights, 32 x 512 calibration tokens) against a fresh fp32 process that loads the model and
generates (must stay within 1.5x), and the tutorial perplexity of the streamed compile against the
whole-model compile from the same calibration.

Writes ``benchmarks/results/scale.json`` after every run (a part or a run not remeasured keeps its
figures; each records the commit it measured) and prints the README
table (``--markdown`` prints it from the JSON alone).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, ROOT)
MODEL_DIR = os.path.join(HERE, ".scale-model")
SHAPE = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
         "vocab_size": 32000, "full_layers": 32}
LIMIT_MIB = 8e9 / 2**20  # the 8 GB
_PROJ = {"self_attn.q_proj": "hh", "self_attn.k_proj": "hh", "self_attn.v_proj": "hh", "self_attn.o_proj": "hh",
         "mlp.gate_proj": "ih", "mlp.up_proj": "ih", "mlp.down_proj": "hi"}


def _random_bf16(shape, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)


def _write_shard(path: str, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)


def _base() -> str:
    """The 32-layer shards and the tokenizer, written once (each file atomically; a rerun resumes)."""
    import torch

    base = os.path.join(MODEL_DIR, "shards")
    os.makedirs(base, exist_ok=True)
    h, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    dims = {"h": h, "i": i}
    outer = os.path.join(base, "outer.safetensors")
    if not os.path.exists(outer):
        _write_shard(outer, {"model.embed_tokens.weight": _random_bf16((v, h), 1),
                             "lm_head.weight": _random_bf16((v, h), 2),
                             "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)})
    for layer in range(SHAPE["full_layers"]):
        path = os.path.join(base, f"layer-{layer:02d}.safetensors")
        if os.path.exists(path):
            continue
        t0 = time.perf_counter()
        p = f"model.layers.{layer}."
        tensors = {p + name + ".weight": _random_bf16((dims[s[0]], dims[s[1]]), 100 + 10 * layer + k)
                   for k, (name, s) in enumerate(_PROJ.items())}
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[p + norm + ".weight"] = torch.ones(h, dtype=torch.bfloat16)
        _write_shard(path, tensors)
        print(f"  wrote {os.path.basename(path)} ({time.perf_counter() - t0:.1f} s)", flush=True)
    tok_dir = os.path.join(base, "tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        _train_tokenizer(tok_dir)
    return base


def _train_tokenizer(out: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sqc.real import protocol_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([protocol_text("library")],
                            trainers.BpeTrainer(vocab_size=SHAPE["vocab_size"], special_tokens=["<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tok.get_vocab_size() <= SHAPE["vocab_size"]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(tmp)
    os.replace(tmp, out)


def checkpoint(layers: int) -> str:
    """A Hugging Face folder of the first ``layers`` decoder layers: links to the shards, its own index."""
    from transformers import LlamaConfig

    base = _base()
    folder = os.path.join(MODEL_DIR, f"L{layers}")
    if os.path.exists(os.path.join(folder, "model.safetensors.index.json")):
        return folder
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shards = ["outer.safetensors"] + [f"layer-{k:02d}.safetensors" for k in range(layers)]
    weight_map = {}
    from safetensors import safe_open

    for s in shards:
        os.symlink(os.path.join(base, s), os.path.join(tmp, s))
        with safe_open(os.path.join(base, s), framework="pt") as fh:
            weight_map.update({k: s for k in fh.keys()})
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    for f in os.listdir(os.path.join(base, "tokenizer")):
        os.symlink(os.path.join(base, "tokenizer", f), os.path.join(tmp, f))
    cfg = {k: v for k, v in SHAPE.items() if k != "full_layers"}
    LlamaConfig(num_hidden_layers=layers, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                torch_dtype="bfloat16", bos_token_id=0, eos_token_id=1, **cfg).save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def _tree_rss_kib(root: int) -> int:
    """Sum of VmRSS over ``root`` and its descendants (from /proc)."""
    parent, rss = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as fh:
                fields = dict(line.split(":", 1) for line in fh if ":" in line)
        except OSError:
            continue
        parent[int(d)] = int(fields["PPid"])
        rss[int(d)] = int(fields.get("VmRSS", "0 kB").split()[0])
    total, todo = 0, [root]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += [c for c, pp in parent.items() if pp == p]
    return total


def _measured(cmd: list[str], env: dict) -> tuple[float, float, float, str]:
    """Run ``cmd``; (wall s, largest per-process peak MiB, largest sampled tree sum MiB, output)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tree_peak, done = [0], threading.Event()

    def sample():
        while not done.wait(0.2):
            tree_peak[0] = max(tree_peak[0], _tree_rss_kib(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log[-4000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, tree_peak[0] / 1024, log


def _env(threads: int) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS=str(threads))


def run(layers: int, ranks: int, threads: int, text_file: str, tune: bool, out: str) -> dict:
    folder = checkpoint(layers)
    args = ["compile", folder, "--preset", "w3-s0.45", "--calib", text_file, "--calib-samples", "4",
            "--seq-len", "128", "--out", out, "--force"] + ([] if tune else ["--no-tune"])
    head = [sys.executable, "-m", "sqc"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "sqc"]
    shutil.rmtree(out, ignore_errors=True)
    wall, peak, tree, _ = _measured(head + args, _env(threads))
    with open(os.path.join(out, "report.json")) as fh:
        stages = json.load(fh)["stage_seconds"]
    sha = hashlib.sha256()
    with open(os.path.join(out, "model.safetensors"), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            sha.update(block)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
    shutil.rmtree(out)
    return {"layers": layers, "ranks": ranks, "threads_per_process": threads, "wall_s": wall, "peak_rss_mib": peak,
            "tree_rss_mib": tree, "stage_seconds": stages, "other_s": wall - sum(stages.values()),
            "artifact_mib": size / 2**20, "model_sha256": sha.hexdigest()}


def smollm2(calib_samples: int = 8) -> dict:
    """SmolLM2-135M: the CLI compile's peak against a fresh fp32 process's, and the perplexity of the
    streamed compile against the whole-model compile (same calibration, 16 x 512 tutorial tokens)."""
    import torch

    import sqc
    from sqc.demo import fresh_rss
    from sqc.real import calibration_windows, eval_windows, load_smollm2, perplexity

    out = os.path.join(MODEL_DIR, "smollm2-artifact")
    cmd = [sys.executable, "-m", "sqc", "compile", "smollm2", "--preset", "w3-s0.45", "--out", out, "--force"]
    # first with empty caches (a new machine: XLA compiles the k-means solvers, TVM builds and tunes the
    # kernels), then again with the caches that run filled (every later compile on that machine)
    caches = tempfile.mkdtemp(prefix="sqc-scale-cache-")
    env = dict(_env(2), SQC_CACHE_DIR=caches, SQC_JAX_CACHE=os.path.join(caches, "jax"))
    try:
        cold_wall, cold_peak, _, _ = _measured(cmd, env)
        shutil.rmtree(out)
        wall, peak, _, _ = _measured(cmd, env)
        shutil.rmtree(out)
    finally:
        shutil.rmtree(caches, ignore_errors=True)
    fp32 = fresh_rss("fp32")  # its resident size after load + generate (stricter than its peak)
    torch.set_num_threads(2)
    _, tok = load_smollm2()
    calib = [(w,) for w in calibration_windows(tok, calib_samples, 512)]
    windows = eval_windows(tok, 16, 512)
    ppl = {}
    for name, stream in (("whole", False), ("streamed", True)):
        model, _ = load_smollm2()  # a fresh model each: sqc.compile swaps its linears in place
        compiled = sqc.compile(model, config="w3-s0.45", calibration=calib, kernels=False, stream=stream)
        ppl[name] = perplexity(compiled, windows)
        del compiled, model
    return {"compile_command": "sqc compile smollm2 --preset w3-s0.45 (lazy GGUF, 32 x 512 calibration)",
            "compile_wall_s": wall, "compile_peak_rss_mib": peak, "cold_cache_compile_wall_s": cold_wall,
            "cold_cache_compile_peak_rss_mib": cold_peak, "cold_cache_ratio": cold_peak / fp32["rss_mib"],
            "fp32_fresh_rss_mib": fp32["rss_mib"],
            "fp32_fresh_peak_rss_mib": fp32["peak_rss_mib"], "ratio": peak / fp32["rss_mib"],
            "ratio_to_fp32_peak": peak / fp32["peak_rss_mib"], "limit_ratio": 1.5,
            "ppl_calibration": f"{calib_samples} x 512 library tokens; eval 16 x 512 tutorial tokens",
            "ppl_whole_model": ppl["whole"], "ppl_streamed": ppl["streamed"]}


def _slope(xs, ys) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def llama7b(depths: list[int], ranks: list[int], tune: bool, previous: dict, save) -> dict:
    """Measure each (depth, ranks) asked for; runs of ``previous`` not remeasured are kept (each run
    records the commit it measured). ``save(part)`` is called after every run, so an interrupted
    sweep keeps what it finished."""
    from sqc.real import protocol_text

    os.makedirs(MODEL_DIR, exist_ok=True)
    text_file = os.path.join(MODEL_DIR, "calibration.txt")
    with open(text_file, "w") as fh:
        fh.write(protocol_text("library"))
    runs = {_key(r): r for r in previous.get("runs", [])}
    # every depth on one rank at 2 threads; more ranks (1 thread each) at the deepest; and at the
    # shallowest, one rank at 1 thread: the artifact's bits depend on the threads per process (the
    # GEMMs split their sums by thread count), so ranks are compared at equal threads per process
    more = [r for r in ranks if r > 1]
    plan = [(d, 1, 2) for d in depths] + [(max(depths), r, 1) for r in more]
    if more:
        plan += [(min(depths), 1, 1)] + ([(min(depths), r, 1) for r in more] if min(depths) < max(depths) else [])
    part = dict(previous)
    for layers, r, threads in plan:
        row = run(layers, r, threads, text_file, tune, os.path.join(MODEL_DIR, "artifact"))
        runs[_key(row)] = dict(row, commit=_commit())
        print(f"  {layers:>2} layers, {r} rank(s) x {threads} thread(s): {row['wall_s']:7.1f} s, peak"
              f" {row['peak_rss_mib']:6.0f} MiB (tree {row['tree_rss_mib']:6.0f})", flush=True)
        part = _summary([runs[k] for k in sorted(runs)], tune)
        save(part)
    return part


def _key(r: dict) -> tuple:
    return r["layers"], r["ranks"], r["threads_per_process"]


def _summary(runs: list[dict], tune: bool) -> dict:
    one = [r for r in runs if r["ranks"] == 1 and _key(r)[2] == 2]
    xs = [r["layers"] for r in one]
    groups = {}  # (layers, threads per process) -> {ranks: sha}
    for r in runs:
        groups.setdefault((r["layers"], _key(r)[2]), {})[r["ranks"]] = r["model_sha256"]
    same = {f"{d} layers, {t} thread(s) per process": len(set(g.values())) == 1
            for (d, t), g in sorted(groups.items()) if len(g) > 1}
    return {
        "model": dict(SHAPE, dtype="bfloat16", weights="random normal, std 0.02"),
        "command": "sqc compile FOLDER --preset w3-s0.45 --calib TEXT --calib-samples 4 --seq-len 128"
                   + (" --no-tune" if not tune else ""),
        "threads": "threads_per_process in each run (OMP_NUM_THREADS)",
        "runs": runs,
        "per_layer": {k: _slope(xs, [r[k] for r in one]) for k in ("wall_s", "peak_rss_mib", "artifact_mib")},
        "limit_mib": LIMIT_MIB,
        "ranks_bit_identical": same,
    }


def _layer_mib() -> float:
    h, i = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    return 2 * (4 * h * h + 3 * h * i) / 2**20


def markdown(result: dict) -> str:
    lines = []
    if "llama7b" in result:
        r7 = result["llama7b"]
        lines += ["| layers | ranks x threads | wall s | peak RSS MiB (process) | sum over ranks MiB | forward s |"
                  " backward s | split s | fit s | kernels s | other s | artifact MiB |", "|" + "---|" * 12]
        for r in r7["runs"]:
            s = r["stage_seconds"]
            lines.append(f"| {r['layers']} | {r['ranks']} x {_key(r)[2]} | {r['wall_s']:.0f} |"
                         f" {r['peak_rss_mib']:.0f} | {r['tree_rss_mib']:.0f} | {s.get('calibration forward', 0):.0f} |"
                         f" {s.get('calibration backward', 0):.0f} | {s.get('SplitOutliers', 0):.0f} |"
                         f" {s.get('FitCodebook', 0):.0f} | {s.get('kernels', 0):.0f} | {r['other_s']:.0f} |"
                         f" {r['artifact_mib']:.0f} |")
        pl = r7["per_layer"]
        lines += ["", f"Per decoder layer (least squares over the 1-rank depths): {pl['wall_s']:.1f} s,"
                  f" {pl['peak_rss_mib']:.0f} MiB of peak RSS, {pl['artifact_mib']:.0f} MiB of artifact"
                  f" (a bf16 layer is {_layer_mib():.0f} MiB). Limit {r7['limit_mib']:.0f} MiB"
                  f" (8 GB). 1 and 2 ranks bit-identical at equal threads per process (model.safetensors sha256): "
                  + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in r7["ranks_bit_identical"].items()) + "."]
    if "smollm2" in result:
        sm = result["smollm2"]
        lines += ["", f"SmolLM2-135M: `{sm['compile_command']}` peaks at {sm['compile_peak_rss_mib']:.0f} MiB, "
                  f"{sm['ratio']:.2f}x the {sm['fp32_fresh_rss_mib']:.0f} MiB resident in a fresh fp32 process that "
                  f"has loaded the model and generated ({sm['ratio_to_fp32_peak']:.2f}x its "
                  f"{sm['fp32_fresh_peak_rss_mib']:.0f} MiB peak; limit {sm['limit_ratio']}x) with the kernel and "
                  f"XLA caches filled; the first compile on a machine (empty caches) peaks at "
                  f"{sm['cold_cache_compile_peak_rss_mib']:.0f} MiB ({sm['cold_cache_ratio']:.2f}x); "
                  f"perplexity ({sm['ppl_calibration']}) "
                  f"{sm['ppl_streamed']:.3f} streamed, {sm['ppl_whole_model']:.3f} whole-model."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="4,8,16,32")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--parts", default="llama7b,smollm2", help="what to (re)measure; the rest of the JSON is kept")
    ap.add_argument("--tune", action="store_true", help="tune the kernels (default: --no-tune)")
    ap.add_argument("--markdown", action="store_true", help="print the README table from the JSON and stop")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "scale.json"))
    a = ap.parse_args()
    result = {}
    if os.path.exists(a.out):
        with open(a.out) as fh:
            result = json.load(fh)
    if a.markdown:
        print(markdown(result))
        return
    parts = a.parts.split(",")

    def save(name, part):
        result[name] = part
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out + ".tmp", "w") as fh:
            json.dump(result, fh, indent=1)
        os.replace(a.out + ".tmp", a.out)

    if "llama7b" in parts:
        llama7b([int(d) for d in a.depths.split(",")], [int(r) for r in a.ranks.split(",")], a.tune,
                result.get("llama7b", {}), lambda part: save("llama7b", part))
    if "smollm2" in parts:
        save("smollm2", dict(smollm2(), commit=_commit()))
    print(markdown(result))


if __name__ == "__main__":
    main()
