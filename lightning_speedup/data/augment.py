"""Batched image augmentation on the device, with every random parameter drawn per sample (``ls.augment``).

torchvision's v2 transforms applied to a batched tensor draw *one* set of random parameters for the
whole batch (every image gets the same crop and the same flip); per-sample randomness then needs a
Python loop over images, which is what CPU ``Dataset`` pipelines do one image at a time. The ops here
draw a vector of parameters (one per sample) and apply them with a few batched kernels (gather,
``where``, masked fill), so a batch of any size costs a handful of launches on the GPU. The idea of
batched per-sample GPU augmentation follows Keller Jordan's airbench (``batch_crop``/``batch_flip_lr``)
and NVIDIA DALI; Cutout is DeVries & Taylor (2017), MixUp is Zhang et al. (ICLR 2018) and CutMix is
Yun et al. (ICCV 2019), here with one mixing weight per sample.

Every op is a plain callable on a ``(B, C, H, W)`` tensor and takes an optional ``torch.Generator``
(on the images' device) so a run is reproducible given the seed. Image ops (:class:`ImageOp`) map
images to images; mixing ops (:class:`MixOp`) map ``(images, labels)`` to ``(images, soft_labels)``.
:class:`Compose` chains both kinds. Plain torch only: no Lightning import. ``lightning_speedup.augment``
(``ls.augment``) is this module under a second name, registered by the package's ``__init__``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_speedup._validation import check_float, check_int

__all__ = [
    "CenterCrop",
    "ChannelsLast",
    "Compose",
    "CutMix",
    "Cutout",
    "ImageOp",
    "MixOp",
    "MixUp",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "ToDtype",
    "batch_seed",
    "sample_beta",
]

PaddingMode = Literal["constant", "reflect", "replicate"]
_PADDING_MODES = ("constant", "reflect", "replicate")


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def batch_seed(seed: int, rank: int, step: int) -> int:
    """A well-mixed 63-bit seed for batch ``step`` on ``rank`` (SplitMix64 of the three numbers)."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ rank) ^ step) >> 1


# ----------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------


def check_images(images: object, op: str) -> Tensor:
    """Return ``images`` if it is a ``(B, C, H, W)`` tensor; otherwise raise an error that says how to fix it."""
    if not isinstance(images, Tensor):
        raise TypeError(
            f"{op} expects a tensor of images of shape (B, C, H, W); got {type(images).__name__}."
        )
    if images.dim() != 4:
        shape = tuple(images.shape)
        hint = ""
        if images.dim() == 3:
            hint = " For one image use x.unsqueeze(0); for a (B, H, W) grayscale batch use x.unsqueeze(1)."
        elif images.dim() == 2:
            hint = " For one grayscale image use x[None, None]."
        raise ValueError(
            f"{op} expects a batch of images of shape (B, C, H, W) (4 dims); got shape {shape} "
            f"({images.dim()} dims).{hint}"
        )
    return images


def _check_generator(generator: torch.Generator | None, device: torch.device, op: str) -> None:
    if generator is not None and torch.device(generator.device).type != device.type:
        raise ValueError(
            f"{op} got a generator on {generator.device} but the images are on {device}; "
            f"create it with torch.Generator(device={str(device)!r})."
        )


def _check_float(images: Tensor, op: str) -> None:
    if not images.is_floating_point():
        raise TypeError(
            f"{op} blends pixel values and needs floating-point images; got {images.dtype} of shape "
            f"{tuple(images.shape)}. Put ToDtype() or Normalize(...) before {op}."
        )


def _check_fill_type(fill: object, op: str) -> float:
    if isinstance(fill, bool) or not isinstance(fill, (int, float)):
        raise ValueError(f"{op}: fill must be a number (the value of the filled pixels); got {fill!r}.")
    return fill


