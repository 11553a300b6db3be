"""The live record of a gpu_check run: the results dict and the JSON file it is rewritten to after every row, each
section's deadline, and the rules every section follows (a row that fails keeps its error and the others run; a
section whose deadline has passed starts nothing new)."""
from __future__ import annotations

import dataclasses
import sys
import time
import traceback
from typing import Callable

from benchmarks.report import write_json


class SectionSkipped(Exception):
    """Raised by a section that cannot run here (vLLM not importable, ...): recorded as skipped, with the reason."""


@dataclasses.dataclass
class Context:
    """What every section gets: the device, whether this is the CPU dry run (tiny sizes, interpreted kernels), the
    run so far (later sections read earlier ones: the copy bandwidth, the card) and where the whole run's time
    budget ends (``time.perf_counter`` seconds). The dry run goes through the timing code too (eager calls in place
    of CUDA graphs, the wall clock in place of CUDA events, one repetition: `reps`), so that it reaches every line
    the GPU run will; its times are the interpreter's and mean nothing."""

    device: object
    dry: bool
    results: dict
    budget_end: float

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    def reps(self, gpu_reps: int) -> int:
        """Repetitions of a timing: ``gpu_reps`` on a GPU, one on a CPU (the dry run: only the code path counts)."""
        return gpu_reps if self.gpu else 1


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


def error_fields(e: BaseException) -> dict:
    """A failed row's ``error`` and the end of its ``traceback`` (call inside the ``except``): the one GPU run's
    failures must be diagnosable from the JSON alone."""
    return {"error": error_text(e), "traceback": traceback.format_exc()[-2000:]}


class Run:
    """A run's results dict and the file it is written to, after every row and every section: a run cut short by a
    hang or an outer timeout keeps every finished row, and names the item in progress."""

    def __init__(self, out_path: str, results: dict, started: float, budget_s: float):
        self.out_path, self.results = out_path, results
        self.started, self.budget_s = started, budget_s

    def save(self) -> None:
        write_json(self.out_path, self.results)

    def section(self, name: str, share: float, fn: Callable, *args) -> dict:
        """Run ``fn(section, *args)`` as section ``name`` unless the budget's ``share`` has passed (then it is
        recorded as skipped); its return value (a dict) joins its record. An exception, a row with an ``error`` or
        a row with ``ok`` False fails the section (recorded, not raised); `SectionSkipped` skips it."""
        sec = Section(self, name, self.started + share * self.budget_s)
        start = time.perf_counter()
        if sec.out_of_time():
            sec.record.update(status="skipped", note="time budget spent before it could start")
        else:
            print(f"[gpu_check] {name} ...", flush=True)
            try:
                sec.record.update(status="ok", **(fn(sec, *args) or {}))
                bad = sec.bad_rows()
                if bad:
                    sec.record.update(status="failed", error=f"{len(bad)} row(s) failed: " + "; ".join(bad)[:1500])
            except SectionSkipped as e:
                sec.record.update(status="skipped", note=str(e))
            except Exception as e:  # record and go on: one broken section must not hide the others' numbers
                sec.record.update(status="failed", **error_fields(e))
        if sec.record["status"] != "ok":
            print(f"[gpu_check] {name}: {sec.record['status'].upper()} "
                  f"{sec.record.get('error') or sec.record.get('note', '')}", file=sys.stderr, flush=True)
        sec.record.pop("in_progress", None)
        sec.record["seconds"] = time.perf_counter() - start
        self.save()
        return sec.record


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

    def skip(self, row: dict, key: str = "rows", why: str = "time budget") -> dict:
        return self.add({**row, "note": f"skipped: {why}"}, key)

    def measure(self, row: dict, what: Callable[[], dict], label: str = "", key: str = "rows") -> dict:
        """One configuration: skipped past the deadline; else ``what()``'s dict joins ``row``, and an exception
        becomes the row's ``error`` (with the end of its traceback) while the section goes on to the next."""
        if self.out_of_time():
            return self.skip(row, key)
        self.starting(label or " ".join(f"{k}={v}" for k, v in row.items()))
        try:
            row.update(what())
        except Exception as e:
            row.update(error_fields(e))
        return self.add(row, key)

    def bad_rows(self) -> list:
        """Rows (of every list in the record) that failed or disagree with their reference, as short labels."""
        out = []
        for key, rows in self.record.items():
            if isinstance(rows, list):
                for row in rows:
                    if isinstance(row, dict) and ("error" in row or row.get("ok") is False):
                        label = ", ".join(f"{k}={v}" for k, v in row.items()
                                          if isinstance(v, (str, int, float)) and k not in ("error", "traceback"))
                        out.append(f"{key}[{label[:160]}]: {row.get('error', 'disagrees with the reference')}")
        return out
