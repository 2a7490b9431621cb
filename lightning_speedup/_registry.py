"""One mechanism for the project's strategy strings (private plumbing; only :func:`check_strategy_name` is public).

A strategy class opts in with the :func:`registered_strategy` decorator and defines Lightning's own
``register_strategies(cls, strategy_registry)`` classmethod (the convention of
``lightning.pytorch.strategies.DDPStrategy``), which registers each alias with its preset init
parameters. Importing :mod:`lightning_speedup` calls :func:`register_strategies`, so
``L.Trainer(strategy="diloco")`` works right after ``import lightning_speedup``.

Lightning's Trainer rejects an unknown string with a fixed list of a few of its own examples and has
no hook to extend that message, so :func:`check_strategy_name` is the place that suggests the closest
registered name (ours included); the project's own entry points call it before building a Trainer.
"""

from __future__ import annotations

import difflib
from typing import Any, TypeVar

_T = TypeVar("_T", bound=type)

_STRATEGY_CLASSES: list[type] = []


def registered_strategy(cls: _T) -> _T:
    """Class decorator: add a Lightning ``Strategy`` subclass to the project's strategy strings."""
    # Defined on the class itself: an inherited one would register the parent's aliases, not ours.
    if "register_strategies" not in vars(cls):
        raise TypeError(
            f"{cls.__name__} must define a classmethod `register_strategies(cls, strategy_registry)` "
            "that calls `strategy_registry.register(name, cls, description=..., **init_params)` per alias."
        )
    if cls not in _STRATEGY_CLASSES:
        _STRATEGY_CLASSES.append(cls)
    return cls


def register_strategies(registry: Any = None) -> list[str]:
    """Register every decorated strategy class with Lightning's ``StrategyRegistry``.

    Safe to call more than once. Returns the aliases the project's classes own in ``registry``.
    """
    if registry is None:
        from lightning.pytorch.strategies import StrategyRegistry as registry

    names: list[str] = []
    for cls in _STRATEGY_CLASSES:
        before = set(registry.available_strategies())
        owned = [n for n in before if registry[n]["strategy"] is cls]
        if not owned:
            cls.register_strategies(registry)
            owned = [n for n in registry.available_strategies() if registry[n]["strategy"] is cls]
        names.extend(sorted(owned))
    return names


def check_strategy_name(name: str) -> str:
    """Return ``name`` (lower-cased, as the Trainer reads it) if Lightning's ``StrategyRegistry`` knows it.

    Raises:
        ValueError: an unknown name; the message suggests the closest registered names and lists the
            project's own strings (which Lightning's Trainer error does not show).
    """
    from lightning.pytorch.strategies import StrategyRegistry

    ours = register_strategies()
    key = name.lower()
    known = StrategyRegistry.available_strategies()
    if key == "auto" or key in known:
        return key
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"Unknown strategy {name!r}.{hint} lightning_speedup registers {sorted(ours)}; Lightning's own names are "
        "listed by lightning.pytorch.strategies.StrategyRegistry.available_strategies()."
    )
