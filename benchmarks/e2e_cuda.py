"""End-to-end decode on one GPU: sqc's CUDA kernels in the compiled step against torch fp16, eager and graphed.

Two steps, because the GPU machines have no TVM:

* ``python benchmarks/e2e_cuda.py --prepare DIR --arch sm_90`` (where TVM and nvcc are) builds one CUDA bundle
  with the default kernels of every linear shape of the models below (3-bit codes, 0.45 % sparse: the
  ``w3-s0.45`` storage) and writes it to ``DIR``.
* ``python benchmarks/e2e_cuda.py --bundle DIR`` (on the GPU) builds each model with random fp16 weights on
  the GPU, makes a copy whose decoder linears are sqc layers (:func:`sqc.cuda_check.random_packed`: random
  3-bit codes and tables, each entry sparse with probability 0.45 %) with the bundle's kernels attached by :meth:`sqc.runtime.cuda.kernels.CudaBundle.attach`,
  and times greedy decoding. Decode speed depends on the shapes, not on the values: the real SmolLM2 weights
  (98 MB) do not travel to the GPU machine, so "smollm2-135m" is its configuration with random weights.

Settings, all through :class:`sqc.runtime.decode.CompiledDecoder` (a static KV cache, the same prompt):

* ``torch fp16 eager``: the fp16 model, one eager forward per token;
* ``torch fp16 + CUDA graphs``: the fp16 model, the step compiled by Inductor and replayed as one CUDA graph;
* ``sqc eager``: the sqc model, eager (shows what each layer call's launch costs);
* ``sqc + CUDA graphs``: the sqc model, compiled and graphed like the fp16 baseline.

Timing: each setting generates ``SHORT`` and ``LONG`` new tokens after the prompt (CUDA synchronised, wall
clock); decode tokens/s is ``(LONG - SHORT) / (t_long - t_short)``, which cancels the prefill, the first
(traced) step and the graph capture. Settings are interleaved over ``--rounds`` rounds; medians. Checks: the
graphed sqc step gives the tokens of the eager sqc step, and the graphed fp16 step those of eager fp16.
Writes ``benchmarks/results/e2e_cuda.json``. Siblings (q/k/v, gate/up) are not fused here, unlike
``sqc.compile``: every linear is its own launch.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MODELS = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0),
    "llama-7b-shape": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
                           max_position_embeddings=4096, rms_norm_eps=1e-5),
}
BITS, DENSITY = 3, 0.0045
PROMPT, SHORT, LONG = 16, 16, 144
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each decoder linear of a LLaMA configuration."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), "gate_proj": (i, h),
            "up_proj": (i, h), "down_proj": (h, i)}


def cuda_key(rows: int, k: int) -> dict:
    from sqc.runtime.layout import col_dtype_for

    return {"rows": rows, "in_features": k, "bits": BITS, "sparse": True, "lut_dtype": "float16",
            "col_dtype": str(col_dtype_for(k)).removeprefix("torch."), "val_dtype": "float16"}


def bundle_keys(models=MODELS) -> list[dict]:
    keys = []
    for cfg in models.values():
        for rows, k in linear_shapes(cfg).values():
            if cuda_key(rows, k) not in keys:
                keys.append(cuda_key(rows, k))
    return keys


def prepare(folder: str, arch: str) -> None:
    """The default kernels of every linear shape of :data:`MODELS` in one bundle."""
    from sqc.codegen.cuda import CudaKey, build_check_bundle

    t = time.perf_counter()
    bundle = build_check_bundle([CudaKey(**k) for k in bundle_keys()], arch, all_candidates=False)
    bundle.write(folder)
    print(f"wrote {len(bundle.plan['kernels'])} kernels for {arch} to {folder} "
          f"({len(bundle.fatbin) / 1e6:.1f} MB fatbin) in {time.perf_counter() - t:.0f} s")


# -- building the models --------------------------------------------------------------------------

def fp16_model(cfg: dict, device) -> torch.nn.Module:
    """A LLaMA of configuration ``cfg`` with transformers' random initialisation, fp16, on ``device``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**cfg), dtype=torch.float16)
    return model.eval()


def quantize_random(model: torch.nn.Module, bundle, target: str) -> int:
    """Replace every decoder linear of ``model`` with an sqc layer of random codes and attach the bundle's
    kernels (the plan's slots are pointed at the layers by their key, then :meth:`CudaBundle.attach`)."""
    from sqc.cuda_check import random_packed
    from sqc.runtime.cuda.kernels import layer_key
    from sqc.runtime.modules import replace_module
    from sqc.runtime.qlinear import SqcLinear

    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(1)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LINEARS]
    for name in names:
        lin = model.get_submodule(name)
        packed = random_packed(cuda_key(lin.out_features, lin.in_features), gen, DENSITY)
        replace_module(model, name, SqcLinear(packed, None))
    slots = {}
    for slot in bundle.plan["slots"]:
        slot["layers"] = []
        slots[(json.dumps(slot["key"], sort_keys=True), slot["bucket"])] = slot
    for name in names:
        key = json.dumps(layer_key(model.get_submodule(name)), sort_keys=True)
        for bucket in ("1", "2-16", "17+"):
            slots[(key, bucket)]["layers"].append(name)
    bundle.attach(model, target)
    kinds = {m.kernel for m in model.modules() if isinstance(m, SqcLinear)}
    if len(kinds) != 1 or not next(iter(kinds)).startswith("tvm-cuda"):
        raise RuntimeError(f"not every layer runs a CUDA kernel: {sorted(kinds)}")
    return len(names)


