"""Measuring time, launches and bandwidth, the same way for every implementation.

CPU: wall clock per call (``perf_counter``), repeated until a time budget is spent. CUDA: a CUDA event pair around
each call, with the L2 cache flushed before it by reading a clean buffer four times its size (`flush_l2`; not
``triton.testing.do_bench``'s ``zero_()``, which leaves dirty lines for the timed call to write back), so bandwidth
figures are DRAM figures and not cache hits. Every measurement reports the median and the 20th/80th percentiles of
the per-call times.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import time
from typing import Callable, Optional

import torch

# Peak DRAM bandwidth (GB/s, 1e9 bytes) from the vendors' data sheets, matched on torch.cuda.get_device_name().
# Order matters: the first matching key wins (more specific names first).
CARD_PEAK_GBPS = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5
    ("GH200", 4000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40 GB
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("RTX 4090", 1008.0),
)


@dataclasses.dataclass
class Stats:
    """Per-call times in seconds."""

    median: float
    p20: float
    p80: float
    reps: int

    def as_us(self) -> dict:
        return {"median_us": self.median * 1e6, "p20_us": self.p20 * 1e6, "p80_us": self.p80 * 1e6,
                "reps": self.reps}


def stats_of(samples: list[float]) -> Stats:
    if not samples:
        raise ValueError("samples: expected at least one time")
    ordered = sorted(samples)
    q = statistics.quantiles(ordered, n=10, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 9
    return Stats(median=statistics.median(ordered), p20=q[1], p80=q[7], reps=len(ordered))


def _time_cpu(fn: Callable[[], object], budget_s: float, min_reps: int, max_reps: int) -> Stats:
    t0 = time.perf_counter()
    fn()  # warm-up (allocator, lazy init)
    if time.perf_counter() - t0 > budget_s:  # a slow call: the minimum of repetitions is all the budget allows
        min_reps = min(min_reps, 3)
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return stats_of(samples)


_FLUSH_BUFFERS: dict = {}
# Larger than the L2 of any current card (H100: 50 MiB, H200: 60 MiB, B200: 126 MiB), so reading it evicts all of L2;
# on a CPU (dry runs: the code path, no figure) a small one.
FLUSH_BYTES = {"cuda": 256 << 20, "cpu": 1 << 20}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    """A buffer written once, when made, and only read after that: it stays clean, so the lines it leaves in L2
    are never written back. Its first read (here) evicts the lines its own writing left dirty."""
    key = str(device)
    if key not in _FLUSH_BUFFERS:
        _FLUSH_BUFFERS[key] = buffer = torch.ones(FLUSH_BYTES[device.type] // 4, dtype=torch.int32, device=device)
        buffer.sum()
    return _FLUSH_BUFFERS[key]


def flush_l2(device: torch.device, by_writing: bool = False) -> None:
    """Evict L2 by reading a clean buffer four times its size: the previous call's dirty lines are written back
    during this flush, and what is left in L2 is clean, so the timed call that follows pays for its own bytes only.
    ``by_writing``: the old way (``zero_()`` of the buffer), which leaves up to a whole L2 of dirty lines for the
    timed call to write back first; kept only to show the difference (`l2_flush_check`)."""
    buffer = _flush_buffer(torch.device(device))
    if by_writing:
        buffer.zero_()
    else:
        buffer.sum()


def _time_cuda(fn: Callable[[], object], budget_s: float, min_reps: int, max_reps: int, device: torch.device,
               cold_l2: bool) -> Stats:
    fn()
    torch.cuda.synchronize(device)
    # estimate one call to size the repetition count to the budget
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    torch.cuda.synchronize(device)
    per_call = max((time.perf_counter() - t0) / 3, 1e-6)
    reps = int(min(max_reps, max(min_reps, budget_s / per_call)))
    return stats_of(_event_times(fn, reps, device, (lambda: flush_l2(device)) if cold_l2 else None))


def _event_times(fn: Callable[[], object], reps: int, device: torch.device,
                 before: Optional[Callable[[], object]] = None) -> list[float]:
    """Seconds of ``reps`` calls of ``fn``, each between two CUDA events (on a CPU, the wall clock: the dry run's
    timed path); ``before`` (an L2 flush, restoring the inputs) runs before each call, outside the timed region."""
    if device.type != "cuda":
        samples = []
        for _ in range(reps):
            if before is not None:
                before()
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return samples
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if before is not None:
            before()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]


def elapsed_s(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn`` (which may launch many kernels) between two CUDA events, or on the wall clock
    on a CPU."""
    return _event_times(fn, 1, torch.device(device))[0]


def measure(fn: Callable[[], object], device: torch.device, budget_s: float = 0.3, min_reps: int = 5,
            max_reps: int = 200, cold_l2: bool = True) -> Stats:
    """Per-call time statistics of ``fn()`` on ``device``; call it only for compiled code, never under the
    Triton interpreter (that measures Python, not a kernel)."""
    device = torch.device(device)
    with torch.inference_mode():
        if device.type == "cuda":
            return _time_cuda(fn, budget_s, min_reps, max_reps, device, cold_l2)
        return _time_cpu(fn, budget_s, min_reps, max_reps)


