"""The ``sqc`` command line: compile, eval, bench, generate, report.

Exit codes: 0 success, 2 usage error, 1 failure. ``--json`` prints one JSON
object on stdout for scripting; ``--quiet`` silences progress.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import sys
import threading
import time
from typing import Any

from .decode_steps import normalize_lengths
from .runtime.stepstore import DEFAULT_CACHE_LENGTHS

__all__ = ["main"]

SMOLLM2 = "smollm2"


class CLIError(Exception):
    """A failure with a message for the user (exit code 1)."""


class UsageError(Exception):
    """Bad arguments (exit code 2)."""


# -- progress ------------------------------------------------------------------

class Progress:
    """A progress bar on a terminal; plain log lines otherwise."""

    def __init__(self, quiet: bool = False, stream=None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._start: dict[str, tuple[float, int, int]] = {}  # stage -> (clock, count at it, last count)
        self._last_line: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        t0, d0, last = self._start.get(stage, (now, done, -1))
        if done <= last:  # the stage runs again (per layer): a new count
            t0, d0 = now, done
        self._start[stage] = (t0, d0, done)
        # the rate counts the items finished since the first report (the first one's start is unknown)
        speed = f"{(done - d0) / (now - t0):.2f}/s, ETA {(total - done) * (now - t0) / (done - d0):.0f}s" \
            if done > d0 and now > t0 else "rate after the next item"
        msg = f"{stage}: {done}/{total} ({speed})"
        if self.tty:
            width = 24
            filled = int(width * done / max(total, 1))
            self.stream.write(f"\r{stage} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {speed}")
            if done >= total:
                self.stream.write("\n")
            self.stream.flush()
        elif done >= total or now - self._last_line.get(stage, 0.0) >= 5.0 or done == 1:
            self._last_line[stage] = now
            print(msg, file=self.stream, flush=True)

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=self.stream, flush=True)


# -- model sources -------------------------------------------------------------

def load_source(source: str):
    """(model, tokenizer) from 'smollm2', a Hugging Face folder, or a GGUF file."""
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if source == SMOLLM2:
        from .real import load_smollm2

        return load_smollm2()
    from .lazy import CheckpointError, checkpoint_kind

    try:
        kind = checkpoint_kind(source)
    except CheckpointError as e:
        raise CLIError(f"{e} (or '{SMOLLM2}')" if not os.path.exists(source) else str(e)) from e
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    try:
        if kind == "gguf":
            d, f = os.path.split(os.path.abspath(source))
            model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(source)
    except Exception as e:  # noqa: BLE001 - reported with the path
        raise CLIError(f"could not load a causal LM from {source}: {type(e).__name__}: {e}") from e
    return model.eval(), tok


def _read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise CLIError(f"text file {path} does not exist")
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _load_artifact(path: str):
    import sqc

    if not os.path.isdir(path):
        raise CLIError(f"{path} is not an sqc artifact folder (run `sqc compile ... --out {path}` first)")
    compiled = sqc.load(path)
    tok_dir = os.path.join(path, "tokenizer")
    if not os.path.isdir(tok_dir):
        raise CLIError(f"{path} has no tokenizer/ folder; it was not written by `sqc compile`")
    from transformers import AutoTokenizer

    return compiled, AutoTokenizer.from_pretrained(tok_dir)


def _source_of(path: str) -> str:
    with open(os.path.join(path, "manifest.json")) as fh:
        src = json.load(fh).get("source")
    if not src:
        raise CLIError(f"{path} does not record the model it was compiled from; --baseline needs it")
    return src


# -- subcommands -----------------------------------------------------------------

def _kernel_stats() -> dict[str, int]:
    """This process's kernel builds, cache hits, tuning searches and tuning-database hits."""
    from .codegen.build import STATS

    return dict(STATS)


def _lengths_arg(text: str) -> list[int]:
    if text.strip().lower() == "none":
        return []
    try:
        return list(normalize_lengths([int(v) for v in text.split(",") if v.strip()]))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e} (for example 512,1024, or none)") from None


