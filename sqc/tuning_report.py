"""The autotuning report as Markdown: one row per (kernel, batch bucket)."""
from __future__ import annotations

from typing import Any

__all__ = ["tuning_markdown", "kernel_rows", "KERNEL_COLUMNS"]


KERNEL_COLUMNS = ("kernel", "shape", "bits", "sparse", "batch", "knobs", "tried", "best ms", "default ms",
                  "GB/s", "of copy bw", "source", "layers")


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def kernel_rows(kernels: list[dict[str, Any]]) -> list[list[str]]:
    """One row of :data:`KERNEL_COLUMNS` cells (plain text) per (kernel, batch bucket)."""
    rows = []
    for k in kernels:
        key = k["key"]
        layers = k.get("layers", [])
        source = "tuning db" if k.get("from_db") else ("tuned" if k.get("tuned") else "default")
        if k.get("best_ms") is None:
            source = "not timed (needs the target GPU)"
        rows.append([
            f"{k.get('kernel', '')} {key['op']}".strip(), f"{key['out_features']}x{key['in_features']}", str(key["bits"]),
            "yes" if key["sparse"] else "no", f"{k['bucket']} (timed at {k['tuned_at_batch']})",
            " ".join(f"{a}={b}" for a, b in k["knobs"].items()), str(len(k.get("candidates", []))),
            _num(k.get("best_ms"), ".4f"), _num(k.get("default_ms"), ".4f"), _num(k.get("gbps"), ".1f"),
            _num(k.get("bw_ratio"), ".2f"), source,
            ", ".join(layers[:3]) + (f" (+{len(layers) - 3} more)" if len(layers) > 3 else ""),
        ])
    return rows


def tuning_markdown(data: dict[str, Any]) -> str:
    kernels = data.get("kernels", [])
    lines = [f"# sqc kernels for `{data.get('target')}`", ""]
    if not kernels:
        lines.append("No generated kernels: every quantized layer runs the reference op.")
        return "\n".join(lines) + "\n"
    copy = next((k.get("copy_gbps") for k in kernels if k.get("copy_gbps")), None)
    if copy:
        dev = next((k.get("device") for k in kernels if k.get("device")), None)
        lines += [f"Measured copy bandwidth (read + write): {copy:.1f} GB/s" + (f" on {dev}." if dev else "."), ""]
    lines.append("| " + " | ".join(KERNEL_COLUMNS) + " |")
    lines.append("|" + "---|" * len(KERNEL_COLUMNS))
    lines += ["| " + " | ".join(row) + " |" for row in kernel_rows(kernels)]
    return "\n".join(lines) + "\n"