def _check_fill(fill: float, dtype: torch.dtype, op: str) -> None:
    """Raise if integer images of ``dtype`` cannot hold ``fill`` exactly (masked_fill would wrap or truncate it)."""
    if dtype.is_floating_point or dtype.is_complex:
        return
    info = (0, 1) if dtype == torch.bool else (torch.iinfo(dtype).min, torch.iinfo(dtype).max)
    if not (math.isfinite(fill) and float(fill).is_integer() and info[0] <= fill <= info[1]):
        raise ValueError(
            f"{op}: fill={fill!r} is not a value of the images' dtype {dtype}, whose values are the integers in "
            f"[{info[0]}, {info[1]}]; pass an integer fill in that range (e.g. 0 or {info[1]}), or convert the "
            f"images to float before {op} (ToDtype or Normalize)."
        )


def _pair(size: int | Sequence[int], op: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        return check_int("size", size, 1, prefix=f"{op}: "), size
    if isinstance(size, Sequence) and len(size) == 2:
        h, w = size
        return check_int("size[0]", h, 1, prefix=f"{op}: "), check_int("size[1]", w, 1, prefix=f"{op}: ")
    raise ValueError(f"{op}: size must be an int or a (height, width) pair; got {size!r}.")


# ----------------------------------------------------------------------------------------------------
# base classes
# ----------------------------------------------------------------------------------------------------


class ImageOp:
    """A batched op on images ``(B, C, H, W) -> (B', C', H', W')``.

    ``random`` says whether the op draws random parameters. :meth:`eval_op` is the op's evaluation
    form, which :class:`~lightning_speedup.data.gpu_augment.GPUAugment` applies to evaluation batches
    so that validation sees the same input distribution (and shape) as training: a deterministic op
    (dtype, normalisation, memory format) is its own evaluation form, a random op has none unless it
    changes the image size (:class:`RandomCrop` becomes a centre crop to the same size).
    """

    random: ClassVar[bool] = True

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def eval_op(self) -> ImageOp | None:
        """The op applied to evaluation batches in this op's place, or None to skip it there."""
        return None if self.random else self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class MixOp(ImageOp):
    """A batched op that mixes samples and their labels: ``(images, labels) -> (images, soft_labels)``.

    Labels are hard class indices ``(B,)`` (then ``num_classes`` is required) or soft labels
    ``(B, num_classes)``; the result is always soft labels ``(B, num_classes)`` in float32 whose rows
    sum to 1, which ``F.cross_entropy`` accepts as targets.
    """

    def __init__(self, alpha: float, num_classes: int | None) -> None:
        name = type(self).__name__
        # Finite only: Beta(inf, inf) is no distribution (MixUp got NaN weights, CutMix did nothing).
        check_float(
            "alpha", alpha, 0.0, prefix=f"{name}: ", hint="It is the a of Beta(a, a) mixing, e.g. 0.2."
        )
        if num_classes is not None:
            check_int("num_classes", num_classes, 1, prefix=f"{name}: ")
        self.alpha = float(alpha)
        self.num_classes = num_classes

    def __call__(  # type: ignore[override]
        self, images: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def soft_labels(self, labels: Tensor, batch: int) -> Tensor:
        """Hard ``(B,)`` or soft ``(B, K)`` labels as float32 soft labels ``(B, K)``."""
        name = type(self).__name__
        if not isinstance(labels, Tensor):
            raise TypeError(f"{name} needs the labels as a tensor; got {type(labels).__name__}.")
        if labels.dim() == 1 and not labels.is_floating_point():
            if self.num_classes is None:
                raise ValueError(
                    f"{name} got hard labels of shape {tuple(labels.shape)} but num_classes is None; "
                    f"pass {name}(alpha, num_classes=K) or soft labels of shape (B, K)."
                )
            if labels.shape[0] != batch:
                raise ValueError(f"{name}: {labels.shape[0]} labels for a batch of {batch} images.")
            return F.one_hot(labels.long(), self.num_classes).float()
        if labels.dim() == 2 and labels.is_floating_point():
            if labels.shape[0] != batch or (
                self.num_classes is not None and labels.shape[1] != self.num_classes
            ):
                k = self.num_classes if self.num_classes is not None else "K"
                raise ValueError(
                    f"{name} expects soft labels of shape ({batch}, {k}); got {tuple(labels.shape)}."
                )
            return labels.float()
        raise ValueError(
            f"{name} expects hard labels (B,) of an integer dtype or soft labels (B, K) of a float dtype; "
            f"got shape {tuple(labels.shape)} and dtype {labels.dtype}."
        )


# ----------------------------------------------------------------------------------------------------
# random crop
# ----------------------------------------------------------------------------------------------------


def _reflect(index: Tensor, n: int) -> Tensor:
    # Mirror without repeating the edge pixel (numpy/torch "reflect"), valid while padding < n.
    index = index.abs()
    return torch.where(index >= n, 2 * (n - 1) - index, index)


_OFFSETS: dict[tuple[int, int, torch.device], Tensor] = {}


def _offsets(n: int, padding: int, device: torch.device) -> Tensor:
    """``arange(n) - padding`` on ``device``, made once: two fewer allocations and launches per crop."""
    key = (n, padding, device)
    out = _OFFSETS.get(key)
    if out is None:
        out = _OFFSETS[key] = torch.arange(n, device=device) - padding
    return out


def crop_batch(
    images: Tensor,
    top: Tensor,
    left: Tensor,
    size: tuple[int, int],
    padding: int = 0,
    padding_mode: PaddingMode = "constant",
    fill: float = 0.0,
) -> Tensor:
    """Crop every image at its own offset, as if it were first padded by ``padding`` on each side.

    ``top``/``left`` are (B,) offsets into the padded image, in ``[0, H + 2*padding - size[0]]`` and
    ``[0, W + 2*padding - size[1]]``. The padded image is never materialised: source indices are
    computed per output pixel and out-of-image pixels take ``fill`` (constant), the mirrored pixel
    (reflect) or the nearest edge pixel (replicate). One ``gather`` for the whole batch.
    """
    images = check_images(images, "crop_batch")
    B, C, H, W = images.shape
    h, w = size
    rows = top.view(B, 1) + _offsets(h, padding, images.device)  # (B, h) source rows
    cols = left.view(B, 1) + _offsets(w, padding, images.device)  # (B, w) source cols
    valid: Tensor | None = None
    if padding_mode == "constant":
        _check_fill(fill, images.dtype, "crop_batch")
        valid = ((rows >= 0) & (rows < H)).view(B, h, 1) & ((cols >= 0) & (cols < W)).view(B, 1, w)
        rows, cols = rows.clamp(0, H - 1), cols.clamp(0, W - 1)
    elif padding_mode == "reflect":
        rows, cols = _reflect(rows, H), _reflect(cols, W)
    else:
        rows, cols = rows.clamp(0, H - 1), cols.clamp(0, W - 1)
    index = (rows.view(B, h, 1) * W + cols.view(B, 1, w)).view(B, 1, h * w).expand(B, C, h * w)
    out = images.reshape(B, C, H * W).gather(2, index).view(B, C, h, w)
    if valid is not None:
        out = out.masked_fill(~valid.view(B, 1, h, w), fill)
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


class _Crop(ImageOp):
    """The arguments and checks :class:`RandomCrop` and :class:`CenterCrop` share: a crop of ``size`` from the
    image padded by ``padding`` on each side."""

    def __init__(
        self,
        size: int | Sequence[int],
        padding: int = 0,
        padding_mode: PaddingMode = "constant",
        fill: float = 0.0,
    ) -> None:
        name = type(self).__name__
        self.size = _pair(size, name)
        self.padding = check_int("padding", padding, 0, prefix=f"{name}: ")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"{name}: padding_mode must be one of {_PADDING_MODES}; got {padding_mode!r}.")
        self.padding_mode: PaddingMode = padding_mode
        self.fill = _check_fill_type(fill, name)

    def _checked(self, images: Tensor) -> Tensor:
        """``images`` as a (B, C, H, W) batch this crop fits."""
        name = type(self).__name__
        images = check_images(images, name)
        _, _, H, W = images.shape
        p, (h, w) = self.padding, self.size
        if h > H + 2 * p or w > W + 2 * p:
            raise ValueError(
                f"{name}: the crop {h}x{w} is larger than the padded image {H + 2 * p}x{W + 2 * p} "
                f"(images of shape {tuple(images.shape)} plus padding {p} on each side); use a size of at most "
                f"{H + 2 * p}x{W + 2 * p} or more padding."
            )
        if self.padding_mode == "reflect" and (p >= H or p >= W):
            raise ValueError(
                f"{name}: reflect padding {p} needs images larger than {p}x{p}; got shape {tuple(images.shape)}."
            )
        return images

    def _crop(self, images: Tensor, top: Tensor, left: Tensor) -> Tensor:
        if self.padding_mode == "constant":
            _check_fill(self.fill, images.dtype, type(self).__name__)
        return crop_batch(images, top, left, self.size, self.padding, self.padding_mode, self.fill)


class RandomCrop(_Crop):
    """Pad by ``padding`` and crop ``size`` at a uniformly random offset drawn for each sample.

    ``RandomCrop(28, padding=2)`` on 28x28 images is the classic "translate by up to 2 pixels"
    augmentation: each image gets its own offset in ``{0..4} x {0..4}``.

    Raises:
        ValueError: ``size`` or ``padding`` is not a positive int (padding may be 0); an unknown
            ``padding_mode``; a ``fill`` that is not a number; at call time, a crop larger than the
            padded image, reflect padding as large as the image, or a ``fill`` that integer images
            cannot hold (not an integer in their dtype's range, e.g. -1 or 0.5 for uint8).
    """

    def sample(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample (top, left) offsets into the padded image, each (B,) int64."""
        images = self._checked(images)
        _check_generator(generator, images.device, "RandomCrop")
        B, _, H, W = images.shape
        p, (h, w) = self.padding, self.size
        top = torch.randint(0, H + 2 * p - h + 1, (B,), device=images.device, generator=generator)
        left = torch.randint(0, W + 2 * p - w + 1, (B,), device=images.device, generator=generator)
        return top, left

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        top, left = self.sample(images, generator)
        return self._crop(images, top, left)

    def eval_op(self) -> ImageOp:
        """A :class:`CenterCrop` to the same size (torchvision's RandomCrop/CenterCrop convention), so that
        evaluation batches have the training batches' shape; the identity when the crop keeps the size."""
        return CenterCrop(self.size, self.padding, self.padding_mode, self.fill)


class CenterCrop(_Crop):
    """Crop ``size`` at the centre of every image, as if it were first padded by ``padding`` on each side.

    The evaluation form of :class:`RandomCrop` (same arguments): the crop starts ``(H - h) // 2`` rows
    and ``(W - w) // 2`` columns into the image (negative: into the padding), so a crop that keeps the
    image size returns the batch unchanged (the same tensor) and ``RandomCrop(24)``'s 24x24 training crops
    of 28x28 images are matched by the central 24x24 at evaluation.

    Raises:
        ValueError: as :class:`RandomCrop`: bad ``size``/``padding``/``padding_mode``/``fill`` here, and at
            call time a crop larger than the padded image or a ``fill`` the integer images cannot hold.
    """

    random: ClassVar[bool] = False

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        images = self._checked(images)
        B, _, H, W = images.shape
        p, (h, w) = self.padding, self.size
        if (h, w) == (H, W):
            return images
        # Offsets into the padded image, as crop_batch takes them.
        top = torch.full((B,), p + (H - h) // 2, dtype=torch.long, device=images.device)
        left = torch.full((B,), p + (W - w) // 2, dtype=torch.long, device=images.device)
        return self._crop(images, top, left)


# ----------------------------------------------------------------------------------------------------
# flip and cutout
# ----------------------------------------------------------------------------------------------------


class RandomHorizontalFlip(ImageOp):
    """Mirror each image left-right with probability ``p``, drawn independently per sample."""

    def __init__(self, p: float = 0.5) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be a probability in [0, 1]; got {p!r}.")
        self.p = float(p)

    def sample(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample flip decisions, (B,) bool."""
        images = check_images(images, "RandomHorizontalFlip")
        _check_generator(generator, images.device, "RandomHorizontalFlip")
        return torch.rand(images.shape[0], device=images.device, generator=generator) < self.p

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        flip = self.sample(images, generator)
        return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def box_mask(
    center_y: Tensor, center_x: Tensor, box_h: Tensor | int, box_w: Tensor | int, height: int, width: int
) -> Tensor:
    """Per-sample boolean masks ``(B, 1, H, W)`` of boxes centred at (center_y, center_x), clipped to the image.

    The box covers rows ``[cy - h // 2, cy - h // 2 + h)`` and the same for columns, so an even box
    is centred on the lower-right of its four central pixels, as in the Cutout reference code.
    """
    B = center_y.shape[0]
    device = center_y.device
    y0 = center_y - torch.as_tensor(box_h, device=device) // 2
    x0 = center_x - torch.as_tensor(box_w, device=device) // 2
    rows = torch.arange(height, device=device).view(1, height)
    cols = torch.arange(width, device=device).view(1, width)
    in_rows = (rows >= y0.view(B, 1)) & (rows < (y0 + box_h).view(B, 1))  # (B, H)
    in_cols = (cols >= x0.view(B, 1)) & (cols < (x0 + box_w).view(B, 1))  # (B, W)
    return (in_rows.view(B, height, 1) & in_cols.view(B, 1, width)).view(B, 1, height, width)


class Cutout(ImageOp):
    """Fill a ``size`` x ``size`` square at a random centre (per sample) with ``fill``; DeVries & Taylor (2017).

    As in the paper, the centre is uniform over the whole image and the square is clipped at the
    borders, so squares near an edge cover less area. The image size and dtype are known only at the
    first call, which raises ``ValueError`` if ``size`` exceeds the image's shorter side (a square that
    large blanks most or all of every image) or if integer images cannot hold ``fill`` (e.g. -1 or 0.5
    for uint8). The output keeps the input's memory format (channels-last stays channels-last).
    """

    def __init__(self, size: int, fill: float = 0.0) -> None:
        self.size = check_int("size", size, 1, prefix="Cutout: ")
        self.fill = _check_fill_type(fill, "Cutout")

    def sample(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample square centres (cy, cx), each (B,) int64."""
        images = check_images(images, "Cutout")
        _check_generator(generator, images.device, "Cutout")
        B, _, H, W = images.shape
        if self.size > min(H, W):
            raise ValueError(
                f"Cutout(size={self.size}) is larger than the {H}x{W} images it got, so it would blank most or all "
                f"of every image; pick size <= {min(H, W)} (DeVries & Taylor use about half the side)."
            )
        cy = torch.randint(0, H, (B,), device=images.device, generator=generator)
        cx = torch.randint(0, W, (B,), device=images.device, generator=generator)
        return cy, cx

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        cy, cx = self.sample(images, generator)
        _check_fill(self.fill, images.dtype, "Cutout")
        H, W = images.shape[-2:]
        # clone() keeps the memory format, which an out-of-place masked_fill with the (B, 1, H, W) mask does not.
        return images.clone().masked_fill_(box_mask(cy, cx, self.size, self.size, H, W), self.fill)


# ----------------------------------------------------------------------------------------------------
# deterministic conversions
# ----------------------------------------------------------------------------------------------------


def _to_float(images: Tensor, dtype: torch.dtype, scale: bool, op: str) -> Tensor:
    if images.is_floating_point():
        return images.to(dtype)
    if images.dtype != torch.uint8 and scale:
        raise TypeError(
            f"{op} scales integer images from uint8's [0, 255] to [0, 1]; got {images.dtype} of shape "
            f"{tuple(images.shape)}. Convert to uint8 or float first, or pass scale=False."
        )
    out = images.to(dtype)
    return out.mul_(1.0 / 255.0) if scale else out


class ToDtype(ImageOp):
    """Convert images to ``dtype``; uint8 is scaled from [0, 255] to [0, 1] when ``scale`` (torchvision's convention).

    With ``channels_last=True`` the result is also laid out channels-last (NHWC), which cuDNN's
    tensor-core convolutions prefer.
    """

    random: ClassVar[bool] = False

    def __init__(
        self, dtype: torch.dtype = torch.float32, scale: bool = True, channels_last: bool = False
    ) -> None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"ToDtype: dtype must be a floating-point torch.dtype; got {dtype!r}.")
        self.dtype, self.scale, self.channels_last = dtype, scale, channels_last

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        images = check_images(images, "ToDtype")
        out = _to_float(images, self.dtype, self.scale, "ToDtype")
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out


class ChannelsLast(ImageOp):
    """Lay the batch out channels-last (NHWC) in memory; shapes and values are unchanged."""

    random: ClassVar[bool] = False

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return check_images(images, "ChannelsLast").contiguous(memory_format=torch.channels_last)


def _check_finite(name: str, value: object, prefix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{prefix}{name} must be a finite number, got {value!r}.")
    return float(value)


def _per_channel(name: str, value: object) -> list[tuple[str, object]]:
    """``value`` as ``[(name, value)]`` for a number, ``[(f"{name}[i]", v_i), ...]`` for a sequence of them (a
    list, a tuple, a 1-D tensor or array; a 0-D one or a numpy scalar is a number)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # tensors and numpy values as Python numbers and lists
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return [(name, value)]  # a number, or something check_float refuses by name (a str is not per-channel)


class Normalize(ImageOp):
    """``(x - mean) / std`` per channel. uint8 input is first converted to ``dtype`` and scaled to [0, 1].

    ``mean``/``std`` are a number (all channels) or one value per channel, on the [0, 1] scale.
    Accepting uint8 lets a pipeline transfer raw bytes (4x fewer than float32) and convert on the GPU:
    ``GPUAugment(RandomCrop(28, padding=2), RandomHorizontalFlip(), Normalize(0.286, 0.353))``.

    Raises:
        ValueError: a mean that is not a finite number (NaN, inf, a string), a std that is not a finite
            number > 0, ``mean``/``std`` of different lengths, or at call time a batch whose channel count
            does not match the number of means.
    """

    random: ClassVar[bool] = False

    def __init__(
        self, mean: float | Sequence[float], std: float | Sequence[float], dtype: torch.dtype = torch.float32
    ) -> None:
        self.mean = [_check_finite(name, m, "Normalize: ") for name, m in _per_channel("mean", mean)]
        self.std = [
            check_float(name, s, 0.0, prefix="Normalize: ", hint="Stds are on the [0, 1] scale, e.g. 0.353.")
            for name, s in _per_channel("std", std)
        ]
        if not self.mean or len(self.mean) != len(self.std):
            raise ValueError(
                f"Normalize: mean and std need the same number of channels (>= 1); got {len(self.mean)} means "
                f"and {len(self.std)} stds."
            )
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"Normalize: dtype must be a floating-point torch.dtype; got {dtype!r}.")
        self.dtype = dtype
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def _stats(self, device: torch.device, dtype: torch.dtype, channels: int) -> tuple[Tensor, Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            # Built once per device: a host->device copy per step would be a sync point on some paths.
            mean = torch.tensor(self.mean, dtype=dtype, device=device).view(1, -1, 1, 1)
            inv_std = (1.0 / torch.tensor(self.std, dtype=torch.float64)).to(dtype=dtype, device=device)
            self._cache[key] = (mean, inv_std.view(1, -1, 1, 1))
        mean, inv_std = self._cache[key]
        if len(self.mean) not in (1, channels):
            raise ValueError(
                f"Normalize has {len(self.mean)} channel means but the batch has {channels} channels "
                f"(shape (B, {channels}, H, W)); expected a batch of shape (B, {len(self.mean)}, H, W) "
                f"or one mean/std per channel."
            )
        return mean, inv_std

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        images = check_images(images, "Normalize")
        x = _to_float(images, images.dtype if images.is_floating_point() else self.dtype, True, "Normalize")
        mean, inv_std = self._stats(x.device, x.dtype, x.shape[1])
        return (x - mean) * inv_std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std}, dtype={self.dtype})"


# ----------------------------------------------------------------------------------------------------
# MixUp / CutMix
# ----------------------------------------------------------------------------------------------------

_GAMMA_TRIES = 8


def _sample_log_gamma(
    shape: float, n: int, device: torch.device, generator: torch.Generator | None
) -> Tensor:
    """``n`` draws of ``log(X)``, ``X ~ Gamma(shape, 1)``, in float64.

    Marsaglia & Tsang (2000). torch's own Gamma sampler takes no generator, and per-run
    reproducibility needs one. Rejection is vectorised over a fixed number of candidates so the draw
    never syncs with the host; each candidate is accepted with probability > 0.95, so all
    _GAMMA_TRIES fail with probability < 4e-11 per sample, in which case the last candidate (a valid
    positive draw from the proposal) is used. The result is a logarithm because for a small shape the
    boost ``U ** (1 / shape)`` underflows float64 to 0 (at shape 0.005, for U < 0.03), and two zeros
    made Beta's ``x / (x + y)`` NaN; ``log(U) / shape`` stays finite.
    """
    boost = shape < 1.0
    k = shape + 1.0 if boost else shape
    d = k - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    z = torch.randn(_GAMMA_TRIES, n, device=device, generator=generator, dtype=torch.float64)
    u = torch.rand(_GAMMA_TRIES, n, device=device, generator=generator, dtype=torch.float64)
    v = (1.0 + c * z) ** 3
    v_safe = v.clamp_min(1e-12)
    accept = (v > 0) & (u.log() < 0.5 * z * z + d - d * v_safe + d * v_safe.log())
    accept[-1] = True
    first = accept.to(torch.uint8).argmax(dim=0)  # first accepted candidate per sample
    out = (d * v_safe.gather(0, first.view(1, n)).view(n)).log()
    if boost:  # Gamma(a) = Gamma(a + 1) * U^(1/a); U > 0 so that the log is finite
        u_boost = torch.rand(n, device=device, generator=generator, dtype=torch.float64)
        out = out + u_boost.clamp_min(torch.finfo(torch.float64).tiny).log() / shape
    return out


def sample_beta(
    alpha: float,
    beta: float,
    n: int,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``n`` draws from Beta(alpha, beta) as float32, reproducible with ``generator`` (unlike ``torch.distributions``).

    ``X / (X + Y)`` with ``X ~ Gamma(alpha)``, ``Y ~ Gamma(beta)``, computed as ``sigmoid(log X - log Y)``:
    finite for every finite alpha, beta > 0, however small (then most draws are 0 or 1).

    Raises:
        ValueError: ``alpha`` or ``beta`` is not a finite number > 0.
    """
    check_float("alpha", alpha, 0.0, prefix="sample_beta: ")
    check_float("beta", beta, 0.0, prefix="sample_beta: ")
    device = torch.device(device)
    log_x = _sample_log_gamma(alpha, n, device, generator)
    log_y = _sample_log_gamma(beta, n, device, generator)
    return torch.sigmoid(log_x - log_y).float()


class MixUp(MixOp):
    """MixUp (Zhang et al., 2018) with one weight per sample: ``x_i' = l_i x_i + (1 - l_i) x_j``, ``l_i ~ Beta(a, a)``.

    The partner ``j`` of each sample comes from one random permutation of the batch; labels are
    mixed with the same weights into soft labels (rows sum to 1). Needs floating-point images:
    put it after ``Normalize``/``ToDtype``.
    """

    def __init__(self, alpha: float = 0.2, num_classes: int | None = None) -> None:
        super().__init__(alpha, num_classes)

    def sample(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample weights ``lam`` (B,) float32 and partner indices ``perm`` (B,) int64."""
        images = check_images(images, "MixUp")
        _check_generator(generator, images.device, "MixUp")
        B = images.shape[0]
        lam = sample_beta(self.alpha, self.alpha, B, images.device, generator)
        perm = torch.randperm(B, device=images.device, generator=generator)
        return lam, perm

    def __call__(  # type: ignore[override]
        self, images: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        images = check_images(images, "MixUp")
        _check_float(images, "MixUp")
        soft = self.soft_labels(labels, images.shape[0])
        lam, perm = self.sample(images, generator)
        w = lam.to(images.dtype).view(-1, 1, 1, 1)
        mixed = images * w + images[perm] * (1 - w)
        mixed_labels = soft * lam.view(-1, 1) + soft[perm] * (1 - lam.view(-1, 1))
        return mixed, mixed_labels


class CutMix(MixOp):
    """CutMix (Yun et al., 2019) with one box per sample: paste a box of a partner image into each image.

    Each sample draws ``l ~ Beta(a, a)``, a box of area about ``(1 - l) H W`` (side ratio ``sqrt(1 - l)``)
    at a uniformly random centre, clipped to the image. The label weight is corrected to the area
    actually pasted, so it is exact after clipping. Works on any dtype (pixels are copied, not blended).
    """

    def __init__(self, alpha: float = 1.0, num_classes: int | None = None) -> None:
        super().__init__(alpha, num_classes)

    def sample(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample box masks (B, 1, H, W) bool, kept fraction ``lam`` (B,) float32, partners (B,) int64."""
        images = check_images(images, "CutMix")
        _check_generator(generator, images.device, "CutMix")
        B, _, H, W = images.shape
        lam = sample_beta(self.alpha, self.alpha, B, images.device, generator)
        ratio = (1.0 - lam).sqrt()
        box_h = (ratio * H).long()
        box_w = (ratio * W).long()
        cy = torch.randint(0, H, (B,), device=images.device, generator=generator)
        cx = torch.randint(0, W, (B,), device=images.device, generator=generator)
        perm = torch.randperm(B, device=images.device, generator=generator)
        mask = box_mask(cy, cx, box_h, box_w, H, W)
        kept = 1.0 - mask.flatten(1).float().mean(dim=1)  # exact after clipping
        return mask, kept, perm

    def __call__(  # type: ignore[override]
        self, images: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        images = check_images(images, "CutMix")
        soft = self.soft_labels(labels, images.shape[0])
        mask, kept, perm = self.sample(images, generator)
        mixed = torch.where(mask, images[perm], images)
        mixed_labels = soft * kept.view(-1, 1) + soft[perm] * (1 - kept.view(-1, 1))
        return mixed, mixed_labels


# ----------------------------------------------------------------------------------------------------
# composition
# ----------------------------------------------------------------------------------------------------


class Compose:
    """Apply ops in order: ``Compose(RandomCrop(28, padding=2), Normalize(m, s), MixUp(0.2, 10))``.

    ``__call__(images, labels=None, generator=None)`` returns ``(images, labels)``; labels pass
    through image ops unchanged and are required by mixing ops.

    Raises:
        TypeError: an op that is not an :class:`ImageOp`/:class:`MixOp` (subclass one for a custom op).
        ValueError: no ops.
    """

    def __init__(self, *ops: ImageOp) -> None:
        if not ops:
            raise ValueError("Compose needs at least one op, e.g. Compose(RandomCrop(28, padding=2)).")
        for op in ops:
            if not isinstance(op, ImageOp):
                raise TypeError(
                    f"Expected ops from lightning_speedup.augment (RandomCrop, RandomHorizontalFlip, Cutout, "
                    f"CenterCrop, Normalize, ToDtype, ChannelsLast, MixUp, CutMix) or a subclass of ImageOp/MixOp; "
                    f"got {op!r} of type {type(op).__name__}."
                )
        self.ops: tuple[ImageOp, ...] = tuple(ops)
        self._needs_labels = any(isinstance(op, MixOp) for op in self.ops)

    @property
    def needs_labels(self) -> bool:
        return self._needs_labels  # read on every batch; the ops tuple never changes

    def deterministic(self) -> Compose | None:
        """The ops' evaluation forms (:meth:`ImageOp.eval_op`) in order, or None if no op has one.

        Deterministic ops are kept, random ones dropped, except a :class:`RandomCrop`, which becomes a
        :class:`CenterCrop` to the same size so that evaluation batches have the training batches' shape.
        """
        ops = [eval_form for op in self.ops if (eval_form := op.eval_op()) is not None]
        return Compose(*ops) if ops else None

    def __call__(
        self, images: Tensor, labels: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor | None]:
        for op in self.ops:
            if isinstance(op, MixOp):
                if labels is None:
                    raise ValueError(f"{type(op).__name__} mixes labels too; pass the labels of the batch.")
                images, labels = op(images, labels, generator)
            else:
                images = op(images, generator)
        return images, labels

    def __repr__(self) -> str:
        return f"Compose({', '.join(repr(op) for op in self.ops)})"
