"""Wrapping a method on one instance (``model.generate``, a continuous-batching manager's ``add_request``, ...) so
that wrappers of several patches, and of other libraries, come off in any order.

`unwrap` puts the wrapped method back only while our wrapper is the one on the instance; if something wrapped it
since, ours stays as an inactive pass-through, and is taken off later, when the wrappers above it are gone. So
nothing is left behind and nobody else's wrapper is dropped, whatever the order of removal.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

MARK = "_finesteer_wrapper"


@dataclasses.dataclass(eq=False)
class Wrapped:
    """One installed wrapper: where it sits and what it replaced."""

    obj: object
    name: str
    original: Callable
    had_own: bool  # the instance had its own attribute (not the class's method) before
    active: bool = True


def wrap(obj, name: str, make: Callable[[Callable], Callable]) -> Wrapped:
    """Set ``obj.name`` to ``make(original)`` on the instance; once `unwrap` ped, calls go to the original."""
    original = getattr(obj, name)
    record = Wrapped(obj, name, original, name in vars(obj))
    inner = make(original)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if not record.active:  # unwrapped while another wrapper sat on top of this one
            return original(*args, **kwargs)
        return inner(*args, **kwargs)

    setattr(wrapper, MARK, record)  # after functools.wraps, which copies the wrapped function's attributes
    setattr(obj, name, wrapper)
    return record


def unwrap(record: Wrapped) -> None:
    """Deactivate the wrapper and take inactive FineSteer wrappers off the top of ``obj.name``."""
    record.active = False
    obj, name = record.obj, record.name
    while True:
        top = getattr(vars(obj).get(name), MARK, None)
        if top is None or top.active:
            return
        if top.had_own:
            setattr(obj, name, top.original)
        else:
            delattr(obj, name)


def wrapped_by(obj, name: str, records) -> bool:
    """Whether one of ``records`` is still installed (active) on ``obj.name``."""
    return any(r.obj is obj and r.name == name and r.active for r in records)
