"""Generated CPU kernels against torch ``F.linear`` (fp32 and bf16), same shapes, same threads, one run.

    python benchmarks/kernel_speed.py [--threads 2] [--repeats 40] [--quick]

For LLaMA-7B's and SmolLM2's linear shapes, 3 and 4 bits, dense and with
0.45% sparse entries, batch 1 / 8 / 64: the median latency of the sqc layer
(the whole module call: the op dispatch, kernel, output) and of ``F.linear`` on
the de-quantized weight in fp32 and bf16. Every setting rotates over enough
distinct copies of the layer (different weights) that one pass reads more than
twice this CPU's L3, so the weights come from DRAM as in a model's
decode step, not from a cache that holds a 3-bit layer but not its fp32 twin.

The stack: distinct 4096x4096 layers called in sequence at batch 1, as many as
read more than twice the L3 (its size read from sysfs) per pass, for each CPU
kernel family this CPU runs (the fp32 lane kernels; the byte kernels with
AVX-512 VBMI/VNNI), 3 and 4 bits, dense and 0.45 % sparse, against fp32 and
bf16 stacks, with the achieved GB/s against the read bandwidth measured in the
same run (the sum of a tensor four times the L3). Batch-1 rows also give the achieved
bandwidth (bytes of codes + tables + sparse part + x + y per call / time) and
its ratio to the measured copy bandwidth. Kernels are tuned on first use and
come from the tuning database after that. Writes ``benchmarks/results/kernels.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import sqc  # noqa: E402,F401  (first: it sets the thread pools' spin counts before torch loads OpenMP)
import torch  # noqa: E402

from sqc.codegen import build as B  # noqa: E402
from sqc.runtime.target import parse_target  # noqa: E402
from sqc.codegen.tune import attach_cpu_kernels  # noqa: E402
from sqc.runtime.layout import PackedLinear, col_dtype_for, pack_codes  # noqa: E402
from sqc.runtime.qlinear import SqcLinear  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (576, 576), (1536, 576), (576, 1536)]
BATCHES = (1, 8, 64)


def random_layer(R: int, K: int, bits: int, sparse_pct: float, seed: int = 0) -> PackedLinear:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (R, K), generator=g, dtype=torch.int64)
    lut = torch.sort(torch.randn(R, 1 << bits, generator=g) * 0.02, dim=1).values.to(torch.float16)
    nnz = int(round(R * K * sparse_pct / 100))
    flat = torch.randperm(R * K, generator=g)[:nnz].sort().values
    rows, cols = flat // K, flat % K
    crow = torch.zeros(R + 1, dtype=torch.int32)
    crow[1:] = torch.bincount(rows, minlength=R).cumsum(0)
    val = torch.randn(nnz, generator=g) * 0.1
    return PackedLinear(bits, K, R, pack_codes(codes, bits), lut, crow, cols.to(col_dtype_for(K)), val)


def l3_bytes() -> int:
    """This CPU's last-level cache, read from sysfs (the largest cache index of cpu0); 32 MiB where unreadable."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    for d in (os.listdir(base) if os.path.isdir(base) else []):
        try:
            with open(os.path.join(base, d, "size")) as fh:
                txt = fh.read().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
        best = max(best, int(txt.rstrip("KMG")) * mult)
    return best or 32 << 20


L3_BYTES = l3_bytes()


def read_bandwidth_gbps(mib: int = 0, repeats: int = 7) -> float:
    """Bytes read per second by a ``sum`` over a tensor four times the L3 (at least 256 MiB)."""
    mib = mib or max(256, 4 * L3_BYTES >> 20)
    a = torch.ones(mib << 18)  # fp32: mib MiB
    return a.numel() * 4 / (B.median_ms(lambda: a.sum(), repeats, warmup=2) * 1e-3) / 1e9