def cmd_compile(args, progress: Progress) -> dict[str, Any]:
    import sqc

    cfg, target = _compile_settings(args)
    out = _output_folder(args, target)
    from .parallel import init_from_env

    group = init_from_env()  # under torchrun: this rank's place in the job (else a job of one)
    if group.distributed:
        if not args.lazy:
            raise UsageError("a data-parallel compile (torchrun) streams the model: drop --no-lazy")
        if group.rank != 0:
            progress.quiet = True  # rank 0 reports
        progress.log(f"data-parallel compile: {group.world} ranks (gloo); rank 0 writes {out}")
    model, source, tok = _load_for_compile(args, cfg, group, progress)
    calibration = _calibration(args, tok)
    example = calibration[0] if calibration else (tok("an example input", return_tensors="pt")["input_ids"],)
    from .streaming import StreamingRequired

    t = time.perf_counter()
    try:
        compiled = sqc.compile(model, example, config=cfg, calibration=calibration, target=target, progress=progress,
                               tune=args.tune, tune_trials=args.tune_trials, weight_source=source)
    except StreamingRequired as e:
        if source is not None:
            raise CLIError(f"{e}; pass --no-lazy to load the whole model") from e
        raise
    if source is not None:
        source.check_complete()
    compile_s = time.perf_counter() - t
    if group.rank == 0:
        _save_compiled(args, compiled, out, tok, progress)
    group.barrier("writing the artifact")  # the other ranks return once rank 0's artifact is in place
    group.close()
    args.written = out
    from .report_html import write_report

    write_report(out)
    result = _compile_result(compiled, cfg, target, out, compile_s)
    if group.rank != 0:
        args.json = False  # rank 0 prints the result
        return result
    if not args.json:
        wb = result["weight_bytes"]
        print(compiled.report() if args.verbose else
              f"compiled {result['quantized_layers']}/{result['linear_layers']} linear layers in {compile_s:.1f} s: "
              f"{result['bits_per_weight']:.3f} bits/weight, {wb['float_before'] / 2**20:.1f} -> "
              f"{wb['packed_after'] / 2**20:.1f} MiB -> {out}")
    return result


def _compile_settings(args):
    """The QuantConfig (preset plus flags) and target of ``sqc compile``; bad combinations are usage errors."""
    from .config import resolve_config
    from .runtime.target import parse_target

    try:
        cfg = resolve_config(args.preset)
        overrides = {
            k: v for k, v in (
                ("bits", args.bits), ("outlier_pct", args.outlier_pct), ("sensitive_pct", args.sensitive_pct),
                ("table_dtype", args.table_dtype), ("kmeans_iters", args.kmeans_iters),
                ("chunk_rows", args.chunk_rows), ("fit", args.fit), ("bits_per_weight", args.bpw),
                ("skip", tuple(args.skip) if args.skip else None),
            ) if v is not None
        }
        if overrides:
            cfg = cfg.replace(**overrides)
        if args.no_calib and cfg.fit.value == "guided":
            raise UsageError(f"the guided fit (--preset {args.preset}{' --fit guided' if args.fit else ''}) needs "
                             "calibration data: drop --no-calib, or use a k-means preset such as w3-s0.45")
        if args.no_calib and cfg.bits_per_weight is not None:
            raise UsageError(f"a bits budget (--preset {args.preset}{' --bpw' if args.bpw else ''}) chooses each "
                             "layer's width from calibration data: drop --no-calib, or use a uniform preset such "
                             "as w3-s0.45")
        target = parse_target(args.target)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from e
    return cfg, target


def _output_folder(args, target) -> str:
    """The artifact folder, checked before minutes of compiling (not at the save)."""
    if target.kind == "cuda":
        import shutil

        if shutil.which("nvcc") is None:
            raise CLIError("target cuda needs nvcc on PATH to compile the generated kernels; install the CUDA toolkit")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.force:
        raise CLIError(f"output folder {out} exists; pass --force to replace it")
    from .artifact import check_replaceable

    try:
        check_replaceable(out)
    except FileExistsError as e:
        raise CLIError(str(e)) from e
    return out