# -- timing ---------------------------------------------------------------------------------------

def timed_generate(dec, ids: torch.Tensor, n: int) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = dec.generate(ids, max_new_tokens=n, min_new_tokens=n)
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


def run(folder: str, out: str, models: list[str], rounds: int) -> None:
    from sqc.runtime.cuda.kernels import CudaBundle
    from sqc.runtime.decode import CompiledDecoder

    dev = torch.device("cuda", 0)
    props = torch.cuda.get_device_properties(dev)
    result = {"device": props.name, "capability": [props.major, props.minor], "torch": torch.__version__,
              "python": platform.python_version(), "bits": BITS, "density": DENSITY, "prompt": PROMPT,
              "new_tokens": [SHORT, LONG], "rounds": rounds, "fused_siblings": False,
              "timing": "wall clock around generate (CUDA synchronised); decode tokens/s = (LONG - SHORT) / "
                        "(t_long - t_short); settings interleaved; medians over rounds", "models": {}}
    for name in models:
        cfg = MODELS[name]
        t0 = time.perf_counter()
        fp16 = fp16_model(cfg, dev)
        sqc_model = copy.deepcopy(fp16)
        n_layers = quantize_random(sqc_model, CudaBundle.read(folder), "cuda -arch=sm_90")
        torch.cuda.synchronize()
        build_s = time.perf_counter() - t0
        mem = {"fp16_bytes": sum(t.nbytes for t in fp16.parameters()),
               "sqc_bytes": sum(t.nbytes for t in sqc_model.parameters()) + sum(
                   m.resident_bytes() for m in sqc_model.modules() if hasattr(m, "resident_bytes"))}
        settings = {
            "torch fp16 eager": CompiledDecoder(fp16, compile_step=False),
            "torch fp16 + CUDA graphs": CompiledDecoder(fp16),
            "sqc eager": CompiledDecoder(sqc_model, compile_step=False),
            "sqc + CUDA graphs": CompiledDecoder(sqc_model),
        }
        ids = torch.randint(0, cfg["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(2))
        tokens, warm_s = {}, {}
        with torch.no_grad():
            for label, dec in settings.items():  # warm-up: traces and compiles the step once per length
                t = time.perf_counter()
                timed_generate(dec, ids, SHORT)
                _, tokens[label] = timed_generate(dec, ids, LONG)
                warm_s[label] = time.perf_counter() - t
                print(f"{name}: {label} warm in {warm_s[label]:.1f} s ({dec.stats.get('replay', 'eager')})",
                      flush=True)
            tps = {label: [] for label in settings}
            for _ in range(rounds):
                for label, dec in settings.items():
                    ts, _ = timed_generate(dec, ids, SHORT)
                    tl, _ = timed_generate(dec, ids, LONG)
                    tps[label].append((LONG - SHORT) / (tl - ts))
        med = {label: statistics.median(v) for label, v in tps.items()}
        row = {
            "config": cfg, "sqc_layers": n_layers, "build_s": build_s, "warm_s": warm_s, "memory": mem,
            "tokens_per_s": med, "all_tokens_per_s": tps,
            "sqc_graphs_vs_fp16_eager": med["sqc + CUDA graphs"] / med["torch fp16 eager"],
            "sqc_graphs_vs_fp16_graphs": med["sqc + CUDA graphs"] / med["torch fp16 + CUDA graphs"],
            "tokens_equal": {
                "sqc graphed == sqc eager": bool(torch.equal(tokens["sqc + CUDA graphs"], tokens["sqc eager"])),
                "fp16 graphed == fp16 eager": bool(torch.equal(tokens["torch fp16 + CUDA graphs"],
                                                               tokens["torch fp16 eager"]))},
            "replay": settings["sqc + CUDA graphs"].stats.get("replay"),
        }
        result["models"][name] = row
        print(f"\n{name} ({props.name}): decode tokens/s, median of {rounds}")
        for label, v in med.items():
            print(f"  {label:<26} {v:9.1f}")
        print(f"  sqc graphed / fp16 eager {row['sqc_graphs_vs_fp16_eager']:.2f}x, / fp16 graphed "
              f"{row['sqc_graphs_vs_fp16_graphs']:.2f}x; tokens equal: {row['tokens_equal']}", flush=True)
        del settings, fp16, sqc_model
        torch.cuda.empty_cache()
        _write(out, result)  # after each model: a later failure keeps what was measured


def _write(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prepare", metavar="DIR", help="build the kernel bundle into DIR (needs TVM and nvcc)")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--bundle", metavar="DIR", help="run on the GPU with the bundle in DIR")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "e2e_cuda.json"))
    args = ap.parse_args(argv)
    if args.prepare:
        prepare(args.prepare, args.arch)
    elif args.bundle:
        if not torch.cuda.is_available():
            sys.exit("e2e_cuda: --bundle runs on an NVIDIA GPU (torch.cuda.is_available() is False)")
        models = [m for m in args.models.split(",") if m]
        unknown = [m for m in models if m not in MODELS]
        if unknown:
            sys.exit(f"e2e_cuda: unknown models {unknown}; choose from {list(MODELS)}")
        run(args.bundle, args.out, models, args.rounds)
    else:
        ap.error("give --prepare DIR (here) or --bundle DIR (on the GPU)")


if __name__ == "__main__":
    main()
