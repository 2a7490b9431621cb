"""Compilation that pays for itself: regional compilation, a cross-process artifact cache, and the
decision whether compiling can repay its cost in the steps a run has left; and the names of the
attention kernels :class:`~lightning_speedup.compile.callbacks.SDPABackends` chooses among.

Regional compilation follows PyTorch's recipe "Reducing torch.compile cold start compilation time with
regional compilation": the repeated blocks of a model (a GPT's ``Block``) are compiled in place with
``nn.Module.compile``; Dynamo caches per code object, so N identical blocks compile once. The artifact
cache stores ``torch.compiler.save_cache_artifacts()`` under a key of everything that changes the compiled
code (model structure, input shapes, mode, torch version, GPU), so a second process starts warm.

Plain torch only (no Lightning); :mod:`lightning_speedup.compile.callbacks` wires it into the Trainer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

CACHE_ENV = "LIGHTNING_SPEEDUP_COMPILE_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/lightning_speedup/compile")
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Conservative priors for `compile="auto"` when the cache holds no record of an earlier run with the same
# key: a cold Inductor compile of a whole small model costs tens of seconds, a regional one less, and the
# speed-up of a compiled step is assumed modest. Overestimating the cost only makes auto compile later.
PRIOR_COMPILE_S = {"full": 30.0, "regional": 15.0}
PRIOR_SPEEDUP = 1.3
# A cached compile (artifacts loaded) still traces the model with Dynamo: assume a quarter of cold.
PRIOR_WARM_FRACTION = 0.25


# --- regional compilation --------------------------------------------------------------------------------

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def find_regions(model: nn.Module, regions: Sequence[str] | None = None) -> list[nn.Module]:
    """The submodules to compile one by one: instances of the classes named in ``regions``, or by default
    of the repeated class (two or more instances) whose instances hold the most parameters.

    Instances nested inside another chosen instance are left to their parent. Returns ``[]`` when the model
    has no repeated block (compile the whole model instead). Raises ``ValueError`` when a named class does
    not occur in ``model``.
    """
    modules = [m for name, m in model.named_modules() if name and not isinstance(m, _CONTAINERS)]
    if regions is not None:
        wanted = set(regions)
        present = {type(m).__name__ for m in modules}
        missing = sorted(wanted - present)
        if missing:
            raise ValueError(
                f"Compile regions {missing} are not submodule classes of {type(model).__name__}; classes "
                f"present: {sorted(present)}. Pass class names from that list, or regions=None to find "
                "the repeated block automatically."
            )
        chosen = [m for m in modules if type(m).__name__ in wanted]
    else:
        counts = Counter(type(m) for m in modules if any(True for _ in m.children()))
        repeated = [cls for cls, n in counts.items() if n >= 2]
        if not repeated:
            return []

        def weight(cls: type) -> int:
            return sum(p.numel() for m in modules if type(m) is cls for p in m.parameters())

        best = max(repeated, key=weight)
        chosen = [m for m in modules if type(m) is best]
    inner: set[int] = set()
    for m in chosen:
        inner.update(id(sub) for sub in m.modules() if sub is not m)
    return [m for m in chosen if id(m) not in inner]


class _CompiledCall:
    """A module's compiled ``_call_impl`` (what ``nn.Module.compile`` stores), counting its calls.

    ``torch.compile(module._call_impl)`` is bound to ``module``, and ``LightningModule.__getstate__`` (unlike
    ``nn.Module``'s) keeps ``_compiled_call_impl``: a deep copy of a compiled LightningModule would run the
    original's weights, and pickling it fails. Copies and pickles of this wrapper are ``None``, so a copy of
    the module runs its own weights, uncompiled.
    """

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return type(None), ()  # unpickles as None


def compile_in_place(module: nn.Module, **compile_kwargs: Any) -> None:
    """``module.compile(**compile_kwargs)`` (in place, state_dict keys unchanged), except that copies and
    pickles of ``module`` run uncompiled instead of calling the original's compiled call."""
    module._compiled_call_impl = _CompiledCall(torch.compile(module._call_impl, **compile_kwargs))


def uncompile(modules: Iterable[nn.Module]) -> None:
    """Undo :func:`compile_in_place` on ``modules`` (a later compile reuses torch's caches)."""
    for m in modules:
        if isinstance(getattr(m, "_compiled_call_impl", None), _CompiledCall):
            m._compiled_call_impl = None


def compiled_calls(modules: Iterable[nn.Module]) -> int:
    """How often the calls compiled by :func:`compile_in_place` on ``modules`` ran."""
    return sum(
        m._compiled_call_impl.calls
        for m in modules
        if isinstance(getattr(m, "_compiled_call_impl", None), _CompiledCall)
    )


def already_compiled(model: nn.Module) -> list[str]:
    """What in ``model`` was compiled before :func:`compile_model` ran: submodules compiled in place
    (``nn.Module.compile``), ``torch.compile``'d submodules (``OptimizedModule``) and compiled functions held
    as attributes (``self._forward = torch.compile(self.net.forward)``), by qualified name."""
    from torch._dynamo.eval_frame import OptimizedModule

    found = []
    for name, m in model.named_modules():
        label = name or type(model).__name__
        if getattr(m, "_compiled_call_impl", None) is not None or isinstance(m, OptimizedModule):
            found.append(label)
            continue
        for attr, value in vars(m).items():
            if callable(value) and hasattr(value, "_torchdynamo_orig_callable"):
                found.append(f"{label}.{attr}")
    return found


def compile_regions(
    model: nn.Module,
    regions: Sequence[str] | None = None,
    mode: str | None = None,
    backend: str = "inductor",
    fullgraph: bool = False,
) -> list[nn.Module]:
    """Compile each region of ``model`` in place (state_dict keys unchanged); returns the regions.

    Falls back to compiling ``model`` itself, logged at INFO, when it has no repeated block.
    """
    found = find_regions(model, regions)
    if not found:
        log.info("No repeated submodule class in %s: compiling the whole model.", type(model).__name__)
        compile_in_place(model, mode=mode, backend=backend, fullgraph=fullgraph)
        return [model]
    for m in found:
        compile_in_place(m, mode=mode, backend=backend, fullgraph=fullgraph)
    return found


def compile_model(
    model: nn.Module,
    strategy: str,
    regions: Sequence[str] | None = None,
    mode: str | None = None,
    backend: str = "inductor",
) -> list[nn.Module]:
    """``strategy`` "full" compiles ``model`` in place, "regional" its repeated blocks."""
    if strategy == "full":
        compile_in_place(model, mode=mode, backend=backend)
        return [model]
    if strategy == "regional":
        return compile_regions(model, regions, mode=mode, backend=backend)
    raise ValueError(f"compile strategy must be 'full' or 'regional', got {strategy!r}.")


# --- cache key and artifact cache ------------------------------------------------------------------------


def device_name(device: torch.device | None = None) -> str:
    """The GPU's name (compiled kernels are tuned per GPU), or ``"cpu"``."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return "cpu"


def _shape_signature(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return [list(inputs.shape), str(inputs.dtype)]
    if isinstance(inputs, (list, tuple)):
        return [_shape_signature(x) for x in inputs]
    if isinstance(inputs, dict):
        return {str(k): _shape_signature(v) for k, v in sorted(inputs.items())}
    return type(inputs).__name__


def _backend_name(backend: Any) -> str:
    if isinstance(backend, str):
        return backend
    return getattr(backend, "__qualname__", None) or type(backend).__qualname__  # a callable backend


def cache_key(
    model: nn.Module,
    inputs: Any,
    mode: str | None,
    strategy: str,
    device: str,
    torch_version: str = torch.__version__,
    *,
    backend: Any = "inductor",
    regions: Sequence[str] | None = None,
    fullgraph: bool = False,
    precision: str | None = None,
) -> str:
    """A hex digest of what changes the compiled code or its speed: the module tree (classes, names and each
    module's ``extra_repr``, its configuration: dropout ``p``, GELU's ``approximate``, ...), every
    parameter's and buffer's name, shape and dtype and every parameter's ``requires_grad`` (a frozen part
    has no backward), the input shapes and dtypes, the compile mode, strategy, backend, regions and
    ``fullgraph``, the training precision (autocast changes the graphs), the torch version and the device
    name."""
    tree = [[name, type(m).__qualname__, m.extra_repr()] for name, m in model.named_modules()]
    tensors = [
        [name, list(t.shape), str(t.dtype), t.requires_grad]
        for name, t in (*model.named_parameters(), *model.named_buffers())
    ]
    payload = {
        "tree": tree,
        "tensors": tensors,
        "inputs": _shape_signature(inputs),
        "mode": mode,
        "strategy": strategy,
        "backend": _backend_name(backend),
        "regions": sorted(set(regions)) if regions is not None else None,
        "fullgraph": fullgraph,
        "precision": precision,
        "device": device,
        "torch": torch_version,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    """``$LIGHTNING_SPEEDUP_COMPILE_CACHE`` if set, else ``~/.cache/lightning_speedup/compile``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


