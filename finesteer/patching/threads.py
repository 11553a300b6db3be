"""`OneThreadAtATime`: lets one thread at a time into a region, re-entrantly, and refuses the others at once.

A `finesteer.patching.PatchHandle` keeps per-forward state (the attention mask, the cache length) and per-sequence
query-mode coefficients on itself; two threads running forwards through one patch would read each other's. Waiting
for the other thread would not help either (its decode steps still expect its own coefficients), so a second thread
is refused with an error saying what to do instead.

While torch.compile traces a hook, the guard does nothing (Dynamo cannot trace thread ids or locks, and would break
the graph at each patched layer): a compiled forward is not guarded.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch


class OneThreadAtATime:
    """``enter(what)`` / ``exit()`` around a region; nested entries from the holding thread are counted."""

    def __init__(self, refusal: str):
        self._lock = threading.Lock()
        self._owner = None  # thread id of the holder
        self._depth = 0
        self._refusal = refusal

    @staticmethod
    def ident() -> Optional[int]:
        """The calling thread's id; None while torch.compile traces."""
        return None if torch.compiler.is_compiling() else threading.get_ident()

    def held_here(self) -> bool:
        """Whether the calling thread is inside (always, while tracing)."""
        return self.ident() in (None, self._owner)

    def enter(self, what: str) -> None:
        """Raise RuntimeError if another thread is inside; ``what`` names the refused call."""
        if torch.compiler.is_compiling():
            return
        if self.held_here():
            self._depth += 1
            return
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"{what}: called from a second thread while another thread's call is running; "
                               f"{self._refusal}")
        self._owner, self._depth = threading.get_ident(), 1

    def exit(self) -> None:
        """Leave one level; a no-op in a thread that does not hold it (e.g. one whose ``enter`` was refused)."""
        if torch.compiler.is_compiling() or not self.held_here():
            return
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            self._lock.release()
