"""Every results table in README.md and docs/results.md, generated from ``benchmarks/results/*.json``.

    python benchmarks/tables.py            # rewrite the generated blocks in README.md and docs/results.md
    python benchmarks/tables.py --check    # exit 1 naming each block that differs from the JSON

A generated block sits between ``<!-- table: NAME -->`` and ``<!-- /table -->``; NAME picks the generator
below (most are the benchmark's own ``markdown`` function). Text around the blocks is written by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
FILES = ("README.md", os.path.join("docs", "results.md"))
BLOCK = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


def _json(name: str) -> dict:
    with open(os.path.join(RESULTS, name)) as fh:
        return json.load(fh)


def headline() -> str:
    """README's table: quality, size and decode speed of the main settings, from quality.json, e2e.json and
    sampling.json (SmolLM2-135M, 2 threads)."""
    q, e = _json("quality.json")["settings"], _json("e2e.json")
    res, fp = e["results"], e["results"]["fp32"]
    greedy_g = _json("sampling.json")["results"]["greedy"]
    rows = ["| SmolLM2-135M | bits / weight | perplexity (tutorial text) | perplexity (held-out text) | decode tok/s | "
            "× torch fp32 eager |", "|---|---|---|---|---|---|"]
    rows.append(f"| torch fp32 | 32 | {q['fp32']['ppl']:.2f} | {q['fp32']['heldout_ppl']:.2f} | "
                f"{fp['decode_tok_s']:.1f} | 1.00 |")
    for name in ("w4", "w3-s0.45"):
        r = res[name]
        rows.append(f"| sqc {name} | {q[name]['bits_per_weight']:.2f} | {q[name]['ppl']:.2f} | "
                    f"{q[name]['heldout_ppl']:.2f} | {r['decode_tok_s']:.1f} | {r['decode_vs_fp32']:.2f} |")
    g = q["w3-s0.45-g"]
    rows.append(f"| sqc w3-s0.45-g (guided fit) | {g['bits_per_weight']:.2f} | {g['ppl']:.2f} | "
                f"{g['heldout_ppl']:.2f} | {1e3 / greedy_g['ms_per_token']:.1f}¹ | – |")
    return "\n".join(rows)


def quality() -> str:
    import quality as q

    return q.markdown_table(_json("quality.json"))


def curve() -> str:
    import quality as q

    return q.curve_table(_json("quality.json"))


def kernels_cpu() -> str:
    d = _json("kernels.json")
    rows = ["| shape | bits | sparse % | batch | sqc ms | torch fp32 ms | torch bf16 ms | × fp32 | × bf16 | "
            "GB/s (of copy) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        if r["shape"][0] < 4096 and r["shape"][1] < 4096:
            continue  # SmolLM2's shapes are in the JSON
        bw = f"{r['gbps']:.1f} ({r['bw_ratio']:.2f})" if r["batch"] == 1 else ""
        rows.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['bits']} | {r['sparse_pct']} | {r['batch']} | "
                    f"{r['sqc_ms']:.3f} | {r['torch_fp32_ms']:.3f} | {r['torch_bf16_ms']:.3f} | "
                    f"{r['speedup_vs_fp32']:.2f} | {r['speedup_vs_bf16']:.2f} | {bw} |")
    over = ", ".join(f"{o['shape'][0]}x{o['shape'][1]} {o['bits']}-bit {100 * (o['sparse_over_dense'] - 1):+.0f}%"
                     for o in d["sparse_overhead"])
    rows += ["", f"Copy bandwidth in that run: {d['machine']['copy_gbps']:.1f} GB/s (read + write). The +0.45 % "
             f"sparse part at batch 1 against a dense twin, interleaved: {over}."]
    return "\n".join(rows)


def kernels_cuda() -> str:
    d = _json("kernels_cuda.json")
    rows = ["| shape | bits | sparse % | batch | sqc µs | cuBLAS fp16 µs | × cuBLAS | GB/s (of copy) |",
            "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        bw = f"{r['sqc_gbps']:.0f} ({r['bw_ratio']:.2f})" if r["batch"] == 1 else ""
        rows.append(f"| {r['shape']} | {r['bits']} | {0.45 if r['sparse'] else 0} | {r['batch']} | {r['sqc_us']:.2f} | "
                    f"{r['cublas_fp16_us']:.2f} | {r['speedup_vs_cublas']:.2f} | {bw} |")
    c = d["checks"]
    rows += ["", f"{d['device']}, torch {d['torch']}, copy bandwidth {d['copy_gbps']:.0f} GB/s; {d['timing']}. "
             f"Every variant against an fp64 reference: {c['n']} checks, {c['failed']} failed, max relative error "
             f"{c['max_rel_err']:.1e}."]
    return "\n".join(rows)


def e2e() -> str:
    import e2e as m

    return m.markdown(os.path.join(RESULTS, "e2e.json"))


def coldstart() -> str:
    import coldstart as m

    return m.markdown(os.path.join(RESULTS, "e2e.json"))


def sampling() -> str:
    import sampling as m

    return m.markdown(os.path.join(RESULTS, "sampling.json"))


def serve() -> str:
    import serve as m

    return m.markdown(os.path.join(RESULTS, "serve.json"))


def scale() -> str:
    import scale as m

    return m.markdown(_json("scale.json"))


GENERATORS = {"headline": headline, "quality": quality, "curve": curve, "kernels-cpu": kernels_cpu, "kernels-cuda": kernels_cuda,
              "e2e": e2e, "coldstart": coldstart, "sampling": sampling, "serve": serve, "scale": scale}


def render(text: str, where: str) -> str:
    """``text`` with every generated block rewritten from the JSON."""

    def block(m: re.Match) -> str:
        gen = GENERATORS.get(m.group(2))
        if gen is None:
            raise SystemExit(f"{where}: unknown table {m.group(2)!r} (known: {', '.join(GENERATORS)})")
        return f"{m.group(1)}{gen()}\n{m.group(4)}"

    return BLOCK.sub(block, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a generated block differs from the JSON")
    args = ap.parse_args(argv)
    stale = []
    for rel in FILES:
        path = os.path.join(ROOT, rel)
        with open(path) as fh:
            text = fh.read()
        new = render(text, rel)
        if new != text:
            stale.append(rel)
            if not args.check:
                with open(path, "w") as fh:
                    fh.write(new)
    if args.check and stale:
        print(f"generated tables differ from benchmarks/results in: {', '.join(stale)}; run python "
              "benchmarks/tables.py", file=sys.stderr)
        return 1
    if not args.check:
        print(f"rewrote {', '.join(stale) or 'nothing (up to date)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
