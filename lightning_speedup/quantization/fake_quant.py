"""Fake quantization: quantize-then-dequantize in float, with straight-through gradients.

The same two functions, :func:`quantize_weight` (codes and scales) and :func:`dequantize_weight`,
serve training (fake quantization) and deployment (:mod:`.convert` stores the codes and scales and the
real kernels consume them), so a converted model computes with exactly the weights it was trained
with. The ``nf4``/``fp4`` arithmetic mirrors bitsandbytes' reference implementation operation by
operation (``x * (1 / absmax)``, clamp to [-1, 1], ``bucketize`` on the codebook midpoints), which
makes it bit-exact with ``bitsandbytes.functional.quantize_4bit``/``dequantize_4bit``; for fp4 on CUDA
it follows the CUDA kernel's decision tree instead, which breaks ties differently.

Gradients: with the default ``absmax`` scales the whole quantizer is a straight-through estimator
(Bengio et al., 2013): ``d fake_quant(w) / d w = 1``. With learnable scales (LSQ, Esser et al., 2020)
the rounding alone is straight-through, values clipped by the scale get no weight gradient, and the
scale gets LSQ's gradient ``q - w/s`` scaled by ``1 / sqrt(numel_per_scale * qmax)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_speedup.quantization.formats import INT_QMAX, INT_QMIN, QuantSpec, codebook, scale_shape

_TINY = 1e-12  # floor for int scales so an all-zero group divides by a positive number
_BNB_TINY = 1e-38  # bitsandbytes' own floor for a zero absmax

_CODEBOOK_CACHE: dict[tuple[str, str], tuple[Tensor, Tensor, Tensor]] = {}


def _codebook_tables(fmt: str, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(code values, midpoints between sorted codes, sorted-position -> code index) on ``device``."""
    key = (fmt, str(device))
    if key not in _CODEBOOK_CACHE:
        code = codebook(fmt)
        # Stable sort keeps fp4's +0 (code 0) ahead of -0 (code 8), as bitsandbytes' argsort does.
        order = torch.argsort(code, stable=True)
        sorted_code = code[order]
        bounds = (sorted_code[:-1] + sorted_code[1:]) / 2
        _CODEBOOK_CACHE[key] = (code.to(device), bounds.to(device), order.to(device))
    return _CODEBOOK_CACHE[key]


