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
Writes ``benchmarks/results/scale.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
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


def run(layers: int, ranks: int, text_file: str, tune: bool, out: str) -> dict:
    folder = checkpoint(layers)
    args = ["compile", folder, "--preset", "w3-s0.45", "--calib", text_file, "--calib-samples", "4",
            "--seq-len", "128", "--out", out, "--force"] + ([] if tune else ["--no-tune"])
    head = [sys.executable, "-m", "sqc"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "sqc"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2" if ranks == 1 else "1"))
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(head + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"compile of {layers} layers on {ranks} rank(s) failed ({proc.returncode}):\n{log[-4000:]}")
    with open(os.path.join(out, "report.json")) as fh:
        stages = json.load(fh)["stage_seconds"]
    sha = hashlib.sha256()
    with open(os.path.join(out, "model.safetensors"), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            sha.update(block)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
    shutil.rmtree(out)
    return {"layers": layers, "ranks": ranks, "wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024,
            "tree_rss_mib": tree_peak[0] / 1024, "stage_seconds": stages, "other_s": wall - sum(stages.values()),
            "artifact_mib": size / 2**20, "model_sha256": sha.hexdigest()}


def _slope(xs, ys) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="4,8,16,32")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--tune", action="store_true", help="tune the kernels (default: --no-tune)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "scale.json"))
    a = ap.parse_args()
    depths = [int(d) for d in a.depths.split(",")]
    ranks = [int(r) for r in a.ranks.split(",")]
    from sqc.real import protocol_text

    os.makedirs(MODEL_DIR, exist_ok=True)
    text_file = os.path.join(MODEL_DIR, "calibration.txt")
    with open(text_file, "w") as fh:
        fh.write(protocol_text("library"))
    runs = []
    for layers in depths:  # every depth on one rank first: the depth series is the one read together
        for r in ranks:
            if r == 1 or layers == max(depths):
                row = run(layers, r, text_file, a.tune, os.path.join(MODEL_DIR, "artifact"))
                runs.append(row)
                print(f"  {layers:>2} layers, {r} rank(s): {row['wall_s']:7.1f} s, peak {row['peak_rss_mib']:6.0f} MiB"
                      f" (tree {row['tree_rss_mib']:6.0f})", flush=True)
    one = [r for r in runs if r["ranks"] == 1]
    xs = [r["layers"] for r in one]
    result = {
        "model": dict(SHAPE, dtype="bfloat16", weights="random normal, std 0.02"),
        "command": "sqc compile FOLDER --preset w3-s0.45 --calib TEXT --calib-samples 4 --seq-len 128"
                   + (" --no-tune" if not a.tune else ""),
        "threads": "2 (1 rank), 1 per rank (2 ranks)",
        "runs": runs,
        "per_layer": {"wall_s": _slope(xs, [r["wall_s"] for r in one]),
                      "peak_rss_mib": _slope(xs, [r["peak_rss_mib"] for r in one]),
                      "artifact_mib": _slope(xs, [r["artifact_mib"] for r in one])},
        "limit_mib": LIMIT_MIB,
    }
    same = {}
    for layers in depths:
        shas = {r["model_sha256"] for r in runs if r["layers"] == layers}
        if len([r for r in runs if r["layers"] == layers]) > 1:
            same[str(layers)] = len(shas) == 1
    result["ranks_bit_identical"] = same
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".tmp", "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(a.out + ".tmp", a.out)
    print(f"\n{'layers':>6} {'ranks':>5} {'wall s':>8} {'peak MiB':>9} {'tree MiB':>9} {'fwd s':>7} {'bwd s':>7}"
          f" {'fit s':>7} {'kern s':>7} {'other s':>7} {'artifact MiB':>12}")
    for r in runs:
        s = r["stage_seconds"]
        print(f"{r['layers']:>6} {r['ranks']:>5} {r['wall_s']:>8.1f} {r['peak_rss_mib']:>9.0f} {r['tree_rss_mib']:>9.0f}"
              f" {s.get('calibration forward', 0):>7.1f} {s.get('calibration backward', 0):>7.1f}"
              f" {s.get('FitCodebook', 0):>7.1f} {s.get('kernels', 0):>7.1f} {r['other_s']:>7.1f}"
              f" {r['artifact_mib']:>12.0f}")
    pl = result["per_layer"]
    print(f"per layer: {pl['wall_s']:.1f} s, {pl['peak_rss_mib']:.0f} MiB peak, {pl['artifact_mib']:.0f} MiB artifact;"
          f" limit {LIMIT_MIB:.0f} MiB; 1 vs 2 ranks bit-identical: {same}")


if __name__ == "__main__":
    main()
