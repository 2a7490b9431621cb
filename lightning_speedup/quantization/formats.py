"""Quantization formats: what a weight (and optionally an activation) format means, and its validation.

Four weight formats, each symmetric (no zero point):

* ``int8``: per-output-channel, scale = absmax / 127, codes in [-127, 127] (the weight half of
  LLM.int8(), Dettmers et al., 2022, and of torchao's int8 weight-only / dynamic schemes).
* ``int4``: group-wise along the input dimension (groups of 32/64/128/256), scale = absmax / 7, codes
  in [-8, 7] (GPTQ/AWQ-style groups; the layout torch's tinygemm int4 kernel runs).
* ``nf4`` / ``fp4``: bitsandbytes' blockwise absmax 4-bit codebooks (QLoRA, Dettmers et al., 2023):
  the weight is flattened, cut into blocks of 64 (by default), each block divided by its absmax and
  rounded to the nearest of 16 code values. The code tables below are bitsandbytes' own, so a
  fake-quantized weight equals bitsandbytes' ``dequantize_4bit(quantize_4bit(w))`` bit for bit.

Activations may be ``None`` (weight-only) or ``"int8"``: dynamic, symmetric, per token (per row of
the last dimension), scale = absmax / 127, recomputed every forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

WeightFormat = Literal["int8", "int4", "nf4", "fp4"]
ScaleMode = Literal["absmax", "lsq"]

WEIGHT_FORMATS: tuple[str, ...] = ("int8", "int4", "nf4", "fp4")
ACTIVATION_FORMATS: tuple[str | None, ...] = (None, "int8")
SCALE_MODES: tuple[str, ...] = ("absmax", "lsq")
BIT_WIDTH_ALIASES: dict[int, str] = {8: "int8", 4: "int4"}
DEFAULT_GROUP_SIZE: dict[str, int | None] = {"int8": None, "int4": 32, "nf4": 64, "fp4": 64}
INT4_GROUP_SIZES: tuple[int, ...] = (32, 64, 128, 256)
# bitsandbytes.functional.quantize_4bit accepts exactly these block sizes.
BLOCKWISE_GROUP_SIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
INT_QMAX: dict[str, int] = {"int8": 127, "int4": 7}
INT_QMIN: dict[str, int] = {"int8": -127, "int4": -8}

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1) normalised to [-1, 1].
_NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip
# bitsandbytes.functional.get_4bit_type("fp4"): e2m1 values in bit-pattern order, divided by 12.
_FP4_VALUES = (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


def codebook(fmt: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 float32 code values of ``nf4`` or ``fp4``, indexed by 4-bit code (bitsandbytes' order)."""
    if fmt == "nf4":
        data = torch.tensor(_NF4_VALUES, dtype=torch.float32, device=device)
    elif fmt == "fp4":
        data = torch.tensor(_FP4_VALUES, dtype=torch.float32, device=device)
    else:
        raise ValueError(f"codebook() is defined for 'nf4' and 'fp4', not {fmt!r}.")
    # Same float32 arithmetic as bitsandbytes (``data.div_(data.abs().max())``), so values match bit for bit.
    return data.div_(data.abs().max())


