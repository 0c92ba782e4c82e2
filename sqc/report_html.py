"""A self-contained HTML report of a compiled artifact (no network: plots are inline SVG).

Sections: model and config summary; per-layer table (shape, bits, sparse %,
weighted error, SNR in dB, bytes, kernel, tuned latency); plots of weighted
error and sparse fraction per layer and of the bits-per-weight breakdown
(codes / tables / sparse); tuning curves (best latency so far against trials,
one line per kernel, from ``tuning.json``) and a kernel table (knobs, best and
default latency, GB/s, share of the copy bandwidth); kernel latency against
torch fp32/bf16 by batch size once ``latency.json`` exists. A target without
generated kernels gets a line saying every layer runs the reference op.
"""
from __future__ import annotations

import html
import io
import json
import math
import os
from typing import Any

__all__ = ["write_report", "render_report", "size_quality_svg"]


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _latency_plot(latency: list[dict[str, Any]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["shape"][0], r["shape"][1], r["bits"]) for r in latency})
    fig, axes = plt.subplots(1, len(shapes), figsize=(3.2 * len(shapes), 3), squeeze=False)
    for ax, (o, i, bits) in zip(axes[0], shapes):
        rs = sorted((r for r in latency if r["shape"] == [o, i] and r["bits"] == bits), key=lambda r: r["batch"])
        xs = [r["batch"] for r in rs]
        for key, label in (("sqc_ms", f"sqc ({rs[0]['kernel']})"), ("torch_fp32_ms", "torch fp32"), ("torch_bf16_ms", "torch bf16")):
            ax.loglog(xs, [r[key] for r in rs], "o-", label=label)
        ax.set_title(f"{o}x{i}, {bits}-bit", fontsize=9)
        ax.set_xlabel("batch")
    axes[0][0].set_ylabel("ms (median)")
    axes[0][-1].legend(fontsize=7)
    text = _svg(fig)
    plt.close(fig)
    return text


def _plots(layers: list[dict[str, Any]]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = [r for r in layers if r["quantized"]]
    out = []
    if not q:
        return out
    idx = list(range(len(q)))
    fig, ax = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    ax[0].semilogy(idx, [max(r["weighted_error"] or 0, 1e-30) for r in q], ".-", lw=0.8)
    ax[0].set_ylabel("weighted error")
    ax[1].plot(idx, [r["sparse_pct"] for r in q], ".-", lw=0.8, color="tab:orange")
    ax[1].set_ylabel("sparse %")
    ax[1].set_xlabel("quantized layer (graph order)")
    out.append(("Weighted error and sparse fraction per layer", _svg(fig)))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 3))
    parts = ("codes", "tables", "sparse")
    bottom = [0.0] * len(q)
    for part in parts:
        vals = [8.0 * (r["bytes"] or {}).get(part, 0) / (r["shape"][0] * r["shape"][1]) for r in q]
        ax.bar(idx, vals, bottom=bottom, label=part, width=0.9)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("bits / weight")
    ax.set_xlabel("quantized layer (graph order)")
    ax.legend(loc="upper right")
    out.append(("Bits per weight: codes / tables / sparse", _svg(fig)))
    plt.close(fig)
    return out


