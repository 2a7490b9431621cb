"""Search-space checks: reject an empty or malformed space before a Ray cluster is touched.

A search space is Ray Tune's ``param_space`` (Liaw et al., 2018): a dict whose values are Ray domains
(``tune.uniform``, ``tune.loguniform``, ``tune.choice``, ``tune.randint``, ...), ``tune.grid_search``,
nested dicts, or constants that are passed to ``build`` unchanged. Plain lists and tuples are refused:
``(1e-4, 1e-1)`` reads as a range to some users and as a set or a constant to others, and Ray would
silently treat it as a constant. Bayesian and TPE searchers (Optuna) cannot sample ``grid_search`` or
``sample_from``; that is reported here, not after the first trial.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ray.tune.search.sample import Categorical, Domain, Float, Function, Integer, Quantized

SEARCHERS = ("bayes", "tpe", "random")

_FIX = (
    "A value must be a ray.tune domain (tune.uniform, tune.loguniform, tune.randint, tune.choice, ...), "
    "tune.grid_search([...]) (searcher='random' only), a nested dict, or a constant passed to build() "
    "unchanged (str, number, bool, None, path, ...)."
)


def _is_grid(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value.keys()) == {"grid_search"}


def _check_domain(path: str, domain: Domain, searcher: str) -> None:
    if isinstance(domain, (Float, Integer)):
        lo, hi = domain.lower, domain.upper
        if isinstance(domain, Integer) and not isinstance(domain.get_sampler(), Quantized):
            empty = not lo < hi  # tune.randint's upper bound is exclusive
        else:
            empty = not lo <= hi
        if empty or (math.isfinite(lo) and math.isfinite(hi) and lo == hi and isinstance(domain, Float)):
            raise ValueError(
                f"search_space[{path!r}] is an empty range ({lo}, {hi}); the lower bound must be below the "
                "upper bound (tune.randint's upper bound is exclusive)."
            )
    elif isinstance(domain, Categorical) and len(domain.categories) == 0:
        raise ValueError(f"search_space[{path!r}] is tune.choice([]) with no categories; give at least one.")
    if isinstance(domain, Function) and searcher != "random":
        raise ValueError(
            f"search_space[{path!r}] is tune.sample_from(...), which searcher={searcher!r} (Optuna) cannot "
            "model. Use a tune domain for it, or searcher='random'."
        )


def _walk(space: Mapping[Any, Any], prefix: str, searcher: str, searched: list[str]) -> None:
    for key, value in space.items():
        if not isinstance(key, str) or not key:
            raise ValueError(
                f"search_space keys must be non-empty strings, got {key!r} under {prefix or 'the top level'!r}."
            )
        if "/" in key:
            raise ValueError(
                f"search_space key {key!r} contains '/', which Ray uses to flatten nested keys; rename it "
                "or nest it as a dict."
            )
        path = f"{prefix}{key}"
        if isinstance(value, Domain):
            _check_domain(path, value, searcher)
            searched.append(path)
        elif _is_grid(value):
            grid = value["grid_search"]
            if searcher != "random":
                raise ValueError(
                    f"search_space[{path!r}] is tune.grid_search, which searcher={searcher!r} cannot run. "
                    "Use tune.choice([...]) for the Bayesian and TPE searchers, or searcher='random' for a grid."
                )
            if not isinstance(grid, (list, tuple)) or len(grid) == 0:
                raise ValueError(
                    f"search_space[{path!r}] is a grid_search with no values; give at least one."
                )
            searched.append(path)
        elif isinstance(value, Mapping):
            if not value:
                raise ValueError(f"search_space[{path!r}] is an empty dict; remove it or give it parameters.")
            _walk(value, f"{path}/", searcher, searched)
        elif isinstance(value, (list, tuple, set, frozenset)):
            example = list(value)[:2]
            raise ValueError(
                f"search_space[{path!r}] is a {type(value).__name__} {value!r}, which is ambiguous (a range? a "
                f"set of choices? a constant?). For a range use tune.loguniform(*{example!r}) or "
                f"tune.uniform(...); for a set use tune.choice({list(value)!r}); for a constant sequence "
                "build it inside build(). " + _FIX
            )
        elif callable(value):
            raise ValueError(
                f"search_space[{path!r}] is a callable {value!r}. To compute a value from other parameters "
                "use tune.sample_from(fn) (searcher='random' only); otherwise call it inside build(). " + _FIX
            )


def validate_search_space(space: Any, searcher: str) -> list[str]:
    """Check ``space`` for ``searcher`` and return the names of the searched parameters (``a/b`` if nested).

    Raises:
        TypeError: ``space`` is not a dict.
        ValueError: the space is empty, has no searched parameter, a malformed key or value, an empty
            range or choice, or a domain the searcher cannot model (the message names the key and the fix).
    """
    if searcher not in SEARCHERS:
        raise ValueError(f"Unknown searcher {searcher!r}; choose one of {list(SEARCHERS)}.")
    if not isinstance(space, Mapping):
        raise TypeError(
            f"search_space must be a dict such as {{'lr': tune.loguniform(1e-4, 1e-1)}}, got "
            f"{type(space).__name__}."
        )
    if not space:
        raise ValueError(
            "search_space is empty: give at least one parameter to search, e.g. "
            "{'lr': tune.loguniform(1e-4, 1e-1)}."
        )
    searched: list[str] = []
    _walk(space, "", searcher, searched)
    if not searched:
        raise ValueError(
            f"search_space {dict(space)!r} has only constants, so there is nothing to search. Make at least "
            "one value a tune domain, e.g. tune.loguniform(1e-4, 1e-1)."
        )
    if searcher in ("bayes", "tpe"):
        from ray.tune.search.optuna import OptunaSearch

        try:
            OptunaSearch.convert_search_space(dict(space))
        except ValueError as err:
            raise ValueError(
                f"searcher={searcher!r} (Optuna) cannot model this search space: {err} "
                "Use uniform/loguniform/randint/choice domains, or searcher='random'."
            ) from err
    return searched


def grid_size(space: Mapping[str, Any]) -> int:
    """How many configurations the ``grid_search`` values of ``space`` span (1 without a grid).

    Ray runs ``num_samples`` trials per grid point.
    """
    size = 1
    for value in space.values():
        if _is_grid(value):
            size *= len(value["grid_search"])
        elif isinstance(value, Mapping):
            size *= grid_size(value)
    return size


def grid_paths(space: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The names (``a/b`` if nested) of the ``tune.grid_search`` values of ``space``."""
    paths: list[str] = []
    for key, value in space.items():
        if _is_grid(value):
            paths.append(f"{prefix}{key}")
        elif isinstance(value, Mapping):
            paths.extend(grid_paths(value, f"{prefix}{key}/"))
    return paths


