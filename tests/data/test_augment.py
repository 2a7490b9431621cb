"""Batched per-sample augmentation ops and the GPUAugment callback, on the CPU."""

from __future__ import annotations

import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_speedup import augment as ls_augment
from lightning_speedup.data.augment import (
    CenterCrop,
    ChannelsLast,
    Compose,
    CutMix,
    Cutout,
    MixUp,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    ToDtype,
    batch_seed,
    box_mask,
    crop_batch,
    sample_beta,
)
from lightning_speedup.data.gpu_augment import GPUAugment
from lightning_speedup.data.resident import DeviceResidentDataModule


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def shape_only(batch: int, channels: int = 1, size: int = 28) -> Tensor:
    """A (B, C, H, W) tensor that costs one image of memory (for sampling parameters only)."""
    return torch.zeros(1, channels, size, size, dtype=torch.uint8).expand(batch, -1, -1, -1)


def chi2_uniform(values: Tensor, n_bins: int) -> float:
    counts = torch.bincount(values, minlength=n_bins).double()
    expected = values.numel() / n_bins
    return float(((counts - expected) ** 2 / expected).sum())


# -- random crop --------------------------------------------------------------------------------------


def test_crop_offsets_in_bounds_and_uniform() -> None:
    top, left = RandomCrop(28, padding=2).sample(shape_only(20_000), gen())
    for offsets in (top, left):
        assert offsets.min() == 0 and offsets.max() == 4
        # 4 degrees of freedom: P(chi2 > 18.47) = 0.001 for a uniform distribution.
        assert chi2_uniform(offsets, 5) < 18.47
    joint = top * 5 + left  # 25 cells, 24 dof: P(chi2 > 51.2) = 0.001
    assert chi2_uniform(joint, 25) < 51.2


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate"])
def test_crop_matches_pad_then_slice_reference(mode: str) -> None:
    images = torch.rand(16, 3, 9, 7)
    op = RandomCrop((6, 8), padding=3, padding_mode=mode, fill=0.0)  # type: ignore[arg-type]
    top, left = op.sample(images, gen(1))
    out = crop_batch(images, top, left, (6, 8), 3, mode)  # type: ignore[arg-type]
    padded = F.pad(images, (3, 3, 3, 3), mode=mode)
    for i in range(16):
        t, lft = int(top[i]), int(left[i])
        assert torch.equal(out[i], padded[i, :, t : t + 6, lft : lft + 8])
    # The op itself draws the same offsets from the same seed.
    assert torch.equal(op(images, gen(1)), out)


def test_crop_keeps_uint8_and_channels_last() -> None:
    images = torch.randint(0, 256, (4, 3, 10, 10), dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last
    )
    out = RandomCrop(10, padding=2)(images, gen())
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert out.is_contiguous(memory_format=torch.channels_last)


# -- flip, cutout -------------------------------------------------------------------------------------


def test_flip_rate_near_half_and_flips_exactly_the_chosen_samples() -> None:
    flips = RandomHorizontalFlip().sample(shape_only(100_000), gen())
    assert abs(flips.float().mean().item() - 0.5) < 0.01  # 6 standard deviations
    images = torch.rand(64, 2, 5, 6)
    out = RandomHorizontalFlip()(images, gen(3))
    chosen = RandomHorizontalFlip().sample(images, gen(3))
    assert torch.equal(out[chosen], images[chosen].flip(-1))
    assert torch.equal(out[~chosen], images[~chosen])
    assert torch.equal(RandomHorizontalFlip(p=0.0)(images, gen()), images)