class _StraightThrough(torch.autograd.Function):
    """Returns ``y`` unchanged; the gradient goes to ``x`` as if the op were the identity.

    Unlike ``x + (y - x).detach()`` the forward value is exactly ``y`` (no float round trip), which
    is what keeps fake quantization bit-exact with the real kernels.
    """

    @staticmethod
    def forward(ctx: object, x: Tensor, y: Tensor) -> Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _GradScale(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` (LSQ's scale-gradient normaliser)."""

    @staticmethod
    def forward(ctx: object, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None  # type: ignore[attr-defined]


def straight_through(x: Tensor, y: Tensor) -> Tensor:
    """``y`` in the forward pass, identity gradient to ``x`` in the backward pass."""
    return _StraightThrough.apply(x, y)


# --------------------------------------------------------------------------------------------------
# Scales
# --------------------------------------------------------------------------------------------------


def absmax_scale(weight: Tensor, spec: QuantSpec) -> Tensor:
    """The scale the ``absmax`` mode derives from a weight (float32, shape :func:`scale_shape`).

    For int formats it is ``absmax / qmax``; for nf4/fp4 it is the block absmax itself (the value
    bitsandbytes stores), since their codebooks span [-1, 1].
    """
    w = weight.detach().float()
    out = w.shape[0]
    if spec.weights == "int8":
        return w.reshape(out, -1).abs().amax(dim=1) / INT_QMAX["int8"]
    if spec.weights == "int4":
        g = int(spec.group_size)  # type: ignore[arg-type]
        return w.reshape(out, -1, g).abs().amax(dim=2) / INT_QMAX["int4"]
    return _block_absmax(w.reshape(-1), int(spec.group_size))  # type: ignore[arg-type]


def _block_absmax(flat: Tensor, block: int) -> Tensor:
    n = flat.numel()
    rem = n % block
    full = n - rem
    absmax = flat[:full].reshape(-1, block).abs().amax(dim=1)
    if rem:
        absmax = torch.cat([absmax, flat[full:].abs().amax().reshape(1)])
    return absmax


def _expand_blocks(values: Tensor, block: int, n: int) -> Tensor:
    """Repeat one value per block to one value per element of a flat tensor of ``n`` elements."""
    return values.repeat_interleave(block)[:n] if n % block else values.repeat_interleave(block)


# --------------------------------------------------------------------------------------------------
# Quantize / dequantize (the shared core of fake quantization and the real kernels)
# --------------------------------------------------------------------------------------------------


def quantize_weight(weight: Tensor, spec: QuantSpec, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Quantize a Linear (out, in) or Conv2d (out, in/groups, kh, kw) weight.

    Args:
        weight: the float weight (any float dtype; the arithmetic runs in float32).
        spec: the recipe.
        scale: a fixed scale of shape :func:`scale_shape` (frozen or learned); ``None`` derives the
            absmax scale from ``weight``.

    Returns:
        ``(codes, scale)``: int8 codes of shape (out, K) for int8/int4 (K = in * kh * kw) or uint8
        code indices of shape (numel,) for nf4/fp4; and the float32 scale used.
    """
    w = weight.detach().float()
    s = absmax_scale(w, spec) if scale is None else scale.detach().float()
    expected = scale_shape(spec, w.shape)
    if tuple(s.shape) != expected:
        raise ValueError(
            f"scale has shape {tuple(s.shape)}, but a {spec.weights} weight of shape {tuple(w.shape)} "
            f"needs {expected}."
        )
    out = w.shape[0]
    if spec.weights == "int8":
        q = torch.round(w.reshape(out, -1) / s.clamp_min(_TINY)[:, None])
        return q.clamp_(INT_QMIN["int8"], INT_QMAX["int8"]).to(torch.int8), s
    if spec.weights == "int4":
        g = int(spec.group_size)  # type: ignore[arg-type]
        q = torch.round(w.reshape(out, -1, g) / s.clamp_min(_TINY)[:, :, None])
        return q.clamp_(INT_QMIN["int4"], INT_QMAX["int4"]).to(torch.int8).reshape(out, -1), s
    return _quantize_codebook(w.reshape(-1), s, spec), s


def _quantize_codebook(flat: Tensor, absmax: Tensor, spec: QuantSpec) -> Tensor:
    """bitsandbytes' reference nf4/fp4 quantizer, operation for operation (blocks over a flat tensor)."""
    _, bounds, order = _codebook_tables(spec.weights, flat.device)
    block = int(spec.group_size)  # type: ignore[arg-type]
    inv = 1.0 / absmax.clamp(min=_BNB_TINY)
    if spec.weights == "fp4" and flat.is_cuda:
        return _fp4_cuda_kernel_codes(flat * _expand_blocks(inv, block, flat.numel()))
    scaled = torch.clamp(flat * _expand_blocks(inv, block, flat.numel()), -1, 1)
    idx = torch.bucketize(scaled, bounds, out_int32=True)
    if spec.weights != "nf4":  # nf4's codebook is already sorted; fp4's is in bit-pattern order
        idx = order[idx]
    return idx.to(torch.uint8)


# bitsandbytes' CUDA kernel (dQuantizeFP4 in csrc/kernels.cu) quantizes fp4 by a decision tree on |x| with
# these float32 literals (near, not at, the codebook midpoints: 0.583333f is below 7/12) and strict `>`, so
# a tie goes to the smaller magnitude for either sign. Its CPU path (the reference above) ties towards -inf.
_FP4_CUDA_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
_FP4_CODE_BY_MAGNITUDE = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)  # 0, 1/192, 1/6, ..., 1


def _fp4_cuda_kernel_codes(scaled: Tensor) -> Tensor:
    thresholds = torch.tensor(_FP4_CUDA_THRESHOLDS, dtype=torch.float32, device=scaled.device)
    codes = torch.tensor(_FP4_CODE_BY_MAGNITUDE, dtype=torch.uint8, device=scaled.device)
    magnitude = torch.bucketize(scaled.abs(), thresholds)  # how many thresholds |x| is strictly above
    return codes[magnitude] + (scaled < 0).to(torch.uint8) * 8


def dequantize_weight(
    codes: Tensor, scale: Tensor, spec: QuantSpec, shape: torch.Size | tuple[int, ...], dtype: torch.dtype
) -> Tensor:
    """Invert :func:`quantize_weight`: float32 ``codes * scale`` reshaped to ``shape``, cast to ``dtype``."""
    out = int(shape[0])
    if spec.weights == "int8":
        w = codes.float() * scale.float()[:, None]
    elif spec.weights == "int4":
        g = int(spec.group_size)  # type: ignore[arg-type]
        w = codes.float().reshape(out, -1, g) * scale.float()[:, :, None]
    else:
        code, _, _ = _codebook_tables(spec.weights, codes.device)
        values = code[codes.reshape(-1).long()]
        w = values * _expand_blocks(scale.float(), int(spec.group_size), values.numel())  # type: ignore[arg-type]
    return w.reshape(shape).to(dtype)


def quantize_activation(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric int8 per token: ``(codes int8 (..., K), scale float32 (..., 1))``."""
    xf = x.detach().float()
    s = xf.abs().amax(dim=-1, keepdim=True) / INT_QMAX["int8"]
    q = torch.round(xf / s.clamp_min(_TINY)).clamp_(INT_QMIN["int8"], INT_QMAX["int8"])
    return q.to(torch.int8), s


# --------------------------------------------------------------------------------------------------
# Fake quantization (differentiable)
# --------------------------------------------------------------------------------------------------


def fake_quantize_weight(weight: Tensor, spec: QuantSpec, scale: Tensor | None = None) -> Tensor:
    """Quantize-dequantize ``weight`` with a straight-through gradient; same dtype and shape.

    ``scale=None`` derives absmax scales; a scale that does not require grad (a frozen scale) is used
    as given; a scale that requires grad is learned with LSQ's gradient.
    """
    if scale is not None and scale.requires_grad:
        return _lsq_fake_quantize(weight, spec, scale)
    codes, s = quantize_weight(weight, spec, scale)
    return straight_through(weight, dequantize_weight(codes, s, spec, weight.shape, weight.dtype))


def fake_quantize_activation(x: Tensor) -> Tensor:
    """Dynamic int8 per-token fake quantization of an activation, straight-through gradient."""
    q, s = quantize_activation(x)
    return straight_through(x, (q.float() * s).to(x.dtype))


def _lsq_fake_quantize(weight: Tensor, spec: QuantSpec, scale: Tensor) -> Tensor:
    """LSQ: the forward equals ``dequantize_weight(*quantize_weight(w, spec, scale))`` exactly."""
    w = weight.float()
    out = w.shape[0]
    qmax = INT_QMAX.get(spec.weights, 1)
    per_scale = w.numel() // scale.numel()
    s = _GradScale.apply(scale.float(), 1.0 / math.sqrt(per_scale * qmax))
    if spec.weights in ("int8", "int4"):
        lo, hi = INT_QMIN[spec.weights], INT_QMAX[spec.weights]
        g = w[0].numel() if spec.weights == "int8" else int(spec.group_size)  # type: ignore[arg-type]
        s3 = s.reshape(out, -1, 1)
        x = torch.clamp(w.reshape(out, -1, g) / s3.clamp_min(_TINY), lo, hi)
        xq = straight_through(x, torch.round(x.detach()))
        wq = xq * s3
    else:
        code, bounds, order = _codebook_tables(spec.weights, w.device)
        block = int(spec.group_size)  # type: ignore[arg-type]
        flat = w.reshape(-1)
        s_el = _expand_blocks(s, block, flat.numel())
        inv = 1.0 / s_el.clamp(min=_BNB_TINY)
        x = torch.clamp(flat * inv, -1, 1)
        idx = torch.bucketize(x.detach(), bounds, out_int32=True)
        if spec.weights != "nf4":
            idx = order[idx]
        xq = straight_through(x, code[idx.long()])
        wq = xq * s_el
    return wq.reshape(weight.shape).to(weight.dtype)
