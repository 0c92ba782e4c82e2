"""Cold start: how soon a fresh process generates, with the decode steps an artifact carries and without them.

    python benchmarks/coldstart.py [--threads 2] [--rounds 3]

The model: SmolLM2-135M at ``w3-s0.45-g`` (``benchmarks/.e2e-artifacts/w3-s0.45-g``, compiled by the CLI when
missing; ``sqc compile`` stores greedy batch-1 decode steps for its default cache lengths). The baseline is the
same artifact without stored steps (``sqc.save(..., decode_steps=None)``, written next to it), whose first
decode step TorchDynamo traces in every process.

Settings (every measurement a fresh process; rounds interleave the two artifacts; medians over ``--rounds``):

* ``sqc generate ART --prompt "def fibonacci(n):" --max-new-tokens 40``: wall time of the whole command,
  warm caches (an untimed first run of each artifact warms them);
* load to first tokens: a fresh process times ``sqc.load`` and then ``generate(max_new_tokens=2)`` (the
  prefill's token and the first decode step's), with warm caches and with empty ones (a new
  ``TORCHINDUCTOR_CACHE_DIR`` and ``SQC_CACHE_DIR``, as on a fresh machine: the artifact carries its TVM
  kernels, and its stored steps carry Inductor's compiled C++ kernels);
* steady state, one process: ms per decode step of the restored step against a freshly traced one at the same
  cache length (a 896-token prompt and 128 new tokens: 1024 slots), and the cost of running a longer stored
  step than a generation needs (512 + 128 tokens: the stored 1024-slot step against a traced 640-slot one).

Merges ``cold_start`` into ``benchmarks/results/e2e.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, ROOT)
ART = os.path.join(HERE, ".e2e-artifacts", "w3-s0.45-g")
BARE = os.path.join(HERE, ".e2e-artifacts", "w3-s0.45-g-nosteps")
PROMPT = "def fibonacci(n):"

FIRST_TOKENS = """
import json, sys, time
t0 = time.perf_counter()
import torch, sqc
t1 = time.perf_counter()
c = sqc.load(sys.argv[1])
t2 = time.perf_counter()
c.generate(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), max_new_tokens=2)
t3 = time.perf_counter()
st = c.decode_stats
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_tokens_s": t3 - t2, "load_to_first_token_s": t3 - t1,
                  "first_step_s": st.get("first_step_s"), "stored_step": st.get("stored_step", "none stored")}))
"""


def ensure_artifacts() -> None:
    if not os.path.exists(os.path.join(ART, "manifest.json")):
        subprocess.run([sys.executable, "-m", "sqc", "compile", "smollm2", "--preset", "w3-s0.45-g", "--out", ART,
                        "--force"], check=True, cwd=ROOT)
    with open(os.path.join(ART, "manifest.json")) as fh:
        if not json.load(fh).get("steps"):  # compiled before steps were stored: add them
            _resave(ART, "default")
    if not os.path.exists(os.path.join(BARE, "manifest.json")):
        _resave(BARE, None)


def _resave(dest: str, steps) -> None:
    """Write ``ART``'s model and tokenizer to ``dest`` with the given stored steps ("default" or None)."""
    code = ("import os, sys, sqc\nfrom transformers import AutoTokenizer\n"
            "tok = AutoTokenizer.from_pretrained(os.path.join(sys.argv[1], 'tokenizer'))\n"
            "c = sqc.load(sys.argv[1])\n"
            "sqc.save(c, sys.argv[2], overwrite=True, tokenizer=tok, "
            "decode_steps=None if sys.argv[3] == 'none' else sys.argv[3])\n")
    subprocess.run([sys.executable, "-c", code, ART, dest, "none" if steps is None else steps], check=True, cwd=ROOT)


def _env(threads: int, empty: bool):
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
    tmp = None
    if empty:
        tmp = tempfile.mkdtemp(prefix="sqc-coldstart-")
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
        env["SQC_CACHE_DIR"] = os.path.join(tmp, "sqc")
    return env, tmp


