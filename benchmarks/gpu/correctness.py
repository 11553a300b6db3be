"""Section ``correctness``: every op against the reference on the GPU: the four layouts (relu and identity MLP,
CAA, a width not a multiple of 16) in bf16 at a multi-tile row count, the full layout also in fp16 and at one row,
and in place on the first. One steering-kernel compile costs ~4 s: the cases run most important first, so a
deadline cuts the least."""
from __future__ import annotations

NAME, DEADLINE = "correctness", 0.80
WIDTHS, DRY_WIDTHS = (4096, 1000), (64, 40)  # (wide, odd)
ROWS, DRY_ROWS = 77, 5


def cases(dry: bool) -> list:
    """(name, params factory, dtype name, rows, in place too)."""
    from benchmarks.cases import random_params

    (wide, odd), rows = (DRY_WIDTHS, DRY_ROWS) if dry else (WIDTHS, ROWS)
    full = (f"finesteer+res(relu) d={wide}", lambda: random_params(wide, min(64, wide // 2), 8, residual="relu",
                                                                   m=32, k=8, seed=4))
    return [
        (*full, "bf16", rows, True),
        (f"finesteer d={wide}", lambda: random_params(wide, min(64, wide // 2), 8, seed=3), "bf16", rows, False),
        (f"finesteer+res(identity) d={odd}", lambda: random_params(odd, 8, 3, residual="identity", seed=5), "bf16",
         rows, False),
        (f"caa d={odd}", lambda: random_params(odd, 0, 1, seed=6), "bf16", rows, False),
        (*full, "fp16", rows, False),
        (*full, "bf16", 1, False),
    ]


def run(sec, ctx) -> dict:
    import torch

    import finesteer_kernels as fk
    from benchmarks.cases import REL_TOL, random_rows, rel_error
    from benchmarks.implementations import forced_backend
    from finesteer_kernels import reference

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    for name, factory, dtype_name, rows, in_place in cases(ctx.dry):
        where = {"case": name, "dtype": dtype_name, "rows": rows}

        def check(factory=factory, dtype=dtypes[dtype_name], rows=rows, in_place=in_place) -> dict:
            """Every op of the case: a row per op in ``checks`` (their errors), summarised in this row."""
            params_cpu = factory()
            params = params_cpu.to(ctx.device)
            h = random_rows(params_cpu, rows, seed=rows, dtype=dtype).to(ctx.device)
            seq = torch.arange(rows) % 3  # three sequences ...
            seq[1:2] = -1  # ... and row 1 left alone
            seq = seq.to(ctx.device)
            coef_ref = reference.synthesize(h, params)
            expected = {"steer": reference.steer(h, params), "synthesize": coef_ref,
                        "apply_coef": reference.apply_coef(h, coef_ref[:3], params, seq)}
            with torch.inference_mode(), forced_backend("triton"):
                got = {"steer": fk.steer(h, params), "synthesize": fk.synthesize(h, params),
                       "apply_coef": fk.apply_coef(h, coef_ref[:3], params, seq)}
                if in_place:
                    got.update(steer_=fk.steer_(h.clone(), params),
                               apply_coef_=fk.ops.apply_coef_(h.clone(), coef_ref[:3], params, seq))
                    expected.update(steer_=expected["steer"], apply_coef_=expected["apply_coef"])
            # coefficients are fp32 whatever h is; their tolerance is the input's (they come from h)
            errors = {op: rel_error(out, expected[op]) if out.shape == expected[op].shape
                      and out.dtype == expected[op].dtype else float("inf") for op, out in got.items()}
            result = {"errors": errors, "tol": REL_TOL[dtype], "ok": max(errors.values()) <= REL_TOL[dtype]}
            if rows > 1 and params.has_gate:  # the gate must really switch: some rows on, some off
                on = reference.gate(h.float(), params)
                result["gate_mix"] = bool(0 < on.sum() < rows)
                result["ok"] = result["ok"] and result["gate_mix"]
            return result

        sec.measure(where, check, f"{name} {dtype_name} T={rows}")
    checks = sec.record["rows"]
    return {"passed": sum(r.get("ok") is True for r in checks), "ops_checked": sum(len(r.get("errors", {}))
                                                                                   for r in checks)}


def markdown(results: dict) -> list:
    corr = results["sections"].get(NAME, {})
    if not corr.get("rows"):
        return []
    failed = [r for r in corr["rows"] if r.get("ok") is not True and "note" not in r]
    skipped = [r for r in corr["rows"] if "note" in r]
    lines = [f"\n**Correctness**: {corr.get('passed', 0)} cases ({corr.get('ops_checked', 0)} op checks) passed, "
             f"{len(failed)} failed, {len(skipped)} skipped (bf16, fp16)"]
    lines += [f"- FAILED {r['case']} {r['dtype']} T={r['rows']}: {r.get('error') or r.get('errors')}" for r in failed]
    return lines