# ---- launches -------------------------------------------------------------------------------------------------
# ATen ops that only create views or metadata (no kernel on a GPU); used by the CPU proxy for launches.
_NO_KERNEL_OPS = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::expand", "aten::unsqueeze",
    "aten::squeeze", "aten::t", "aten::transpose", "aten::permute", "aten::resolve_conj", "aten::resolve_neg",
    "aten::result_type", "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::lift_fresh",
    "aten::detach", "aten::alias", "aten::slice", "aten::select", "aten::contiguous", "aten::to",
    "aten::_unsafe_view", "aten::narrow", "aten::split", "aten::split_with_sizes", "aten::unbind",
    "aten::clone", "aten::flatten", "aten::numpy_T", "aten::matmul", "aten::linear", "aten::_to_copy",
    "aten::index_select_backward", "aten::size", "aten::stride", "aten::is_nonzero",
}


def _kernel_ops_on_cpu(events) -> int:
    """ATen ops that would launch a kernel: compute ops none of whose descendants is a compute op (so
    ``matmul -> mm`` counts once and ``to -> _to_copy -> copy_`` counts as the one copy)."""
    def is_compute(e) -> bool:
        return e.name.startswith("aten::") and e.name not in _NO_KERNEL_OPS

    def has_compute_descendant(e) -> bool:
        return any(is_compute(c) or has_compute_descendant(c) for c in e.cpu_children)

    return sum(1 for e in events if is_compute(e) and not has_compute_descendant(e))


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence file descriptor 2 for a moment: the profiler's native library prints a start and a stop line per
    session (no setting turns them off) that would bury the table under hundreds of lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def count_launches(fn: Callable[[], object], device: torch.device, calls: int = 2) -> Optional[float]:
    """Launches per call seen by torch.profiler.

    CUDA: device-side events (kernels, memcpy, memset) per call. CPU: the number of kernel-level ATen ops per
    call, the CPU proxy for launches (each launches at least one kernel on a GPU); returns None for code whose
    kernels the CPU profiler does not see (Inductor's generated C++), which the caller reports as n/a.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with _quiet_native_stderr(), profile(activities=activities) as prof:
            for _ in range(calls):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    events = prof.events()
    if device.type == "cuda":
        n = sum(1 for e in events if getattr(e, "device_type", None) == DeviceType.CUDA)
        return n / calls if n else None
    if any("CompiledFxGraph" in e.name or "Torch-Compiled Region" in e.name for e in events):
        return None
    return _kernel_ops_on_cpu(events) / calls


# ---- the card -------------------------------------------------------------------------------------------------
def card_peak_gbps(device: torch.device) -> Optional[float]:
    """The data-sheet DRAM bandwidth of a CUDA device, or None (CPU, unknown card)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, gbps in CARD_PEAK_GBPS:
        if key in name:
            return gbps
    return None


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30, budget_s: float = 0.5) -> dict:
    """Measured device-to-device copy bandwidth (read + write bytes / median time) of an ``nbytes`` buffer."""
    device = torch.device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    stats = measure(lambda: dst.copy_(src), device, budget_s=budget_s, cold_l2=False)
    moved = 2 * src.numel() * src.element_size()
    return {"bytes": moved, **stats.as_us(), "gbps": moved / stats.median / 1e9}


def bytes_per_second(nbytes: float, seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None or seconds <= 0 else nbytes / seconds / 1e9


# ---- CUDA graphs with a cold L2 ----------------------------------------------------------------------------------
def time_graph(fn: Callable[[], object], device: torch.device, reps: int = 20, cold_l2: bool = True,
               calls_per_graph: int = 1, before_each: Optional[Callable[[], object]] = None) -> Stats:
    """Capture ``fn`` (``calls_per_graph`` times) in a CUDA graph after warming it up on a side stream, then time
    ``reps`` replays with CUDA events. Before each replay, outside the timed region: ``before_each`` (restoring
    inputs that the calls edit in place), then with ``cold_l2`` an L2 flush (`flush_l2`), so every replay starts
    with nothing of its inputs in L2. Per-call seconds. On a CPU (the dry run's timed path) the calls run eagerly,
    a loop in place of the graph."""
    device = torch.device(device)
    if device.type == "cuda":
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls_per_graph):
                fn()
        replay = graph.replay
    else:
        def replay():
            for _ in range(calls_per_graph):
                fn()
    replay()

    def before():
        if before_each is not None:
            before_each()
        if cold_l2:
            flush_l2(device)

    return stats_of([t / calls_per_graph for t in _event_times(replay, reps, device, before)])


