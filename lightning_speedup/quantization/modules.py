"""Real low-bit layers: stored codes + scales, executed by one of four backends.

Every layer is built from the *canonical* form that :func:`.fake_quant.quantize_weight` produces
(int8 codes (out, K) for int8/int4, uint8 code indices (numel,) for nf4/fp4, float32 scales) and can
give it back (:meth:`QuantizedLinear.canonical`), which is what save/load and backend changes use.

Backends (``BACKENDS``):

* ``"torch"``: plain PyTorch on any device. Weight-only formats store packed codes and dequantize
  in ``forward`` with the very function QAT used, so outputs equal the QAT model's. ``int8`` weights
  with ``int8`` activations run ``torch._int_mm`` (int8 x int8 -> int32 on tensor cores; rows padded
  to 17 on CUDA, the kernel's minimum) and rescale by ``activation_scale * weight_scale``. 4-bit
  weights with int8 activations dequantize the weight and fake-quantize the activation (storage is
  real, the activation arithmetic is emulated).
* ``"tinygemm"``: ``torch._weight_int4pack_mm``, PyTorch's CUDA int4 group-wise kernel (from
  tinygemm, as used by gpt-fast and torchao). int4 weight-only, bfloat16 compute; the scales are
  stored in bfloat16, so outputs match the QAT model to bfloat16 precision.
* ``"triton"``: int4/nf4/fp4 weight-only layers in the torch backend's packed storage, run by a Triton
  GEMV for batch-1 decode (:mod:`.triton_gemv`: up to ``GEMV_MAX_ROWS`` rows, one kernel reading the
  packed bytes, float32 scales and accumulation: it multiplies by the exact float32 dequantized
  weight, so outputs match the torch backend's to the weight dtype's precision) and, for more rows
  (prefill), by a one-kernel dequantization (bit-exact with the torch backend's) + ``F.linear``; and
  W8A8 layers (int8 weights, int8 activations) on a Triton int8 GEMM with the rescale in its epilogue
  (:mod:`.triton_int8`). CUDA only; Triton ships with PyTorch's CUDA wheels.
* ``"bnb"``: bitsandbytes ``Linear4bit`` for nf4/fp4 (double quantization off, so the stored
  absmax equals the trained one) and ``Linear8bitLt`` with ``threshold=0`` (pure vector-wise int8,
  LLM.int8() without the fp16 outlier path) for int8 weights with int8 activations.

Conv2d layers are stored weight-only (``QuantizedConv2d``, torch backend): memory shrinks, compute
runs on the dequantized weight.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_speedup.quantization.fake_quant import (
    dequantize_weight,
    fake_quantize_activation,
    quantize_activation,
)
from lightning_speedup.quantization.formats import QuantSpec, codebook, reduction_size
from lightning_speedup.quantization.triton_gemv import (
    GEMV_MAX_ROWS,
    dequantize_packed,
    interpreting,
    lut_gemv,
)
from lightning_speedup.quantization.triton_int8 import w8a8_linear
from lightning_speedup.quantization.triton_ops import dequantize_packed_op, lut_gemv_op, w8a8_linear_op

# --------------------------------------------------------------------------------------------------
# Packing helpers
# --------------------------------------------------------------------------------------------------


def pack_nibbles(values: Tensor) -> Tensor:
    """Pack a flat tensor of 4-bit values (uint8 in [0, 15]) two per byte, first value in the high nibble.

    This is bitsandbytes' layout for ``Params4bit`` data; an odd count is padded with a zero nibble.
    """
    flat = values.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] << 4) | flat[1::2]


def unpack_nibbles(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_nibbles`: the first ``numel`` 4-bit values as uint8."""
    flat = packed.reshape(-1)
    out = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)
    return out[:numel]


def codes_to_storage(codes: Tensor, spec: QuantSpec) -> Tensor:
    """Canonical codes -> the compact tensor stored in files and torch-backend layers."""
    if spec.weights == "int8":
        return codes.to(torch.int8)
    if spec.weights == "int4":
        return pack_nibbles((codes.reshape(-1).to(torch.int16) + 8).to(torch.uint8))
    return pack_nibbles(codes)


