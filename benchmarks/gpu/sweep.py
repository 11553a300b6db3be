"""Section ``sweep``: at T = 8192, d = 4096, bf16, the model's best candidates and a few others (the pick first),
each checked and timed in a CUDA graph with a cold L2: the pick against the best measured, and how well the model
ranks them. When the split-d smoke failed (``FINESTEER_SPLIT_D=0``), split configurations are skipped: their spin
waits are what failed."""
from __future__ import annotations

NAME, DEADLINE = "sweep", 0.52
SHAPE, DRY_SHAPE = (8192, 4096), (40, 96)
COUNT, DRY_COUNT = 12, 3
REPS = 20


def sweep_configs(shape, card, count: int) -> list:
    """The model's ``count`` best candidates, plus the best unsplit and a v1-like tile, the pick first."""
    from finesteer_kernels.heuristics import best_steer, steer_candidates
    from finesteer_kernels.perf_model import Config, predict_steer

    ranked = sorted(((predict_steer(shape, c, card).time_us, c) for c, _ in steer_candidates(shape, card)),
                    key=lambda pair: pair[0])
    chosen = [best_steer(shape, card).config]
    for extra in [c for _, c in ranked if c.SPLIT == 1][:1] + [Config(64, 64, 8, 3), Config(32, 64, 4, 2)]:
        if extra not in chosen:
            chosen.append(extra)
    for _, config in ranked:
        if len(chosen) >= count:
            break
        if config not in chosen:
            chosen.append(config)
    return chosen[:max(count, 2)]


def run(sec, ctx) -> dict:
    import torch

    from benchmarks import timing
    from benchmarks.cases import REL_TOL, rel_error
    from benchmarks.gpu.bandwidth import copy_gbps, model_cards
    from benchmarks.gpu.steer_case import launch, prediction, shape_of, steer_case
    from finesteer_kernels.heuristics import split_d_allowed

    T, d = DRY_SHAPE if ctx.dry else SHAPE
    params, h, expected, packed, layout = steer_case(d, T, ctx.device)
    shape = shape_of(h, layout)
    shipped, _ = model_cards(ctx.results)
    copy = copy_gbps(ctx.results)
    for i, config in enumerate(sweep_configs(shape, shipped, DRY_COUNT if ctx.dry else COUNT)):
        row = {"config": config.short(), "picked": i == 0}
        if config.SPLIT > 1 and not split_d_allowed():
            sec.skip(row, why="split-d is off (FINESTEER_SPLIT_D=0)")
            continue

        def one(config=config) -> dict:
            out = torch.empty_like(h)
            with torch.inference_mode():
                seconds = timing.time_graph(lambda: launch(h, out, params, packed, layout, config), ctx.device,
                                            ctx.reps(REPS)).median
                out.fill_(float("nan"))  # the check below sees this launch's rows only
                launch(h, out, params, packed, layout, config)
            return {"ok": rel_error(out, expected) <= REL_TOL[torch.bfloat16], "median_us": seconds * 1e6,
                    "pct_copy": 100 * 2 * h.numel() * 2 / seconds / 1e9 / copy if copy else None,
                    "model": prediction(ctx.results, shape, config)}

        sec.measure(row, one, config.short())
    timed = [r for r in sec.record["rows"] if "median_us" in r]
    summary = {"T": T, "d": d}
    if timed:
        best = min(timed, key=lambda r: r["median_us"])
        pick = next((r for r in timed if r["picked"]), None)
        summary.update(best=best["config"], pick_over_best=pick["median_us"] / best["median_us"] if pick else None)
        order_measured = [r["config"] for r in sorted(timed, key=lambda r: r["median_us"])]
        order_model = [r["config"] for r in sorted(timed, key=lambda r: r["model"]["shipped"]["time_us"])]
        summary["model_rank_agreement"] = sum(a == b for a, b in zip(order_measured, order_model)) / len(timed)
    return summary


def markdown(results: dict) -> list:
    from benchmarks.report import fmt, pct

    sw = results["sections"].get(NAME, {})
    if not sw.get("rows"):
        return []
    lines = ["", f"**Config sweep** T={sw.get('T', '-')} d={sw.get('d', '-')} (pick first; pick / best measured "
             f"= {fmt(sw.get('pick_over_best'), '.2f')}, best {sw.get('best', '-')})", "",
             "| config | us | % copy | model us (shipped / measured bw) |", "| --- | --- | --- | --- |"]
    for r in sw["rows"]:
        m = r.get("model", {})
        lines.append(f"| {r['config']}{' (pick)' if r['picked'] else ''} | "
                     f"{fmt(r.get('median_us'), '.1f', r.get('note') or r.get('error', '-')[:80])} | "
                     f"{pct(r.get('pct_copy'))} | {fmt(m.get('shipped', {}).get('time_us'), '.1f')} / "
                     f"{fmt(m.get('measured', {}).get('time_us'), '.1f')} |")
    return lines