def _load_for_compile(args, cfg, group, progress: Progress):
    """(model, its lazy weight source or None, tokenizer): lazily, one layer at a time, unless the whole model
    is needed (``--no-lazy``, a bits budget)."""
    if cfg.bits_per_weight is not None and args.lazy:
        if group.distributed:
            raise UsageError("a bits budget (--bpw, the b* presets) chooses every layer's width from all layers' "
                             "statistics at once, which the layer-streamed data-parallel compile does not have: "
                             "run one process, or use a uniform preset such as w3-s0.45")
        args.lazy = False
        progress.log("a bits budget chooses every layer's width at once: the whole model is loaded, not one layer "
                     "at a time")
    progress.log(f"loading {args.model} ..." if not args.lazy else f"reading {args.model} (lazily: one layer at a time) ...")
    if not args.lazy:
        model, tok = load_source(args.model)
        return model, None, tok
    from .lazy import CheckpointError, load_lazy
    from .real import SMOLLM2_GGUF, smollm2_dir

    path = os.path.join(smollm2_dir(), SMOLLM2_GGUF) if args.model == SMOLLM2 else args.model
    try:
        model, source, tok = load_lazy(path)
    except CheckpointError as e:
        raise CLIError(f"{e} (or pass --no-lazy to load the whole model)") from e
    if tok is None:
        raise CLIError(f"{args.model} has no tokenizer files; the CLI needs one for the calibration text")
    return model, source, tok


def _calibration(args, tok) -> list[tuple] | None:
    """The calibration windows of ``--calib`` (SmolLM2: the protocol's library text), or None (``--no-calib``)."""
    from .real import calibration_windows

    if args.no_calib:
        return None
    if args.calib:
        text = _read_text(args.calib)
    elif args.model == SMOLLM2:
        from .real import protocol_text

        text = protocol_text("library")
    else:
        raise UsageError("give --calib TEXTFILE (calibration text) or --no-calib (plain k-means)")
    return [(w,) for w in calibration_windows(tok, args.calib_samples, args.seq_len, text=text)]


def _save_compiled(args, compiled, out: str, tok, progress: Progress) -> None:
    import sqc
    from .artifact import step_lengths

    lengths = step_lengths(compiled, "default" if args.decode_steps is None else args.decode_steps or None)
    if lengths:  # traced in a child process while the artifact is written (--decode-steps none skips it)
        progress("writing the artifact and tracing its decode steps", 0, len(lengths))
    sqc.save(compiled, out, overwrite=args.force, tokenizer=tok,
             source=os.path.abspath(args.model) if args.model != SMOLLM2 else SMOLLM2, decode_steps=lengths or None)
    if lengths:
        progress("writing the artifact and tracing its decode steps", len(lengths), len(lengths))


def _compile_result(compiled, cfg, target, out: str, compile_s: float) -> dict[str, Any]:
    """What ``sqc compile --json`` prints."""
    from .artifact import artifact_bits_per_weight

    return {
        "out": out,
        "config": cfg.to_dict(),
        "target": str(target),
        "compile_s": compile_s,
        "stage_seconds": compiled.stage_seconds,
        "bits_per_weight": artifact_bits_per_weight(out)["overall"],
        "quantized_layers": sum(r.quantized for r in compiled.layers),
        "linear_layers": len(compiled.layers),
        "weight_bytes": compiled.weight_bytes(),
        "notes": compiled.notes,
        "kernels": sorted({m.kernel for m in compiled.quantized_modules().values()}),
        "tuning": [{"kernel": k["key"], "bucket": k["bucket"], "from_db": k["from_db"], "tried": len(k["candidates"]),
                    "best_ms": k["best_ms"]} for k in compiled.tuning],
        "kernel_stats": _kernel_stats(),
    }


def cmd_eval(args, progress: Progress) -> dict[str, Any]:
    from .real import eval_windows, perplexity

    compiled, tok = _load_artifact(args.dir)
    text = _read_text(args.text)
    windows = eval_windows(tok, args.windows, args.seq_len, text=text)
    result = {"windows": len(windows), "seq_len": args.seq_len, "ppl": perplexity(compiled, windows)}
    if args.baseline:
        model, _ = load_source(_source_of(args.dir))
        result["baseline_ppl"] = perplexity(model, windows)
    if not args.json:
        line = f"perplexity {result['ppl']:.3f} over {len(windows)} x {args.seq_len} tokens"
        if "baseline_ppl" in result:
            line += f" (float baseline {result['baseline_ppl']:.3f})"
        print(line)
    return result


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time_model(model, ids, new_tokens: int) -> dict[str, float]:
    import torch

    from .real import decode_tokens_per_s

    with torch.no_grad():
        model(ids[:, :8], use_cache=False)  # warm-up
        t = time.perf_counter()
        model(ids, use_cache=False)
        prefill = ids.numel() / (time.perf_counter() - t)
    return {"prefill_tok_s": prefill, "decode_tok_s": decode_tokens_per_s(model, ids[:, :8], new_tokens)}


