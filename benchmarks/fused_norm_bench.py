"""Op level, issue 14: the steering edit fused with the next RMSNorm against the edit followed by the model's own norm
module (transformers' LlamaRMSNorm, what a patched model runs without ``fuse_norm``), in token mode (``steer_`` +
norm vs ``steer_rmsnorm_``) and query mode (``apply_delta_`` + norm vs ``apply_delta_rmsnorm_``, the decode step),
each row checked (the fused outputs against the separate ones) and set beside the bytes model: HBM bytes and time of
the separate steering kernel plus a one-launch RMSNorm (and the launch gap between them) against the fused kernel.

On a CPU the ops run on the torch backend, where "fused" is the same work (the edit, then the norm's formula): the
timing shows that the option costs nothing there; the saving is a GPU one and is predicted. On a GPU the calls are
captured in CUDA graphs (prefill sizes with a cold L2; decode sizes 100 calls a graph); on a CPU the two calls
alternate, so both see the same machine. Under the Triton interpreter (dry runs) every call runs once, checked,
untimed.

The ops edit their rows in place, as a hook does, so every timed call edits rows an earlier call already edited. The
timed calls therefore run with the gate forced open (``tau = 0``: every row steered, as the model's figures assume,
whichever way earlier edits moved the rows) and cycle through copies of the rows, so that no copy is edited a
thousand times (the residual MLP's edit grows with the row: a row edited ~1000 times overflows). A decode-size
graph of 100 calls holds 100 copies, each edited about a dozen times; a prefill-size graph of one call replays one
copy some twenty times. The copies are checked finite afterwards (the row's ``ok``).
"""
from __future__ import annotations

import time

import torch

import finesteer_kernels as fk

from . import timing
from .cases import REL_TOL, interpreting, make_params, random_rows, rel_error


