"""SmolLM2-135M end to end: batch-1 greedy decode and prefill, sqc against torch fp32 eager, one run.

    python benchmarks/e2e.py [--threads 2] [--new-tokens 128] [--prefill 512] [--fisher-windows 8]

Artifacts for ``w3-s0.45`` and ``w4`` are compiled once (Fisher from
``--fisher-windows`` library windows) into ``benchmarks/.e2e-artifacts`` and
reused. Each setting is then measured in its own subprocess, so that its peak
RSS is its own: load, reset the peak, prefill ``--prefill`` tokens, decode
``--new-tokens`` tokens with ``generate`` (greedy, KV cache), and a second
decode with timing hooks that splits a token's time into quantized linears,
lm_head, attention (without its projections), everything else in the model,
and what ``generate`` spends outside the model (Python, sampling, cache).
Writes ``benchmarks/results/e2e.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
ART = os.path.join(HERE, ".e2e-artifacts")
SETTINGS = ("fp32", "w3-s0.45", "w4")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> None:
    release_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def release_memory() -> None:
    from sqc.compiler import _release_memory

    _release_memory()


def compile_artifacts(fisher_windows: int) -> None:
    import torch

    import sqc
    from sqc.passes.annotate_sensitivity import fisher_information
    from sqc.real import calibration_windows, load_smollm2

    todo = [s for s in SETTINGS[1:] if not os.path.exists(os.path.join(ART, s, "manifest.json"))]
    if not todo:
        return
    model, tok = load_smollm2()
    calib = calibration_windows(tok, n_samples=fisher_windows)
    t = time.perf_counter()
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    fisher = fisher_information(model, [(w,) for w in calib], names, call_kwargs={"use_cache": False})
    print(f"Fisher from {fisher_windows} windows: {time.perf_counter() - t:.1f} s", flush=True)
    for preset in todo:
        model, _ = load_smollm2()
        c = sqc.compile(model, (calib[0][:, :64],), config=preset, sensitivity=fisher, target="llvm")
        sqc.save(c, os.path.join(ART, preset), overwrite=True, tokenizer=tok, source="smollm2")
        print(f"compiled {preset}: stages {json.dumps({k: round(v, 1) for k, v in c.stage_seconds.items()})}", flush=True)
        del c, model
        release_memory()
    del fisher


def measure(setting: str, new_tokens: int, prefill: int) -> dict:
    import torch

    import sqc
    from sqc.real import eval_windows, load_smollm2
    from sqc.runtime.qlinear import SqcLinear

    model, tok = load_smollm2()
    if setting != "fp32":
        model = sqc.load(os.path.join(ART, setting)).model
    model.eval()
    qmods = [m for m in model.modules() if isinstance(m, SqcLinear)]
    kernels = sorted({m.kernel for m in qmods})
    resident = sum(m.resident_bytes() for m in qmods)
    _reset_peak_rss()
    ids = eval_windows(tok, n_windows=1, seq_len=prefill)[0]
    prompt = ids[:, :16]
    with torch.no_grad():
        model(ids[:, :32], use_cache=False)  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            model(ids, use_cache=False)
            times.append(time.perf_counter() - t)
        prefill_s = sorted(times)[1]
        model.generate(prompt, max_new_tokens=4, do_sample=False)
        t = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        decode_s = time.perf_counter() - t
        n_new = out.shape[1] - prompt.shape[1]
        breakdown = decode_breakdown(model, prompt, new_tokens)
    return {
        "setting": setting,
        "kernels": kernels,
        "prefill_tokens": prefill,
        "prefill_tok_s": prefill / prefill_s,
        "decode_tokens": n_new,
        "decode_tok_s": n_new / decode_s,
        "ms_per_token": 1e3 * decode_s / n_new,
        "breakdown_ms_per_token": breakdown,
        "peak_rss_mib": _status_kib("VmHWM") / 1024,
        "quantized_resident_bytes": resident,
        "text": tok.decode(out[0, prompt.shape[1]:prompt.shape[1] + 24]),
    }


def decode_breakdown(model, prompt, new_tokens: int) -> dict:
    """Per-token ms by part, from forward hooks (pre/post) on the modules of one greedy decode."""
    import torch

    from sqc.runtime.qlinear import SqcLinear

    spent = {"linears": 0.0, "lm_head": 0.0, "attention_incl_proj": 0.0, "proj_in_attention": 0.0, "model": 0.0}
    starts = {}
    handles = []

    def watch(mod, key, inside_attn=False):
        def pre(m, args, kwargs=None):
            starts[id(m)] = time.perf_counter()

        def post(m, args, out, kwargs=None):
            dt = time.perf_counter() - starts.pop(id(m))
            spent[key] += dt
            if inside_attn:
                spent["proj_in_attention"] += dt

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))

    for name, m in model.named_modules():
        if isinstance(m, (SqcLinear, torch.nn.Linear)) and name != "lm_head":
            watch(m, "linears", inside_attn=".self_attn." in name)
        elif name == "lm_head":
            watch(m, "lm_head")
        elif name.endswith("self_attn"):
            watch(m, "attention_incl_proj")
    watch(model, "model")
    try:
        t = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        total = time.perf_counter() - t
    finally:
        for h in handles:
            h.remove()
    n = out.shape[1] - prompt.shape[1]
    attn_core = spent["attention_incl_proj"] - spent["proj_in_attention"]
    rest = spent["model"] - spent["linears"] - spent["lm_head"] - attn_core
    per = lambda v: 1e3 * v / n  # noqa: E731
    return {
        "total": per(total),
        "quantized_linears": per(spent["linears"]),
        "lm_head": per(spent["lm_head"]),
        "attention": per(attn_core),
        "everything_else_in_model": per(rest),
        "outside_model (generate loop, Python)": per(total - spent["model"]),
        "note": "measured with timing hooks (their own cost lands in the parts they wrap)",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--fisher-windows", type=int, default=8)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "e2e.json"))
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import sqc  # noqa: F401  (first: it sets the thread pools' spin counts before torch loads OpenMP)
    import torch

    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.one, args.new_tokens, args.prefill)))
        return
    compile_artifacts(args.fisher_windows)
    results = []
    for s in SETTINGS:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", s, "--threads", str(args.threads),
               "--new-tokens", str(args.new_tokens), "--prefill", str(args.prefill)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"measuring {s} failed:\n{p.stderr[-3000:]}")
        results.append(json.loads(p.stdout.strip().splitlines()[-1]))
    fp = results[0]
    from sqc.real import load_smollm2  # fp32 bytes of the layers sqc quantizes

    model, _ = load_smollm2()
    fp_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n != "lm_head")
    print(f"{'setting':<10} {'decode tok/s':>12} {'x fp32':>7} {'prefill tok/s':>13} {'x fp32':>7} {'peak RSS MiB':>12} {'q-weights':>10}")
    for r in results:
        r["decode_vs_fp32"] = r["decode_tok_s"] / fp["decode_tok_s"]
        r["prefill_vs_fp32"] = r["prefill_tok_s"] / fp["prefill_tok_s"]
        r["resident_over_fp32"] = r["quantized_resident_bytes"] / fp_bytes if r["quantized_resident_bytes"] else 1.0
        print(f"{r['setting']:<10} {r['decode_tok_s']:>12.1f} {r['decode_vs_fp32']:>7.2f} {r['prefill_tok_s']:>13.1f} "
              f"{r['prefill_vs_fp32']:>7.2f} {r['peak_rss_mib']:>12.0f} {r['resident_over_fp32']:>10.4f}")
    print("ms per decoded token:")
    for r in results:
        b = r["breakdown_ms_per_token"]
        print(f"  {r['setting']:<10} " + "  ".join(f"{k.split(' ')[0]} {v:.2f}" for k, v in b.items() if k != "note"))
    out = {"threads": args.threads, "fp32_linear_bytes": fp_bytes, "results": results}
    from sqc.codegen.build import atomic_write

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write(args.out, json.dumps(out, indent=1).encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
