"""Cold start and compilation that pays for itself: regional compile, a cross-process artifact cache,
``auto``; CUDA graphs without Inductor; the choice of attention kernels (:class:`SDPABackends`).
Core: :mod:`.core` (plain torch); adapters: :mod:`.callbacks`."""

from lightning_speedup.compile.callbacks import Compile, EagerCUDAGraphs, SDPABackends
from lightning_speedup.compile.core import (
    ArtifactCache,
    CompileDecision,
    CompileRecord,
    cache_key,
    compile_model,
    compile_regions,
    decide_compile,
    default_cache_dir,
    find_regions,
)

__all__ = [
    "ArtifactCache",
    "Compile",
    "CompileDecision",
    "CompileRecord",
    "EagerCUDAGraphs",
    "SDPABackends",
    "cache_key",
    "compile_model",
    "compile_regions",
    "decide_compile",
    "default_cache_dir",
    "find_regions",
]