def cmd_bench(args, progress: Progress) -> dict[str, Any]:
    from .real import eval_windows

    compiled, tok = _load_artifact(args.dir)
    text = "The quick brown fox jumps over the lazy dog. " * (args.prompt_len // 4 + 8)
    ids = eval_windows(tok, 1, args.prompt_len, text=text)[0]
    result: dict[str, Any] = {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    result["sqc"] = _time_model(compiled, ids, args.new_tokens)
    result["sqc"]["peak_rss_mib"] = _peak_rss_mib()
    result["sqc"]["weight_bytes"] = compiled.weight_bytes()
    model, _ = load_source(_source_of(args.dir))
    result["float"] = _time_model(model, ids, args.new_tokens)
    result["float"]["peak_rss_mib"] = _peak_rss_mib()
    if not args.json:
        print(f"{'':<8}{'prefill tok/s':>14}{'decode tok/s':>14}")
        for k in ("float", "sqc"):
            print(f"{k:<8}{result[k]['prefill_tok_s']:>14.1f}{result[k]['decode_tok_s']:>14.1f}")
        print(f"peak RSS {result['float']['peak_rss_mib']:.0f} MiB (process; float model loaded second)")
    return result


def cmd_generate(args, progress: Progress) -> dict[str, Any]:
    import torch

    compiled, tok = _load_artifact(args.dir)
    ids = tok(args.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.numel() == 0:
        raise UsageError("--prompt is empty")
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.temperature > 0:
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    else:
        kwargs["do_sample"] = False
    with torch.no_grad():
        out = compiled.generate(ids, **kwargs)
    text = tok.decode(out[0], skip_special_tokens=True)
    if not args.json:
        print(text)
    st = compiled.decode_stats
    return {"prompt": args.prompt, "text": text, "new_tokens": int(out.shape[1] - ids.shape[1]),
            "decode": {k: st[k] for k in ("last_path", "stored_step", "first_step_s") if k in st}}


# -- parser --------------------------------------------------------------------

def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--windows 0`` is a usage error, not a ZeroDivisionError)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS, FitMode, TableDType

    p = argparse.ArgumentParser(prog="sqc", description="SqueezeLLM dense-and-sparse quantization compiler")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        sp.add_argument("--quiet", action="store_true", help="no progress output")

    c = sub.add_parser("compile", help="quantize a model and write an artifact folder")
    c.add_argument("model", help=f"Hugging Face model folder, .gguf file, or '{SMOLLM2}'")
    c.add_argument("--preset", default="w3-s0.45", choices=list(PRESETS))
    c.add_argument("--target", default="llvm", help="llvm, 'llvm -mcpu=...', 'cuda -arch=sm_86'")
    c.add_argument("--calib", help="calibration text file")
    c.add_argument("--no-calib", action="store_true", help="no Fisher information: plain k-means")
    c.add_argument("--calib-samples", type=_positive_int, default=32)
    c.add_argument("--seq-len", type=_positive_int, default=512)
    c.add_argument("--out", required=True, help="artifact folder")
    c.add_argument("--force", action="store_true", help="replace an existing output folder")
    c.add_argument("--tune", dest="tune", action="store_true", default=True)
    c.add_argument("--no-tune", dest="tune", action="store_false",
                   help="no schedule search: the tuning database's choice, else default knobs")
    c.add_argument("--tune-trials", type=_positive_int, default=None, help="at most this many candidates per kernel")
    c.add_argument("--bits", type=int)
    c.add_argument("--bpw", type=float, metavar="BITS",
                   help="size budget in stored bits per weight (tables and sparse part included): each layer "
                        "gets 2, 3 or 4 bits by its measured sensitivity (the b* presets set it)")
    c.add_argument("--outlier-pct", type=float)
    c.add_argument("--sensitive-pct", type=float)
    c.add_argument("--table-dtype", choices=[t.value for t in TableDType])
    c.add_argument("--kmeans-iters", type=int)
    c.add_argument("--chunk-rows", type=int)
    c.add_argument("--fit", choices=[m.value for m in FitMode],
                   help="codebook fit: kmeans, or guided (layer-output objective; needs calibration)")
    c.add_argument("--skip", action="append", metavar="PATTERN", help="module-name pattern left in float (repeatable)")
    c.add_argument("--lazy", dest="lazy", action="store_true", default=True,
                   help="read the checkpoint one decoder layer at a time (default; memory: a layer, not the model)")
    c.add_argument("--no-lazy", dest="lazy", action="store_false",
                   help="load the whole float model first (models without a decoder-layer stack)")
    c.add_argument("--decode-steps", type=_lengths_arg, default=None, metavar="LENGTHS",
                   help="cache lengths to store traced decode steps for, comma-separated (default "
                        f"{','.join(map(str, DEFAULT_CACHE_LENGTHS))}), or 'none': a fresh process then "
                        "generates without tracing the model")
    c.add_argument("--verbose", action="store_true", help="print the per-layer report")
    common(c)

    e = sub.add_parser("eval", help="perplexity of a compiled model")
    e.add_argument("dir")
    e.add_argument("--text", required=True)
    e.add_argument("--baseline", action="store_true", help="also the float model it was compiled from")
    e.add_argument("--windows", type=_positive_int, default=16)
    e.add_argument("--seq-len", type=_positive_int, default=512)
    common(e)

    b = sub.add_parser("bench", help="prefill / decode tokens/s and peak memory vs the float model")
    b.add_argument("dir")
    b.add_argument("--prompt-len", type=_positive_int, default=128)
    b.add_argument("--new-tokens", type=_positive_int, default=32)
    common(b)

    g = sub.add_parser("generate", help="generate text with a compiled model")
    g.add_argument("dir")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=_positive_int, default=40)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0)
    common(g)

    r = sub.add_parser("report", help="write the self-contained HTML report into the artifact folder")
    r.add_argument("dir")
    r.add_argument("--latency", action="store_true", help="measure each layer shape's kernel vs torch fp32 / bf16")
    r.add_argument("--repeats", type=_positive_int, default=15)
    r.add_argument("--curve", metavar="JSON", help="plot a size-quality curve (benchmarks/results/quality.json from "
                   "`benchmarks/quality.py --curve`) with this model marked on it")
    common(r)

    s = sub.add_parser("serve", help="serve a compiled model over OpenAI's HTTP API (completions, chat, SSE)")
    s.add_argument("dir", help="sqc artifact folder (with its tokenizer) or Hugging Face folder saved by sqc")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_positive_int, default=8000)
    s.add_argument("--max-batch", type=_positive_int, default=8, help="sequences decoded together (slots)")
    s.add_argument("--ctx", type=_positive_int, default=2048, help="tokens per sequence: prompt plus output")
    s.add_argument("--max-queue", type=_positive_int, default=64,
                   help="requests that may wait for a slot; more get 429 with Retry-After")
    s.add_argument("--model-name", help="the model id clients send (default: the folder's name)")
    s.add_argument("--no-compile", dest="compile_step", action="store_false",
                   help="run the decode step eagerly (no torch.compile)")
    common(s)

    t = sub.add_parser("tune-gpu", help="time a CUDA artifact's candidate kernels on this GPU and keep the fastest")
    t.add_argument("dir")
    t.add_argument("--repeats", type=_positive_int, default=100)
    common(t)
    # a usage error found inside a subcommand prints that subcommand's usage, not the top level's
    p.subcommand_parsers = {"compile": c, "eval": e, "bench": b, "generate": g, "report": r, "serve": s,
                           "tune-gpu": t}
    return p