def copies_for(nbytes: int) -> int:
    """Distinct copies of a layer of ``nbytes`` whose one pass reads more than twice the L3."""
    return max(1, -(-2 * L3_BYTES // max(nbytes, 1)))


def rotation(layers: list) -> callable:
    """One call runs every layer of ``layers`` (a list of zero-argument callables) once."""
    def run():
        for f in layers:
            f()
    return run


def kernel_families() -> list[tuple[str, str | None]]:
    """(name, SQC_CPU_KERNELS) of the CPU kernel families this CPU runs: the fp32 lane kernels, and the byte
    kernels where it has AVX-512 VBMI and VNNI."""
    from sqc.runtime.cpu.bytelanes import BYTE_LANES
    from sqc.runtime.cpu.kernels import host_lanes

    return [("fp32-lanes", None)] + ([("bytes", "vnni")] if host_lanes() == BYTE_LANES else [])


def layer_calls(m, copies: int, x) -> list:
    """``copies`` distinct layers with ``m``'s kernels, each called as a compiled decode step calls a layer
    (the ``sqc::lut_linear_cpu`` op on its own tensors): ``m`` itself and copies whose codes are random bytes
    (the kernels' speed does not depend on the values; building and converting each copy from a packed layer
    would dominate the run on a CPU with a large L3)."""
    from sqc.runtime.cpu.ops import lut_linear_cpu
    from sqc.runtime.kernels import register_kernels

    calls = [lambda: lut_linear_cpu(x, *m._args)]
    for i in range(copies - 1):
        k = object.__new__(type(m._kernels))  # not copy.copy: unpickling a copy binds it to m's codes
        k.__dict__.update(m._kernels.__dict__)
        k.words = m._kernels.words.clone()
        k.words.view(torch.uint8).random_(generator=torch.Generator().manual_seed(i))
        register_kernels(k, k.words)
        # the call holds its kernels (the registry holds them weakly)
        calls.append(lambda a=(k.words, *m._args[1:]), k=k: lut_linear_cpu(x, *a))
    return calls


def stack_rows(spec, copy_gbps: float, repeats: int) -> list[dict]:
    """Distinct 4096x4096 layers in sequence at batch 1, as many as read more than twice the L3 per pass, per
    kernel family, 3 and 4 bits, dense and 0.45 % sparse: GB/s against the read bandwidth timed in the same
    interleaved rounds (the sum of a tensor four times the L3), and
    against fp32 and bf16 ``F.linear`` stacks (also beyond twice the L3)."""
    rows = []
    x = torch.randn(1, 4096)
    x16 = x.to(torch.bfloat16)
    w32 = [torch.randn(4096, 4096) * 0.02 for _ in range(copies_for(4096 * 4096 * 4))]
    w16 = [w.to(torch.bfloat16) for w in w32[: copies_for(4096 * 4096 * 2)]]
    big = torch.ones(max(256 << 20, 4 * L3_BYTES) // 4)
    # the read bandwidth is timed in the same interleaved rounds as the stacks: on a shared host it drifts
    base = {"fp32": (rotation([lambda w=w: torch.nn.functional.linear(x, w) for w in w32]), len(w32)),
            "bf16": (rotation([lambda w=w: torch.nn.functional.linear(x16, w) for w in w16]), len(w16)),
            "read": (lambda: big.sum(), 1)}
    # every setting's stack is built first and all are timed in the same interleaved rounds, so a ratio between
    # settings (3- against 4-bit, one family against the other) is not a drift between their time windows
    fns = dict(base)
    settings = {}
    for bits, sp in ((3, 0.45), (3, 0.0), (4, 0.0), (4, 0.45)):
        for fam, env in kernel_families():
            if env is None:
                os.environ.pop("SQC_CPU_KERNELS", None)
            else:
                os.environ["SQC_CPU_KERNELS"] = env
            m = SqcLinear(random_layer(4096, 4096, bits, sp, seed=100), None)
            attach_cpu_kernels(torch.nn.Sequential(m), spec, tune=True)
            n = copies_for(m.resident_bytes())
            fns[(fam, bits, sp)] = (rotation(layer_calls(m, n, x)), n)
            settings[(fam, bits, sp)] = (m.resident_bytes(), m.kernel)
    os.environ.pop("SQC_CPU_KERNELS", None)
    with torch.no_grad():
        med = interleaved_medians({k: f for k, (f, _) in fns.items()}, max(10, repeats // 2), rounds=10)
    per = {k: med[k] / n for k, (_, n) in fns.items()}  # ms per layer
    read_gbps = big.numel() * 4 / (med["read"] * 1e-3) / 1e9
    for (fam, bits, sp), (nb, kname) in settings.items():
        t = per[(fam, bits, sp)]
        n = fns[(fam, bits, sp)][1]
        gbps = nb / (t * 1e-3) / 1e9
        row = {"family": fam, "kernel": kname, "layers": n, "shape": [4096, 4096], "bits": bits,
               "sparse_pct": sp, "layer_bytes": nb, "stack_bytes": nb * n, "l3_bytes": L3_BYTES,
               "sqc_ms_per_layer": t, "fp32_ms_per_layer": per["fp32"], "bf16_ms_per_layer": per["bf16"],
               "speedup_vs_fp32": per["fp32"] / t, "speedup_vs_bf16": per["bf16"] / t,
               "gbps": gbps, "read_gbps": read_gbps, "of_read_bandwidth": gbps / read_gbps,
               "copy_gbps": copy_gbps, "fp32_gbps": 4096 * 4096 * 4 / (per["fp32"] * 1e-3) / 1e9}
        rows.append(row)
        print(f"stack {n}x4096x4096 ({row['stack_bytes'] / 2**20:.0f} MiB) {fam} {bits}-bit sp {sp}: "
              f"{t:.3f} ms/layer, fp32 {per['fp32']:.3f}, bf16 {per['bf16']:.3f}: "
              f"x{row['speedup_vs_fp32']:.2f} fp32; {gbps:.1f} GB/s = {100 * row['of_read_bandwidth']:.0f} % of the "
              f"{read_gbps:.1f} GB/s read bandwidth", flush=True)
    for fam, _ in kernel_families():
        by = {(r["bits"], r["sparse_pct"]): r for r in rows if r["family"] == fam}
        for sp in (0.0, 0.45):
            r3, r4 = by[(3, sp)], by[(4, sp)]
            print(f"{fam} sp {sp}: 3-bit x{r4['sqc_ms_per_layer'] / r3['sqc_ms_per_layer']:.2f} faster than 4-bit")
    return rows


def interleaved_medians(fns: dict, repeats: int, rounds: int = 5) -> dict:
    """Median ms of each fn, measured in alternating rounds so drift hits all of them alike."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    per = max(1, repeats // rounds)
    for _ in range(rounds):
        for k, f in fns.items():
            for _ in range(per):
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--target", default="llvm")
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes only")
    ap.add_argument("--stack-only", action="store_true", help="only the 4096x4096 stack")
    ap.add_argument("--out", default=None, help="default: results/kernels.json (cpu), results/kernels_cuda.json (cuda)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--prepare", metavar="DIR", help="cuda: generate and build the kernels into DIR (needs TVM, nvcc)")
    ap.add_argument("--bundle", metavar="DIR", help="cuda: check and time the kernels in DIR (needs a GPU)")
    ap.add_argument("--arch", default="sm_90", help="cuda: architecture to build for with --prepare")
    ap.add_argument("--plan-out", help="cuda: where to write the plan with the GPU's tuning results")
    args = ap.parse_args()
    results = os.path.join(os.path.dirname(__file__), "results")
    if args.device == "cuda":
        import kernels_cuda

        if args.prepare:
            kernels_cuda.prepare(args.prepare, args.arch)
        if args.bundle:
            kernels_cuda.run(args.bundle, args.out or os.path.join(results, "kernels_cuda.json"), args.plan_out)
        if not (args.prepare or args.bundle):
            ap.error("--device cuda needs --prepare DIR (here) and/or --bundle DIR (on the GPU)")
        return
    args.out = args.out or os.path.join(results, "kernels_stack.json" if args.stack_only else "kernels.json")
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    spec = parse_target(args.target)
    copy_gbps = B.copy_bandwidth_gbps(mib=1024, repeats=5)
    read_gbps = read_bandwidth_gbps()
    print(f"read bandwidth {read_gbps:.1f} GB/s (sum over four times the {L3_BYTES >> 20} MiB L3)")
    stack = stack_rows(spec, copy_gbps, args.repeats)
    if args.stack_only:
        shapes = []
    else:
        shapes = SHAPES[3:] if args.quick else SHAPES
    rows = []
    overhead = []
    print(f"copy bandwidth {copy_gbps:.1f} GB/s (read + write), {args.threads} threads, target {args.target}")
    hdr = f"{'shape':>12} {'bits':>4} {'sparse':>6} {'batch':>5} {'sqc ms':>8} {'fp32 ms':>8} {'bf16 ms':>8} {'x fp32':>7} {'x bf16':>7} {'GB/s':>6} {'of copy':>7}"
    print(hdr)
    for R, K in shapes:
        for bits in (3, 4):
            for sp in (0.0, 0.45):
                packed = random_layer(R, K, bits, sp)
                m = SqcLinear(packed, None)
                t0 = time.perf_counter()
                recs = attach_cpu_kernels(torch.nn.Sequential(m), spec, tune=True)
                tune_s = time.perf_counter() - t0
                if m._kernels is None:
                    raise SystemExit(f"no generated kernel for {R}x{K} {bits}-bit: {m.kernel}")
                wbytes = m.resident_bytes()
                n_copies = copies_for(wbytes)
                mods = [m] + [SqcLinear(random_layer(R, K, bits, sp, seed=1 + i), None) for i in range(n_copies - 1)]
                if n_copies > 1:
                    attach_cpu_kernels(torch.nn.Sequential(*mods[1:]), spec, tune=True)
                w32s = [q.packed.dequantize(torch.float32) for q in mods]
                w16s = [w.to(torch.bfloat16) for w in w32s]
                for n in BATCHES:
                    x = torch.randn(n, K)
                    x16 = x.to(torch.bfloat16)
                    reps = args.repeats if n == 1 else max(10, args.repeats // (2 if n == 8 else 4))
                    reps = max(5, reps // max(1, n_copies // 8))
                    with torch.no_grad():
                        med = interleaved_medians({
                            "sqc": rotation([lambda q=q: q(x) for q in mods]),
                            "fp32": rotation([lambda w=w: torch.nn.functional.linear(x, w) for w in w32s]),
                            "bf16": rotation([lambda w=w: torch.nn.functional.linear(x16, w) for w in w16s]),
                        }, reps)
                    med = {key: v / n_copies for key, v in med.items()}
                    nbytes = wbytes + 4 * n * (K + R)
                    gbps = nbytes / (med["sqc"] * 1e-3) / 1e9
                    rec = next(r for r in recs if r["bucket"] == B.bucket_of(n))
                    row = {
                        "shape": [R, K], "bits": bits, "sparse_pct": sp, "nnz": packed.nnz, "batch": n,
                        "sqc_ms": med["sqc"], "torch_fp32_ms": med["fp32"], "torch_bf16_ms": med["bf16"],
                        "speedup_vs_fp32": med["fp32"] / med["sqc"], "speedup_vs_bf16": med["bf16"] / med["sqc"],
                        "bytes": nbytes, "gbps": gbps, "copy_gbps": copy_gbps, "bw_ratio": gbps / copy_gbps,
                        "kernel": m.kernel, "knobs": rec["knobs"], "tuning_from_db": rec["from_db"], "tune_s": tune_s,
                        "distinct_copies": n_copies,
                    }
                    rows.append(row)
                    print(f"{R:>5}x{K:<6} {bits:>4} {sp:>6} {n:>5} {med['sqc']:>8.3f} {med['fp32']:>8.3f} {med['bf16']:>8.3f} "
                          f"{row['speedup_vs_fp32']:>7.2f} {row['speedup_vs_bf16']:>7.2f} {gbps:>6.1f} {row['bw_ratio']:>7.2f}",
                          flush=True)
                if sp > 0:
                    # the sparse part's cost at batch 1: this layer against its dense twin, interleaved
                    dense = SqcLinear(random_layer(R, K, bits, 0.0), None)
                    attach_cpu_kernels(torch.nn.Sequential(dense), spec, tune=True)
                    x = torch.randn(1, K)
                    with torch.no_grad():
                        med = interleaved_medians({"dense": lambda: dense(x), "sparse": lambda: m(x)}, 8 * args.repeats, rounds=10)
                    overhead.append({"shape": [R, K], "bits": bits, "dense_ms": med["dense"], "sparse_ms": med["sparse"],
                                     "sparse_over_dense": med["sparse"] / med["dense"]})
                    del dense
                del mods, w32s, w16s
    for o in overhead:
        print(f"sparse +0.45% at batch 1, {o['shape'][0]}x{o['shape'][1]} {o['bits']}-bit: {100 * (o['sparse_over_dense'] - 1):+.1f}% time")
    out = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__, "target": args.target, "copy_gbps": copy_gbps},
        "read_gbps": read_gbps,
        "stack": stack,
        "rows": rows,
        "sparse_overhead": overhead,
    }
    from sqc.runtime.files import atomic_write

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write(args.out, json.dumps(out, indent=1).encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