def test_cutout_area_is_the_clipped_square() -> None:
    images = torch.ones(2000, 1, 28, 28)
    out = Cutout(8)(images, gen(5))
    cy, cx = Cutout(8).sample(images, gen(5))
    y0, x0 = cy - 4, cx - 4
    rows = (y0 + 8).clamp(max=28) - y0.clamp(min=0)
    cols = (x0 + 8).clamp(max=28) - x0.clamp(min=0)
    zeros = (out == 0).flatten(1).sum(1)
    assert torch.equal(zeros, rows * cols)
    interior = (cy >= 4) & (cy <= 24) & (cx >= 4) & (cx <= 24)
    assert interior.any() and (zeros[interior] == 64).all() and (zeros <= 64).all()
    assert torch.equal(box_mask(cy, cx, 8, 8, 28, 28).flatten(1).sum(1), rows * cols)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_cutout_keeps_channels_last(dtype: torch.dtype) -> None:
    images = torch.randint(0, 256, (8, 3, 10, 10)).to(dtype)
    out = Cutout(4, fill=7)(images.contiguous(memory_format=torch.channels_last), gen(2))
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, Cutout(4, fill=7)(images, gen(2)))  # same values as the NCHW input gets


def test_ops_draw_per_sample_not_per_batch() -> None:
    # torchvision v2 on a batch applies one crop and one flip to every image; here each image gets its own.
    one = torch.arange(28 * 28, dtype=torch.float32).view(1, 1, 28, 28)
    batch = one.expand(256, -1, -1, -1).contiguous()
    out = Compose(RandomCrop(28, padding=2), RandomHorizontalFlip())(batch, generator=gen())[0]
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) > 30  # 50 possible (crop, flip) combinations
    flips = RandomHorizontalFlip().sample(shape_only(10_000), gen(2)).float()
    corr = torch.corrcoef(torch.stack([flips[:-1], flips[1:]]))[0, 1]
    assert abs(corr.item()) < 0.05  # neighbours are independent
    lam, _ = MixUp(1.0, 10).sample(shape_only(512), gen())
    assert lam.std() > 0.2


# -- normalize, dtype ---------------------------------------------------------------------------------


def test_normalize_matches_reference_for_uint8_and_float() -> None:
    images = torch.randint(0, 256, (8, 3, 5, 5), dtype=torch.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    reference = (
        images.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    ) / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    out = Normalize(mean, std)(images)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)
    out_float = Normalize(mean, std)(images.float() / 255)
    torch.testing.assert_close(out_float.double(), reference, rtol=1e-5, atol=1e-5)
    one_channel = torch.randint(0, 256, (4, 1, 3, 3), dtype=torch.uint8)
    torch.testing.assert_close(Normalize(0.286, 0.353)(one_channel), (one_channel / 255 - 0.286) / 0.353)


def test_to_dtype_and_channels_last() -> None:
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    torch.testing.assert_close(ToDtype()(images), torch.tensor([0.0, 0.2, 1.0]).view(1, 1, 1, 3))
    assert ToDtype(torch.bfloat16, scale=False)(images).dtype == torch.bfloat16
    x = torch.rand(2, 3, 4, 4)
    assert ChannelsLast()(x).is_contiguous(memory_format=torch.channels_last)
    assert ToDtype(channels_last=True)(x).is_contiguous(memory_format=torch.channels_last)
    assert not ToDtype.random and not Normalize.random and not ChannelsLast.random and RandomCrop.random


# -- MixUp, CutMix -------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.4, 2.0])
def test_beta_sampler_moments(alpha: float) -> None:
    lam = sample_beta(alpha, alpha, 100_000, generator=gen()).double()
    assert lam.min() >= 0 and lam.max() <= 1
    assert abs(lam.mean().item() - 0.5) < 0.005
    var = 1 / (4 * (2 * alpha + 1))
    assert abs(lam.var().item() - var) < 0.03 * var
    assert torch.equal(
        sample_beta(alpha, alpha, 10, generator=gen(7)), sample_beta(alpha, alpha, 10, generator=gen(7))
    )


