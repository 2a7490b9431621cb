"""The Ray cluster a sweep runs on: a local one bound to localhost by default, or an existing one.

Ray (Moritz et al., 2018) is started once per Python process and kept for later sweeps (a notebook
re-runs cells); ``ray.shutdown()`` stops it. A trial's resource request is checked against the nodes
of the cluster before the sweep starts: Ray itself would leave an unplaceable trial pending forever.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import ray

log = logging.getLogger(__name__)

# Ray 2.60 chooses the address every Ray process binds to (GCS, raylet, workers) through
# `ray._private.ray_constants.ENABLE_RAY_CLUSTER`: off, it is 127.0.0.1. The environment variable is read
# by the processes Ray spawns; the module constant was read by this process when Ray was imported.
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class InsufficientResourcesError(ValueError):
    """No node of the Ray cluster can host one trial's resource request."""


@contextmanager
def _bind_to_localhost() -> Iterator[None]:
    """Make a Ray node started (or a local cluster joined) in this block use 127.0.0.1 only.

    Private Ray API, isolated here; checked against Ray 2.60.
    """
    from ray._private import ray_constants

    old_env = os.environ.get(_LOCAL_ONLY_ENV)
    old_const = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_LOCAL_ONLY_ENV] = "0"
    if old_const is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    else:
        log.warning(
            "This Ray version has no ray_constants.ENABLE_RAY_CLUSTER; the local cluster may listen on the "
            "machine's network address instead of 127.0.0.1."
        )
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop(_LOCAL_ONLY_ENV, None)
        else:
            os.environ[_LOCAL_ONLY_ENV] = old_env
        if old_const is not None:
            ray_constants.ENABLE_RAY_CLUSTER = old_const


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _host_port(address: str) -> tuple[str, str] | None:
    """``(host, port)`` of a ``host:port`` address (``[::1]:6379`` too); ``None`` for anything else
    (``ray://host:port`` is Ray Client's server, not the cluster's GCS)."""
    if "://" in address:
        return None
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    return (host, port) if sep and host and port.isdigit() else None


def _same_host(a: str, b: str) -> bool | None:
    """Whether two host names or IPs name the same host; ``None`` when a name cannot be resolved."""
    import socket

    def ip(host: str) -> str:
        return "127.0.0.1" if host in _LOCAL_HOSTS else socket.gethostbyname(host)

    if a == b:
        return True
    try:
        return ip(a) == ip(b)
    except OSError:
        return None


# The address init_ray joined each cluster with, by the cluster's GCS address: the cluster may know
# itself by another (a tunnel, a public IP in front of a private one).
_JOINED_WITH: dict[str, str] = {}

_RECONNECT_HINT = "Call ray.shutdown() first to leave it (its tasks stop), then call again."


def _check_address(address: str, connected: str) -> None:
    """Raise when ``address`` names another cluster than the connected one at ``connected``; warn when
    that cannot be told (the address is then ignored)."""
    if address == "auto" or _JOINED_WITH.get(connected) == address:
        return
    wanted, have = _host_port(address), _host_port(connected)
    if wanted is not None and have is not None and wanted[1] != have[1]:
        raise ValueError(
            f"address={address!r}, but this process is already connected to the Ray cluster at {connected}; "
            f"a process is connected to one cluster at a time. {_RECONNECT_HINT} Or leave address out to use "
            "the connected cluster."
        )
    if wanted is not None and have is not None and _same_host(wanted[0], have[0]):
        return
    # "ray://..." (Ray Client), "local" (a new cluster), or the same port on a host known by another
    # name or address (another network interface, a NAT): no reliable answer.
    log.warning(
        "address=%r is ignored: this process is already connected to the Ray cluster at %s and keeps using "
        "it. If that is another cluster: %s",
        address, connected, _RECONNECT_HINT,
    )  # fmt: skip


def _check_connected(address: str | None, num_cpus: int | None, num_gpus: int | None, connected: str) -> None:
    """Raise when ``address``, ``num_cpus`` or ``num_gpus`` ask for another cluster than the one this
    process is connected to (at ``connected``); warn when that cannot be told. The same values pass."""
    if address is not None:
        _check_address(address, connected)
    if num_cpus is None and num_gpus is None:
        return
    total = ray.cluster_resources()
    asked = {"num_cpus": ("CPU", num_cpus), "num_gpus": ("GPU", num_gpus)}
    differ = [
        f"{arg}={value} (it has {total.get(key, 0.0):g})"
        for arg, (key, value) in asked.items()
        if value is not None and not math.isclose(float(value), float(total.get(key, 0.0)))
    ]
    if differ:
        raise ValueError(
            f"{' and '.join(differ)}, but this process is already connected to a Ray cluster ({connected}) "
            f"and num_cpus/num_gpus only size a new local cluster. {_RECONNECT_HINT} Or leave them out to "
            "use the connected cluster."
        )