def norm_module(d: int, device, dtype) -> tuple:
    """(LlamaRMSNorm with random weights, its `RMSNormParams` as patching recognises it)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from finesteer.patching.fused_norm import rmsnorm_of

    module = LlamaRMSNorm(d, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(1.0 + 0.1 * torch.randn(d, generator=torch.Generator().manual_seed(d)))
    module = module.to(device, dtype)
    norm, why = rmsnorm_of(module, d)
    if norm is None:
        raise RuntimeError(f"LlamaRMSNorm not recognised: {why}")
    return module, norm


def model_figures(T: int, d: int, elem: int, params) -> dict:
    """Per card: (separate, fused) HBM MB and predicted us for both modes, at ``params``' sizes; separate = the
    steering kernel, a one-launch RMSNorm and the launch gap between them."""
    from finesteer_kernels.heuristics import best_steer
    from finesteer_kernels.perf_model import (CARDS, Shape, predict_apply_delta, predict_apply_delta_norm,
                                              predict_rmsnorm)

    sizes = (params.r, params.num_experts, params.m, params.k)
    out = {}
    for card in CARDS.values():
        norm = predict_rmsnorm(T, d, elem, card)
        steer = best_steer(Shape.of(T, d, elem, *sizes), card)
        fused = best_steer(Shape.of(T, d, elem, *sizes, norm_out=elem), card)
        sequences = min(T, 64)
        apply = predict_apply_delta(T, d, elem, sequences, card)
        apply_norm = predict_apply_delta_norm(T, d, elem, sequences, card)
        gap = card.launch_us
        out[card.name] = {
            "token": {"separate_mb": (steer.hbm_bytes + norm.hbm_bytes) / 1e6, "fused_mb": fused.hbm_bytes / 1e6,
                      "separate_us": steer.time_us + norm.time_us + gap, "fused_us": fused.time_us,
                      "fused_config": fused.config.short()},
            "query": {"separate_mb": (apply.hbm_bytes + norm.hbm_bytes) / 1e6, "fused_mb": apply_norm.hbm_bytes / 1e6,
                      "separate_us": apply.time_us + norm.time_us + gap, "fused_us": apply_norm.time_us},
        }
    return out


def _medians_us(fns, device, graphs: bool, decode: bool, budget_s: float) -> list:
    """Median microseconds per call of each function. GPU: each in its own CUDA graph. CPU: calls interleaved
    round by round (a slow spell of a shared machine then hits all alike), ``budget_s`` per function."""
    if graphs:
        return [timing.time_graph(fn, device, reps=10 if decode else 20, cold_l2=not decode,
                                  calls_per_graph=100 if decode else 1).median * 1e6 for fn in fns]
    samples = [[] for _ in fns]
    for fn in fns:
        fn()  # warm-up
    deadline = time.perf_counter() + budget_s * len(fns)
    while min(len(s) for s in samples) < 5 or (time.perf_counter() < deadline and len(samples[0]) < 500):
        for fn, out in zip(fns, samples):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [timing.stats_of(s).median * 1e6 for s in samples]


def _ops(params, module, norm, delta) -> dict:
    """mode -> (separate, fused), each editing its rows in place and returning the normalised rows."""
    return {"token": (lambda h: (fk.steer_(h, params), module(h))[1],
                      lambda h: fk.steer_rmsnorm_(h, params, norm)),
            "query": (lambda h: (fk.apply_delta_(h, delta), module(h))[1],
                      lambda h: fk.apply_delta_rmsnorm_(h, delta, norm))}


WORK_BYTES = 256 << 20  # the copies of the rows the timed calls cycle through, at most (and at most 100 copies)


def _cycling(op, h0: torch.Tensor):
    """``(call, copies)``: each call runs ``op`` on the next of several copies of ``h0`` (a CUDA graph of 100 calls
    records 100 distinct copies)."""
    copies = [h0.clone() for _ in range(max(1, min(100, WORK_BYTES // max(1, h0.numel() * h0.element_size()))))]
    turn = [0]

    def call():
        turn[0] += 1
        return op(copies[turn[0] % len(copies)])

    return call, copies


def fused_norm_rows(device, shapes, dtype=torch.float32, budget_s: float = 0.3, timed: bool = True) -> list:
    """One row per (mode, T, d): separate and fused medians (us), their ratio, agreement, the model's figures."""
    device = torch.device(device)
    graphs = timed and device.type == "cuda"
    rows = []
    for T, d in shapes:
        params = make_params(d, residual=True, device=device)
        module, norm = norm_module(d, device, dtype)
        h0 = random_rows(params.to("cpu"), T, seed=T, dtype=dtype).to(device).reshape(1, T, d)
        open_gate = params.replace(tau=0.0)  # the timed calls: every row steered, whatever earlier calls did
        with torch.inference_mode():
            delta = fk.coef_delta(fk.synthesize(h0[:, -1], params), params)
            delta_open = fk.coef_delta(fk.synthesize(h0[:, -1], open_gate), open_gate)
        ops = _ops(params, module, norm, delta)
        timed_ops = _ops(open_gate, module, norm, delta_open)
        figures = model_figures(T, d, h0.element_size(), params)
        for mode, (separate, fused) in ops.items():
            with torch.inference_mode():
                h_sep, h_fused = h0.clone(), h0.clone()
                y_sep, y_fused = separate(h_sep), fused(h_fused)
            # the interpreter truncates fp32 to bf16 (a GPU rounds), and Llama's norm rounds twice: 2 ulps there
            y_tol = 2e-2 if interpreting() and dtype == torch.bfloat16 else REL_TOL[dtype]
            ok = rel_error(h_fused, h_sep) <= REL_TOL[dtype] and rel_error(y_fused, y_sep) <= y_tol
            err = max(rel_error(h_fused, h_sep), rel_error(y_fused, y_sep))
            row = {"mode": mode, "T": T, "d": d, "dtype": str(dtype).replace("torch.", ""),
                   "backend": fk.select_backend(h0), "max_rel_err": err, "ok": ok,
                   "model": {card: f[mode] for card, f in figures.items()}}
            if timed:
                with torch.inference_mode():
                    (sep_call, sep_work), (fused_call, fused_work) = (_cycling(op, h0) for op in timed_ops[mode])
                    row["separate_us"], row["fused_us"] = _medians_us([sep_call, fused_call], device, graphs,
                                                                      T <= 64, budget_s)
                row["ratio"] = row["separate_us"] / row["fused_us"]
                row["ok"] = ok and all(bool(torch.isfinite(c).all()) for c in sep_work + fused_work)
            rows.append(row)
    return rows


def fused_norm_table(rows, card: str = "H200") -> str:
    from .report import fmt, table

    columns = [("mode", lambda r: r["mode"]), ("T", lambda r: str(r["T"])), ("d", lambda r: str(r["d"])),
               ("dtype", lambda r: r["dtype"]), ("backend", lambda r: r["backend"]),
               ("separate us", lambda r: fmt(r.get("separate_us"), ".1f")),
               ("fused us", lambda r: fmt(r.get("fused_us"), ".1f")),
               ("separate / fused", lambda r: fmt(r.get("ratio"), ".2f")),
               (f"model MB sep/fused ({card})",
                lambda r: f"{r['model'][card]['separate_mb']:.2f} / {r['model'][card]['fused_mb']:.2f}"),
               (f"model us sep/fused ({card})",
                lambda r: f"{r['model'][card]['separate_us']:.1f} / {r['model'][card]['fused_us']:.1f}"),
               ("ok", lambda r: fmt(r["ok"]))]
    return table(rows, columns)
