"""A Triton GEMV for packed 4-bit weights (int4 group-wise, nf4/fp4 blockwise): batch-1 decode.

``out = x @ W.T`` for a few rows of ``x`` (M <= 8 or so), reading the weight as the ``"torch"``
backend stores it (:func:`.modules.codes_to_storage`): two 4-bit codes per byte, the first in the
high nibble, row-major (N, K), so row ``n`` is the ``K / 2`` bytes from ``n * K / 2``. Every format
decodes as ``value = LUT[nibble] * scale[n, k // G]``: int4 has ``LUT[i] = i - 8`` (computed, not
looked up) and one float32 scale per (row, group of G); nf4/fp4 look the nibble up in their 16-entry
codebook, and their blockwise absmax over the flattened weight is a (row, block) scale whenever
``K % block == 0``.

Decode is memory-bound: the kernel streams the packed bytes once and does as little arithmetic per
weight as it can (an H100/H200 issues ~33e12 thread-instructions/s, 132 SMs x 4 schedulers x 32 lanes
x 1.98 GHz, against 9.6e12 weights/s at the H200's 4.8 TB/s: ~3.5 instructions per weight):

* a thread owns one 16-byte chunk (32 weights) of one row per step, loaded with one 128-bit load
  (a warp reads 128 to 512 contiguous bytes of a row); a chunk never straddles a group (G >= 32; 8-byte
  chunks for G = 16), so its products are summed unscaled and the scale multiplies the chunk sum once;
* ``x`` is read through an int32 view (the two activations of one weight byte per load element, four
  128-bit loads per chunk, L1 hits after the first row), and bfloat16 -> float32 is a shift or a mask;
  x and the weights are loaded as tensors of one shape, so they share a register layout (no
  shared-memory shuffles in the loop);
* int4 codes become float32 with the "magic number" trick (``0x4B000000 | v`` is the float
  ``2**23 + v``; subtracting ``2**23 + 8`` leaves the code exactly) rather than an int-to-float
  conversion (quarter rate), and the high nibble is decoded in place (16x, rescaled per chunk);
* float32 accumulation throughout; the row sums, the bias and the rounding to the output dtype are
  the kernel's epilogue, so a layer call is one kernel launch (no zero-fill, no cast kernel).

Compiled for sm_90 (its bundled ``ptxas``, no GPU needed: benchmarks/triton_gemv_sass.py), the int4 loop is
5.1-6.4 SASS instructions per weight with Triton 3.9 and 5.4-5.9 with Triton 3.6 (bfloat16 ``x``; see
``AUTOTUNE_TILES``), the nf4/fp4 loop 7.6-8.9 and 8.0-8.4 (each codebook lookup is a 64-bit address and
a load from L1). Measured on an H200 (benchmarks/triton_gemv_layers.py), the kernel streams 2.0-2.15 TB/s
of packed weights, faster than cuBLAS' bfloat16 GEMV (numbers in ``docs/methods/quantization.md``): bound by
its instructions, not by HBM.

:func:`dequantize_packed` is the prefill path's other kernel: one pass from the packed bytes to the
(N, K) weight in the layer's dtype, bit-exact with the torch backend's dequantization.

There is no split-K: with ``BLOCK_N`` of 1 to 16 rows, the layers of 1-7B models (N >= 2048) give
hundreds to thousands of programs, enough for 132 SMs without the atomics (order-dependent sums), the
zeroed float32 buffer and the cast kernel that split-K needs. ``triton.autotune`` picks the tile per
(N, K, group size, format) on the first call; benchmarks make it before capturing CUDA graphs.

Triton is imported lazily: CPU builds of PyTorch do not ship it, and ``import lightning_speedup``
must work without it. With ``TRITON_INTERPRET=1`` in the environment the kernel runs in Triton's
interpreter on CPU tensors (the tests do this; it is slow, and it does not autotune).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import Tensor

# Rows of x up to which a layer runs the GEMV; above it (prefill), dequantize + F.linear is faster.
GEMV_MAX_ROWS = 8

# Autotuned tiles (BLOCK_N rows, BLOCK_KB bytes along K, num_warps), each with and without PREFETCH (the
# next step's weight bytes loaded before this step computes: +1-2% on nf4 layers of an H200, nothing on int4). A warp covers 512 bytes of one row
# (BLOCK_KB >= 512; two or four warps share a row at 1024 and 2048) or 256 bytes of two rows; the rows
# left over go to the same threads, and a thread with R rows loads and converts its x chunk once for
# all of them: offline SASS (sm_90, int4, bf16 x) has 6.4 instructions per weight at R = 1, 5.5 at R = 2
# and 5.1 at R = 4 (89 registers; fewer warps in flight to hide latency, which autotuning weighs).
AUTOTUNE_TILES: tuple[tuple[int, int, int], ...] = (
    (4, 512, 4),  # R = 1
    (8, 512, 4),  # R = 2
    (16, 512, 4),  # R = 4
    (8, 512, 8),  # R = 1
    (16, 512, 8),  # R = 2
    (8, 256, 4),  # R = 1
    (16, 256, 4),  # R = 2
    (2, 1024, 4),  # R = 1
    (4, 1024, 4),  # R = 2
    (1, 2048, 4),  # R = 1
)
# The tile used without autotuning (the interpreter, which cannot time kernels).
DEFAULT_TILE: dict[str, int] = {"BLOCK_N": 8, "BLOCK_KB": 256}

_X_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_TRUE = ("1", "true", "on", "yes")

tl: Any = None  # triton.language, imported by _kernels() on first use (the kernel resolves it then)
DEQUANT_BLOCK = 1024  # packed bytes per program of the dequantization kernel


def triton_unavailable() -> str | None:
    """Why the Triton kernel cannot be used in this environment, or None if it can."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return (
            "triton is not installed (PyTorch's CUDA wheels ship it, its CPU wheels do not): pip install "
            "triton, or choose backend='torch'"
        )
    return None


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read at every call)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def require_cuda(t: Tensor, fn: str) -> None:
    """The RuntimeError of every kernel entry point given CPU tensors outside Triton's interpreter."""
    if not t.is_cuda and not interpreting():
        raise RuntimeError(
            f"{fn} runs on CUDA tensors, got {t.device} ones (TRITON_INTERPRET=1 runs Triton's CPU "
            "interpreter instead)."
        )