def storage_to_codes(stored: Tensor, spec: QuantSpec, weight_shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`codes_to_storage`."""
    out, k = int(weight_shape[0]), reduction_size(weight_shape)
    if spec.weights == "int8":
        return stored.reshape(out, k)
    numel = out * k
    unpacked = unpack_nibbles(stored, numel)
    if spec.weights == "int4":
        return (unpacked.to(torch.int16) - 8).to(torch.int8).reshape(out, k)
    return unpacked


def _tensor_bytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _output_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _FollowsModuleCasts(nn.Module):
    """A quantized layer under ``model.to(dtype)`` / ``.half()`` / ``.bfloat16()``: its compute dtype
    (``weight_dtype``) follows the cast, as a float layer's weight would, while its scales keep the dtype its
    kernel needs (``_scale_buffers``). Without this, the cast turned the float32 scales to bf16 and left the
    dequantized weight float32, so the layer refused the bf16 input. Moves between devices change nothing else."""

    _scale_buffers: ClassVar[tuple[str, ...]] = ("scale",)
    weight_dtype: torch.dtype

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        before = {n: b for n in self._scale_buffers if (b := self._buffers.get(n)) is not None}
        out = super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:  # the old values, where the cast put the new ones
                self._buffers[name] = old.to(new.device, copy=True)
        # What the cast does to a floating tensor of the compute dtype (an empty one: no copy, no device memory).
        probe = fn(torch.empty(0, dtype=self.weight_dtype))
        if isinstance(probe, Tensor) and probe.is_floating_point():
            self.weight_dtype = probe.dtype
        return out


# --------------------------------------------------------------------------------------------------
# Linear layers
# --------------------------------------------------------------------------------------------------


class QuantizedLinear(_FollowsModuleCasts):
    """Base class of the real low-bit Linear layers. ``backend`` names the kernel family."""

    backend: ClassVar[str] = ""
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")

    def __init__(
        self, spec: QuantSpec, in_features: int, out_features: int, weight_dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.spec = spec
        self.in_features = in_features
        self.out_features = out_features
        self.weight_dtype = weight_dtype

    @staticmethod
    def _bias_param(bias: Tensor | None) -> nn.Parameter | None:
        return None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @classmethod
    def unsupported(
        cls, spec: QuantSpec, in_features: int, out_features: int, device_type: str = "cpu"
    ) -> str | None:
        """Why this backend cannot run ``spec`` at this shape, or None."""
        return None

    def canonical(self) -> tuple[Tensor, Tensor]:
        """The canonical (codes, float32 scale) this layer computes with."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes of every tensor the layer keeps (codes, scales, bias, kernel layouts)."""
        return sum(_tensor_bytes(t) for t in self.parameters()) + sum(
            _tensor_bytes(t) for t in self.buffers()
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"quant={self.spec.describe()}, backend={self.backend}"
        )


class TorchQuantizedLinear(QuantizedLinear):
    """Packed codes dequantized in PyTorch (weight-only), or ``torch._int_mm`` for int8 x int8."""

    backend = "torch"

    def __init__(
        self,
        spec: QuantSpec,
        in_features: int,
        out_features: int,
        codes: Tensor,
        scale: Tensor,
        bias: Tensor | None,
        weight_dtype: torch.dtype,
    ) -> None:
        super().__init__(spec, in_features, out_features, weight_dtype)
        self.bias = self._bias_param(bias)
        self.register_buffer("qweight", codes_to_storage(codes, spec).contiguous())
        self.register_buffer("scale", scale.detach().float().contiguous())

    @classmethod
    def unsupported(
        cls, spec: QuantSpec, in_features: int, out_features: int, device_type: str = "cpu"
    ) -> str | None:
        int_mm = spec.weights == "int8" and spec.activations == "int8"
        if int_mm and device_type == "cuda" and (in_features % 8 or out_features % 8):
            return (
                f"torch._int_mm on CUDA needs in_features and out_features divisible by 8 "
                f"(got {in_features}, {out_features})"
            )
        return None

    def canonical(self) -> tuple[Tensor, Tensor]:
        return storage_to_codes(self.qweight, self.spec, self.weight_shape), self.scale

    def dequantized_weight(self) -> Tensor:
        codes = storage_to_codes(self.qweight, self.spec, self.weight_shape)
        return dequantize_weight(codes, self.scale, self.spec, self.weight_shape, self.weight_dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.spec.activations == "int8":
            if self.spec.weights == "int8":
                return int8_linear(x, self.qweight, self.scale, self.bias)
            x = fake_quantize_activation(x)
        return F.linear(x, self.dequantized_weight(), self.bias)


def int8_linear(x: Tensor, qweight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ W.T`` with dynamic per-token int8 ``x``, int8 ``W`` (out, in) and int32 accumulation."""
    xq, xs = quantize_activation(x)  # (..., K) int8, (..., 1) float32
    k = x.shape[-1]
    x2 = xq.reshape(-1, k)
    m = x2.shape[0]
    if x2.is_cuda and m <= 16:  # cuBLASLt's int8 GEMM needs more than 16 rows
        x2 = torch.cat([x2, x2.new_zeros(17 - m, k)])
    acc = torch._int_mm(x2, qweight.t())[:m]  # (M, N) int32; qweight.t() is column-major, the fast layout
    out = acc.float() * (xs.reshape(-1, 1) * weight_scale.float()[None, :])
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*x.shape[:-1], qweight.shape[0]).to(_output_dtype(x))


class TinyGemmLinear(QuantizedLinear):
    """int4 group-wise weights in tinygemm's tiled layout, run by ``torch._weight_int4pack_mm`` (CUDA)."""

    backend = "tinygemm"
    devices = ("cuda",)
    _scale_buffers = ("scales_and_zeros",)  # bf16: the kernel's layout

    def __init__(
        self,
        spec: QuantSpec,
        in_features: int,
        out_features: int,
        codes: Tensor,
        scale: Tensor,
        bias: Tensor | None,
        weight_dtype: torch.dtype,
    ) -> None:
        super().__init__(spec, in_features, out_features, weight_dtype)
        self.bias = self._bias_param(bias)
        k = in_features
        self.inner_k_tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
        unsigned = (codes.to(torch.int16) + 8).to(torch.uint8)  # tinygemm dequantizes (q - 8) * scale + zero
        packed = (unsigned[:, 0::2] << 4) | unsigned[:, 1::2]
        self.register_buffer(
            "packed", torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), self.inner_k_tiles)
        )
        scales = scale.detach().to(torch.bfloat16)  # (N, K/g)
        sz = torch.stack([scales, torch.zeros_like(scales)], dim=-1)  # (N, K/g, 2)
        self.register_buffer("scales_and_zeros", sz.transpose(0, 1).contiguous())  # (K/g, N, 2)

    @classmethod
    def unsupported(
        cls, spec: QuantSpec, in_features: int, out_features: int, device_type: str = "cpu"
    ) -> str | None:
        if spec.weights != "int4" or spec.activations is not None:
            return "tinygemm runs int4 weight-only layers only"
        if out_features % 8 or in_features % 32:
            return f"tinygemm needs out_features % 8 == 0 and in_features % 32 == 0 (got {out_features}, {in_features})"
        return None

    def canonical(self) -> tuple[Tensor, Tensor]:
        # The tiled layout has no public unpack; multiplying by the identity dequantizes it exactly enough
        # to recover every code (|q| <= 8, so the bf16 product is off by far less than half a step).
        g = int(self.spec.group_size)  # type: ignore[arg-type]
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.packed.device)
        dense = torch.ops.aten._weight_int4pack_mm(eye, self.packed, g, self.scales_and_zeros).t().float()
        scale = self.scales_and_zeros[..., 0].t().float()  # (N, K/g)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = torch.round(dense.reshape(self.out_features, -1, g) / safe[..., None]).clamp_(-8, 7)
        return codes.to(torch.int8).reshape(self.out_features, self.in_features), scale.contiguous()

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        g = int(self.spec.group_size)  # type: ignore[arg-type]
        out = torch.ops.aten._weight_int4pack_mm(x2, self.packed, g, self.scales_and_zeros)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features).to(_output_dtype(x))


