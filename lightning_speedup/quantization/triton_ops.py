"""The Triton kernels as ``torch.library`` custom ops, so that ``torch.compile`` traces through them.

:func:`.triton_gemv.lut_gemv`, :func:`.triton_gemv.dequantize_packed` and the W8A8 pair
(:func:`.triton_int8.quantize_rows` + :func:`.triton_int8.int8_gemm_scaled`) are Python functions
that Dynamo cannot trace (a pair view, an alignment check, Triton's autotuner), so a compiled model
calling them directly gets a graph break at every quantized layer, and Inductor can fuse nothing
across a layer. Registered here as opaque ops with a shape-only ("fake") implementation,
:class:`.modules.TritonLinear` calls them while compiling: the whole model is one graph, the
unquantized work between the layers (norms, residual adds, activations, attention glue) is fused
around them, and a ``fullgraph=True`` compile succeeds. Eager calls skip the dispatcher and call the
functions themselves.

Each op states its schema (the one torch infers from the signature) instead of leaving torch to read
this module's postponed (string) annotations, which some releases (2.4) cannot.

The real implementations run the same functions (autotuning on their first real call, so warm a
compiled model up before capturing it in a CUDA graph).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_gemv import dequantize_packed, lut_gemv
from .triton_int8 import w8a8_linear

__all__ = ["dequantize_packed_op", "lut_gemv_op", "w8a8_linear_op"]


@torch.library.custom_op(
    "lightning_speedup::lut_gemv",
    mutates_args=(),
    schema="(Tensor x2d, Tensor packed, Tensor scales, Tensor? lut, SymInt group_size, SymInt n, SymInt k, Tensor? bias, "
    "ScalarType out_dtype) -> Tensor",
)
def lut_gemv_op(
    x2d: Tensor,
    packed: Tensor,
    scales: Tensor,
    lut: Tensor | None,
    group_size: int,
    n: int,
    k: int,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """:func:`.triton_gemv.lut_gemv` (autotuned tile) as an op: the (M, N) ``out_dtype`` product."""
    return lut_gemv(x2d, packed, scales, lut, group_size, n, k, bias=bias, out_dtype=out_dtype)


@lut_gemv_op.register_fake
def _lut_gemv_fake(
    x2d: Tensor, packed: Tensor, scales: Tensor, lut: Tensor | None, group_size: int, n: int, k: int,
    bias: Tensor | None, out_dtype: torch.dtype,
) -> Tensor:  # fmt: skip
    return x2d.new_empty(x2d.shape[0], n, dtype=out_dtype)


@torch.library.custom_op(
    "lightning_speedup::dequantize_packed",
    mutates_args=(),
    schema="(Tensor packed, Tensor scales, Tensor? lut, SymInt group_size, SymInt n, SymInt k, ScalarType dtype) -> Tensor",
)
def dequantize_packed_op(
    packed: Tensor, scales: Tensor, lut: Tensor | None, group_size: int, n: int, k: int, dtype: torch.dtype
) -> Tensor:
    """:func:`.triton_gemv.dequantize_packed` as an op: the (N, K) ``dtype`` weight."""
    return dequantize_packed(packed, scales, lut, group_size, n, k, dtype)


@dequantize_packed_op.register_fake
def _dequantize_packed_fake(
    packed: Tensor, scales: Tensor, lut: Tensor | None, group_size: int, n: int, k: int, dtype: torch.dtype
) -> Tensor:
    return packed.new_empty(n, k, dtype=dtype)


@torch.library.custom_op(
    "lightning_speedup::w8a8_linear",
    mutates_args=(),
    schema="(Tensor x2d, Tensor wq, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor",
)
def w8a8_linear_op(
    x2d: Tensor, wq: Tensor, w_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """:func:`.triton_int8.w8a8_linear` (activation quantization, then the int8 GEMM) as an op."""
    return w8a8_linear(x2d, wq, w_scale, bias, out_dtype)


@w8a8_linear_op.register_fake
def _w8a8_linear_fake(
    x2d: Tensor, wq: Tensor, w_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    return x2d.new_empty(x2d.shape[0], wq.shape[0], dtype=out_dtype)