def _check_no_size_with_address(address: str | None, num_cpus: int | None, num_gpus: int | None) -> None:
    if address is not None and (num_cpus is not None or num_gpus is not None):
        raise ValueError(
            "num_cpus/num_gpus size a new local cluster; an existing cluster at "
            f"address={address!r} brings its own. Leave them out or drop the address."
        )


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    **init_kwargs: Any,
) -> str:
    """Connect to a Ray cluster, starting a local one when needed; return the cluster's GCS address.

    Reuses the cluster this process is already connected to (``init_kwargs`` then do nothing). Otherwise,
    with ``address`` (or the ``RAY_ADDRESS`` environment variable) it joins that cluster; without, it
    starts a local one with ``num_cpus`` (default: the CPUs this process may use) and ``num_gpus``
    (default: the visible CUDA devices), no dashboard, and every Ray process bound to 127.0.0.1.
    ``init_kwargs`` go to ``ray.init``.

    Raises:
        ValueError: ``address`` together with ``num_cpus``/``num_gpus``; or, while this process is
            connected to a cluster, an ``address`` of another cluster or ``num_cpus``/``num_gpus`` other
            than the connected cluster's, e.g. an address on another port (call ``ray.shutdown()``
            first). The same values again pass; an address that cannot be compared (``ray://...``, the
            same port on a host of another name) is ignored with a warning.
    """
    if ray.is_initialized():
        connected = str(ray.get_runtime_context().gcs_address)
        _check_no_size_with_address(address, num_cpus, num_gpus)
        _check_connected(address, num_cpus, num_gpus, connected)
        return connected
    address = address or os.environ.get("RAY_ADDRESS") or None
    init_kwargs.setdefault("include_dashboard", False)
    _check_no_size_with_address(address, num_cpus, num_gpus)
    if address is not None:
        host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
        if host in _LOCAL_HOSTS:
            with _bind_to_localhost():
                ray.init(address=address, **init_kwargs)
        else:
            ray.init(address=address, **init_kwargs)
        _JOINED_WITH[str(ray.get_runtime_context().gcs_address)] = address
    else:
        if num_gpus is None:
            import torch

            num_gpus = torch.cuda.device_count()
        with _bind_to_localhost():
            ray.init(
                num_cpus=num_cpus if num_cpus is not None else _available_cpus(),
                num_gpus=num_gpus,
                **init_kwargs,
            )
        log.info("Started a local Ray cluster on 127.0.0.1; ray.shutdown() stops it.")
    return str(ray.get_runtime_context().gcs_address)


def normalize_resources(resources: Mapping[str, float] | None) -> dict[str, float]:
    """Ray resource names (``CPU``, ``GPU``, custom) for a ``resources_per_trial`` request.

    Raises:
        ValueError: a negative or non-numeric amount, ``cpu <= 0``, or ``gpu > 1`` (one trial trains on
            one device; run more trials concurrently to use more GPUs).
    """
    if resources is None:
        resources = {"cpu": 1}
    if not isinstance(resources, Mapping):
        raise TypeError(
            f"resources_per_trial must be a dict such as {{'cpu': 2, 'gpu': 0.25}}, got {resources!r}."
        )
    out: dict[str, float] = {"CPU": 1.0, "GPU": 0.0}
    for key, amount in resources.items():
        if not isinstance(key, str):
            raise ValueError(f"resources_per_trial keys must be strings, got {key!r}.")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount):
            raise ValueError(f"resources_per_trial[{key!r}] must be a number, got {amount!r}.")
        if amount < 0:
            raise ValueError(f"resources_per_trial[{key!r}] must be >= 0, got {amount}.")
        name = key.upper() if key.lower() in ("cpu", "gpu") else key
        out[name] = float(amount)
    if out["CPU"] <= 0:
        raise ValueError(
            f"resources_per_trial['cpu'] must be > 0 (a trial runs Python on a CPU), got {out['CPU']}."
        )
    if out["GPU"] > 1:
        raise ValueError(
            f"resources_per_trial['gpu']={out['GPU']:g}: a trial trains on one device (a fraction of a GPU or "
            "one whole GPU). Lightning's multi-process strategies re-launch the script, which inside a Ray "
            "worker hangs or fails; to use more GPUs, run more trials at once (e.g. {'gpu': 1} or {'gpu': 0.5})."
        )
    return out


def _node_offer(node: Mapping[str, Any], request: Mapping[str, float]) -> dict[str, float]:
    res = node.get("Resources", {})
    return {k: float(res.get(k, 0.0)) for k in request}


def check_resources(request: Mapping[str, float]) -> None:
    """Raise :class:`InsufficientResourcesError` when no alive node can host ``request`` (Ray names).

    Nodes are those alive now; on an autoscaling cluster, start the nodes before the sweep.
    """
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    needed = {k: v for k, v in request.items() if v > 0}
    for node in nodes:
        offer = _node_offer(node, needed)
        if all(offer[k] >= v - 1e-9 for k, v in needed.items()):
            return
    offers = [_node_offer(n, needed) for n in nodes]
    largest = max(offers, key=lambda o: tuple(o.values()), default={})
    raise InsufficientResourcesError(
        f"No node of the Ray cluster can host one trial's request {needed}: the cluster has {len(nodes)} "
        f"node(s), the largest offering {largest}. Lower resources_per_trial, or connect to a cluster with "
        "larger nodes (address=...). Ray would otherwise keep the trials pending forever."
    )


def trial_slots(request: Mapping[str, float]) -> int:
    """How many trials with ``request`` fit on the cluster at once (at least 1)."""
    slots = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        fits = [math.floor(float(res.get(k, 0.0)) / v + 1e-9) for k, v in request.items() if v > 0]
        slots += min(fits) if fits else 0
    return max(1, slots)