def test_mixup_blends_images_and_labels_with_the_same_weights() -> None:
    images = torch.rand(32, 1, 6, 6)
    labels = torch.randint(0, 10, (32,))
    mixed, soft = MixUp(0.4, num_classes=10)(images, labels, gen(4))
    lam, perm = MixUp(0.4, num_classes=10).sample(images, gen(4))
    w = lam.view(-1, 1, 1, 1)
    torch.testing.assert_close(mixed, images * w + images[perm] * (1 - w))
    torch.testing.assert_close(soft.sum(1), torch.ones(32))
    one_hot = F.one_hot(labels, 10).float()
    torch.testing.assert_close(soft, one_hot * lam[:, None] + one_hot[perm] * (1 - lam[:, None]))
    # Soft labels in, soft labels out (chaining two mixes).
    _, soft2 = MixUp(0.4)(mixed, soft, gen(5))
    torch.testing.assert_close(soft2.sum(1), torch.ones(32))


def test_cutmix_label_weights_equal_pasted_area() -> None:
    images = torch.arange(16, dtype=torch.float32).view(16, 1, 1, 1).expand(16, 1, 12, 12).contiguous()
    labels = torch.arange(16) % 4
    mixed, soft = CutMix(1.0, num_classes=4)(images, labels, gen(9))
    _, kept, perm = CutMix(1.0, num_classes=4).sample(images, gen(9))
    own = (mixed == images).flatten(1).float().mean(1)
    pasted_from_self = perm == torch.arange(16)
    torch.testing.assert_close(own[~pasted_from_self], kept[~pasted_from_self])
    torch.testing.assert_close(soft.sum(1), torch.ones(16))
    assert CutMix(1.0, 4)(images.to(torch.uint8), labels, gen())[0].dtype == torch.uint8


# -- determinism, seeds --------------------------------------------------------------------------------


def full_pipeline() -> Compose:
    return Compose(
        RandomCrop(28, padding=2),
        RandomHorizontalFlip(),
        Cutout(6),
        Normalize(0.286, 0.353),
        MixUp(0.4, num_classes=10),
        CutMix(1.0),
    )