@dataclass(frozen=True)
class CompileRecord:
    """What an earlier run with the same key measured: compile seconds and the compiled step's speed-up."""

    compile_s: float
    speedup: float


class ArtifactCache:
    """Compiled artifacts and timing records by key, one ``<key>.bin`` and ``<key>.json`` per entry.

    Clear it by deleting the directory (``rm -rf ~/.cache/lightning_speedup/compile``). A file that cannot
    be read, or a record whose values are out of range (a negative or non-finite ``compile_s``, a ``speedup``
    that is not a finite positive number), is reported in a warning naming it, removed, and rebuilt by the
    run.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()

    def artifact_path(self, key: str) -> Path:
        return self.directory / f"{key}.bin"

    def record_path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Unique across processes and hosts sharing the directory (a pid alone is not).
        tmp = path.with_suffix(path.suffix + f".tmp{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one

    def _discard(self, path: Path, error: BaseException) -> None:
        warnings.warn(
            f"Ignoring the unreadable compile cache file {path} ({type(error).__name__}: {error}); it is "
            "removed and will be rebuilt by this run.",
            stacklevel=3,
        )
        path.unlink(missing_ok=True)

    def load_artifacts(self, key: str) -> bool:
        """Load the artifacts stored under ``key`` into this process's compile caches; True on a hit."""
        path = self.artifact_path(key)
        if not path.is_file():
            return False
        try:
            load_artifacts_bytes(path.read_bytes())
        except Exception as error:  # torch raises many types for a truncated or foreign file
            self._discard(path, error)
            return False
        return True

    def save_artifacts(self, key: str) -> bool:
        """Store what this process compiled so far under ``key``; False when torch has nothing to save."""
        data = save_artifacts_bytes()
        if not data:
            return False
        self._write(self.artifact_path(key), data)
        return True

    def read_record(self, key: str) -> CompileRecord | None:
        path = self.record_path(key)
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            record = CompileRecord(compile_s=float(raw["compile_s"]), speedup=float(raw["speedup"]))
            if not (math.isfinite(record.compile_s) and record.compile_s >= 0):
                raise ValueError(f"compile_s must be a finite number of seconds >= 0, got {record.compile_s}")
            if not (math.isfinite(record.speedup) and record.speedup > 0):
                raise ValueError(f"speedup must be a finite number > 0, got {record.speedup}")
        except Exception as error:
            self._discard(path, error)
            return None
        return record

    def write_record(self, key: str, record: CompileRecord) -> None:
        self._write(self.record_path(key), json.dumps(asdict(record)).encode())


