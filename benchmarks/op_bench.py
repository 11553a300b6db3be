"""Op-level benchmark: every implementation of `steer` / `apply` over a grid of cases, with correctness against
the reference, launches, bytes, bandwidth and the share of a decoder layer of the same width."""
from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Iterable, Optional

import torch
from tqdm import tqdm

import finesteer_kernels

from . import timing
from .cases import REL_TOL, DecoderLayerBench, OpCase, bytes_moved, interpreting, make_inputs, make_params, rel_error
from .implementations import IMPLEMENTATIONS, forced_backend, op_function

# CPU only: skip timing a decoder layer whose estimated cost exceeds `layer_limit_s` per call. fp32 runs ~25 GFLOP/s
# per core here, so a d = 4096 layer on 512 rows would take ~9 s a call on one thread.
CPU_FLOPS_PER_S_PER_THREAD = 25e9


@dataclasses.dataclass
class OpBenchConfig:
    ops: tuple = ("steer", "apply")
    rows: tuple = (1, 16, 64, 512, 4096)
    widths: tuple = (576, 4096)
    residual: tuple = (False, True)
    dtypes: tuple = (torch.float32,)
    impls: tuple = IMPLEMENTATIONS
    device: str = "cpu"
    budget_s: float = 0.3  # per timed measurement
    layer: bool = True  # time a decoder layer of the same width
    layer_limit_s: float = 1.0  # CPU: skip layers estimated slower than this per call
    compile_backend: str = "inductor"  # "eager" traces with dynamo only (fast; for dry runs)
    copy_gbps: Optional[float] = None  # measured copy bandwidth of the device (GPU)
    peak_gbps: Optional[float] = None  # data-sheet peak of the device (GPU)
    deadline: Optional[float] = None  # time.perf_counter() after which no new case starts (rows say so)


def op_groups(ops: tuple, impls: tuple, compile_ops: tuple) -> list[tuple]:
    """``(ops, impls)`` runs: the ops in ``compile_ops`` with every implementation, the others without the
    torch.compile one (each compile costs 10-20 s)."""
    with_compile = tuple(o for o in ops if o in compile_ops)
    without = tuple(o for o in ops if o not in compile_ops)
    groups = [(with_compile, tuple(impls)), (without, tuple(i for i in impls if i != "compiled"))]
    return [(o, i) for o, i in groups if o and i]


def triton_problem(h: torch.Tensor) -> Optional[str]:
    """None when the Triton kernels can run on ``h``, else why not."""
    try:
        with forced_backend("triton"):
            finesteer_kernels.select_backend(h)
    except RuntimeError as e:
        return str(e)
    return None


def _call(fn, params, inputs):
    return lambda: fn(params, **inputs)


def _layer_row(layer: Optional[DecoderLayerBench], rows: int, cfg: OpBenchConfig, cache: dict) -> dict:
    if layer is None:
        return {"layer_us": None, "layer_note": "not measured"}
    if rows in cache:
        return cache[rows]
    device = torch.device(cfg.device)
    estimate = layer.estimated_flops(rows) / (CPU_FLOPS_PER_S_PER_THREAD * torch.get_num_threads())
    if device.type == "cpu" and estimate > cfg.layer_limit_s:
        result = {"layer_us": None, "layer_note": f"skipped on CPU (~{estimate:.0f} s a call; raise --layer-limit)"}
    else:
        stats = timing.measure(layer.call_for(rows), device, budget_s=cfg.budget_s, min_reps=3)
        result = {"layer_us": stats.median * 1e6, "layer_note": ""}
    cache[rows] = result
    return result