def test_fixed_seed_is_deterministic_and_seeds_differ() -> None:
    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (64,))
    a = full_pipeline()(images, labels, gen(11))
    b = full_pipeline()(images, labels, gen(11))
    c = full_pipeline()(images, labels, gen(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_batch_seeds_differ_across_ranks_and_steps() -> None:
    seeds = {batch_seed(0, rank, step) for rank in range(8) for step in range(1000)}
    assert len(seeds) == 8000 and all(0 <= s < 2**63 for s in seeds)
    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    out = [
        full_pipeline()(images, torch.zeros(64, dtype=torch.long), gen(batch_seed(3, rank, 0)))[0]
        for rank in (0, 1)
    ]
    assert not torch.equal(out[0], out[1])


# -- bad input -----------------------------------------------------------------------------------------


def test_bad_inputs_name_found_and_expected_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*\(28, 28\).*2 dims"):
        RandomCrop(28)(torch.zeros(28, 28))
    with pytest.raises(ValueError, match=r"\(1, 28, 28\).*unsqueeze"):
        RandomHorizontalFlip()(torch.zeros(1, 28, 28))
    with pytest.raises(ValueError, match=r"3 channel means.*\(B, 1, H, W\).*\(B, 3, H, W\)"):
        Normalize([0.5] * 3, [0.2] * 3)(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"crop 40x40 is larger than the padded image 32x32"):
        RandomCrop(40, padding=2)(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="num_classes"):
        MixUp(0.2)(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match=r"floating-point.*Normalize"):
        MixUp(0.2, 10)(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"soft labels of shape \(2, 10\)"):
        MixUp(0.2, 10)(torch.zeros(2, 1, 4, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="probability"):
        RandomHorizontalFlip(1.5)
    with pytest.raises(ValueError, match="alpha"):
        CutMix(0.0)
    with pytest.raises(ValueError, match="padding"):
        RandomCrop(28, padding=-1)
    with pytest.raises(ValueError, match="std"):
        Normalize(0.5, 0.0)
    with pytest.raises(TypeError, match="ImageOp"):
        Compose(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one op"):
        GPUAugment()
    with pytest.raises(ValueError, match="label_key"):
        GPUAugment(MixUp(0.2, 10), label_key=None)
    with pytest.raises(ValueError, match="image_key must be an int"):
        GPUAugment(RandomHorizontalFlip(), image_key=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        GPUAugment(RandomHorizontalFlip(), ops=[RandomHorizontalFlip()])
    for seed in (1.5, "0", True):  # the package's one message for seeds
        with pytest.raises(
            ValueError, match=rf"^seed must be an int or None, got {re.escape(repr(seed))}\.$"
        ):
            GPUAugment(RandomHorizontalFlip(), seed=seed)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Cutout\(size=100\) is larger than the 28x28 images.*size <= 28"):
        Cutout(100)(torch.zeros(2, 1, 28, 28))


@pytest.mark.parametrize("fill", [-1, 0.5, 300])
@pytest.mark.parametrize("op", [RandomCrop, Cutout])
def test_fill_that_integer_images_cannot_hold_is_a_clear_error(op: type, fill: float) -> None:
    """uint8 would wrap -1 to 255 and truncate 0.5 to 0 silently, and 300 raise torch's overflow error."""
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    aug = RandomCrop(8, padding=2, fill=fill) if op is RandomCrop else Cutout(4, fill=fill)
    with pytest.raises(ValueError, match=rf"{op.__name__}: fill={fill}.*torch.uint8.*integers in \[0, 255\]"):
        aug(images, gen())
    # The same fill is fine for float images, and an integer in range for uint8 ones: the same pixels as in float.
    assert aug(images.float(), gen()).dtype == torch.float32
    ok = RandomCrop(8, padding=2, fill=255) if op is RandomCrop else Cutout(4, fill=255)
    assert torch.equal(ok(images, gen()), ok(images.float(), gen()).to(torch.uint8))
    with pytest.raises(ValueError, match=rf"{op.__name__}: fill must be a number"):
        RandomCrop(8, fill="0") if op is RandomCrop else Cutout(4, fill="0")  # type: ignore[arg-type]


def test_gpu_augment_takes_ops_as_a_keyword_list() -> None:
    """``ops=[...]`` (the form a LightningCLI config sets) builds the same pipeline as positional ops."""
    images = torch.rand(4, 1, 28, 28)
    positional = GPUAugment(RandomCrop(28, padding=2), RandomHorizontalFlip(), seed=1)
    keyword = GPUAugment(ops=[RandomCrop(28, padding=2), RandomHorizontalFlip()], seed=1)
    assert repr(positional.pipeline) == repr(keyword.pipeline)
    assert torch.equal(
        positional.pipeline(images, generator=gen(3))[0], keyword.pipeline(images, generator=gen(3))[0]
    )


def test_package_reexports_the_ops() -> None:
    assert (
        ls_augment.RandomCrop is RandomCrop
        and ls_augment.MixUp is MixUp
        and ls_augment.Normalize is Normalize
    )


# -- GPUAugment callback (CPU) -------------------------------------------------------------------------

N, CLASSES = 96, 10


def fake_images(n: int = N, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = gen(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    return images, torch.randint(0, CLASSES, (n,), generator=g)


class Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, CLASSES))
        self.train_batches: list[tuple[Tensor, Tensor]] = []
        self.val_batches: list[Tensor] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        self.train_batches.append((x.clone(), y.clone()))
        return F.cross_entropy(self.net(x.float()), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.val_batches.append(batch[0].clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def trainer(**kwargs: object) -> L.Trainer:
    defaults: dict[str, object] = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0,
    )  # fmt: skip
    defaults.update(kwargs)
    return L.Trainer(**defaults)  # type: ignore[arg-type]


def test_callback_augments_training_and_converts_eval_batches() -> None:
    x, y = fake_images()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    norm = Normalize(0.286, 0.353)
    model = Recorder()
    aug = GPUAugment(RandomCrop(28, padding=2), RandomHorizontalFlip(), norm, seed=3)
    trainer(max_epochs=1, callbacks=[aug]).fit(model, loader, loader)
    assert len(model.train_batches) == 3 and aug.step == 3
    for i, (xb, yb) in enumerate(model.train_batches):
        assert xb.dtype == torch.float32 and xb.shape == (32, 1, 28, 28)
        assert torch.equal(yb, y[i * 32 : (i + 1) * 32])
        # The same draws as the functional pipeline seeded for (seed=3, rank 0, step i).
        expected, _ = aug.pipeline(x[i * 32 : (i + 1) * 32], None, gen(batch_seed(3, 0, i)))
        assert torch.equal(xb, expected)
    # Validation: only the deterministic op (Normalize), no crop or flip.
    for i, xb in enumerate(model.val_batches):
        assert torch.equal(xb, norm(x[i * 32 : (i + 1) * 32]))


def test_callback_stream_per_seed_matches_an_independent_reference() -> None:
    """The bench's ops (crop with padding 2, flip, normalise) give, for each step, exactly what drawing the
    offsets and flips by hand from (seed, rank 0, step) and padding, slicing and flipping give."""
    x, y = fake_images(64)
    model = Recorder()
    aug = GPUAugment(RandomCrop(28, padding=2), RandomHorizontalFlip(), Normalize(0.286, 0.353), seed=11)
    trainer(max_epochs=1, callbacks=[aug]).fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    assert len(model.train_batches) == 4
    mean = torch.tensor([0.286]).view(1, 1, 1, 1)
    inv_std = (1.0 / torch.tensor([0.353], dtype=torch.float64)).float().view(1, 1, 1, 1)
    for step, (xb, _) in enumerate(model.train_batches):
        g = gen(batch_seed(11, 0, step))
        top = torch.randint(0, 5, (16,), generator=g)
        left = torch.randint(0, 5, (16,), generator=g)
        flip = torch.rand(16, generator=g) < 0.5
        padded = F.pad(x[step * 16 : (step + 1) * 16], (2, 2, 2, 2))
        crops = torch.stack([padded[i, :, top[i] : top[i] + 28, left[i] : left[i] + 28] for i in range(16)])
        crops = torch.where(flip.view(-1, 1, 1, 1), crops.flip(-1), crops)
        assert torch.equal(xb, (crops.float().mul_(1.0 / 255.0) - mean) * inv_std), step


def test_crops_of_other_sizes_and_paddings_on_one_device_stay_exact() -> None:
    """Crops of several sizes and paddings interleaved (their index offsets are made once per size and
    padding) each equal the pad-then-slice reference."""
    images = torch.rand(8, 2, 10, 10)
    for size, padding in [((10, 10), 2), ((6, 8), 3), ((10, 10), 0), ((6, 8), 3), ((10, 10), 2)]:
        op = RandomCrop(size, padding=padding)
        top, left = op.sample(images, gen(padding))
        out = op(images, gen(padding))
        padded = F.pad(images, (padding,) * 4)
        for i in range(8):
            t, lft = int(top[i]), int(left[i])
            assert torch.equal(out[i], padded[i, :, t : t + size[0], lft : lft + size[1]])


def test_state_key_names_the_ops_and_follows_a_new_pipeline() -> None:
    aug = GPUAugment(RandomCrop(28, padding=2), seed=0)
    assert aug.state_key == aug._generate_state_key(ops=repr(aug.pipeline), image_key=0)
    assert aug.state_key is aug.state_key  # built once, read on every hook call
    aug.pipeline = Compose(RandomHorizontalFlip())
    aug.image_key = "image"
    assert aug.state_key == aug._generate_state_key(
        ops="Compose(RandomHorizontalFlip(p=0.5))", image_key="image"
    )
    assert not Compose(RandomCrop(28)).needs_labels and Compose(MixUp(0.2, num_classes=10)).needs_labels


def tuple_collate(samples: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    xs, ys = zip(*samples)
    return torch.stack(xs), torch.stack(ys)


def test_callback_replaces_tensors_inside_tuple_batches_with_soft_labels() -> None:
    x, y = fake_images(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, collate_fn=tuple_collate)
    model = Recorder()
    aug = GPUAugment(Normalize(0.286, 0.353), MixUp(0.4, num_classes=CLASSES), seed=0, convert_eval=False)
    trainer(max_epochs=1, callbacks=[aug]).fit(model, loader)
    for xb, yb in model.train_batches:
        assert xb.dtype == torch.float32 and yb.shape == (32, CLASSES)
        torch.testing.assert_close(yb.sum(1), torch.ones(32))


def test_bad_batch_layout_is_a_clear_error() -> None:
    x, y = fake_images(32)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    with pytest.raises(ValueError, match="image_key='images'"):
        trainer(max_steps=1, callbacks=[GPUAugment(RandomHorizontalFlip(), image_key="images")]).fit(
            Recorder(), loader
        )


class TensorBatches(L.LightningModule):
    """Steps that take a bare tensor of images as the batch (a loader that yields images only)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, CLASSES))
        self.seen: dict[str, list[Tensor]] = {"train": [], "val": [], "test": [], "predict": []}

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        self.seen["train"].append(batch.clone())
        return self.net(batch.float()).logsumexp(1).mean()

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self.seen["val"].append(batch.clone())

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self.seen["test"].append(batch.clone())

    def predict_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        self.seen["predict"].append(batch.clone())
        return self.net(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_bare_tensor_batches_are_the_images() -> None:
    """Training batches are augmented and evaluation batches converted when the loader yields images only."""
    x, _ = fake_images(64)
    loader = DataLoader(x, batch_size=32)  # default_collate stacks bare tensors: each batch is one tensor
    norm = Normalize(0.286, 0.353)
    model = TensorBatches()
    aug = GPUAugment(RandomCrop(28, padding=2), RandomHorizontalFlip(), norm, seed=3)
    trainer(max_epochs=1, callbacks=[aug]).fit(model, loader, loader)
    trainer(callbacks=[aug]).test(model, loader, verbose=False)
    predictions = trainer(callbacks=[aug]).predict(model, loader)
    assert predictions is not None and len(predictions) == 2
    for i, xb in enumerate(model.seen["train"]):
        expected, _ = aug.pipeline(x[i * 32 : (i + 1) * 32], None, gen(batch_seed(3, 0, i)))
        assert torch.equal(xb, expected)
    for stage in ("val", "test", "predict"):  # the deterministic op only
        assert len(model.seen[stage]) == 2, stage
        for i, xb in enumerate(model.seen[stage]):
            assert torch.equal(xb, norm(x[i * 32 : (i + 1) * 32])), stage


def test_mixing_ops_on_bare_tensor_batches_are_a_clear_error() -> None:
    x, _ = fake_images(32)
    aug = GPUAugment(Normalize(0.286, 0.353), MixUp(0.4, num_classes=CLASSES), seed=0)
    loader = DataLoader(x, batch_size=32)
    with pytest.raises(
        ValueError, match=r"need the labels.*bare tensor of shape \(32, 1, 28, 28\).*\(images, labels\)"
    ):
        trainer(max_steps=1, callbacks=[aug]).fit(TensorBatches(), loader, loader)


def _fit(tmp_path: Path, max_epochs: int, ckpt: str | None = None) -> tuple[Recorder, GPUAugment]:
    L.seed_everything(0, verbose=False)
    x, y = fake_images(N, seed=1)
    dm = DeviceResidentDataModule((x, y), batch_size=16)
    model = Recorder()
    aug = GPUAugment(
        RandomCrop(28, padding=2), RandomHorizontalFlip(), Normalize(0.286, 0.353), MixUp(0.4, CLASSES)
    )
    save = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer(max_epochs=max_epochs, callbacks=[aug, save], enable_checkpointing=True).fit(
        model, dm, ckpt_path=ckpt
    )
    return model, aug


def test_resume_is_bitwise_identical(tmp_path: Path) -> None:
    full, full_aug = _fit(tmp_path / "full", max_epochs=4)
    _fit(tmp_path / "part", max_epochs=2)
    resumed, resumed_aug = _fit(tmp_path / "resumed", max_epochs=4, ckpt=str(tmp_path / "part" / "last.ckpt"))
    assert resumed_aug.seed == full_aug.seed and resumed_aug.step == full_aug.step == 4 * N // 16
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# -- small alpha, bad arguments, evaluation crops, fresh fits ----------------------------------------


# Beta(a, a) probabilities from scipy.stats.beta(a, a).cdf: of [0.01, 0.99], and of (0, 1e-30).
@pytest.mark.parametrize("alpha, middle, tiny", [(0.005, 0.022674, 0.353987), (0.001, 0.004583, 0.466628)])
def test_beta_sampler_stays_finite_for_small_alpha(alpha: float, middle: float, tiny: float) -> None:
    """For a small alpha both Gamma boosts underflowed to 0 and x / (x + y) was NaN. The draws follow
    Beta(a, a) into its tails: the share below 1e-30 is right too (about 6 and 7 standard errors allowed)."""
    lam = sample_beta(alpha, alpha, 100_000, generator=gen())
    assert torch.isfinite(lam).all() and lam.min() >= 0 and lam.max() <= 1
    assert abs((lam < 0.5).double().mean().item() - 0.5) < 0.01
    assert abs(((lam >= 0.01) & (lam <= 0.99)).double().mean().item() - middle) < 0.003
    assert abs((lam < 1e-30).double().mean().item() - tiny) < 0.01
    mixed, soft = MixUp(alpha, num_classes=10)(torch.rand(512, 1, 4, 4), torch.randint(0, 10, (512,)), gen(1))
    assert torch.isfinite(mixed).all() and torch.isfinite(soft).all()


@pytest.mark.parametrize("alpha", [math.inf, math.nan, "0.2", True, -1.0])
def test_mixing_ops_refuse_alpha_that_is_not_a_finite_positive_number(alpha: object) -> None:
    for op in (MixUp, CutMix):
        with pytest.raises(ValueError, match=rf"^{op.__name__}: alpha must be a finite number > 0, got"):
            op(alpha, num_classes=10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^sample_beta: beta must be a finite number > 0, got"):
        sample_beta(0.2, alpha, 4)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "mean, std, match",
    [
        (math.nan, 1.0, r"^Normalize: mean must be a finite number, got nan\.$"),
        ([0.5, math.inf], [1.0, 1.0], r"^Normalize: mean\[1\] must be a finite number, got inf\.$"),
        ("0.5", 1.0, r"^Normalize: mean must be a finite number, got '0\.5'\.$"),
        (0.0, math.inf, r"^Normalize: std must be a finite number > 0, got inf\."),
        (0.0, [0.2, math.nan], r"^Normalize: std\[1\] must be a finite number > 0, got nan\."),
        (0.0, -0.1, r"^Normalize: std must be a finite number > 0, got -0\.1\."),
    ],
)
def test_normalize_refuses_non_finite_statistics(mean: object, std: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Normalize(mean, std)  # type: ignore[arg-type]


def test_normalize_takes_statistics_as_tensors_and_arrays() -> None:
    """Per-channel statistics as a 1-D tensor or numpy array (as computed from a data set) are per-channel lists,
    and 0-D ones and numpy scalars are numbers: the same op as from Python floats."""
    np = pytest.importorskip("numpy")
    images = torch.rand(2, 3, 4, 4)
    reference = Normalize([0.1, 0.2, 0.3], [0.5, 0.6, 0.7])(images)
    for mean, std in (
        (
            torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64),
            torch.tensor([0.5, 0.6, 0.7], dtype=torch.float64),
        ),
        (np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.6, 0.7])),
    ):
        assert torch.equal(Normalize(mean, std)(images), reference)
    assert Normalize(np.float32(0.5), torch.tensor(0.25)).std == [0.25]
    with pytest.raises(ValueError, match=r"mean\[1\] must be a finite number, got nan"):
        Normalize(torch.tensor([0.1, math.nan]), 0.5)


def test_convert_eval_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match=r"^convert_eval must be True or False, got 'no'\.$"):
        GPUAugment(Normalize(0.5, 0.5), convert_eval="no")  # type: ignore[arg-type]


def test_center_crop_is_the_evaluation_form_of_random_crop() -> None:
    images = torch.rand(4, 2, 28, 28)
    # Same size: the identity (the very tensor), whatever the padding.
    assert RandomCrop(28, padding=2).eval_op()(images) is images
    # Smaller: the central crop, as torchvision's CenterCrop (even margins).
    torch.testing.assert_close(RandomCrop(24).eval_op()(images), images[..., 2:26, 2:26], rtol=0, atol=0)
    # Larger than the image: the centre of the padded image, in the crop's padding mode.
    for mode in ("constant", "reflect"):
        out = RandomCrop((32, 30), padding=4, padding_mode=mode).eval_op()(images)  # type: ignore[arg-type]
        torch.testing.assert_close(out, F.pad(images, (4,) * 4, mode=mode)[..., 2:34, 3:33], rtol=0, atol=0)
    channels_last = images.contiguous(memory_format=torch.channels_last)
    assert CenterCrop(20)(channels_last).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"CenterCrop: the crop 40x40 is larger than the padded image 32x32"):
        CenterCrop(40, padding=2)(images)
    pipeline = Compose(
        RandomCrop(24), RandomHorizontalFlip(), Normalize(0.5, 0.5), MixUp(0.2, 10)
    ).deterministic()
    assert repr(pipeline) == (
        "Compose(CenterCrop(size=(24, 24), padding=0, padding_mode='constant', fill=0.0), "
        "Normalize(mean=[0.5], std=[0.5], dtype=torch.float32))"
    )
    assert ls_augment.CenterCrop is CenterCrop


def test_evaluation_batches_have_the_training_crop_size() -> None:
    """RandomCrop(24) on 28x28 images: validation batches are the central 24x24, the size training sees."""
    x, y = fake_images(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    norm = Normalize(0.286, 0.353)
    model = Recorder()
    model.net = nn.Sequential(nn.Flatten(), nn.Linear(24 * 24, CLASSES))  # fails on any other size
    trainer(max_epochs=1, callbacks=[GPUAugment(RandomCrop(24), norm, seed=0)]).fit(model, loader, loader)
    assert {tuple(xb.shape[-2:]) for xb, _ in model.train_batches} == {(24, 24)}
    assert len(model.val_batches) == 2
    for i, xb in enumerate(model.val_batches):
        assert torch.equal(xb, norm(x[i * 32 : (i + 1) * 32, :, 2:26, 2:26]))


def _first_batch(aug: GPUAugment, global_seed: int = 0) -> Tensor:
    L.seed_everything(global_seed, verbose=False)
    x, y = fake_images(64)
    model = Recorder()
    trainer(max_epochs=1, callbacks=[aug]).fit(model, DataLoader(TensorDataset(x, y), batch_size=32))
    return model.train_batches[0][0]


@pytest.mark.parametrize("seed", [3, None])
def test_a_fresh_fit_starts_the_augmentation_stream_over(seed: int | None) -> None:
    """A callback reused for a second fit (a sweep, a notebook re-run) augments it as a new callback would:
    step 0, the constructor's seed, or with seed=None a seed drawn again from the global RNG."""
    aug = GPUAugment(RandomCrop(28, padding=2), RandomHorizontalFlip(), seed=seed)
    _first_batch(aug, global_seed=0)
    assert aug.step == 2
    second = _first_batch(aug, global_seed=1)
    fresh = GPUAugment(RandomCrop(28, padding=2), RandomHorizontalFlip(), seed=seed)
    assert torch.equal(second, _first_batch(fresh, global_seed=1))
    assert aug.step == fresh.step == 2 and aug.seed == fresh.seed
