"""Printing tables, writing the JSON file and the plot of op time vs rows (gpu_check's live record and tables:
`benchmarks.gpu`)."""
from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Optional, Sequence

import torch


def environment(device: str) -> dict:
    """Where and when a run happened."""
    import triton  # noqa: F401  (only its version)
    import transformers

    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": platform.node(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "device": device, "triton_interpret": os.environ.get("TRITON_INTERPRET", "")}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    if value is None:
        return missing
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, str):
        return value
    return format(value, spec)


def table(rows: Sequence[dict], columns: Sequence[tuple]) -> str:
    """``columns``: (header, function of a row -> str). Returns an aligned plain-text table."""
    cells = [[header for header, _ in columns]] + [[get(r) for _, get in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(caption: str, rows: Sequence[dict], columns: Sequence[tuple]) -> list:
    """A captioned markdown table as lines, a blank line before the caption and the table; ``columns`` as in
    `table`. No rows, no lines."""
    if not rows:
        return []
    return ["", caption, "", "| " + " | ".join(h for h, _ in columns) + " |", "|" + " --- |" * len(columns),
            *("| " + " | ".join(get(r) for _, get in columns) + " |" for r in rows)]


def op_table(rows: Sequence[dict], gpu: bool) -> str:
    no_gpu = "no GPU"

    def gpu_col(key: str, spec: str):
        return lambda r: fmt(r[key], spec) if gpu else (no_gpu if r["median_us"] is not None else "-")

    def time_col(key: str):
        return lambda r: fmt(r[key], ".1f", missing=r["note"] or "-") if key == "median_us" else fmt(r[key], ".1f")

    columns = [
        ("op", lambda r: r["op"]), ("T", lambda r: str(r["T"])), ("d", lambda r: str(r["d"])),
        ("res", lambda r: "y" if r["residual"] else "n"), ("dtype", lambda r: r["dtype"]),
        ("impl", lambda r: r["impl"]),
        ("median us", time_col("median_us")), ("p20", time_col("p20_us")), ("p80", time_col("p80_us")),
        ("launches" if gpu else "kernel ops (CPU)", lambda r: fmt(r["launches"], ".0f",
                                                                   missing="n/a" if r["median_us"] else "-")),
        ("KiB moved", lambda r: fmt(None if r["bytes"] is None else r["bytes"] / 1024, ".0f")),
        ("GB/s", lambda r: fmt(r["gbps"], ".2f")),
        ("% peak", gpu_col("pct_peak", ".0f")), ("% copy", gpu_col("pct_copy", ".0f")),
        ("% layer", lambda r: fmt(None if r["layer_share"] is None else 100 * r["layer_share"], ".1f")),
        ("ok", lambda r: fmt(r["ok"])),
    ]
    return table(rows, columns)


def e2e_table(rows: Sequence[dict]) -> str:
    columns = [("config", lambda r: r["config"]),
               ("layers", lambda r: ",".join(map(str, r["layers"])) or "-"),
               ("decode tok/s (wall)", lambda r: fmt(r["tokens_per_s"], ".1f")),
               ("step ms", lambda r: fmt(1e3 * r["step_median_s"], ".1f")),
               ("p20", lambda r: fmt(1e3 * r["step_p20_s"], ".1f")), ("p80", lambda r: fmt(1e3 * r["step_p80_s"], ".1f")),
               ("ratio (paired median)", lambda r: fmt(r["time_ratio"], ".3f")),
               ("ratio p20-p80", lambda r: f"{r['ratio_p20']:.3f}-{r['ratio_p80']:.3f}"),
               ("slowdown %", lambda r: fmt(100 * (r["time_ratio"] - 1), "+.1f")),
               ("wall ratio", lambda r: fmt(r["wall_ratio"], ".3f")),
               ("tokens changed", lambda r: fmt(r["tokens_differ_from_unpatched"]) if r["layers"] else "-")]
    return table(rows, columns)


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, sort_keys=False)
        f.write("\n")


IMPL_COLORS = {"reference": "tab:orange", "frugal": "tab:blue", "compiled": "tab:green", "triton": "tab:red"}


def plot_op_times(rows: Sequence[dict], path: str, title: Optional[str] = None) -> Optional[str]:
    """Median op time vs T, one line per implementation, one panel per (op, d, residual, dtype). Returns the path,
    or None when there was nothing timed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["median_us"] is not None]
    if not timed:
        return None
    op_order = {"steer": 0, "apply": 1}
    panels = sorted({(r["op"], r["d"], r["residual"], r["dtype"]) for r in timed},
                    key=lambda p: (op_order.get(p[0], 9), p[1], p[2], p[3]))
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.9 * nrows), squeeze=False, dpi=72)
    for ax, (op, d, residual, dtype) in zip(axes.flat, panels):
        panel = [r for r in timed if (r["op"], r["d"], r["residual"], r["dtype"]) == (op, d, residual, dtype)]
        for impl in IMPL_COLORS:
            points = sorted((r["T"], r["median_us"]) for r in panel if r["impl"] == impl)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=impl,
                        color=IMPL_COLORS[impl])
        layer = sorted({(r["T"], r["layer_us"]) for r in panel if r["layer_us"]})
        if layer:
            ax.plot([p[0] for p in layer], [p[1] for p in layer], "k--", linewidth=1, label="decoder layer")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{op} d={d} {'res' if residual else 'no res'} {dtype}", fontsize=8)
        ax.set_xlabel("rows T", fontsize=7)
        ax.set_ylabel("median us", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="upper right", fontsize=7, ncol=len(handles))
    if title:
        fig.suptitle(title, fontsize=9, x=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def pct(value) -> str:
    return fmt(value, ".0f") + (" %" if value is not None else "")