def cdiv(a: int, b: int) -> int:
    return -(a // -b)


def chunk_bytes(group_size: int) -> int:
    """Bytes of one thread's step along K: 16 (one 128-bit load), or half a group if that is smaller."""
    return min(16, group_size // 2)


def _lut_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    lut_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    KB,
    NUM_GROUPS,
    GROUP_SIZE: tl.constexpr,
    CHUNK: tl.constexpr,
    X_KIND: tl.constexpr,
    USE_LUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,
    INTERPRET: tl.constexpr,
    PREFETCH: tl.constexpr = False,
):
    """One program: rows ``[pid_n * BLOCK_N, +BLOCK_N)`` of the output for activation row ``pid_m``.

    Not decorated here: :func:`_kernels` wraps it in ``triton.jit`` on first use, after importing
    ``triton.language`` into this module's ``tl``.

    ``x_ptr`` is ``x`` viewed as pairs (int32 for 16-bit ``x``, int64 for float32), so pair ``j`` holds
    the two activations of weight byte ``j``. The tile is (BLOCK_N, C, CHUNK) bytes with C = BLOCK_KB /
    CHUNK; each CHUNK lies inside one scale group, and since BLOCK_KB and G are powers of two the
    group of chunk c at step kb0 is ``kb0 // (G / 2) + c * CHUNK // (G / 2)`` whichever is larger.
    """
    # One grid axis (the y axis stops at 65535 tiles); m varies fastest, so the M programs of one weight
    # tile run side by side and share it through L2.
    pid = tl.program_id(0)
    pid_m = pid % M
    pid_n = pid // M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    rows = tl.minimum(offs_n, N - 1)  # the last tile re-reads row N-1 instead of masking every load
    offs_c = tl.arange(0, BLOCK_KB // CHUNK)  # (C,)
    chunk = offs_c[None, :, None] * CHUNK + tl.arange(0, CHUNK)[None, None, :]  # (1, C, CHUNK) bytes
    zero_rows = tl.zeros([BLOCK_N, 1, 1], dtype=tl.int32)
    chunk_full = chunk + zero_rows  # (BN, C, CHUNK): x and w share one shape, so one register layout
    w_ptrs = w_ptr + rows[:, None, None].to(tl.int64) * KB + chunk_full
    x_ptrs = x_ptr + pid_m.to(tl.int64) * KB + chunk_full
    s_ptrs = s_ptr + rows[:, None].to(tl.int64) * NUM_GROUPS + (offs_c[None, :] * CHUNK) // (GROUP_SIZE // 2)
    acc = tl.zeros([BLOCK_N, BLOCK_KB // CHUNK], dtype=tl.float32)  # per-chunk scaled partial sums
    if EVEN_K and PREFETCH:  # software pipelining: the weight bytes and scales of step kb0 + BLOCK_KB are
        # in flight while step kb0 computes (the last step re-reads its own block, an L2 hit, unmasked)
        b_next = tl.load(w_ptrs, eviction_policy="evict_first")
        s_next = tl.load(s_ptrs)
    for kb0 in range(0, KB, BLOCK_KB):
        if EVEN_K and PREFETCH:
            b = b_next.to(tl.int32)
            s = s_next
            nxt = tl.minimum(kb0 + BLOCK_KB, KB - BLOCK_KB)
            b_next = tl.load(w_ptrs + nxt, eviction_policy="evict_first")
            s_next = tl.load(s_ptrs + (nxt * 2) // GROUP_SIZE)
            xp = tl.load(x_ptrs + kb0, eviction_policy="evict_last")
        elif EVEN_K:  # no tail: unmasked loads (no predicates, no zero-fill moves)
            b = tl.load(w_ptrs + kb0, eviction_policy="evict_first").to(tl.int32)
            xp = tl.load(x_ptrs + kb0, eviction_policy="evict_last")
            s = tl.load(s_ptrs + (kb0 * 2) // GROUP_SIZE)
        else:
            in_k = chunk_full < KB - kb0  # constant along each CHUNK: one predicate per 16-byte load
            b = tl.load(w_ptrs + kb0, mask=in_k, other=0, eviction_policy="evict_first").to(tl.int32)
            xp = tl.load(x_ptrs + kb0, mask=in_k, other=0, eviction_policy="evict_last")
            s = tl.load(s_ptrs + (kb0 * 2) // GROUP_SIZE, mask=offs_c[None, :] * CHUNK < KB - kb0, other=0.0)
        # Weight byte j holds element 2j in its high nibble and 2j + 1 in its low one; activation pair j
        # holds element 2j in its low half (little-endian) and 2j + 1 in its high half.
        if X_KIND == 0:  # bfloat16: float32 with the low 16 bits zero
            x_even = (xp << 16).to(tl.float32, bitcast=True)
            x_odd = (xp & -65536).to(tl.float32, bitcast=True)
        elif X_KIND == 1:  # float16
            x_even = (xp & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            x_odd = (xp >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:  # float32 pairs in an int64
            x_even = (xp & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
            x_odd = (xp >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        if USE_LUT:
            # A codebook lookup is a load from L1 at a data-dependent address. Compiled, it is issued as
            # inline PTX, which keeps Triton's coalescing pass from giving this gather its own register
            # layout (Triton 3.6 then moved x and the weights into it through shared memory every step).
            if INTERPRET:
                w_even = tl.load(lut_ptr + (b >> 4).to(tl.uint32))
                w_odd = tl.load(lut_ptr + (b & 0xF).to(tl.uint32))
            else:
                w_even = tl.inline_asm_elementwise(
                    "ld.global.nc.f32 $0, [$1];",
                    "=r,l",
                    [lut_ptr + (b >> 4).to(tl.uint32)],
                    dtype=tl.float32,
                    is_pure=True,
                    pack=1,
                )
                w_odd = tl.inline_asm_elementwise(
                    "ld.global.nc.f32 $0, [$1];",
                    "=r,l",
                    [lut_ptr + (b & 0xF).to(tl.uint32)],
                    dtype=tl.float32,
                    is_pure=True,
                    pack=1,
                )
            part = tl.sum(w_even * x_even, axis=2) + tl.sum(w_odd * x_odd, axis=2)  # (BN, C), in-thread
        else:
            # int4 code = nibble - 8 as a float, exactly, without an int-to-float conversion (quarter
            # rate): 0x4B000000 | v is the float 2**23 + v. The high nibble stays in place (v = 16 *
            # nibble, saving a shift per byte), so its sum is 16x and scaled back exactly by 1/16.
            t = b | 0x4B000000
            w_even16 = (t & 0x4B0000F0).to(tl.float32, bitcast=True) - 8388736.0  # 16 * code
            w_odd = (t & 0x4B00000F).to(tl.float32, bitcast=True) - 8388616.0
            part = tl.sum(w_even16 * x_even, axis=2) * 0.0625 + tl.sum(w_odd * x_odd, axis=2)
        acc += part * s
    out = tl.sum(acc, axis=1)  # (BN,)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows).to(tl.float32)
    # The store rounds to the output dtype to nearest even, as torch's .to() does (the interpreter truncates).
    tl.store(out_ptr + pid_m.to(tl.int64) * N + offs_n, out, mask=offs_n < N)


def _dequant_kernel(w_ptr, s_ptr, lut_ptr, out_ptr, NBYTES, GROUP_SIZE: tl.constexpr, USE_LUT: tl.constexpr,
                    BLOCK: tl.constexpr):  # fmt: skip
    """Bytes ``[pid * BLOCK, +BLOCK)`` of the packed weight -> their 2 * BLOCK values, in order.

    Byte j holds weights 2j (high nibble) and 2j + 1 (low nibble) of the flattened (N, K) weight; since
    G divides K, the scale of weight 2j is ``scales.flatten()[2j // G]`` whatever the row. The value is
    ``LUT[nibble] * scale`` in float32 (int4: ``nibble - 8``), rounded once to the output dtype: what
    :func:`.fake_quant.dequantize_weight` computes.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NBYTES
    b = tl.load(w_ptr + offs, mask=mask, other=0).to(tl.int32)
    s = tl.load(s_ptr + (offs * 2) // GROUP_SIZE, mask=mask, other=0.0)
    if USE_LUT:
        hi = tl.load(lut_ptr + (b >> 4))
        lo = tl.load(lut_ptr + (b & 0xF))
    else:
        hi = ((b >> 4) - 8).to(tl.float32)
        lo = ((b & 0xF) - 8).to(tl.float32)
    pair = tl.join(hi * s, lo * s)  # (BLOCK, 2): element 2j, then 2j + 1
    out_offs = tl.join(offs * 2, offs * 2 + 1)
    tl.store(out_ptr + out_offs, pair.to(out_ptr.dtype.element_ty), mask=tl.join(mask, mask))


def _prune_tiles(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
    """Drop tiles far larger than the layer (small layers would time many identical kernels)."""
    n, kb = named_args["N"], named_args["KB"]
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= max(n, 2) and c.kwargs["BLOCK_KB"] <= max(kb, 128)]
    return kept or configs[:1]


def _even_k(args: dict[str, Any]) -> bool:
    return args["KB"] % args["BLOCK_KB"] == 0


@functools.cache
def _kernels(interpret: bool) -> tuple[Any, Any, Any]:
    """(plain GEMV, autotuned GEMV, dequantization kernel), built on first use: ``triton.jit`` reads
    TRITON_INTERPRET then.

    ``interpret`` is part of the cache key only, so that the interpreted and the compiled kernels
    are built (and kept) separately when a test session switches between them.
    """
    global tl
    import triton
    import triton.language

    tl = triton.language
    plain = triton.jit(_lut_gemv_kernel, do_not_specialize=["M"])
    dequant = triton.jit(_dequant_kernel)
    configs = [
        triton.Config({"BLOCK_N": bn, "BLOCK_KB": bkb, "PREFETCH": prefetch}, num_warps=w, num_stages=1)
        for bn, bkb, w in AUTOTUNE_TILES
        for prefetch in (False, True)
    ]
    tuned = triton.autotune(
        configs=configs,
        key=["N", "KB", "GROUP_SIZE", "USE_LUT"],
        prune_configs_by={"early_config_prune": _prune_tiles},
    )(triton.heuristics({"EVEN_K": _even_k})(plain))
    return plain, tuned, dequant


# torch.compile does not trace this function (the pair view, the alignment check and Triton's autotuner,
# which Dynamo cannot capture): called directly in compiled code it is a graph break. TritonLinear calls
# it through the custom op in .triton_ops while compiling, which Inductor keeps in the graph.
@torch.compiler.disable
def lut_gemv(
    x2d: Tensor,
    packed: Tensor,
    scales: Tensor,
    lut: Tensor | None,
    group_size: int,
    n: int,
    k: int,
    *,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    config: dict[str, int] | None = None,
) -> Tensor:
    """``x2d @ dequantize(W).T (+ bias)`` for a packed 4-bit (N, K) weight: an (M, N) ``out_dtype`` tensor.

    Args:
        x2d: (M, K) activations, bfloat16, float16 or float32 (CUDA; CPU under TRITON_INTERPRET=1).
        packed: the N * K / 2 weight bytes (uint8), row-major, first value of a byte in its high nibble.
        scales: the N * K / group_size float32 scales, row-major (N, K / group_size).
        lut: the 16 float32 code values (nf4/fp4), or None for int4 (value = nibble - 8).
        group_size: weights per scale along K: a power of two >= 16 that divides K.
        bias: optional (N,) bias, added in float32.
        out_dtype: dtype of the result; accumulation is float32 either way.
        config: a fixed tile (``{"BLOCK_N": 8, "BLOCK_KB": 256}``, optionally ``num_warps``) instead of
            autotuning; BLOCK_KB is a power of two >= 16, in bytes. The interpreter never autotunes
            (``DEFAULT_TILE`` if None).

    Raises:
        ValueError: shapes or dtypes that do not fit (the message says which).
        RuntimeError: CPU tensors outside the interpreter.
    """
    if group_size < 16 or group_size & (group_size - 1) or k % group_size:
        raise ValueError(f"group_size must be a power of two >= 16 that divides K={k}, got {group_size}.")
    if x2d.dim() != 2 or x2d.shape[1] != k or x2d.dtype not in _X_KIND:
        raise ValueError(f"x must be (M, {k}) bfloat16/float16/float32, got {tuple(x2d.shape)} {x2d.dtype}.")
    if packed.dtype != torch.uint8 or packed.numel() != n * k // 2 or scales.numel() != n * k // group_size:
        raise ValueError(
            f"An ({n}, {k}) weight in groups of {group_size} needs {n * k // 2} uint8 bytes and "
            f"{n * k // group_size} scales; got {packed.numel()} {packed.dtype} and {scales.numel()}."
        )
    if lut is not None and (lut.numel() != 16 or lut.dtype != torch.float32):
        raise ValueError(f"lut must hold 16 float32 values, got {lut.numel()} {lut.dtype}.")
    require_cuda(x2d, "lut_gemv")
    interpret = interpreting()
    m = x2d.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=x2d.device)
    if m == 0 or n == 0:
        return out
    x2d = x2d.contiguous()
    if x2d.data_ptr() % 16:  # the pair view needs an aligned start; a sliced input may not have one
        x2d = x2d.clone()
    pairs = x2d.view(torch.int64 if x2d.dtype == torch.float32 else torch.int32)  # (M, K / 2)
    scales = scales.reshape(n, k // group_size)
    if scales.dtype != torch.float32 or not scales.is_contiguous():
        scales = scales.float().contiguous()
    args = (
        pairs, packed.reshape(-1), scales, scales if lut is None else lut, out if bias is None else bias, out,
        m, n, k // 2, k // group_size,
    )  # fmt: skip
    meta: dict[str, Any] = {
        "GROUP_SIZE": group_size, "CHUNK": chunk_bytes(group_size), "X_KIND": _X_KIND[x2d.dtype],
        "USE_LUT": lut is not None, "HAS_BIAS": bias is not None, "INTERPRET": interpret,
        "enable_fp_fusion": True,  # the products and sums compile to FMAs (Triton 3.10 turns this off by default)
    }  # fmt: skip
    plain, tuned, _ = _kernels(interpret)
    if config is None and not interpret:
        tuned[lambda meta_: (m * cdiv(n, meta_["BLOCK_N"]),)](*args, **meta)
        return out
    tile = dict(config or DEFAULT_TILE)
    bkb, chunk = tile["BLOCK_KB"], chunk_bytes(group_size)
    if bkb < chunk or bkb & (bkb - 1) or tile["BLOCK_N"] & (tile["BLOCK_N"] - 1):
        raise ValueError(f"config needs powers of two, BLOCK_KB >= {chunk} bytes; got {config}.")
    tile["EVEN_K"] = (k // 2) % bkb == 0
    plain[(m * cdiv(n, tile["BLOCK_N"]),)](*args, **meta, **tile)
    return out


@torch.compiler.disable
def dequantize_packed(
    packed: Tensor, scales: Tensor, lut: Tensor | None, group_size: int, n: int, k: int, dtype: torch.dtype
) -> Tensor:
    """The (N, K) ``dtype`` weight of packed 4-bit codes, in one pass (prefill: dequantize + ``F.linear``).

    Equal, bit for bit, to the torch backend's ``dequantize_weight`` (float32 ``LUT[code] * scale``,
    rounded once to ``dtype``); that path takes a dozen elementwise kernels with int16/int64/float32
    intermediates. Arguments as :func:`lut_gemv`'s.
    """
    if group_size < 2 or group_size & (group_size - 1) or k % group_size or packed.numel() != n * k // 2:
        raise ValueError(
            f"An ({n}, {k}) weight in groups of {group_size} (a power of two dividing K) needs {n * k // 2} "
            f"packed bytes; got {packed.numel()}."
        )
    require_cuda(packed, "dequantize_packed")
    interpret = interpreting()
    # The interpreter rounds float32 to 16 bits by truncation: there, torch rounds the float32 values.
    out = torch.empty(n, k, dtype=torch.float32 if interpret else dtype, device=packed.device)
    nbytes = n * k // 2
    if nbytes == 0:
        return out.to(dtype)
    _, _, dequant = _kernels(interpret)
    scales = scales.reshape(-1)
    if scales.dtype != torch.float32 or not scales.is_contiguous():
        scales = scales.float().contiguous()
    dequant[(cdiv(nbytes, DEQUANT_BLOCK),)](
        packed.reshape(-1), scales, scales if lut is None else lut, out, nbytes,
        GROUP_SIZE=group_size, USE_LUT=lut is not None, BLOCK=DEQUANT_BLOCK,
    )  # fmt: skip
    return out.to(dtype)