def run_op_bench(cfg: OpBenchConfig, progress: bool = True) -> list[dict]:
    """One row (dict) per (case, implementation); see `benchmarks/README.md` for the columns."""
    device = torch.device(cfg.device)
    results: list[dict] = []
    combos = list(itertools.product(cfg.dtypes, cfg.widths, cfg.residual, cfg.ops))
    total = len(combos) * len(cfg.rows) * len(cfg.impls)
    bar = tqdm(total=total, desc="op benchmark", disable=not progress, leave=False)
    layers: dict = {}
    layer_times: dict = {}
    for dtype, d, residual, op in combos:
        if cfg.deadline is not None and time.perf_counter() > cfg.deadline:
            for rows, impl in itertools.product(cfg.rows, cfg.impls):
                results.append(_skipped_row(OpCase(op, rows, d, residual, dtype), impl, device,
                                            "skipped: time budget"))
                bar.update()
            continue
        params = make_params(d, residual, device)
        if cfg.layer and (d, dtype) not in layers:
            layers[(d, dtype)] = DecoderLayerBench(d, dtype, device)
        layer = layers.get((d, dtype))
        functions = {impl: op_function(impl, op, cfg.compile_backend) for impl in cfg.impls}
        for rows in cfg.rows:
            case = OpCase(op, rows, d, residual, dtype)
            inputs = make_inputs(case, params, device)
            with torch.inference_mode():
                expected = op_function("reference", op)(params, **inputs)
            moved = bytes_moved(case, params)
            layer_info = _layer_row(layer, rows, cfg, layer_times.setdefault((d, dtype), {}))
            for impl in cfg.impls:
                bar.set_postfix_str(f"{case.label()} {impl}")
                results.append(_measure_one(case, impl, functions[impl], params, inputs, expected, moved,
                                            layer_info, cfg))
                bar.update()
    bar.close()
    return results


def _skipped_row(case: OpCase, impl: str, device: torch.device, note: str, moved: Optional[int] = None,
                 layer_us: Optional[float] = None) -> dict:
    return {"op": case.op, "impl": impl, "T": case.rows, "d": case.d, "residual": case.residual,
            "dtype": case.dtype_name, "device": device.type, "bytes": moved, "median_us": None, "p20_us": None,
            "p80_us": None, "reps": 0, "launches": None, "gbps": None, "pct_peak": None, "pct_copy": None,
            "layer_us": layer_us, "layer_share": None, "max_rel_err": None, "ok": None, "note": note}


def _measure_one(case: OpCase, impl: str, fn, params, inputs, expected, moved: int, layer_info: dict,
                 cfg: OpBenchConfig) -> dict:
    device = torch.device(cfg.device)
    row = _skipped_row(case, impl, device, "", moved, layer_info["layer_us"])
    timed = True
    if impl == "triton":
        problem = triton_problem(inputs["h"])
        if problem is not None:
            row["note"] = "no GPU" if device.type == "cpu" else problem
            return row
        if interpreting():
            timed = False
            row["note"] = "Triton interpreter: checked, not timed"
    call = _call(fn, params, inputs)
    with torch.inference_mode():
        out = call()
    err = rel_error(out, expected)
    row["max_rel_err"] = err
    row["ok"] = bool(err <= REL_TOL[case.dtype])
    if not timed:
        return row
    row["launches"] = timing.count_launches(call, device)
    stats = timing.measure(call, device, budget_s=cfg.budget_s)
    row.update(stats.as_us())
    row["gbps"] = timing.bytes_per_second(moved, stats.median)
    if row["gbps"] is not None and cfg.peak_gbps:
        row["pct_peak"] = 100 * row["gbps"] / cfg.peak_gbps
    if row["gbps"] is not None and cfg.copy_gbps:
        row["pct_copy"] = 100 * row["gbps"] / cfg.copy_gbps
    if row["layer_us"]:
        row["layer_share"] = row["median_us"] / row["layer_us"]
    return row


def speedups(rows: Iterable[dict], baseline: str = "reference") -> list[dict]:
    """Per case: each implementation's median time relative to ``baseline``'s (baseline / impl; > 1 is faster)."""
    rows = list(rows)
    key = lambda r: (r["op"], r["T"], r["d"], r["residual"], r["dtype"])  # noqa: E731
    base = {key(r): r["median_us"] for r in rows if r["impl"] == baseline and r["median_us"]}
    out = []
    for r in rows:
        b = base.get(key(r))
        if b and r["median_us"] and r["impl"] != baseline:
            out.append({**{k: r[k] for k in ("op", "impl", "T", "d", "residual", "dtype")},
                        f"speedup_vs_{baseline}": b / r["median_us"]})
    return out