class TritonLinear(TorchQuantizedLinear):
    """4-bit weight-only layers (int4, nf4, fp4) and W8A8 layers on Triton kernels (CUDA).

    The storage is the torch backend's (``qweight``: two codes per byte; ``scale``: float32), so
    :meth:`canonical` and files are the same. Inputs of up to ``GEMV_MAX_ROWS`` rows (batch-1 decode)
    run :func:`.triton_gemv.lut_gemv`, which decodes ``LUT[nibble] * scale[n, k // G]`` on the fly;
    larger inputs (prefill), and inputs that need a gradient, dequantize the weight in one Triton kernel
    (:func:`.triton_gemv.dequantize_packed`, bit-exact with the torch backend's dequantization) and run
    ``F.linear``. The GEMV multiplies by the float32 dequantized weight where the torch backend first
    rounds it to the weight dtype, so the two agree to that dtype's precision, not bit for bit.

    W8A8 (int8 weights, int8 dynamic per-token activations): one kernel quantizes the activations
    (:func:`.triton_int8.quantize_rows`, the torch backend's codes bit for bit), then
    :func:`.triton_int8.int8_gemm_scaled` multiplies the codes on int8 tensor cores
    and rescales each output tile in its epilogue (no int32 tensor in memory); the result equals the
    torch backend's ``torch._int_mm`` path bit for bit.

    Under ``torch.compile`` the kernels are called as the custom ops of :mod:`.triton_ops`, so a model
    of these layers compiles into one graph (eager calls go to the functions directly).
    """

    backend = "triton"
    devices = ("cuda",)

    def __init__(
        self,
        spec: QuantSpec,
        in_features: int,
        out_features: int,
        codes: Tensor,
        scale: Tensor,
        bias: Tensor | None,
        weight_dtype: torch.dtype,
    ) -> None:
        super().__init__(spec, in_features, out_features, codes, scale, bias, weight_dtype)
        # The 16 code values of nf4/fp4 (int4 decodes nibble - 8 itself), rebuilt from the spec and never
        # saved; kept as int32 bits so that model.to(dtype) moves them but cannot round them.
        lut = codebook(spec.weights, codes.device).view(torch.int32) if spec.is_blockwise else None
        self.register_buffer("lut_bits", lut, persistent=False)

    @classmethod
    def unsupported(
        cls, spec: QuantSpec, in_features: int, out_features: int, device_type: str = "cpu"
    ) -> str | None:
        if spec.weights == "int8" and spec.activations == "int8":
            return None  # any shape: the GEMM masks its edges
        if spec.bits != 4 or spec.activations is not None:
            return (
                f"the Triton kernels run 4-bit weight-only layers (int4, nf4, fp4) and int8 weights with int8 "
                f"activations, not {spec.describe()}"
            )
        g = int(spec.group_size)  # type: ignore[arg-type]
        if g < 16 or g & (g - 1):
            return f"the Triton GEMV needs a group size that is a power of two >= 16 (got {g})"
        if in_features % g:
            unit = "block size" if spec.is_blockwise else "group size"
            return (
                f"the Triton GEMV needs in_features divisible by the {unit} {g}, so that every scale "
                f"covers part of one row (got in_features={in_features})"
            )
        return None

    @staticmethod
    def _check_device(x: Tensor) -> None:
        if not x.is_cuda and not interpreting():
            raise RuntimeError(
                f"TritonLinear runs on CUDA, but its input is on {x.device}. Move the model to a GPU, or "
                "convert/load it with backend='torch' to run on the CPU."
            )

    def _lut_and_group(self) -> tuple[Tensor | None, int]:
        """The 4-bit kernels' codebook (None for int4) and group size."""
        lut = None if self.lut_bits is None else self.lut_bits.view(torch.float32)
        return lut, int(self.spec.group_size)  # type: ignore[arg-type]

    def dequantized_weight(self) -> Tensor:
        if self.spec.bits != 4 or (not self.qweight.is_cuda and not interpreting()):
            return super().dequantized_weight()
        lut, g = self._lut_and_group()
        args = (self.qweight, self.scale, lut, g, self.out_features, self.in_features, self.weight_dtype)
        if torch.compiler.is_compiling():  # an opaque op in the graph instead of a graph break
            return dequantize_packed_op(*args)
        return dequantize_packed(*args)

    def forward(self, x: Tensor) -> Tensor:
        dtype = _output_dtype(x)
        rows = x.numel() // self.in_features
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        if self.spec.activations == "int8" and not needs_grad:
            self._check_device(x)
            x2 = x.reshape(-1, self.in_features)
            if torch.compiler.is_compiling():
                out = w8a8_linear_op(x2, self.qweight, self.scale, self.bias, dtype)
            else:
                out = w8a8_linear(x2, self.qweight, self.scale, self.bias, dtype)
            return out.reshape(*x.shape[:-1], self.out_features)
        if (
            self.spec.activations == "int8"
            or rows > GEMV_MAX_ROWS
            or needs_grad
            or dtype not in (torch.bfloat16, torch.float16, torch.float32)
        ):
            return super().forward(x)
        self._check_device(x)
        lut, g = self._lut_and_group()
        x2 = x.reshape(-1, self.in_features).to(dtype)
        if torch.compiler.is_compiling():
            out = lut_gemv_op(
                x2, self.qweight, self.scale, lut, g, self.out_features, self.in_features, self.bias, dtype
            )
        else:
            out = lut_gemv(
                x2, self.qweight, self.scale, lut, g, self.out_features, self.in_features, bias=self.bias,
                out_dtype=dtype,
            )  # fmt: skip
        return out.reshape(*x.shape[:-1], self.out_features)


