"""The autotuning report as Markdown: one row per (kernel, batch bucket)."""
from __future__ import annotations

from typing import Any

__all__ = ["tuning_markdown"]


def _knobs(d: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items())


def tuning_markdown(data: dict[str, Any]) -> str:
    kernels = data.get("kernels", [])
    lines = [f"# sqc kernels for `{data.get('target')}`", ""]
    if not kernels:
        lines.append("No generated kernels: every quantized layer runs the reference op.")
        return "\n".join(lines) + "\n"
    copy = next((k.get("copy_gbps") for k in kernels if k.get("copy_gbps")), None)
    if copy:
        lines += [f"Measured copy bandwidth (read + write): {copy:.1f} GB/s.", ""]
    lines += [
        "| kernel | shape | bits | sparse | batch | knobs | tried | best ms | default ms | GB/s | of copy bw | source | layers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in kernels:
        key = k["key"]
        gbps = k.get("gbps")
        ratio = k.get("bw_ratio")
        layers = k.get("layers", [])
        shown = ", ".join(layers[:3]) + (f" (+{len(layers) - 3} more)" if len(layers) > 3 else "")
        lines.append(
            f"| {k.get('kernel', key['op'])} {key['op']} | {key['out_features']}x{key['in_features']} | {key['bits']} "
            f"| {'yes' if key['sparse'] else 'no'} | {k['bucket']} (timed at {k['tuned_at_batch']}) | {_knobs(k['knobs'])} "
            f"| {len(k.get('candidates', []))} | {k['best_ms']:.4f} | {k['default_ms']:.4f} "
            f"| {gbps:.1f} | {ratio:.2f} | {'tuning db' if k.get('from_db') else ('tuned' if k.get('tuned') else 'default')} "
            f"| {shown} |"
        )
    return "\n".join(lines) + "\n"