@dataclass(frozen=True)
class QuantSpec:
    """A validated quantization recipe for one layer: weight format, group size, activations, scale mode.

    Build it with :meth:`QuantSpec.create`, which normalises aliases and rejects bad input early.
    """

    weights: str
    group_size: int | None = None
    activations: str | None = None
    scale: str = "absmax"

    @classmethod
    def create(
        cls,
        weights: str | int,
        activations: str | None = None,
        group_size: int | None = None,
        scale: str = "absmax",
    ) -> QuantSpec:
        """Validate and normalise a recipe.

        Raises:
            ValueError: unknown weight format or bit width; unknown activation format; a group size
                given for ``int8`` (per-channel) or not among the sizes the format supports; unknown
                scale mode.
        """
        fmt = _normalise_weights(weights)
        if activations not in ACTIVATION_FORMATS:
            raise ValueError(
                f"Unknown activation format {activations!r}. Choose None (weight-only) or 'int8' "
                "(dynamic per-token int8)."
            )
        if scale not in SCALE_MODES:
            raise ValueError(
                f"Unknown scale mode {scale!r}. Choose 'absmax' (scales follow the weights' absmax; the "
                "stable default) or 'lsq' (learnable scales, Esser et al. 2020)."
            )
        if group_size is None:
            group_size = DEFAULT_GROUP_SIZE[fmt]
        elif fmt == "int8":
            raise ValueError(
                f"int8 weights are quantized per output channel; group_size must be None, got {group_size}."
            )
        else:
            allowed = INT4_GROUP_SIZES if fmt == "int4" else BLOCKWISE_GROUP_SIZES
            if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in allowed:
                raise ValueError(
                    f"group_size={group_size!r} is not supported for {fmt}; choose one of {allowed}."
                )
        return cls(weights=fmt, group_size=group_size, activations=activations, scale=scale)

    @property
    def is_blockwise(self) -> bool:
        """True for the bitsandbytes codebook formats (flat blocks over the whole tensor)."""
        return self.weights in ("nf4", "fp4")

    @property
    def bits(self) -> int:
        return 8 if self.weights == "int8" else 4

    def describe(self) -> str:
        group = "" if self.group_size is None else f", group {self.group_size}"
        act = ", int8 activations" if self.activations else ""
        return f"{self.weights}{group}{act}"

    def to_dict(self) -> dict[str, str | int | None]:
        return {
            "weights": self.weights,
            "group_size": self.group_size,
            "activations": self.activations,
            "scale": self.scale,
        }


def _normalise_weights(weights: str | int) -> str:
    if isinstance(weights, bool):
        raise ValueError(f"weights must be a format name or a bit width, got {weights!r}.")
    if isinstance(weights, int):
        if weights not in BIT_WIDTH_ALIASES:
            raise ValueError(
                f"Unsupported bit width {weights}. Supported: 8 ('int8') and 4 ('int4'); for 4-bit "
                "codebooks pass 'nf4' or 'fp4'."
            )
        return BIT_WIDTH_ALIASES[weights]
    if not isinstance(weights, str) or weights.lower() not in WEIGHT_FORMATS:
        raise ValueError(
            f"Unknown weight format {weights!r}. Choose one of {WEIGHT_FORMATS} "
            "(or the bit widths 8 and 4, which mean 'int8' and 'int4')."
        )
    return weights.lower()


def reduction_size(weight_shape: torch.Size | tuple[int, ...]) -> int:
    """The number of inputs each output channel reduces over: in_features, or in/groups * kh * kw."""
    size = 1
    for d in weight_shape[1:]:
        size *= int(d)
    return size


def scale_shape(spec: QuantSpec, weight_shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the scale tensor of a weight: (out,) for int8, (out, K/g) for int4, (blocks,) for nf4/fp4."""
    out = int(weight_shape[0])
    if spec.weights == "int8":
        return (out,)
    if spec.weights == "int4":
        return (out, reduction_size(weight_shape) // int(spec.group_size))  # type: ignore[arg-type]
    numel = out * reduction_size(weight_shape)
    return (-(numel // -int(spec.group_size)),)  # type: ignore[arg-type]


def indivisible_reason(spec: QuantSpec, weight_shape: torch.Size | tuple[int, ...]) -> str | None:
    """Why ``spec`` cannot quantize a weight of this shape, or None if it can.

    Only int4 has a constraint: its groups run along the reduction dimension, so the group size must
    divide it. The blockwise codebooks follow bitsandbytes and block the flattened tensor, so any
    shape works.
    """
    if spec.weights == "int4":
        k = reduction_size(weight_shape)
        if k % int(spec.group_size) != 0:  # type: ignore[arg-type]
            return f"group_size {spec.group_size} does not divide the reduction size {k}"
    return None
