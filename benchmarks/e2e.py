"""SmolLM2-135M end to end: batch-1 greedy decode and prefill, sqc against torch baselines, one run.

    python benchmarks/e2e.py [--threads 2] [--new-tokens 128] [--prompt 512] [--rounds 3] [--fisher-windows 8]

Artifacts for ``w3-s0.45`` and ``w4`` (the default compile: fused siblings, int8 head) are compiled once
into ``benchmarks/.e2e-artifacts`` and reused.

Timing (one process, settings interleaved round by round, medians over ``--rounds``):

* ``fp32`` / ``bf16``: torch eager, ``transformers`` ``generate`` (greedy, its default cache);
* ``fp32-compiled``: the same model decoded by the mechanism sqc uses — a static KV cache and
  ``torch.compile`` (Inductor) around one decode step (:class:`sqc.runtime.decode.CompiledDecoder`),
  the fair baseline for the glue around the kernels;
* ``w3-s0.45`` / ``w4``: ``sqc.load`` of the artifact, ``compiled.generate`` (the compiled step);
  ``w3-s0.45-eager``: the same artifact through transformers' eager ``generate``.

Each decode is a 512-token prompt (the first eval window) and 128 new tokens; prefill is one forward
over the 512 tokens (all logits, like the fp32 baseline). The sqc decode is split per token into the
quantized linears and the head (timers around the kernels' own calls, which run as opaque ops inside
the compiled step), the rest of the step (attention, norms, rotary, cache: the glue) and the time
outside the step (the Python loop).

Memory: for ``fp32`` and ``w3-s0.45`` a fresh process loads the model (the fp32 GGUF / the artifact),
prefills and generates 32 tokens, and reports its peak resident memory (VmHWM).

Writes ``benchmarks/results/e2e.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
ART = os.path.join(HERE, ".e2e-artifacts")
PRESETS = ("w3-s0.45", "w4")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def compile_artifacts(fisher_windows: int) -> dict:
    import torch

    import sqc
    from sqc.passes.annotate_sensitivity import fisher_information
    from sqc.real import calibration_windows, load_smollm2

    todo = [s for s in PRESETS if not os.path.exists(os.path.join(ART, s, "manifest.json"))]
    if not todo:
        return {}
    model, tok = load_smollm2()
    calib = calibration_windows(tok, n_samples=fisher_windows)
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    fisher = fisher_information(model, [(w,) for w in calib], names, call_kwargs={"use_cache": False})
    stages = {}
    for preset in todo:
        model, _ = load_smollm2()
        c = sqc.compile(model, (calib[0][:, :64],), config=preset, sensitivity=fisher, target="llvm")
        sqc.save(c, os.path.join(ART, preset), overwrite=True, tokenizer=tok, source="smollm2")
        stages[preset] = c.stage_seconds
        print(f"compiled {preset}: stages {json.dumps({k: round(v, 1) for k, v in c.stage_seconds.items()})}", flush=True)
        del c, model
    return stages


class KernelTimers:
    """Seconds spent inside the quantized linears' and the head's kernels (their own Python entry points)."""

    def __init__(self) -> None:
        from sqc.runtime.cpu.kernels import CpuLutKernels
        from sqc.runtime.int8 import Int8Kernels

        self.spent = {"quantized_linears": 0.0, "lm_head": 0.0}
        self._orig = []
        for cls, key in ((CpuLutKernels, "quantized_linears"), (Int8Kernels, "lm_head")):
            run = cls.run

            def timed(self_, *a, _run=run, _key=key):
                if a[0].numel() != self_.in_features:  # prefill calls are not decode time
                    return _run(self_, *a)
                t = time.perf_counter()
                try:
                    return _run(self_, *a)
                finally:
                    self.spent[_key] += time.perf_counter() - t

            self._orig.append((cls, run))
            cls.run = timed

    def reset(self) -> None:
        for k in self.spent:
            self.spent[k] = 0.0

    def remove(self) -> None:
        for cls, run in self._orig:
            cls.run = run


def run_timing(args) -> dict:
    import torch

    import sqc
    from sqc.real import eval_windows, load_smollm2
    from sqc.runtime.decode import CompiledDecoder

    fp32, tok = load_smollm2()
    fp32.eval()
    bf16, _ = load_smollm2(torch.bfloat16)
    bf16.eval()
    ids = eval_windows(tok, n_windows=1, seq_len=args.prompt)[0]
    models = {"fp32": fp32, "bf16": bf16, "fp32-compiled": fp32}
    for p in PRESETS:
        models[p] = sqc.load(os.path.join(ART, p))
    models["w3-s0.45-eager"] = models["w3-s0.45"]
    decoders = {"fp32-compiled": CompiledDecoder(fp32)}
    gen = {}
    for name, m in models.items():
        if name in ("fp32", "bf16", "w3-s0.45-eager"):
            mm = m.model if hasattr(m, "quant_config") else m
            gen[name] = lambda n, mm=mm: mm.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        elif name == "fp32-compiled":
            gen[name] = lambda n: decoders["fp32-compiled"].generate(ids, max_new_tokens=n, min_new_tokens=n)
        else:
            gen[name] = lambda n, m=m: m.generate(ids, max_new_tokens=n, min_new_tokens=n)
    first = {}
    timers = KernelTimers()
    # three float models and two artifacts in one process: move what is loaded out of the collector's reach, so a
    # full collection over their objects does not land inside one setting's decode loop
    import gc

    gc.collect()
    gc.freeze()
    texts = {}
    with torch.no_grad():
        for name in models:  # warm-up: compile each step once (reported), run the eager paths once
            t = time.perf_counter()
            out = gen[name](4)
            first[name] = time.perf_counter() - t
            texts[name] = out
        decode = {n: [] for n in models}
        prefill = {n: [] for n in models}
        parts = {n: [] for n in PRESETS}
        for _ in range(args.rounds):
            for name in models:
                # decode time per token: (generate N tokens - generate 1 token) / (N - 1), so the prefill
                # both include cancels
                t = time.perf_counter()
                gen[name](1)
                t1 = time.perf_counter() - t
                timers.reset()
                t = time.perf_counter()
                out = gen[name](args.new_tokens)
                dt = time.perf_counter() - t - t1
                n_new = out.shape[1] - ids.shape[1] - 1
                decode[name].append(dt / n_new)
                texts[name] = out[0, ids.shape[1]:ids.shape[1] + 24]
                if name in PRESETS:
                    parts[name].append({k: v / n_new for k, v in timers.spent.items()})
                mm = models[name].model if hasattr(models[name], "quant_config") else models[name]
                t = time.perf_counter()
                mm(ids, use_cache=False)
                prefill[name].append(time.perf_counter() - t)
    timers.remove()
    # the sqc step itself, timed from inside CompiledDecoder's loop is not exposed: time one step directly
    res = {}
    for name in models:
        ms = 1e3 * statistics.median(decode[name])
        res[name] = {"ms_per_token": ms, "decode_tok_s": 1e3 / ms, "prefill_s": statistics.median(prefill[name]),
                     "prefill_tok_s": args.prompt / statistics.median(prefill[name]),
                     "first_call_s": first[name], "text": tok.decode(texts[name])}
        if name in PRESETS:
            q = 1e3 * statistics.median(p["quantized_linears"] for p in parts[name])
            h = 1e3 * statistics.median(p["lm_head"] for p in parts[name])
            res[name]["breakdown_ms_per_token"] = {
                "total": ms, "quantized_linears": q, "lm_head": h, "rest_of_step (attention, norms, cache)": None,
                "outside_step (Python loop)": None}
            res[name]["decode_stats"] = models[name].decode_stats
    res["fp32-compiled"]["decode_stats"] = dict(decoders["fp32-compiled"].stats)
    step_split(models, ids, res, args)
    return res


def step_split(models, ids, res, args) -> None:
    """Split the sqc compiled step's token time into the step itself and the loop around it."""
    import torch

    for name in PRESETS:
        dec = models[name].__dict__["_decoder"]
        dec.step_times = times = []
        try:
            with torch.no_grad():
                models[name].generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        finally:
            dec.step_times = None
        times = times[1:]  # the first step runs through TorchDynamo's guards, the others replay the graph
        step_ms = 1e3 * statistics.median(times)
        b = res[name]["breakdown_ms_per_token"]
        b["rest_of_step (attention, norms, cache)"] = step_ms - b["quantized_linears"] - b["lm_head"]
        b["outside_step (Python loop)"] = b["total"] - step_ms
        b["step"] = step_ms


