"""The package's argument checks (ints, bools, finite floats), so that every such error reads the same."""

from __future__ import annotations

from typing import Literal, overload


@overload
def check_int(
    name: str,
    value: object,
    minimum: int | None,
    meaning: str = "",
    *,
    allow_none: Literal[False] = False,
    prefix: str = "",
    hint: str = "",
) -> int: ...


@overload
def check_int(
    name: str,
    value: object,
    minimum: int | None,
    meaning: str = "",
    *,
    allow_none: bool,
    prefix: str = "",
    hint: str = "",
) -> int | None: ...


def check_int(
    name: str,
    value: object,
    minimum: int | None,
    meaning: str = "",
    *,
    allow_none: bool = False,
    prefix: str = "",
    hint: str = "",
) -> int | None:
    """Return ``value`` if it is an ``int >= minimum`` (or ``None`` with ``allow_none``).

    ``bool`` is refused although it is an ``int`` subclass: ``True`` as a count is a mistake.

    Args:
        name: the argument's name, as the caller wrote it.
        value: the value to check.
        minimum: the smallest allowed value; ``None`` allows every int (a seed: torch takes negative ones too).
        meaning: what the number is, said in brackets after the bound.
        allow_none: accept ``None`` (the argument's "default" or "off").
        prefix: what the argument belongs to, put before the message (e.g. ``"RandomCrop: "``).
        hint: a sentence appended to the message (e.g. a good value).

    Raises:
        ValueError: ``"{prefix}{name} must be an int[ >= {minimum}][ or None][ ({meaning})], got {value!r}.[ {hint}]"``
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        alternative = " or None" if allow_none else ""
        note = f" ({meaning})" if meaning else ""
        advice = f" {hint}" if hint else ""
        raise ValueError(f"{prefix}{name} must be an int{bound}{alternative}{note}, got {value!r}.{advice}")
    return value


def check_bool(name: str, value: object, prefix: str = "") -> bool:
    """Return ``value`` if it is a ``bool``: a string such as ``"no"`` is truthy and would mean ``True``."""
    if not isinstance(value, bool):
        raise ValueError(f"{prefix}{name} must be True or False, got {value!r}.")
    return value


def check_float(
    name: str, value: object, minimum: float, *, above: bool = True, prefix: str = "", hint: str = ""
) -> float:
    """Return ``value`` as a float if it is a finite real number ``> minimum`` (``>= minimum`` with
    ``above=False``): NaN passes every comparison-based check and infinity is no setting."""
    import math

    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= minimum if above else value < minimum):  # type: ignore[operator]
        bound = ">" if above else ">="
        advice = f" {hint}" if hint else ""
        raise ValueError(
            f"{prefix}{name} must be a finite number {bound} {minimum:g}, got {value!r}.{advice}"
        )
    return float(value)  # type: ignore[arg-type]