def cmd_tune_gpu(args, progress: Progress) -> dict[str, Any]:
    from .artifact import _read_manifest, tune_artifact

    if not os.path.isdir(args.dir):
        raise CLIError(f"{args.dir} is not an sqc artifact folder")
    _read_manifest(os.path.abspath(args.dir))
    progress.log("timing every candidate CUDA kernel on this GPU ...")
    records = tune_artifact(args.dir, repeats=args.repeats)
    if not args.json:
        for r in records:
            k = r["key"]
            print(f"{k['op']} {k['out_features']}x{k['in_features']} b{k['bits']} batch {r['bucket']}: "
                  f"{1e3 * r['best_ms']:.2f} us (default {1e3 * r['default_ms']:.2f} us), {r['gbps']:.0f} GB/s")
    return {"kernels": records}


def cmd_report(args, progress: Progress) -> dict[str, Any]:
    from .report_html import write_report
    from .artifact import _read_manifest

    if not os.path.isdir(args.dir):
        raise CLIError(f"{args.dir} is not an sqc artifact folder (run `sqc compile ... --out {args.dir}` first)")
    _read_manifest(os.path.abspath(args.dir))  # clear errors for a non-artifact
    latency = None
    if args.latency:
        from .latency import measure_kernels

        compiled, _ = _load_artifact(args.dir)
        progress.log("measuring kernel latency (batch 1 / 8 / 64) ...")
        latency = measure_kernels(compiled, repeats=args.repeats)
    curve = None
    if args.curve:
        try:
            with open(args.curve) as fh:
                curve = json.load(fh).get("curve")
        except (OSError, ValueError, AttributeError) as e:
            curve = e
        if not isinstance(curve, dict) or not {"budgets", "uniform"} <= curve.keys():
            raise CLIError(f"--curve {args.curve}: not a quality.json with a size-quality curve"
                           f"{f' ({curve!r})' if isinstance(curve, Exception) else ''}; run "
                           "python benchmarks/quality.py --curve")
    path = write_report(args.dir, latency, curve)
    if not args.json:
        print(path)
    return {"report": path}