# ---- what the bytes model assumes of the card --------------------------------------------------------------------
def l2_flush_check(device: torch.device, l2_bytes: int, reps: int = 20) -> dict:
    """Whether the flush empties L2, and what the old flush cost: a copy of a quarter of L2 into another quarter
    (both fit), timed right after each kind of flush: none (``warm``: the previous copy left both buffers in L2),
    a read of the clean flush buffer (``read_flush``, what every cold-L2 time here uses) and ``zero_()`` of it
    (``zero_flush``, the old way: its dirty lines are written back during the timed copy). A working flush makes
    ``read_flush`` clearly slower than ``warm``; ``zero_flush`` over ``read_flush`` is what the old flush added."""
    device = torch.device(device)
    src = torch.ones(max(1024, l2_bytes // 4 // 4), dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    flushes = {"warm": None, "read_flush": lambda: flush_l2(device),
               "zero_flush": lambda: flush_l2(device, by_writing=True)}
    out: dict = {"bytes": 2 * src.numel() * 4}
    for name, before in flushes.items():
        if before is not None:
            before()
        dst.copy_(src)
        out[name] = stats_of(_event_times(lambda: dst.copy_(src), reps, device, before)).as_us()
    warm, read, zero = (out[k]["median_us"] for k in flushes)
    return {**out, "read_flush_over_warm": read / warm, "zero_flush_over_read_flush": zero / read,
            "flush_evicts": read >= 1.2 * warm, "ok": bool(torch.equal(dst, src))}


def l2_read_bandwidth_gbps(device: torch.device, l2_bytes: int, reps: int = 50) -> dict:
    """L2 read bandwidth: every SM re-reads its slice of a buffer of a quarter of L2 (so it stays there) ``reps``
    times in one launch; bytes read / median time."""
    from benchmarks.probe_kernels import read_kernel

    device = torch.device(device)
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    per_program = max(1024, (l2_bytes // 4) // 4 // programs // 1024 * 1024)  # fp32 elements
    x = torch.ones(programs * per_program, dtype=torch.float32, device=device)
    out = torch.empty(programs, dtype=torch.float32, device=device)
    launch = lambda: read_kernel[(programs,)](x, out, per_program, reps, BLOCK=1024)  # noqa: E731
    launch()
    ok = bool(out.sum() == reps * x.numel())
    stats = time_graph(launch, device, reps=10 if device.type == "cuda" else 1, cold_l2=False)
    moved = reps * x.numel() * 4
    return {"bytes": moved, "buffer_bytes": x.numel() * 4, **stats.as_us(), "gbps": moved / stats.median / 1e9,
            "ok": ok}


# (BLOCK in fp32 elements, warps) of the per-SM probe: the read kernel's pipeline keeps two BLOCK loads ahead
# (sm_90a compile: async copies into 2 x BLOCK x 4 bytes of shared memory), so 16, 32, 64 and 128 KiB in flight
PER_SM_BLOCKS = ((2048, 8), (4096, 8), (8192, 8), (16384, 16))


def per_sm_read_sweep(device: torch.device, programs: int = 8, nbytes: int = 1 << 28) -> dict:
    """One SM's sustained read bandwidth against the bytes it keeps in flight: ``programs`` programs (on an idle
    card, one per SM) stream a buffer much larger than L2 once, with a cold L2, at each of `PER_SM_BLOCKS`. By
    Little's law an SM with B bytes in flight and a latency L reads at most B / L; the port cap shows as the point
    past which more bytes in flight buy nothing (``saturated``: the last step gained under 10 %). Only a
    saturated figure is a port cap; below that it measures latency (the v2 probe's 16 KiB gave ~20-30 GB/s)."""
    from benchmarks.probe_kernels import read_kernel

    device = torch.device(device)
    rows = []
    for block, warps in PER_SM_BLOCKS:
        per_program = max(block, nbytes // 4 // programs)
        x = torch.ones(programs * per_program, dtype=torch.float32, device=device)
        out = torch.empty(programs, dtype=torch.float32, device=device)
        launch = lambda: read_kernel[(programs,)](x, out, per_program, 1, BLOCK=block, num_warps=warps)  # noqa: E731
        compiled = launch()
        shared = getattr(getattr(compiled, "metadata", None), "shared", None)  # None under the interpreter
        row = {"block": block, "warps": warps, "in_flight_bytes": shared or 2 * block * 4,
               "in_flight_from": "compiled shared memory" if shared else "2 x BLOCK x 4 (the sm_90a compile)",
               "ok": bool(out.sum() == x.numel())}
        stats = time_graph(launch, device, reps=5 if device.type == "cuda" else 1, cold_l2=True)
        gbps = x.numel() * 4 / stats.median / 1e9 / programs
        rows.append({**row, **stats.as_us(), "gbps_per_sm": gbps,
                     "littles_law_latency_ns": row["in_flight_bytes"] / gbps})
    best = max(rows, key=lambda r: r["gbps_per_sm"])
    return {"programs": programs, "rows": rows, "gbps_per_sm": best["gbps_per_sm"],
            "in_flight_bytes_at_best": best["in_flight_bytes"],
            "saturated": rows[-1]["gbps_per_sm"] <= 1.1 * rows[-2]["gbps_per_sm"]}