def import_bitsandbytes() -> Any:
    """Import bitsandbytes on first use, with an install hint if it is missing."""
    try:
        import bitsandbytes
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "backend='bnb' needs bitsandbytes: pip install 'lightning-speedup[quant]' (or pip install "
            "bitsandbytes), or choose backend='torch'."
        ) from err
    return bitsandbytes


class BnbLinear(QuantizedLinear):
    """A bitsandbytes ``Linear4bit`` (nf4/fp4) or ``Linear8bitLt`` (int8 x int8) built from our codes."""

    backend = "bnb"

    def __init__(
        self,
        spec: QuantSpec,
        in_features: int,
        out_features: int,
        codes: Tensor,
        scale: Tensor,
        bias: Tensor | None,
        weight_dtype: torch.dtype,
    ) -> None:
        super().__init__(spec, in_features, out_features, weight_dtype)
        bnb = import_bitsandbytes()
        device = codes.device
        has_bias = bias is not None
        if spec.is_blockwise:
            from bitsandbytes.functional import QuantState

            inner = bnb.nn.Linear4bit(
                in_features, out_features, bias=has_bias, compress_statistics=False,
                quant_type=spec.weights, device="meta",
            )  # fmt: skip
            state = QuantState(
                absmax=scale.detach().float().contiguous(),
                shape=torch.Size([out_features, in_features]),
                dtype=weight_dtype,
                blocksize=int(spec.group_size),  # type: ignore[arg-type]
                code=codebook(spec.weights, device),
                quant_type=spec.weights,
            )
            inner.weight = bnb.nn.Params4bit(
                pack_nibbles(codes).reshape(-1, 1), requires_grad=False, quant_state=state,
                blocksize=int(spec.group_size), compress_statistics=False, quant_type=spec.weights,  # type: ignore[arg-type]
                quant_storage=torch.uint8, module=inner, bnb_quantized=True,
            )  # fmt: skip
            inner.quant_state = state
        else:
            inner = bnb.nn.Linear8bitLt(
                in_features, out_features, bias=has_bias, has_fp16_weights=False, threshold=0.0, device="meta"
            )
            cb = codes.to(torch.int8).contiguous()
            # Linear8bitLt stores the row absmax (SCB) and rescales by SCB / 127.
            inner.weight = bnb.nn.Int8Params(
                cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scale.detach().float() * 127.0
            )
            # Our own float32 scale, kept so canonical() returns it bit for bit (SCB / 127 may not).
            self.register_buffer("scale", scale.detach().float().contiguous())
        if has_bias:
            inner.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)  # type: ignore[union-attr]
        self.inner = inner

    @classmethod
    def unsupported(
        cls, spec: QuantSpec, in_features: int, out_features: int, device_type: str = "cpu"
    ) -> str | None:
        if spec.is_blockwise and spec.activations is None:
            return None
        if spec.weights == "int8" and spec.activations == "int8":
            return None
        return (
            "bitsandbytes runs nf4/fp4 weight-only (Linear4bit) and int8 weights with int8 activations "
            f"(Linear8bitLt), not {spec.describe()}"
        )

    @property
    def bias(self) -> Tensor | None:
        """The bias, kept inside the bitsandbytes layer."""
        return self.inner.bias

    def canonical(self) -> tuple[Tensor, Tensor]:
        if self.spec.is_blockwise:
            state = self.inner.state_dict()  # also undoes bitsandbytes' CPU inference repacking
            numel = self.in_features * self.out_features
            return unpack_nibbles(state["weight"], numel), state["weight.absmax"].float()
        cb = self.inner.weight.CB if self.inner.weight.CB is not None else self.inner.state.CB
        return cb.reshape(self.out_features, self.in_features), self.scale

    def nbytes(self) -> int:
        total = _tensor_bytes(self.inner.weight.data) + _tensor_bytes(self.inner.bias)
        if self.spec.is_blockwise:
            return total + _tensor_bytes(self.inner.weight.quant_state.absmax)
        return total + _tensor_bytes(self.scale)

    def forward(self, x: Tensor) -> Tensor:
        if self.spec.is_blockwise:
            return self.inner(x)
        # Linear8bitLt quantizes float16 activations (it casts, with a log line per call); cast here instead.
        return self.inner(x.to(torch.float16)).to(_output_dtype(x))


