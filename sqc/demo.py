"""The main job: compile SmolLM2-135M to 3-bit + 0.45 % and show quality, size, memory and a sample.

The default preset is ``w3-s0.45-g``: SqueezeLLM's format (3-bit per-row tables
+ 0.45 % exact sparse part) with sqc's guided, error-compensating fit.

Run with ``python -m sqc.demo`` (``--help`` for options).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sqc.demo", description=__doc__)
    ap.add_argument("--preset", default="w3-s0.45-g",
                    help="w3, w4, w3-s0.45, w4-s0.45 (k-means fits) or the same with -g (guided fits)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default=None, help="artifact folder (default: a temporary one)")
    ap.add_argument("--prompt", default="The Python tutorial explains")
    ap.add_argument("--rss-probe", help=argparse.SUPPRESS)  # internal: one fresh-process memory measurement
    args = ap.parse_args(argv)
    if args.rss_probe:
        return _rss_probe(args.rss_probe, args.prompt)

    import sqc
    from sqc.real import calibration_windows, decode_tokens_per_s, eval_windows, load_smollm2, perplexity
    from sqc.artifact import artifact_bits_per_weight

    torch.manual_seed(0)
    print("loading SmolLM2-135M (GGUF, de-quantized to fp32) ...", flush=True)
    model, tok = load_smollm2()
    windows = eval_windows(tok, args.eval_windows, args.seq_len)
    calib = calibration_windows(tok, args.calib_samples, args.seq_len)
    prompt_ids = tok(args.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    decode_fp = decode_tokens_per_s(model, prompt_ids)
    t = time.perf_counter()
    ppl_fp = perplexity(model, windows)
    print(f"FP32 perplexity {ppl_fp:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)

    def progress(stage, done, total):
        if done == total or done % 8 == 0:
            print(f"  {stage}: {done}/{total}", flush=True)

    t = time.perf_counter()
    compiled = sqc.compile(
        model, config=args.preset, calibration=[(w,) for w in calib], target="llvm", progress=progress
    )
    compile_s = time.perf_counter() - t
    gc.collect()
    print(compiled.report())
    t = time.perf_counter()
    ppl_q = perplexity(compiled, windows)
    eval_s = time.perf_counter() - t

    out = args.out or os.path.join(tempfile.mkdtemp(prefix="sqc-demo-"), "smollm2-" + args.preset)
    print("writing the artifact and tracing its decode steps for 512-4096 cache slots (a later process restores "
          "them instead of tracing: about 2 minutes here)", flush=True)
    t = time.perf_counter()
    sqc.save(compiled, out, overwrite=True, tokenizer=tok)
    print(f"wrote {out} in {time.perf_counter() - t:.0f} s")
    bpw = artifact_bits_per_weight(out)["overall"]
    wb = compiled.weight_bytes()

    decode_q = decode_tokens_per_s(compiled, prompt_ids)
    with torch.no_grad():
        gen = compiled.generate(prompt_ids, max_new_tokens=20, do_sample=False)
    sample = tok.decode(gen[0], skip_special_tokens=True)

    print()
    print(f"{'':<34}{'FP32':>12}{'sqc ' + args.preset:>16}")
    label = f"perplexity (tutorial, {len(windows)}x{args.seq_len})"
    print(f"{label:<34}{ppl_fp:>12.3f}{ppl_q:>16.3f}")
    print(f"{'stored bits / weight (artifact)':<34}{32.0:>12.2f}{bpw:>16.3f}")
    print(f"{'quantized-layer weights, MiB':<34}{wb['float_before'] / 2**20:>12.1f}{wb['packed_after'] / 2**20:>16.1f}")
    # what a user's process holds: a fresh process that loads the model (the fp32 GGUF / the artifact) and
    # generates, not this one (which also holds the compiler, JAX, TVM and the calibration data)
    fresh = {k: fresh_rss(k)["peak_rss_mib"] for k in ("fp32", out)}
    print(f"{'fresh load + generate, peak RSS MiB':<34}{fresh['fp32']:>12.0f}{fresh[out]:>16.0f}")
    kernels = ", ".join(sorted({m.kernel for m in compiled.quantized_modules().values()}))
    print(f"{'greedy decode, tokens/s':<34}{decode_fp:>12.1f}{decode_q:>16.1f}   (sqc kernels: {kernels})")
    print(f"compile {compile_s:.0f} s (stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in compiled.stage_seconds.items()) + f"); sqc eval {eval_s:.0f} s")
    print(f"artifact: {out}")
    print(f"sample: {sample!r}")
    return 0


def _rss_probe(what: str, prompt: str) -> int:
    """Load ``what`` ("fp32", or an artifact folder), generate 16 tokens, print the peak RSS in MiB."""
    import sqc
    from sqc.real import load_smollm2

    if what == "fp32":
        model, tok = load_smollm2()
        gen = model.generate
    else:
        from transformers import AutoTokenizer

        model = sqc.load(what)
        tok = AutoTokenizer.from_pretrained(os.path.join(what, "tokenizer"))
        gen = model.generate
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        gen(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    with open("/proc/self/status") as fh:
        status = dict(line.split(":", 1) for line in fh if ":" in line)
    print(f"peak_rss_mib {int(status['VmHWM'].split()[0]) / 1024:.1f}")
    print(f"rss_mib {int(status['VmRSS'].split()[0]) / 1024:.1f}")
    return 0


def fresh_rss(what: str) -> dict[str, float]:
    """A fresh process that loads ``what`` ("fp32" or an artifact folder) and generates 16 tokens:
    {"peak_rss_mib": its high-water mark, "rss_mib": its resident size after generating}."""
    import subprocess

    p = subprocess.run([sys.executable, "-m", "sqc.demo", "--rss-probe", what], capture_output=True, text=True)
    out = {}
    for line in p.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key in ("peak_rss_mib", "rss_mib"):
            out[key] = float(value)
    if len(out) != 2:
        raise RuntimeError(f"the fresh-process memory probe of {what} failed:\n{p.stderr[-2000:]}")
    return out


if __name__ == "__main__":
    sys.exit(main())