def space_constants(space: Mapping[str, Any]) -> dict[str, Any]:
    """The constants of a validated ``space`` (neither domains nor grids), nested as in the space.

    Dicts that hold no constant are left out.
    """
    out: dict[str, Any] = {}
    for key, value in space.items():
        if isinstance(value, Domain) or _is_grid(value):
            continue
        if isinstance(value, Mapping):
            nested = space_constants(value)
            if nested:
                out[key] = nested
        else:
            out[key] = value
    return out


def constant_paths(space: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The sorted names (``a/b`` if nested) of the constants of a validated ``space``."""
    paths: list[str] = []
    for key, value in space_constants(space).items():
        if isinstance(value, Mapping):
            paths.extend(constant_paths(value, f"{prefix}{key}/"))
        else:
            paths.append(f"{prefix}{key}")
    return sorted(paths)


def with_constants(config: Mapping[str, Any], constants: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` whose constants are those of ``constants`` (from :func:`space_constants`).

    A resumed sweep passes the constants of the current call: Ray restores the sampled part of each
    configuration with the sweep, constants included, and a constant such as a data path may move.
    """
    out = dict(config)
    for key, value in constants.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = with_constants(out[key], value)
        else:
            out[key] = value
    return out


def _lookup(config: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    node: Any = config
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def config_in_space(config: Mapping[str, Any], space: Mapping[str, Any]) -> bool:
    """Whether every searched parameter of ``config`` lies in its domain of ``space``, constants included.

    Ranges follow Ray's conventions: ``uniform``/``loguniform`` bounds are inclusive, ``randint``'s upper
    bound is exclusive, quantized integer bounds (``qrandint``) are inclusive.
    """

    def check(sub: Mapping[str, Any], prefix: str) -> bool:
        for key, spec in sub.items():
            path = f"{prefix}{key}"
            found, value = _lookup(config, path)
            if not found:
                return False
            if isinstance(spec, Categorical):
                if value not in spec.categories:
                    return False
            elif isinstance(spec, Integer):
                exclusive = not isinstance(spec.get_sampler(), Quantized)
                if not isinstance(value, int) or value < spec.lower:
                    return False
                if value > spec.upper or (exclusive and value >= spec.upper):
                    return False
            elif isinstance(spec, Float):
                if not isinstance(value, (int, float)) or not spec.lower <= value <= spec.upper:
                    return False
            elif isinstance(spec, Domain):
                continue  # sample_from: any value
            elif _is_grid(spec):
                if value not in spec["grid_search"]:
                    return False
            elif isinstance(spec, Mapping):
                if not check(spec, f"{path}/"):
                    return False
            elif value != spec:
                return False
        return True

    return check(space, "")


def _describe_domain(domain: Domain) -> str:
    sampler = domain.get_sampler()
    inner = sampler.get_sampler() if isinstance(sampler, Quantized) else sampler
    name = type(inner).__name__.lstrip("_")  # Ray's samplers are private classes (_LogUniform, ...)
    base = getattr(inner, "base", None)
    parts = [name if base is None else f"{name}(base={base!r})"]
    if isinstance(sampler, Quantized):
        parts = [f"Quantized({parts[0]}, q={sampler.q!r})"]
    if isinstance(domain, Categorical):
        return f"choice({domain.categories!r}, {', '.join(parts)})"
    if isinstance(domain, (Float, Integer)):
        return f"{type(domain).__name__.lower()}({domain.lower!r}, {domain.upper!r}, {', '.join(parts)})"
    return f"{type(domain).__name__}({', '.join(parts)})"


def describe_search_space(space: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """The searched parameters of a validated ``space`` with their ranges, choices or grids (JSON-able).

    Constants are left out: a constant such as a data path may change its value between a sweep and its
    resume without changing what is searched (the resumed sweep's trials get the new value; see
    :func:`with_constants`). Adding or removing a constant is refused on resume.
    """
    described: dict[str, str] = {}
    for key, value in space.items():
        path = f"{prefix}{key}"
        if isinstance(value, Domain):
            described[path] = _describe_domain(value)
        elif _is_grid(value):
            described[path] = f"grid_search({list(value['grid_search'])!r})"
        elif isinstance(value, Mapping):
            described.update(describe_search_space(value, f"{path}/"))
    return dict(sorted(described.items()))