def cmd_serve(args, progress: Progress) -> dict[str, Any]:
    from .serve import serve

    if args.ctx < 2:
        raise UsageError("--ctx must be at least 2")
    progress.log(f"loading {args.dir} ...")
    serve(args.dir, host=args.host, port=args.port, max_batch=args.max_batch, ctx=args.ctx,
          max_queue=args.max_queue, compile_step=args.compile_step, name=args.model_name,
          ready=lambda: progress.log(f"serving on http://{args.host}:{args.port}/v1"))
    return {"served": args.dir}


COMMANDS = {
    "compile": cmd_compile, "eval": cmd_eval, "bench": cmd_bench, "generate": cmd_generate, "report": cmd_report,
    "serve": cmd_serve, "tune-gpu": cmd_tune_gpu,
}


def _report_interrupt(args) -> int:
    if args.written:
        print(f"sqc: interrupted after {args.written} was written completely; it is usable", file=sys.stderr)
    else:
        print("sqc: interrupted; nothing was written (artifacts are renamed into place only when complete)",
              file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on usage errors
    progress = Progress(quiet=args.quiet or args.json)
    interrupted = []

    def on_sigint(signum, frame):
        interrupted.append(True)  # remembered even where a library callback swallows the exception
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    args.written = None  # set by a command once its output is complete on disk
    try:
        result = COMMANDS[args.command](args, progress)
        if interrupted:
            raise KeyboardInterrupt
    except UsageError as e:
        parser.subcommand_parsers[args.command].error(str(e))  # exit code 2
    except KeyboardInterrupt:
        return _report_interrupt(args)
    except Exception as e:  # noqa: BLE001 - every failure becomes a message and exit code 1
        if interrupted:  # Ctrl-C landed inside a library that turned it into another error
            return _report_interrupt(args)
        from .artifact import ArtifactError
        from .trace import TraceError

        from .runtime.cuda.kernels import CudaUnavailable

        from .parallel import PeerLost

        known = (CLIError, ArtifactError, TraceError, FileExistsError, FileNotFoundError, ValueError, CudaUnavailable,
                 PeerLost)
        if not isinstance(e, known):
            raise
        print(f"sqc {args.command}: error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
    if args.json:
        print(json.dumps(result, default=str))
    return 0


def run() -> None:
    """The ``sqc`` command: :func:`main`, then a quick exit.

    Tearing down the interpreter after a command (torch's, TVM's and transformers' module state, their
    native libraries' finalizers) takes about 0.9 s on 2 cores, a tenth of ``sqc generate``'s wall time.
    The process instead waits for its own non-daemon threads, runs the ``atexit`` handlers (logging and
    temporary-file cleanup among them), flushes stdout and stderr, and ends with ``os._exit``: nothing the
    operating system would not release is skipped. Tests and embedders call :func:`main`, which returns."""
    rc = main()
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say
            pass
    os._exit(rc)


if __name__ == "__main__":
    run()