def save_artifacts_bytes() -> bytes | None:
    """``torch.compiler.save_cache_artifacts()``'s bytes (torch >= 2.7), or None where it is missing."""
    save = getattr(torch.compiler, "save_cache_artifacts", None)
    if save is None:
        return None
    out = save()
    return None if out is None else out[0]


def load_artifacts_bytes(data: bytes) -> None:
    """``torch.compiler.load_cache_artifacts(data)``; raises RuntimeError where torch lacks it."""
    load = getattr(torch.compiler, "load_cache_artifacts", None)
    if load is None:
        raise RuntimeError(
            f"torch {torch.__version__} has no torch.compiler.load_cache_artifacts (needs 2.7+)."
        )
    # torch logs and swallows a corrupt payload, returning None: turn that into an error the cache handles.
    if load(data) is None:
        raise RuntimeError("torch.compiler.load_cache_artifacts could not read the payload")


# --- the auto decision -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompileDecision:
    compile: bool
    reason: str
    expected_saving_s: float


def decide_compile(
    eager_step_s: float,
    remaining_steps: float,
    compile_s: float,
    speedup: float,
    source: str = "priors",
    unit: str = "steps",
) -> CompileDecision:
    """Compile when the time the compiled steps save, ``remaining_steps * eager_step_s * (1 - 1/speedup)``,
    exceeds ``compile_s``. ``remaining_steps`` may be ``inf`` (a run bounded by time, not steps); ``unit``
    names what ``eager_step_s`` times and ``remaining_steps`` counts in the reason ("batches" for the
    callback, which times each training batch)."""
    finite = all(math.isfinite(v) for v in (eager_step_s, compile_s, speedup)) and not math.isnan(
        remaining_steps
    )
    if not finite or eager_step_s < 0 or compile_s < 0 or speedup <= 0 or remaining_steps < 0:
        raise ValueError(
            f"decide_compile needs finite non-negative times and steps and a finite positive speed-up, got "
            f"eager_step_s={eager_step_s}, remaining_steps={remaining_steps}, compile_s={compile_s}, "
            f"speedup={speedup}."
        )
    saved_per_step = eager_step_s * (1.0 - 1.0 / speedup)
    if saved_per_step <= 0:
        return CompileDecision(
            False, f"compiled steps are not expected to be faster (speed-up {speedup:.2f}x, {source})", 0.0
        )
    saving = math.inf if math.isinf(remaining_steps) else remaining_steps * saved_per_step
    net = saving - compile_s
    detail = (
        f"{remaining_steps:g} {unit} left x {eager_step_s * 1e3:.2f} ms eager x (1 - 1/{speedup:.2f}) = "
        f"{saving:.1f} s saved vs {compile_s:.1f} s to compile ({source})"
    )
    if net > 0:
        return CompileDecision(True, f"compiling pays for itself: {detail}", net)
    return CompileDecision(False, f"compiling would not pay for itself: {detail}", net)


