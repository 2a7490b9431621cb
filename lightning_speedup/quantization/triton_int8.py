"""A Triton int8 x int8 GEMM with the W8A8 rescale fused into its epilogue (prefill of W8A8 layers).

``out = (x_q @ w_q.T) * (x_scale[:, None] * w_scale[None, :]) (+ bias)``, rounded once to the output
dtype, with ``x_q`` (M, K) int8 per-token codes, ``w_q`` (N, K) int8 per-channel codes and int32
accumulation. ``torch._int_mm`` writes the (M, N) int32 product to memory and the rescale reads it
back as separate kernels; at prefill sizes (M = 8192, N = 16384) that int32 tensor is 512 MiB of traffic
per layer, as much time as the GEMM. Here the product never leaves registers: every output tile is
rescaled and rounded where it is computed. The epilogue computes in float32 in the order of
:func:`.modules.int8_linear` (``acc * (xs * ws)``, then ``+ bias``), so the result equals the torch
backend's bit for bit.

Both operands are K-major (row-major ``x_q`` and ``w_q``), what Hopper's int8 tensor-core instructions
require. Tiles are autotuned per (M, N, K) on the first call; benchmarks make it before CUDA-graph
capture. Triton is imported lazily, as in :mod:`.triton_gemv`; ``TRITON_INTERPRET=1`` runs the kernel
on CPU tensors (slowly; the tests do).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from lightning_speedup.quantization.triton_gemv import cdiv, interpreting, require_cuda

tl: Any = None  # triton.language, imported by _kernels() on first use

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the shapes Triton's own matmul tutorial tunes over
# for Hopper, with K-blocks of 128 bytes for int8.
AUTOTUNE_TILES: tuple[tuple[int, int, int, int, int], ...] = (
    (128, 256, 128, 8, 3),
    (256, 128, 128, 8, 3),
    (128, 128, 128, 8, 4),
    (128, 128, 128, 4, 4),
    (128, 64, 128, 4, 4),
    (64, 128, 128, 4, 4),
    (64, 64, 128, 4, 4),
)
DEFAULT_TILE: dict[str, int] = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}  # the interpreter's
GROUP_M = 8  # output tiles ordered in groups of 8 row-blocks, so that a group's weight columns stay in L2


def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, BLOCK_K: tl.constexpr, RECIPROCAL: tl.constexpr):
    """Row ``pid`` of x -> its int8 codes and float32 scale, as :func:`.fake_quant.quantize_activation`.

    ``s = absmax / 127``; ``q = round_half_even(x / max(s, 1e-12))`` clamped to [-127, 127]: IEEE divisions
    (``div_rn``) and rounding by adding and subtracting 1.5 * 2**23 (exact for |y| < 2**22; the kernel is
    compiled without FMA contraction), so the codes equal torch's bit for bit. Torch divides by the
    Python scalar 127 differently per device: on CUDA it multiplies by the float32 reciprocal (its division
    kernel does so whenever the divisor is a CPU scalar), on the CPU it divides; ``RECIPROCAL`` follows
    the device (the compiled kernel runs on CUDA, the interpreter on the CPU).
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    in_k = offs < K
    x = tl.load(x_ptr + row * K + offs, mask=in_k, other=0.0).to(tl.float32)
    if RECIPROCAL:
        s = tl.max(tl.abs(x), axis=0) * 0.007874015718698502  # float32(1) / float32(127), exactly
    else:
        s = tl.math.div_rn(tl.max(tl.abs(x), axis=0), 127.0)
    y = tl.math.div_rn(x, tl.maximum(s, 1e-12))
    r = (y + 12582912.0) - 12582912.0
    q = tl.minimum(tl.maximum(r, -127.0), 127.0).to(tl.int8)
    tl.store(q_ptr + row * K + offs, q, mask=in_k)
    tl.store(s_ptr + row, s)


def _int8_gemm_kernel(
    a_ptr,
    b_ptr,
    xs_ptr,
    ws_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) output tile; ``a`` is (M, K) and ``b`` (N, K), both row-major int8."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP * num_n
    first_m = (pid // in_group) * GROUP
    group_size = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_a = tl.minimum(offs_m, M - 1)  # edge tiles re-read the last row/column instead of masking
    rows_b = tl.minimum(offs_n, N - 1)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_a[:, None].to(tl.int64) * K + offs_k[None, :]
    b_ptrs = b_ptr + rows_b[None, :].to(tl.int64) * K + offs_k[:, None]  # (BLOCK_K, BLOCK_N) view of b.T
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        in_k = offs_k < K - k0
        a = tl.load(a_ptrs + k0, mask=in_k[None, :], other=0)
        b = tl.load(b_ptrs + k0, mask=in_k[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    xs = tl.load(xs_ptr + rows_a)
    ws = tl.load(ws_ptr + rows_b)
    out = acc.to(tl.float32) * (xs[:, None] * ws[None, :])
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rows_b).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], out, mask=mask)