BACKENDS: dict[str, type[QuantizedLinear]] = {
    "torch": TorchQuantizedLinear,
    "tinygemm": TinyGemmLinear,
    "triton": TritonLinear,
    "bnb": BnbLinear,
}


# --------------------------------------------------------------------------------------------------
# Conv2d
# --------------------------------------------------------------------------------------------------


class QuantizedConv2d(_FollowsModuleCasts):
    """Weight-only low-bit storage for ``nn.Conv2d``; ``forward`` dequantizes and runs ``F.conv2d``."""

    backend: ClassVar[str] = "torch"

    def __init__(
        self,
        spec: QuantSpec,
        conv: nn.Conv2d,
        codes: Tensor,
        scale: Tensor,
        weight_dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.weight_shape = tuple(conv.weight.shape)
        self.weight_dtype = weight_dtype
        self.conv_args = {
            "stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups,
            "padding_mode": conv.padding_mode,
        }  # fmt: skip
        self._reversed_padding = conv._reversed_padding_repeated_twice
        self.register_buffer("qweight", codes_to_storage(codes, spec).contiguous())
        self.register_buffer("scale", scale.detach().float().contiguous())
        self.bias = (
            None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        )

    def canonical(self) -> tuple[Tensor, Tensor]:
        return storage_to_codes(self.qweight, self.spec, self.weight_shape), self.scale

    def dequantized_weight(self) -> Tensor:
        codes = storage_to_codes(self.qweight, self.spec, self.weight_shape)
        return dequantize_weight(codes, self.scale, self.spec, self.weight_shape, self.weight_dtype)

    def nbytes(self) -> int:
        return sum(_tensor_bytes(t) for t in self.parameters()) + sum(
            _tensor_bytes(t) for t in self.buffers()
        )

    def forward(self, x: Tensor) -> Tensor:
        w = self.dequantized_weight()
        a = self.conv_args
        if a["padding_mode"] != "zeros":
            x = F.pad(x, self._reversed_padding, mode=a["padding_mode"])
            return F.conv2d(x, w, self.bias, a["stride"], 0, a["dilation"], a["groups"])
        return F.conv2d(x, w, self.bias, a["stride"], a["padding"], a["dilation"], a["groups"])

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight_shape}, quant={self.spec.describe()}, backend=torch (weight-only storage)"
        )


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers of ``model`` (shared tensors counted once), quantized or not.

    Quantized layers report their own storage (:meth:`QuantizedLinear.nbytes`), which includes
    bitsandbytes' quantization state that is not a parameter or buffer.
    """
    seen: set[int] = set()
    quantized: list[str] = []
    total = 0
    for name, module in model.named_modules():
        if any(name.startswith(q + ".") for q in quantized):
            continue
        if isinstance(module, (QuantizedLinear, QuantizedConv2d)):
            quantized.append(name)
            total += module.nbytes()
            continue
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if id(t) not in seen:
                seen.add(id(t))
                total += _tensor_bytes(t)
    return total