def measure_rss(setting: str, prompt: int) -> dict:
    """In a fresh process: load, prefill, generate 32 tokens; peak RSS and what is imported."""
    import torch

    from sqc.real import eval_windows, load_smollm2

    t = time.perf_counter()
    if setting == "fp32":
        model, tok = load_smollm2()
        gen = lambda: model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)  # noqa: E731
    else:
        import sqc
        from transformers import AutoTokenizer

        c = sqc.load(os.path.join(ART, setting))
        tok = AutoTokenizer.from_pretrained(os.path.join(ART, setting, "tokenizer"))
        gen = lambda: c.generate(ids, max_new_tokens=32, min_new_tokens=32)  # noqa: E731
    ids = eval_windows(tok, n_windows=1, seq_len=prompt)[0]
    with torch.no_grad():
        gen()
    return {"setting": setting, "peak_rss_mib": _status_kib("VmHWM") / 1024, "seconds": time.perf_counter() - t,
            "tvm_compiler_imported": "tvm" in sys.modules, "jax_imported": "jax" in sys.modules}


def markdown(path: str) -> str:
    """The README table, generated from ``e2e.json``."""
    with open(path) as fh:
        d = json.load(fh)
    res, rss = d["results"], d["fresh_process_rss"]
    lines = ["| setting | ms/token | decode tok/s | × fp32 eager | × fp32 compiled | prefill tok/s | × fp32 | first call s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        lines.append(f"| {name} | {r['ms_per_token']:.2f} | {r['decode_tok_s']:.1f} | {r['decode_vs_fp32']:.2f} | "
                     f"{r['decode_vs_fp32_compiled']:.2f} | {r['prefill_tok_s']:.0f} | {r['prefill_vs_fp32']:.2f} | "
                     f"{r['first_call_s']:.1f} |")
    lines += ["", "| sqc setting | ms/token | quantized linears | lm_head | rest of the step | outside the step |",
              "|---|---|---|---|---|---|"]
    for name in PRESETS:
        b = res[name]["breakdown_ms_per_token"]
        lines.append(f"| {name} | {b['total']:.2f} | {b['quantized_linears']:.2f} | {b['lm_head']:.2f} | "
                     f"{b['rest_of_step (attention, norms, cache)']:.2f} | {b['outside_step (Python loop)']:.2f} |")
    lines += ["", "| fresh process (load, prefill 512, generate 32) | peak RSS MiB | first launch MiB | TVM imported | "
              "JAX imported |", "|---|---|---|---|---|"]
    for s_, r in rss.items():
        first = r.get("first_launch_peak_rss_mib")
        lines.append(f"| {s_} | {r['peak_rss_mib']:.0f} | {'' if first is None else f'{first:.0f}'} | "
                     f"{r['tvm_compiler_imported']} | {r['jax_imported']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fisher-windows", type=int, default=8)
    ap.add_argument("--rss", help=argparse.SUPPRESS)
    ap.add_argument("--markdown", action="store_true", help="print the README tables from --out and exit")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "e2e.json"))
    args = ap.parse_args()
    if args.markdown:
        print(markdown(args.out))
        return
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import sqc  # noqa: F401
    import torch

    torch.set_num_threads(args.threads)
    if args.rss:
        print(json.dumps(measure_rss(args.rss, args.prompt)))
        return
    stages = compile_artifacts(args.fisher_windows)
    rss = {}
    for s in ("fp32", "w3-s0.45"):
        # twice: a first launch may compile the decode step in-process (Inductor's disk cache is cold for these
        # shapes); the second loads it from the cache, as every later launch does
        runs = []
        for _ in range(2):
            cmd = [sys.executable, os.path.abspath(__file__), "--rss", s, "--threads", str(args.threads),
                   "--prompt", str(args.prompt)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"measuring the memory of {s} failed:\n{p.stderr[-3000:]}")
            runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
        rss[s] = dict(runs[1], first_launch_peak_rss_mib=runs[0]["peak_rss_mib"])
    res = run_timing(args)
    fp, fpc = res["fp32"], res["fp32-compiled"]
    print(f"{'setting':<16} {'ms/token':>9} {'tok/s':>7} {'x fp32':>7} {'x fp32-c':>8} {'prefill tok/s':>13} {'x fp32':>7} "
          f"{'first call s':>12}")
    for name, r in res.items():
        r["decode_vs_fp32"] = fp["ms_per_token"] / r["ms_per_token"]
        r["decode_vs_fp32_compiled"] = fpc["ms_per_token"] / r["ms_per_token"]
        r["prefill_vs_fp32"] = r["prefill_tok_s"] / fp["prefill_tok_s"]
        print(f"{name:<16} {r['ms_per_token']:>9.2f} {r['decode_tok_s']:>7.1f} {r['decode_vs_fp32']:>7.2f} "
              f"{r['decode_vs_fp32_compiled']:>8.2f} {r['prefill_tok_s']:>13.1f} {r['prefill_vs_fp32']:>7.2f} "
              f"{r['first_call_s']:>12.1f}")
    print("sqc ms per decoded token:")
    for name in PRESETS:
        b = res[name]["breakdown_ms_per_token"]
        print(f"  {name:<10} " + "  ".join(f"{k.split(' ')[0]} {v:.2f}" for k, v in b.items()))
    print("fresh-process peak RSS MiB: " + ", ".join(f"{s} {r['peak_rss_mib']:.0f}" for s, r in rss.items())
          + f" (saving {rss['fp32']['peak_rss_mib'] - rss['w3-s0.45']['peak_rss_mib']:.0f} MiB)")
    out = {"threads": args.threads, "prompt_tokens": args.prompt, "new_tokens": args.new_tokens,
           "rounds": args.rounds, "results": res, "fresh_process_rss": rss, "compile_stages": stages}
    from sqc.runtime.files import atomic_write

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write(args.out, json.dumps(out, indent=1).encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
