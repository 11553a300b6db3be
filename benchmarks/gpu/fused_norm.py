"""Section ``fused_norm`` (issue 14): the edit fused with the next RMSNorm against the edit then the model's
LlamaRMSNorm module, both modes, bf16, prefill shapes with a cold L2 and decode shapes, beside the model
(`benchmarks.fused_norm_bench`, which checks each row: fused against separate)."""
from __future__ import annotations

NAME, DEADLINE = "fused_norm", 0.93
SHAPES = [(4096, 4096), (8192, 4096), (1, 576), (1, 4096)]
DRY_SHAPES = [(20, 64), (1, 40)]


def run(sec, ctx) -> dict:
    import torch

    from benchmarks.fused_norm_bench import fused_norm_rows
    from benchmarks.gpu.record import error_fields

    for T, d in DRY_SHAPES if ctx.dry else SHAPES:
        if sec.out_of_time():
            sec.skip({"T": T, "d": d})
            continue
        sec.starting(f"T={T} d={d}")
        try:
            # timed on a GPU only: its CPU timing is other code, which benchmarks.run's test covers
            rows = fused_norm_rows(ctx.device, [(T, d)], torch.bfloat16, timed=ctx.gpu)
        except Exception as e:
            rows = [{"T": T, "d": d, **error_fields(e)}]
        for row in rows:
            sec.add(row)
    return {"note": "separate = the steering op then transformers' LlamaRMSNorm module (eager); model "
                    "figures: the steering kernel + a one-launch RMSNorm + a launch gap vs the fused kernel "
                    "(predicted)"}


def markdown(results: dict) -> list:
    from benchmarks.report import fmt

    fused = results["sections"].get(NAME, {})
    if not fused.get("rows"):
        return []
    lines = ["", "**Fused with the next RMSNorm** (bf16; separate = op + LlamaRMSNorm module; model: H200 "
             "predicted)", "", "| mode | T | d | separate us | fused us | separate / fused | model MB sep / fused "
             "| model us sep / fused |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in fused["rows"]:
        m = r.get("model", {}).get("H200")
        model = f"{m['separate_mb']:.2f} / {m['fused_mb']:.2f} | {m['separate_us']:.1f} / {m['fused_us']:.1f}" \
            if m else "- | -"
        lines.append(f"| {r.get('mode', '-')} | {r['T']} | {r['d']} | "
                     f"{fmt(r.get('separate_us'), '.1f', r.get('note') or r.get('error', '-')[:80])} | "
                     f"{fmt(r.get('fused_us'), '.1f')} | {fmt(r.get('ratio'), '.2f')} | {model} |")
    return lines