def expected_costs(
    strategy: str, record: CompileRecord | None, artifacts_cached: bool
) -> tuple[float, float, str]:
    """(compile seconds, speed-up, source) for ``decide_compile``: an earlier run's record, else priors."""
    if record is not None:
        return record.compile_s, record.speedup, "measured by an earlier run with the same key"
    compile_s = PRIOR_COMPILE_S[strategy]
    if artifacts_cached:
        compile_s *= PRIOR_WARM_FRACTION
    return compile_s, PRIOR_SPEEDUP, "documented priors"


def median(values: Iterable[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        raise ValueError("median of no values")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


# --- attention kernels -----------------------------------------------------------------------------------

# scaled_dot_product_attention's CUDA backends, by the names torch.nn.attention.SDPBackend gives them (lower
# case, without "_attention"), each with its SDPBackend member.
_SDPA_MEMBERS = {
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}
SDPA_BACKENDS = tuple(_SDPA_MEMBERS)


def sdpa_backend_enums(backends: Iterable[str], owner: str = "SDPABackends") -> list[Any]:
    """``backends`` as ``torch.nn.attention.SDPBackend`` members, for ``torch.nn.attention.sdpa_kernel``;
    a ``ValueError`` naming ``owner`` for an unknown, repeated or empty choice (a bare string is refused
    too: it would be read letter by letter)."""
    from torch.nn.attention import SDPBackend

    if isinstance(backends, str):
        raise ValueError(f"{owner}(backends={backends!r}) takes a list of names, e.g. [{backends!r}].")
    chosen = list(backends)
    unknown = [b for b in chosen if b not in SDPA_BACKENDS]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(
            f"{owner}(backends={chosen!r}): name one or more of {list(SDPA_BACKENDS)}, each once"
            + (f"; unknown: {unknown}." if unknown else ".")
        )
    return [getattr(SDPBackend, _SDPA_MEMBERS[b]) for b in chosen]
