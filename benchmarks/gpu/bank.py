"""Section ``bank`` (issue 13): a mixed batch of 4 steerers against the same batch on one steerer, token mode,
bf16, the bank kernel in a CUDA graph with a cold L2, beside the bytes model (`benchmarks.bank_bench`), each
checked against the bank reference. By the model the kernel runs split-d at T = 16 and the bounded persistent
grid at T = 4096, d = 4096 (issue 24; the row's ``predicted`` names the launch)."""
from __future__ import annotations

NAME, DEADLINE = "bank", 0.86
SHAPES, DRY_SHAPES = [(16, 4096), (4096, 4096)], [(20, 64)]
REPS = 20


def run(sec, ctx) -> None:
    import torch

    from benchmarks import timing
    from benchmarks.bank_bench import predictions
    from benchmarks.cases import rel_error
    from benchmarks.gpu.split_d_smoke import spin_cap_report
    from finesteer_kernels import bank_reference, plan_rows, steer_bank

    for T, d in DRY_SHAPES if ctx.dry else SHAPES:
        def one(T=T, d=d) -> dict:
            bank, h, indices = bank_case(T, d, ctx.device)
            row = {"predicted": predictions(T, d, bank), "ok": True}
            for name, index in indices.items():
                plan = plan_rows(index, len(bank))
                with torch.inference_mode():
                    err = rel_error(steer_bank(h, bank, index, plan), bank_reference.steer_bank(h, bank, index))
                    stats = timing.time_graph(lambda: steer_bank(h, bank, index, plan), ctx.device, ctx.reps(REPS))
                row[f"{name}_ok"] = err <= 1e-2
                row["ok"] = row["ok"] and row[f"{name}_ok"]
                row[f"{name}_us"] = stats.median * 1e6
            row["measured_ratio"] = row["mixed_us"] / row["uniform_us"]
            # T = 16 runs split-d, whose waits are bounded: a wait that gave up fails the row (issue 24)
            row["spin_cap"] = spin_cap_report(ctx.device)
            row["ok"] = row["ok"] and not row["spin_cap"]["gave_up"]
            return row

        sec.measure({"T": T, "d": d}, one)


def bank_case(T: int, d: int, device) -> tuple:
    """The section's bank (4 steerers of width ``d``), ``T`` bf16 rows and their assignments (``mixed``: the
    steerers in turn; ``uniform``: all on the first). The split-d smoke launches the mixed one too."""
    import torch

    from benchmarks.bank_bench import assignments, make_bank
    from benchmarks.cases import random_rows

    bank = make_bank(d, device)
    h = random_rows(bank.params[0].to("cpu"), T, seed=T, dtype=torch.bfloat16).to(device)
    return bank, h, assignments(T, device)


def markdown(results: dict) -> list:
    from benchmarks.report import fmt

    bank = results["sections"].get(NAME, {})
    if not bank.get("rows"):
        return []
    lines = ["", "**Bank** (4 steerers mixed vs one steerer, bf16, CUDA graph, cold L2)", "",
             "| T | d | mixed us | uniform us | mixed / uniform | model mixed / uniform (H200) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in bank["rows"]:
        pred = r.get("predicted", {}).get("H200", {})
        lines.append(f"| {r['T']} | {r['d']} | "
                     f"{fmt(r.get('mixed_us'), '.1f', r.get('note') or r.get('error', '-')[:80])} | "
                     f"{fmt(r.get('uniform_us'), '.1f')} | {fmt(r.get('measured_ratio'), '.2f')} | "
                     f"{fmt(pred.get('time_ratio'), '.2f')} |")
    return lines
