"""One mechanism for the project's strategy strings.

A strategy class opts in with the :func:`registered_strategy` decorator and defines Lightning's own
``register_strategies(cls, strategy_registry)`` classmethod (the convention of
``lightning.pytorch.strategies.DDPStrategy``), which registers each alias with its preset init
parameters. Importing :mod:`lightning_speedup` calls :func:`register_strategies`, so
``L.Trainer(strategy="diloco")`` works right after ``import lightning_speedup``, and a typo makes
Lightning list our names next to its own.
"""

from __future__ import annotations

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


def strategy_names() -> list[str]:
    """The strategy strings this package registered (empty until strategies land)."""
    return register_strategies()
