"""Programmatic dependent launch (PDL, Hopper and later): let a kernel's launch overlap the end of the kernel before
it on the stream. Off by default until a GPU run confirms it; ``FINESTEER_PDL=1`` turns it on.

A kernel launched with ``launch_pdl=True`` may be scheduled before the previous kernel has finished. Its programs
then run `wait_for_previous_kernel` first: ``griddepcontrol.wait`` blocks until the previous kernel has completed and
its writes are visible, so it precedes *every* global access of our kernels, not only the reads of h. What the
previous kernel may still be touching is not just h: the weights (a pack made or a norm weight edited in place
right before the call), the split-d counters (the previous split-d launch on the stream zeroes them on its way out,
`split_state`) and even our output (the caching allocator may hand us memory the previous kernel still reads). So
what PDL hides is the launch gap (scheduling the grid, the programs' prologue), not the first memory round trip
(`pdl_model` says what that predicts).

``griddepcontrol.launch_dependents`` then comes right after the wait: the next PDL kernel may be scheduled once every
program of ours has passed it (its programs only occupy free slots and wait in turn). Placed after the wait, never
before, it keeps the chain transitive: when kernel N+1 starts, kernel N has passed its wait, so kernel N-1 is done.

The switch is read once per process (`pdl_requested`); `forced` overrides it for a benchmark that times both. It is
never on under the Triton interpreter (which runs launches one after another: nothing to test) nor on a device
older than sm_90. Kernels take a ``PDL`` constexpr; `launch_options` gives the pair of keywords for a launch.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .kernel_common import INTERPRETING

try:  # added by triton-lang/triton#6394 (April 2025); in 3.6 (the lent machines) and 3.9 (here), not in 3.2
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    SUPPORTED = True
except ImportError:  # an older Triton: PDL stays off, and the kernels never compile the branch that names these
    SUPPORTED = False

ENV = "FINESTEER_PDL"
ON, OFF = ("1", "on", "true", "yes"), ("", "0", "off", "false", "no")
_forced: Optional[bool] = None


@functools.lru_cache(maxsize=None)
def pdl_requested() -> bool:
    """``FINESTEER_PDL`` (default off), read once: the launch path only looks up a cached bool."""
    value = os.environ.get(ENV, "").strip().lower()
    if value not in ON + OFF:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(ON)} (PDL on) or {', '.join(OFF[1:])} (off)")
    return value in ON


@functools.lru_cache(maxsize=None)
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(t: torch.Tensor) -> bool:
    """Whether a launch on ``t``'s device uses PDL: requested (or `forced`), a Triton that has it, a CUDA tensor on
    sm_90 or newer, and not interpreted."""
    wanted = pdl_requested() if _forced is None else _forced
    return wanted and SUPPORTED and not INTERPRETING and t.is_cuda and _device_supports(t.device.index or 0)


def launch_options(t: torch.Tensor) -> dict:
    """Keywords for a kernel launch on ``t``'s device: the ``PDL`` constexpr and, when on, ``launch_pdl`` (a
    compile option of Triton's NVIDIA backend that sets the launch attribute)."""
    return dict(PDL=True, launch_pdl=True) if pdl_enabled(t) else dict(PDL=False)


@contextlib.contextmanager
def forced(on: bool):
    """Launches inside use PDL or not whatever ``FINESTEER_PDL`` says (still never interpreted or below sm_90).
    For benchmarks and tests that compare both; a CUDA graph captured inside keeps the choice."""
    global _forced
    previous, _forced = _forced, on
    try:
        yield
    finally:
        _forced = previous


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """With ``PDL``: wait until the previous kernel on the stream is done (call before any global access), then
    let the next one be scheduled. Without: nothing (the same code as before)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