def size_quality_svg(curve: dict[str, Any], mark: float | None = None) -> str:
    """Perplexity against stored bits per weight, one panel per text: the budgeted models as a line, the
    uniform presets as labelled points (``curve`` as ``benchmarks/quality.py --curve`` writes it); ``mark``
    draws a vertical line at one model's bits per weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = (("ppl", "tutorial text (same domain as the calibration)"), ("heldout_ppl", "held-out text (another domain)"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (key, title) in zip(axes, texts):
        pts = sorted(curve["budgets"], key=lambda r: r["bits_per_weight"])
        ax.plot([r["bits_per_weight"] for r in pts], [r[key] for r in pts], "o-", label="sqc bits budget (guided)")
        for r in curve["uniform"]:
            style = "s" if r["preset"].endswith("-g") else "^"
            ax.plot([r["bits_per_weight"]], [r[key]], style, color="tab:gray" if style == "^" else "tab:orange")
            ax.annotate(r["preset"], (r["bits_per_weight"], r[key]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        if curve.get("fp32"):
            ax.axhline(curve["fp32"][key], color="k", lw=0.8, ls=":", label="fp32")
        if mark is not None:
            ax.axvline(mark, color="tab:red", lw=0.8, label="this model")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("stored bits per weight (codes, tables, sparse part)")
        ax.set_ylabel("perplexity")
    axes[0].legend(fontsize=7)
    text = _svg(fig)
    plt.close(fig)
    return text


def _snr_db(r: dict[str, Any], weight_power: float | None) -> str:
    if r.get("mse") in (None, 0) or not weight_power:
        return "-"
    return f"{10 * math.log10(weight_power / r['mse']):.1f}"


def _tuning_plot(kernels: list[dict[str, Any]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k in kernels:
        ms = [c["ms"] for c in k.get("candidates", [])]
        if len(ms) < 2 or any(m is None for m in ms):  # untimed (CUDA candidates before a GPU timed them)
            continue
        best = [min(ms[: i + 1]) for i in range(len(ms))]
        key = k["key"]
        ax.plot(range(1, len(best) + 1), best, marker=".", linewidth=1,
                label=f"{key['op']} {key['out_features']}x{key['in_features']} b{key['bits']} n{k['tuned_at_batch']}")
    ax.set_xlabel("trial")
    ax.set_ylabel("best latency so far (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=6, ncol=2)
    return _svg(fig)


def _kernel_table(kernels: list[dict[str, Any]]) -> str:
    from .tuning_report import KERNEL_COLUMNS, kernel_rows

    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in KERNEL_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in kernel_rows(kernels))
    return f"<table id='kernels'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_report(path: str, curve: dict[str, Any] | None = None) -> str:
    """HTML text for the artifact folder ``path``; with ``curve`` (``benchmarks/quality.py --curve``'s JSON
    ``curve`` entry) also the size-quality plot with this model's stored bits per weight marked."""
    with open(os.path.join(path, "manifest.json")) as fh:
        manifest = json.load(fh)
    with open(os.path.join(path, "report.json")) as fh:
        report = json.load(fh)
    layers = report["layers"]
    kernels = []
    tpath = os.path.join(path, "tuning.json")
    if os.path.exists(tpath):
        with open(tpath) as fh:
            kernels = json.load(fh).get("kernels", [])
    esc = html.escape
    rows = []
    for r in layers:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        if not r["quantized"]:
            rows.append(f"<tr class='float'><td>{esc(r['module'])}</td><td>{shape}</td><td colspan='6'>float: {esc(r['reason'] or '')}</td><td>-</td></tr>")
            continue
        nbytes = sum((r["bytes"] or {}).values())
        rows.append(
            "<tr>" + "".join(f"<td>{c}</td>" for c in (
                esc(r["module"]), shape, r["bits"], f"{r['sparse_pct']:.3f}",
                f"{r['weighted_error']:.3e}" if r["weighted_error"] is not None else "-",
                _snr_db(r, r.get("weight_power")), nbytes, esc(str(r["kernel"])),
                f"{r['tuned_ms']:.4f} ms" if r.get("tuned_ms") is not None else "not tuned",
            )) + "</tr>"
        )
    figures = _plots(layers)
    if any(len(k.get("candidates", [])) > 1 and k.get("best_ms") is not None for k in kernels):
        figures.append(("Tuning curves: best latency so far against trials, per kernel", _tuning_plot(kernels)))
    latency = None
    lpath = os.path.join(path, "latency.json")
    if os.path.exists(lpath):
        with open(lpath) as fh:
            latency = json.load(fh)
        figures.append(("Latency of each layer shape's kernel vs torch F.linear, by batch size", _latency_plot(latency)))
    if curve is not None:
        from .artifact import artifact_bits_per_weight

        figures.append(("Size and quality: perplexity against stored bits per weight (budgets and uniform "
                        "presets; the red line is this model)",
                        size_quality_svg(curve, artifact_bits_per_weight(path)["overall"])))
    plots = "".join(f"<figure><figcaption>{esc(t)}</figcaption>{svg}</figure>" for t, svg in figures)
    wb = report.get("weight_bytes", {})
    cfg = manifest["config"]
    n_q = sum(r["quantized"] for r in layers)
    notes = "".join(f"<li>{esc(n)}</li>" for n in report.get("notes", []))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>sqc report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 12px; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
td:first-child {{ text-align: left; }}
tr.float td {{ color: #777; }}
figure {{ margin: 1em 0; }}
</style></head><body>
<h1>sqc compile report</h1>
<h2>Summary</h2>
<ul>
<li>model: {esc(str(manifest['model'].get('class')))} (source: {esc(str(manifest.get('source')))})</li>
<li>config: <code>{esc(json.dumps(cfg, sort_keys=True))}</code></li>
<li>target: {esc(manifest['target'])}</li>
<li>{n_q} of {len(layers)} linear layers quantized; quantized weights
{wb.get('float_before', 0) / 2**20:.1f} MiB float &rarr; {wb.get('packed_after', 0) / 2**20:.1f} MiB packed</li>
<li>kernels: {f"{len(kernels)} generated kernels (table below)" if kernels else "no generated kernels for this target; every quantized layer runs the reference op, so there are no tuning curves to plot"}{'' if latency else '; no latency measured (run sqc report --latency)'}</li>
{notes}
</ul>
<h2>Plots</h2>
{plots}
{"<h2>Kernels</h2>" + _kernel_table(kernels) if kernels else ""}
<h2>Layers</h2>
<table id="layers"><thead><tr><th>layer</th><th>shape</th><th>bits</th><th>sparse %</th>
<th>weighted error</th><th>SNR dB</th><th>bytes</th><th>kernel</th><th>tuned latency</th></tr></thead>
<tbody>
{''.join(rows)}
</tbody></table>
</body></html>
"""


def write_report(path: str, latency: list[dict[str, Any]] | None = None, curve: dict[str, Any] | None = None) -> str:
    """Write ``report.html`` (and ``latency.json`` when given) into the artifact folder; return its path.
    ``curve``: a size-quality curve to plot (:func:`render_report`)."""
    if latency is not None:
        lpath = os.path.join(path, "latency.json")
        with open(lpath + ".tmp", "w") as fh:
            json.dump(latency, fh, indent=1)
        os.replace(lpath + ".tmp", lpath)
    text = render_report(path, curve)
    out = os.path.join(path, "report.html")
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, out)
    return out