def generate_wall(art: str, threads: int) -> float:
    env, _ = _env(threads, False)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sqc", "generate", art, "--prompt", PROMPT, "--max-new-tokens", "40",
                    "--quiet"], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def first_tokens(art: str, threads: int, empty: bool) -> dict:
    env, tmp = _env(threads, empty)
    try:
        p = subprocess.run([sys.executable, "-c", FIRST_TOKENS, art], capture_output=True, text=True, env=env, cwd=ROOT)
        if p.returncode != 0:
            raise SystemExit(f"fresh process on {art} failed:\n{p.stderr[-3000:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


STEADY = """
import json, statistics, sys, torch, sqc
from sqc.runtime.decode import CompiledDecoder
torch.set_num_threads(int(sys.argv[2]))
c = sqc.load(sys.argv[1])
g = torch.Generator().manual_seed(0)
def run(dec, prompt, new):
    ids = torch.randint(100, 20000, (1, prompt), generator=g)
    dec.generate(ids, max_new_tokens=8)  # restore or trace
    dec.step_times = []
    dec.generate(ids, max_new_tokens=new)
    return statistics.median(dec.step_times[2:]) * 1e3, dec._cache_len
# one decoder per setting: a decoder keeps its cache when a later generation needs fewer slots
decs = {"restored_1024": (CompiledDecoder(c.model, stored=c.stored_steps), 896),
        "traced_1024": (CompiledDecoder(c.model), 896),
        "stored_for_640": (CompiledDecoder(c.model, stored=c.stored_steps), 512),
        "traced_640": (CompiledDecoder(c.model), 512)}
res = {k: [] for k in decs}
for _ in range(int(sys.argv[3])):
    for key, (dec, prompt) in decs.items():
        ms, slots = run(dec, prompt, 128)
        res[key].append(ms)
        res[key + "_slots"] = slots
print(json.dumps(res))
"""


def steady_state(threads: int, rounds: int) -> dict:
    env, _ = _env(threads, False)
    p = subprocess.run([sys.executable, "-c", STEADY, ART, str(threads), str(rounds)], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"steady-state run failed:\n{p.stderr[-3000:]}")
    raw = json.loads(p.stdout.strip().splitlines()[-1])
    out = {k: {"ms_per_token": statistics.median(v), "runs_ms": v, "cache_slots": raw[k + "_slots"]}
           for k, v in raw.items() if not k.endswith("_slots")}
    out["restored_vs_traced_same_length"] = out["traced_1024"]["ms_per_token"] / out["restored_1024"]["ms_per_token"]
    out["stored_1024_vs_traced_640"] = out["traced_640"]["ms_per_token"] / out["stored_for_640"]["ms_per_token"]
    return out


def markdown(path: str) -> str:
    """The README table, generated from ``e2e.json``'s ``cold_start``."""
    with open(path) as fh:
        d = json.load(fh)["cold_start"]
    lines = ["| SmolLM2 w3-s0.45-g, fresh process | with stored steps | without (traced) |", "|---|---|---|"]
    s, b = d["with_steps"], d["without_steps"]
    lines.append(f"| `sqc generate` 40 tokens, wall s (warm caches) | {s['generate_wall_s']:.1f} | "
                 f"{b['generate_wall_s']:.1f} |")
    for cache in ("warm", "empty"):
        lines.append(f"| `sqc.load` to the first new tokens, s ({cache} caches) | "
                     f"{s[cache]['load_to_first_token_s']:.1f} | {b[cache]['load_to_first_token_s']:.1f} |")
        lines.append(f"| of which prefill + first decode step (its restore or trace), s ({cache} caches) | "
                     f"{s[cache]['first_tokens_s']:.2f} | {b[cache]['first_tokens_s']:.2f} |")
    st = d["steady_state"]
    lines.append(f"| steady state, ms per token at 1024 slots (896-token prompt) | "
                 f"{st['restored_1024']['ms_per_token']:.2f} | {st['traced_1024']['ms_per_token']:.2f} |")
    lines.append(f"| steady state, ms per token for a 512-token prompt + 128 (slots) | "
                 f"{st['stored_for_640']['ms_per_token']:.2f} ({st['stored_for_640']['cache_slots']}) | "
                 f"{st['traced_640']['ms_per_token']:.2f} ({st['traced_640']['cache_slots']}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--markdown", action="store_true", help="print the README table from --out and exit")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "e2e.json"))
    args = ap.parse_args()
    if args.markdown:
        print(markdown(args.out))
        return
    ensure_artifacts()
    arts = {"with_steps": ART, "without_steps": BARE}
    for art in arts.values():  # warm every cache a warm run relies on
        generate_wall(art, args.threads)
        first_tokens(art, args.threads, False)
    runs: dict = {k: {"generate_wall_s": [], "warm": [], "empty": []} for k in arts}
    for r in range(args.rounds):
        for name, art in arts.items():
            runs[name]["generate_wall_s"].append(generate_wall(art, args.threads))
            runs[name]["warm"].append(first_tokens(art, args.threads, False))
            runs[name]["empty"].append(first_tokens(art, args.threads, True))
            print(f"round {r + 1} {name}: generate {runs[name]['generate_wall_s'][-1]:.1f} s, load to first "
                  f"tokens warm {runs[name]['warm'][-1]['load_to_first_token_s']:.1f} s, empty "
                  f"{runs[name]['empty'][-1]['load_to_first_token_s']:.1f} s", flush=True)
    res: dict = {}
    for name in arts:
        res[name] = {"generate_wall_s": statistics.median(runs[name]["generate_wall_s"]),
                     "generate_wall_runs_s": runs[name]["generate_wall_s"]}
        for cache in ("warm", "empty"):
            rs = runs[name][cache]
            res[name][cache] = {
                k: statistics.median(r[k] for r in rs) for k in ("import_s", "load_s", "first_tokens_s",
                                                                  "load_to_first_token_s")}
            res[name][cache]["stored_step"] = rs[-1]["stored_step"]
    res["steady_state"] = steady_state(args.threads, args.rounds)
    out = {}
    if os.path.exists(args.out):
        with open(args.out) as fh:
            out = json.load(fh)
    out["cold_start"] = {"threads": args.threads, "rounds": args.rounds, "model": "SmolLM2-135M w3-s0.45-g",
                         "cpu": _cpu(), **res}
    from sqc.runtime.files import atomic_write

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write(args.out, json.dumps(out, indent=1).encode())
    print(markdown(args.out))
    print(f"wrote {args.out}")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
