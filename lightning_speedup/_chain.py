"""Chain a method of one object instance, reversibly: how callbacks hook into a strategy or a module."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["chain_method"]


def chain_method(
    obj: object, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> Callable[[], None]:
    """Replace ``obj.<name>`` on this instance by ``make(original)``; return a function that undoes it.

    ``original`` is the bound method (or an instance attribute someone set before), so the replacement
    chains it rather than losing it. Undoing leaves the attribute alone when someone chained on top of
    this replacement after it (theirs still calls it), and otherwise restores exactly what was there:
    the earlier instance attribute, or none (the class's method).
    """
    original = getattr(obj, name)
    had_instance_attr = name in vars(obj)
    replacement = make(original)
    setattr(obj, name, replacement)

    def undo() -> None:
        if vars(obj).get(name) is not replacement:
            return  # someone chained on top of us; leave their wrapper (it still calls ours)
        if had_instance_attr:
            setattr(obj, name, original)
        else:
            delattr(obj, name)

    return undo
