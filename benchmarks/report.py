"""Printing tables, writing the JSON file (also live, row by row: `Run`) and the plot of op time vs rows."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
import traceback
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


class Run:
    """A run's results dict and the file it is written to, after every row and every section (benchmarks/gpu_check.py:
    a run cut short by a hang or an outer timeout keeps every finished row, and names the item in progress)."""

    def __init__(self, out_path: str, results: dict, started: float, budget_s: float):
        self.out_path, self.results = out_path, results
        self.started, self.budget_s = started, budget_s

    def save(self) -> None:
        write_json(self.out_path, self.results)

    def section(self, name: str, share: float, fn, *args) -> None:
        """Run ``fn(section, *args)`` as section ``name`` unless the budget's ``share`` has passed (then it is
        recorded as skipped); its return value (a dict) joins its record; an exception is recorded, not raised."""
        sec = Section(self, name, self.started + share * self.budget_s)
        start = time.perf_counter()
        if sec.out_of_time():
            sec.record.update(status="skipped", seconds=0.0, note="time budget spent before it could start")
            print(f"[gpu_check] {name}: skipped (time budget)", flush=True)
            return self.save()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            sec.record.update(status="ok", **(fn(sec, *args) or {}))
        except Exception as e:  # record and go on: one broken section must not hide the others' numbers
            sec.record.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            print(f"[gpu_check] section {name} FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sec.record.pop("in_progress", None)
        sec.record["seconds"] = time.perf_counter() - start
        self.save()


class Section:
    """One section's live record: ``rows`` (or another list, ``key``) grow as items finish, each written at once;
    ``deadline`` (perf_counter seconds) past which the section starts nothing new."""

    def __init__(self, run: Run, name: str, deadline: float):
        self.run, self.deadline = run, deadline
        self.record = run.results["sections"][name] = {"status": "running", "rows": []}
        run.save()

    def out_of_time(self) -> bool:
        return time.perf_counter() > self.deadline

    def starting(self, what: str) -> None:
        """Name the item about to run in the file: if it never returns (a hang), the JSON says which it was."""
        self.record["in_progress"] = what
        self.run.save()

    def add(self, row: dict, key: str = "rows") -> dict:
        self.record.setdefault(key, []).append(row)
        self.record.pop("in_progress", None)
        self.run.save()
        return row

    def skip(self, row: dict, key: str = "rows") -> dict:
        return self.add({**row, "note": "skipped: time budget"}, key)


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


# ---- benchmarks/gpu_check.py: its run as markdown, and the issue's goals ------------------------------------------
def _pct(value) -> str:
    return fmt(value, ".0f") + (" %" if value is not None else "")


def gpu_check_markdown(results: dict) -> list:
    """A gpu_check run as markdown tables (also printed): every measured row beside the model's prediction."""
    s = results["sections"]
    env = results["environment"]
    lines = [f"## gpu_check {'(dry run) ' if results['dry_run'] else ''}{env.get('gpu', 'CPU')}, {env['date']}",
             f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}", ""]
    lines += ["| section | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {n} | {v['status']}{' ' + v['error'][:120] if 'error' in v else ''} | {v.get('seconds', 0):.1f} |"
              for n, v in s.items()]
    bw = s.get("bandwidth", {})
    if bw.get("status") == "ok":
        l2, per_sm = bw.get("l2", {}), bw.get("per_sm", {})
        lines += ["", f"**Bandwidth** ({bw['name']}): copy {bw['copy']['gbps']:.0f} GB/s (peak {bw['peak_gbps']}), "
                  f"L2 read {fmt(l2.get('gbps'), '.0f')} GB/s, one SM {fmt(per_sm.get('gbps_per_sm'), '.1f')} GB/s; "
                  f"model assumed L2 {bw['card']['l2_gbps']:.0f}, one SM {bw['card']['sm_gbps']:.0f} GB/s"]
    smoke = s.get("split_d_smoke", {})
    if smoke.get("rows"):
        lines += ["", "**Split-d smoke** (steer vs the reference, bf16)", "",
                  "| T | d | variant | config | max rel err | ok |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['T']} | {r['d']} | {r['variant']} | {r['config']} | "
                  f"{fmt(r.get('max_rel_err'), '.2e', r.get('note', '-'))} | {fmt(r.get('ok'))} |" for r in smoke["rows"]]
    empty = s.get("empty_kernel", {})
    if "median_us" in empty:
        lines.append(f"\n**Empty kernel** in a graph: {empty['median_us']:.2f} us per launch")
    pre = s.get("prefill", {})
    if pre.get("rows"):
        lines += ["", "**Prefill** (steer, bf16, r=64 K=8 m=32 k=8; CUDA graph, cold L2; % of measured copy)", "",
                  "| T | d | impl | us | % copy | model % copy (shipped / measured bw) | model config | v1 model |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in pre["rows"]:
            m = r.get("model", {})
            model = (f"{_pct(m.get('shipped', {}).get('pct_copy'))} / {_pct(m.get('measured', {}).get('pct_copy'))}"
                     if m else "")
            lines.append(f"| {r['T']} | {r['d']} | {r['impl']} | {fmt(r.get('median_us'), '.1f', r.get('note', '-'))}"
                         f" | {_pct(r.get('pct_copy'))} | {model} | {m.get('shipped', {}).get('config', '')} | "
                         f"{_pct(m.get('v1_pct_copy')) if m else ''} |")
    sw = s.get("sweep", {})
    if sw.get("rows"):
        lines += ["", f"**Config sweep** T={sw.get('T', '-')} d={sw.get('d', '-')} (pick first; pick / best measured "
                  f"= {fmt(sw.get('pick_over_best'), '.2f')}, best {sw.get('best', '-')})", "",
                  "| config | us | % copy | model us (shipped / measured bw) |", "| --- | --- | --- | --- |"]
        for r in sw["rows"]:
            m = r.get("model", {})
            lines.append(f"| {r['config']}{' (pick)' if r['picked'] else ''} | "
                         f"{fmt(r.get('median_us'), '.1f', r.get('note', '-'))} | {_pct(r.get('pct_copy'))} | "
                         f"{fmt(m.get('shipped', {}).get('time_us'), '.1f')} / "
                         f"{fmt(m.get('measured', {}).get('time_us'), '.1f')} |")
    dec = s.get("decode", {})
    if dec.get("rows"):
        how = "CUDA graph replay" if dec.get("graphs") else dec.get("note", "")
        lines += ["", f"**Decode step** ({dec.get('dtype', '-')}, {how})", "",
                  "| config | us | ratio to unpatched |", "| --- | --- | --- |"]
        lines += [f"| {r['config']} | {fmt(r.get('median_us'), '.1f', r.get('note') or r.get('error', '-')[:80])} | "
                  f"{fmt(r.get('ratio'), '.4f')} |" for r in dec["rows"]]
        lines += ["", "| decode op | d | us per call (graph) | / empty kernel |", "| --- | --- | --- | --- |"]
        for r in dec.get("ops", []):
            ratio = r["median_us"] / empty["median_us"] if "median_us" in r and "median_us" in empty else None
            lines.append(f"| {r['op']} | {r['d']} | {fmt(r.get('median_us'), '.2f', r.get('note', '-'))} | "
                         f"{fmt(ratio, '.2f')} |")
    corr = s.get("correctness", {})
    if corr.get("rows"):
        failed = [r for r in corr["rows"] if r.get("ok") is False]
        skipped = [r for r in corr["rows"] if "note" in r]
        lines.append(f"\n**Correctness**: {sum(r.get('ok') is True for r in corr['rows'])} checks passed, "
                     f"{len(failed)} failed, {len(skipped)} skipped (bf16, fp16)")
        lines += [f"- FAILED {r['case']} {r['dtype']} T={r['rows']} {r['op']}: err {r['max_rel_err']}" for r in failed]
    bank = s.get("bank", {})
    if bank.get("rows"):
        lines += ["", "**Bank** (4 steerers mixed vs one steerer, bf16, CUDA graph, cold L2)", "",
                  "| T | d | mixed us | uniform us | mixed / uniform | model mixed / uniform (H200) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in bank["rows"]:
            pred = r.get("predicted", {}).get("H200", {})
            lines.append(f"| {r['T']} | {r['d']} | {fmt(r.get('mixed_us'), '.1f', r.get('note', '-'))} | "
                         f"{fmt(r.get('uniform_us'), '.1f')} | {fmt(r.get('measured_ratio'), '.2f')} | "
                         f"{fmt(pred.get('time_ratio'), '.2f')} |")
    fused = s.get("fused_norm", {})
    if fused.get("rows"):
        lines += ["", "**Fused with the next RMSNorm** (bf16; separate = op + LlamaRMSNorm module; model: H200 "
                  "predicted)", "", "| mode | T | d | separate us | fused us | separate / fused | model MB sep / fused "
                  "| model us sep / fused |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in fused["rows"]:
            m = r.get("model", {}).get("H200")
            model = (f"{m['separate_mb']:.2f} / {m['fused_mb']:.2f} | {m['separate_us']:.1f} / {m['fused_us']:.1f}"
                     if m else "- | -")
            lines.append(f"| {r.get('mode', '-')} | {r['T']} | {r['d']} | "
                         f"{fmt(r.get('separate_us'), '.1f', r.get('note', '-'))} | {fmt(r.get('fused_us'), '.1f')} | "
                         f"{fmt(r.get('ratio'), '.2f')} | {model} |")
    if not results["dry_run"]:
        lines += ["", "**Goals**"] + [f"- {g}" for g in gpu_check_goals(results)]
    return lines


def gpu_check_goals(results: dict) -> list:
    """The issue's goals for a gpu_check run, each with its measured value."""
    s = results["sections"]
    out = []
    pre = {(r["T"], r["d"], r["impl"]): r for r in s.get("prefill", {}).get("rows", [])}
    for (T, d, impl), r in pre.items():
        if impl != "triton" or r.get("pct_copy") is None:
            continue
        comp = pre.get((T, d, "compiled"), {})
        speed = comp["median_us"] / r["median_us"] if "median_us" in comp else None
        out.append(f"T={T} d={d}: {r['pct_copy']:.0f} % of copy (goal >= 80 %: "
                   f"{'met' if r['pct_copy'] >= 80 else 'NOT met'}); vs torch.compile "
                   f"{'-' if speed is None else f'{speed:.2f}x'} (goal >= 1.3x)")
    empty = s.get("empty_kernel", {}).get("median_us")
    for r in s.get("decode", {}).get("ops", []):
        if "median_us" in r and empty:
            ratio = r["median_us"] / empty
            out.append(f"{r['op']} d={r['d']}: {ratio:.2f}x an empty kernel (goal <= 1.5x: "
                       f"{'met' if ratio <= 1.5 else 'NOT met'})")
    for r in s.get("decode", {}).get("rows", []):
        if r.get("layers") and len(r["layers"]) == 3 and r.get("ratio"):
            slow = 100 * (r["ratio"] - 1)
            out.append(f"decode, {r['config']}: +{slow:.2f} % (goal <= 0.5 %: {'met' if slow <= 0.5 else 'NOT met'})")
    return out
