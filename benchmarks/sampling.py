"""Sampling in the compiled decode step against greedy decoding, SmolLM2-135M at w3-s0.45-g, one run.

    python benchmarks/sampling.py [--threads 2] [--new-tokens 128] [--prompt 512] [--rounds 5]

The artifact is serve.py's (``benchmarks/.e2e-artifacts/w3-s0.45-g``, compiled by the CLI when missing). Settings,
interleaved round by round, medians over ``--rounds``, each a 512-token prompt and 128 new tokens (decode time
per token = (generate N - generate 1) / (N - 1), so the prefill cancels):

* ``greedy``: ``compiled.generate`` as the README runs it;
* ``sample``: ``do_sample=True, temperature=0.8, top_k=50, top_p=0.95, seed=...`` (transformers' usual set);
* ``sample-min_p``: ``temperature=0.7, min_p=0.05``;
* ``sample-penalties``: the ``sample`` set plus ``repetition_penalty=1.1, presence_penalty=0.3,
  frequency_penalty=0.3`` (the step that also keeps the penalty counts);
* ``sample-flat``: ``temperature=1.5, top_p=0.999``, where the nucleus can outgrow the 256 candidates and the
  exact threshold branch runs.

Writes ``benchmarks/results/sampling.json``; ``--markdown`` prints the README table from it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

SETTINGS = {
    "greedy": {},
    "sample": dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.95),
    "sample-min_p": dict(do_sample=True, temperature=0.7, min_p=0.05),
    "sample-penalties": dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1,
                             presence_penalty=0.3, frequency_penalty=0.3),
    "sample-flat": dict(do_sample=True, temperature=1.5, top_p=0.999),
}


def run(args) -> dict:
    import torch

    import sqc
    from serve import ensure_artifact
    from sqc.real import eval_windows
    from transformers import AutoTokenizer

    path = ensure_artifact()
    model = sqc.load(path)
    tok = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    ids = eval_windows(tok, n_windows=1, seq_len=args.prompt)[0]

    def gen(name: str, n: int, seed: int):
        kw = dict(SETTINGS[name])
        if kw:
            kw["seed"] = seed
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)

    per_token = {n: [] for n in SETTINGS}
    paths, first = {}, {}
    with torch.no_grad():
        for name in SETTINGS:  # warm-up: each step compiles (or loads from Inductor's cache) once
            t = time.perf_counter()
            gen(name, 4, 0)
            first[name] = time.perf_counter() - t
            paths[name] = model.decode_stats["last_path"]
        for r in range(args.rounds):
            for name in SETTINGS:
                t = time.perf_counter()
                gen(name, 1, r)
                t1 = time.perf_counter() - t
                t = time.perf_counter()
                out = gen(name, args.new_tokens, r)
                per_token[name].append((time.perf_counter() - t - t1) / (out.shape[1] - ids.shape[1] - 1))
    greedy = statistics.median(per_token["greedy"])
    res = {}
    for name, times in per_token.items():
        ms = 1e3 * statistics.median(times)
        res[name] = {"settings": SETTINGS[name], "ms_per_token": ms, "decode_tok_s": 1e3 / ms,
                     "vs_greedy": greedy * 1e3 / ms, "first_call_s": first[name], "path": paths[name]}
    return res


def markdown(path: str) -> str:
    with open(path) as fh:
        d = json.load(fh)
    lines = ["| setting | ms/token | decode tok/s | × greedy |", "|---|---|---|---|"]
    for name, r in d["results"].items():
        kw = ", ".join(f"{k}={v}" for k, v in r["settings"].items() if k != "do_sample") or "greedy"
        lines.append(f"| {name} ({kw}) | {r['ms_per_token']:.2f} | {r['decode_tok_s']:.1f} | {r['vs_greedy']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--markdown", action="store_true", help="print the README table from --out and exit")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "sampling.json"))
    args = ap.parse_args()
    if args.markdown:
        print(markdown(args.out))
        return
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    res = run(args)
    for name, r in res.items():
        print(f"{name:<18} {r['ms_per_token']:7.2f} ms/token {r['decode_tok_s']:6.1f} tok/s "
              f"{r['vs_greedy']:5.2f}x greedy  ({r['path']})")
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    out = {"threads": args.threads, "prompt_tokens": args.prompt, "new_tokens": args.new_tokens,
           "rounds": args.rounds, "commit": commit.stdout.strip(), "results": res}
    from sqc.runtime.files import atomic_write

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write(args.out, json.dumps(out, indent=1).encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