@functools.cache
def _kernels(interpret: bool) -> tuple[Any, Any, Any]:
    """(plain GEMM, autotuned GEMM, row quantizer), built on first use (``interpret`` keys the cache only)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    plain = triton.jit(_int8_gemm_kernel)
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in AUTOTUNE_TILES
    ]
    tuned = triton.autotune(configs=configs, key=["M", "N", "K"])(plain)
    return plain, tuned, triton.jit(_quantize_rows_kernel)


@torch.compiler.disable
def int8_gemm_scaled(
    xq: Tensor,
    wq: Tensor,
    x_scale: Tensor,
    w_scale: Tensor,
    *,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    config: dict[str, int] | None = None,
) -> Tensor:
    """``(xq @ wq.T) * (x_scale[:, None] * w_scale[None, :]) (+ bias)`` as an (M, N) ``out_dtype`` tensor.

    Args:
        xq: (M, K) int8 activations codes. wq: (N, K) int8 weight codes (row-major).
        x_scale: (M,) or (M, 1) float32 per-token scales. w_scale: (N,) float32 per-channel scales.
        bias: optional (N,) bias, added in float32 after the rescale.
        out_dtype: dtype of the result (float32, bfloat16 or float16).
        config: a fixed tile (``{"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128}``, optionally
            ``num_warps``/``num_stages``) instead of autotuning; the interpreter never autotunes.

    Raises:
        ValueError: shapes or dtypes that do not fit (the message says which).
        RuntimeError: CPU tensors outside the interpreter.
    """
    if xq.dtype != torch.int8 or wq.dtype != torch.int8 or xq.dim() != 2 or wq.dim() != 2:
        raise ValueError(
            f"xq and wq must be 2-D int8, got {xq.dtype} {tuple(xq.shape)} and {wq.dtype} {tuple(wq.shape)}."
        )
    m, k = xq.shape
    n = wq.shape[0]
    if wq.shape[1] != k or x_scale.numel() != m or w_scale.numel() != n:
        raise ValueError(
            f"xq (M={m}, K={k}) needs wq (N, {k}), {m} activation scales and N weight scales; got wq "
            f"{tuple(wq.shape)}, {x_scale.numel()} and {w_scale.numel()}."
        )
    require_cuda(xq, "int8_gemm_scaled")
    interpret = interpreting()
    out = torch.empty(m, n, dtype=torch.float32 if interpret else out_dtype, device=xq.device)
    if m and n:
        xs = x_scale.reshape(m).float().contiguous()
        ws = w_scale.reshape(n).float().contiguous()
        args = (xq.contiguous(), wq.contiguous(), xs, ws, ws if bias is None else bias, out, m, n, k)
        plain, tuned, _ = _kernels(interpret)
        # No FMA contraction: the epilogue rounds acc * (xs * ws) before adding the bias, as torch does.
        meta = {"HAS_BIAS": bias is not None, "GROUP": GROUP_M, "enable_fp_fusion": False}
        if config is None and not interpret:
            tuned[lambda meta_: (cdiv(m, meta_["BLOCK_M"]) * cdiv(n, meta_["BLOCK_N"]),)](*args, **meta)
        else:
            tile = dict(config or DEFAULT_TILE)
            grid = (cdiv(m, tile["BLOCK_M"]) * cdiv(n, tile["BLOCK_N"]),)
            plain[grid](*args, **meta, **tile)
    # The interpreter rounds float32 to 16 bits by truncation: there, torch rounds.
    return out.to(out_dtype)


@torch.compiler.disable
def quantize_rows(x2d: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric int8 per row in one kernel: ``(codes int8 (M, K), scale float32 (M, 1))``.

    Equal, bit for bit, to :func:`.fake_quant.quantize_activation` (which takes half a dozen elementwise
    kernels with float32 intermediates). Rows of up to 65536 values.
    """
    if x2d.dim() != 2 or x2d.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be 2-D float32/bfloat16/float16, got {x2d.dtype} {tuple(x2d.shape)}.")
    m, k = x2d.shape
    if k > 65536:
        raise ValueError(f"quantize_rows handles rows of up to 65536 values, got {k}.")
    require_cuda(x2d, "quantize_rows")
    interpret = interpreting()
    q = torch.empty(m, k, dtype=torch.int8, device=x2d.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x2d.device)
    if m and k:
        block = 1 << (k - 1).bit_length()
        warps = 4 if block <= 4096 else 8 if block <= 16384 else 16
        _kernels(interpret)[2][(m,)](
            x2d.contiguous(),
            q,
            s,
            k,
            BLOCK_K=block,
            RECIPROCAL=x2d.is_cuda,
            num_warps=warps,
            enable_fp_fusion=False,
        )
    return q, s


def w8a8_linear(
    x2d: Tensor,
    wq: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """One W8A8 layer: :func:`quantize_rows` (per-token int8 codes), then :func:`int8_gemm_scaled`."""
    xq, xs = quantize_rows(x2d)
    return int8_gemm_scaled(xq, wq, xs, w_scale, bias=bias, out_dtype=out_dtype)
