"""The split-d launches' counters and error flag: device buffers that live across calls (no memset launch per call).

A split-d launch (`steer_kernel`, ``SPLIT > 1``) coordinates its programs through int32 counters,
``[exits | ticket | arrived[n_tiles] | ready[n_tiles]]``. They start at zero and the kernel puts them back to zero
itself: the last program to leave (the one whose increment of ``exits`` reaches the grid size, after every program
has taken its last ticket) zeroes what the launch used. So one buffer per device and stream serves every call, with
no ``torch.zeros`` (a memset launch) on the call path, and a CUDA graph replays the same buffer. Launches on one
stream run one after another, which is what makes sharing the buffer safe; another stream gets its own.

Every spin wait of the kernel is bounded (`SPIN_LIMIT` polls); a wait that gives up sets the device's error word,
which nothing on the call path reads: `split_d_error_flag` returns it for a host to check after the launches (a
GPU check, a test), `clear_split_d_error` resets it together with the counters. After a give-up the outputs of
that launch are wrong, but the launch ends instead of hanging the GPU.
"""
from __future__ import annotations

from typing import Optional

import torch

# Polls of a flag before a wait gives up. A wait only ever waits on programs that are already running (see
# `steer_kernel`), each holding microseconds of work; 2^18 polls of an L2 atomic take ~0.1-0.5 s.
SPIN_LIMIT = 1 << 18
HEADER = 2  # exits, ticket

_counters: dict = {}  # (device, stream) -> int32 buffer of HEADER + 2 * capacity words, zero between launches
_errors: dict = {}  # device -> int32 (1,): nonzero once a wait gave up


def _stream_key(device: torch.device):
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def launch_buffers(device: torch.device, n_tiles: int) -> tuple:
    """``(counters, error)`` for a split-d launch of ``n_tiles`` row tiles on the current stream of ``device``.

    Allocated (zeroed) on first use and when a launch needs more tiles than any before (then twice the size);
    otherwise nothing is allocated or launched. Inside a CUDA graph capture a missing or too small buffer cannot be
    cached (it would belong to the graph's memory pool), so that call gets zeroed buffers of its own, captured into
    the graph (warm up outside the capture, as CUDA graphs require anyway, to avoid it)."""
    key = (device, _stream_key(device))
    need = HEADER + 2 * n_tiles
    counters, error = _counters.get(key), _errors.get(device)
    if counters is not None and counters.numel() >= need and error is not None:
        return counters, error
    if _capturing(device):
        scratch = torch.zeros(need + 1, dtype=torch.int32, device=device)
        return scratch[1:], (error if error is not None else scratch[:1])
    if error is None:
        error = _errors[device] = torch.zeros(1, dtype=torch.int32, device=device)
    if counters is None or counters.numel() < need:
        size = max(need, 2 * counters.numel() if counters is not None else 64)
        counters = _counters[key] = torch.zeros(size, dtype=torch.int32, device=device)
    return counters, error


def split_d_error_flag(device: Optional[torch.device | str] = None) -> torch.Tensor:
    """The device's split-d error word, an int32 tensor ``(1,)``: 0, or 1 once a spin wait of a split-d launch gave
    up (`SPIN_LIMIT` polls). Reading its value on the host synchronises: do it after the launches, outside the
    hot path. ``device`` defaults to the current CUDA device (CPU under the interpreter when no GPU is present)."""
    device = _device(device)
    if device not in _errors:
        _errors[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _errors[device]


def clear_split_d_error(device: Optional[torch.device | str] = None) -> None:
    """Zero the device's error word and every counter buffer of the device (after a launch that gave up, its
    counters may not have been reset by the kernel)."""
    device = _device(device)
    split_d_error_flag(device).zero_()
    for (dev, _), counters in _counters.items():
        if dev == device:
            counters.zero_()


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
