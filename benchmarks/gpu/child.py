"""A section run in a child process with its own timeout (the split-d smoke, whose spin waits could hang the GPU;
vLLM, which starts its own processes and wants a fresh CUDA context). The child writes its one-section record to
a file after every row, as the parent does; the parent merges those rows into its own record, so a child that
hangs or dies still leaves the rows it finished and the item it was on."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUTPUT_TAIL = 3000  # characters of the child's stdout and stderr kept in the record


class ChildFailed(Exception):
    pass


def run_in_child(sec, module: str, timeout_s: float, args=(), env=None) -> dict:
    """Run ``python -m module --record FILE *args`` (in a session of its own, killed whole on timeout) and merge
    the section it records into ``sec``. Returns ``{"child": ...}`` (exit status, seconds, timed out, the end of
    its output) for the section's record; raises `ChildFailed` when the child timed out, failed or died."""
    fd, path = tempfile.mkstemp(prefix="gpu_check-", suffix=".json")
    os.close(fd)
    os.unlink(path)  # the child creates it; none there means the child never got as far as its record
    child_env = {**os.environ, **(env or {}),
                 "PYTHONPATH": os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", module, "--record", path, *args], cwd=REPO_ROOT, env=child_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and whatever it started (vLLM's engine and workers)
        output, _ = proc.communicate()
        timed_out = True
    child = {"returncode": proc.returncode, "seconds": time.perf_counter() - start, "timeout_s": timeout_s,
             "timed_out": timed_out, "output_tail": (output or "")[-OUTPUT_TAIL:]}
    record = _read_record(path)
    if "traceback" in record:  # the child's own; the parent's would only show this function
        child["traceback"] = record["traceback"]
    for key, value in record.items():
        if key not in ("status", "seconds", "in_progress", "error", "traceback", "note"):
            sec.record[key] = value
    sec.record["child"] = child
    sec.run.save()
    if timed_out:
        raise ChildFailed(f"timed out after {timeout_s:.0f} s (killed) while running: "
                          f"{record.get('in_progress', 'its start-up (no row begun)')}")
    if record.get("status") == "skipped":
        from benchmarks.gpu.record import SectionSkipped

        raise SectionSkipped(record.get("note", "skipped in the child"))
    if record.get("status") != "ok":
        raise ChildFailed(record.get("error") or f"the child exited with status {proc.returncode} before finishing "
                                                 f"its record; its output ends: {child['output_tail'][-500:]}")
    return {"child": child}


def _read_record(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            sections = json.load(f)["sections"]
        return next(iter(sections.values()), {})
    except (OSError, ValueError, KeyError):
        return {}
    finally:
        if os.path.exists(path):
            os.unlink(path)


def child_main(name: str, fn, argv=None) -> int:
    """The child's side: ``--record FILE [--dry-run]``; runs ``fn(section, context)`` as section ``name`` with no
    deadline of its own (the parent's timeout is the deadline) and writes the record."""
    parser = argparse.ArgumentParser(description=f"gpu_check's {name} section, run by benchmarks/gpu_check.py")
    parser.add_argument("--record", required=True, help="the JSON file the section's record is written to")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.dry_run:  # before triton is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from benchmarks.gpu.record import Context, Run

    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        torch.set_num_threads(1)
    run = Run(args.record, {"sections": {}}, time.perf_counter(), float("inf"))
    record = run.section(name, 1.0, fn, Context(device, args.dry_run, run.results, float("inf")))
    return 0 if record["status"] in ("ok", "skipped") else 1
