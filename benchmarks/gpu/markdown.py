"""A gpu_check run as markdown (printed last and written beside the JSON): where and what ran, each section's
status, every section's own tables (each section module's ``markdown``), and the issue's goals, met or not
(each section module's ``goals``)."""
from __future__ import annotations

DRY_RUN_TIMES = ("Dry run: interpreted kernels and eager calls on a CPU, one repetition each. Its times and goals "
                 "check the code that computes them; they measure nothing.")


def run_markdown(results: dict, sections) -> list:
    env = results["environment"]
    lines = [f"## gpu_check {'(dry run) ' if results['dry_run'] else ''}{env.get('gpu', 'CPU')}, {env['date']}",
             f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}", ""]
    if results["dry_run"]:
        lines += [DRY_RUN_TIMES, ""]
    lines += ["| section | status | seconds |", "| --- | --- | --- |"]
    for name, record in results["sections"].items():
        why = record.get("error") or record.get("note", "") if record["status"] != "ok" else ""
        lines.append(f"| {name} | {record['status']}{' ' + why[:160] if why else ''} | "
                     f"{record.get('seconds', 0):.1f} |")
    for section in sections:
        lines += section.markdown(results)
    if results.get("goals"):
        lines += ["", "**Goals**"] + [f"- {g}" for g in results["goals"]]
    return lines


def goals(results: dict, sections) -> list:
    return [line for section in sections if hasattr(section, "goals") for line in section.goals(results)]
