"""Compilation that pays for itself (regional compile, cross-process artifact cache, ``auto``) and CUDA
graphs without Inductor. Core: :mod:`.core` (plain torch); adapters: :mod:`.callbacks`."""

from lightning_speedup.compile.callbacks import Compile, EagerCUDAGraphs
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
    "cache_key",
    "compile_model",
    "compile_regions",
    "decide_compile",
    "default_cache_dir",
    "find_regions",
]
