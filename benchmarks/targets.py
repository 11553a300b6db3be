"""The issue's performance targets, evaluated from measured rows. They are goals to report against, never test
assertions; each entry says the measured value and whether the goal is met (None when it was not measured)."""
from __future__ import annotations

from typing import Optional


def _find(rows, **match) -> Optional[dict]:
    hits = [r for r in rows if all(r.get(k) == v for k, v in match.items()) and r.get("median_us") is not None]
    return hits[0] if hits else None


def _entry(goal: str, value: Optional[float], met: Optional[bool], unit: str = "") -> dict:
    return {"goal": goal, "value": value, "unit": unit, "met": met}


def op_targets(rows: list, empty_kernel_us: Optional[float], dtype: str = "bf16") -> list[dict]:
    """GPU targets at T = 4096 (largest T measured), d = 4096, token-mode steer, without and with residual."""
    out = []
    big_t = max((r["T"] for r in rows), default=None)
    for residual in (False, True):
        where = dict(op="steer", d=4096, T=big_t, residual=residual, dtype=dtype)
        tag = f"T={big_t} d=4096 {'res' if residual else 'no res'}"
        triton = _find(rows, impl="triton", **where)
        ref = _find(rows, impl="reference", **where)
        comp = _find(rows, impl="compiled", **where)
        pct = triton.get("pct_copy") if triton else None
        out.append(_entry(f"triton >= 70 % of copy bandwidth ({tag})", pct, None if pct is None else pct >= 70, "%"))
        speed = ref["median_us"] / triton["median_us"] if triton and ref else None
        out.append(_entry(f"triton >= 3x faster than eager reference ({tag})", speed,
                          None if speed is None else speed >= 3, "x"))
        vs_comp = comp["median_us"] / triton["median_us"] if triton and comp else None
        out.append(_entry(f"triton faster than torch.compile ({tag})", vs_comp,
                          None if vs_comp is None else vs_comp > 1, "x"))
    small = _find(rows, impl="triton", op="steer", d=4096, T=1, residual=False, dtype=dtype)
    ratio = small["median_us"] / empty_kernel_us if small and empty_kernel_us else None
    out.append(_entry("triton at T=1 (d=4096) <= 2x an empty kernel", ratio, None if ratio is None else ratio <= 2, "x"))
    return out


def graph_targets(graph_rows: list) -> list[dict]:
    three = [r for r in graph_rows if r.get("layers") and len(r["layers"]) == 3 and r.get("ratio") is not None]
    worst = max((r["ratio"] for r in three), default=None)
    slow = None if worst is None else 100 * (worst - 1)
    return [_entry("decode with 3 steered layers under CUDA graphs <= 1 % slower (worst mode)", slow,
                   None if slow is None else slow <= 1, "%")]


def cpu_e2e_targets(e2e_rows: list) -> list[dict]:
    query = [r for r in e2e_rows if r.get("mode") == "query"]
    worst = max((r["time_ratio"] for r in query), default=None)
    slow = None if worst is None else 100 * (worst - 1)
    return [_entry("CPU: patched generation <= 3 % slower in query mode (worst of 1 / 3 layers)", slow,
                   None if slow is None else slow <= 3, "%")]


def format_targets(entries: list[dict]) -> str:
    lines = []
    for e in entries:
        value = "not measured" if e["value"] is None else f"{e['value']:.2f}{e['unit']}"
        verdict = {True: "met", False: "NOT met", None: "-"}[e["met"]]
        lines.append(f"  target: {e['goal']}: {value} ({verdict})")
    return "\n".join(lines)
