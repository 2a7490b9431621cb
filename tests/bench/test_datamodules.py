"""The reference-task data modules: batch shapes, dtypes, augmentation, splits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_speedup.bench.datamodules import CharLMDataModule, FashionMNISTDataModule, ImageBatches
from lightning_speedup.bench.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_text_corpus


def test_fashion_float_batches_are_normalised(fashion_mnist_dir: Path) -> None:
    dm = FashionMNISTDataModule(fashion_mnist_dir, batch_size=64, num_workers=0, augment=False)
    dm.setup()
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    raw = dm.data.test_images[:64].float().div(255)  # type: ignore[union-attr]
    torch.testing.assert_close(x[:, 0], (raw - FASHION_MNIST_MEAN) / FASHION_MNIST_STD)


def test_fashion_uint8_output_and_subsets(fashion_mnist_dir: Path) -> None:
    dm = FashionMNISTDataModule(
        fashion_mnist_dir, batch_size=100, num_workers=0, augment=False, output="uint8",
        train_subset=1000, val_subset=300, drop_last=True,
    )  # fmt: skip
    dm.setup()
    assert len(dm.train_set) == 1000 and len(dm.val_set) == 300
    x, _ = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (100, 1, 28, 28)
    assert len(dm.train_dataloader()) == 10 and len(dm.val_dataloader()) == 3


def test_fashion_cpu_augmentation_is_crop_and_flip(fashion_mnist_dir: Path) -> None:
    dm = FashionMNISTDataModule(
        fashion_mnist_dir, num_workers=0, augment=True, output="uint8", train_subset=64
    )
    dm.setup()
    img = dm.train_set.images[0]  # (28, 28)
    padded = torch.nn.functional.pad(img, (2, 2, 2, 2))
    crops = {
        (dy, dx, flip): (padded[dy : dy + 28, dx : dx + 28].flip(-1) if flip else padded[dy : dy + 28, dx : dx + 28])
        for dy in range(5) for dx in range(5) for flip in (False, True)
    }  # fmt: skip
    seen = set()
    for _ in range(200):
        out = dm.train_set[0][0][0]
        match = [k for k, v in crops.items() if torch.equal(v, out)]
        assert match, "every augmented image is one of the 50 crop/flip variants"
        seen.add(match[0])
    assert len(seen) > 20  # offsets and flips vary from sample to sample


def test_fashion_bad_arguments() -> None:
    with pytest.raises(ValueError, match="output must be"):
        FashionMNISTDataModule(output="float16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        FashionMNISTDataModule(batch_size=0)


def test_charlm_windows_and_validation_coverage(shakespeare_path: Path) -> None:
    dm = CharLMDataModule(
        shakespeare_path, block_size=64, batch_size=32, num_workers=0, samples_per_epoch=100
    )
    dm.setup()
    assert dm.vocab_size == 65
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 64) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token
    assert len(dm.train_dataloader()) == 3  # 100 windows rounded down to whole batches of 32
    corpus = load_text_corpus(shakespeare_path)
    val = torch.cat([xb.reshape(-1) for xb, _ in dm.val_dataloader()])
    assert len(val) == (len(corpus.val_ids) - 1) // 64 * 64
    assert torch.equal(val, corpus.val_ids[: len(val)])  # validation windows are the val split, in order


def test_charlm_ranks_read_different_windows(shakespeare_path: Path) -> None:
    """Under DDP every rank's global RNG is seeded alike; the windows must still differ across ranks."""
    from lightning_speedup.bench.datamodules import RandomWindows

    ids = load_text_corpus(shakespeare_path).train_ids

    def windows(rank: int, world: int) -> list[list[int]]:
        torch.manual_seed(0)
        ds = RandomWindows(ids, 64, 200, rank=rank, world_size=world)
        return [ds[i][0].tolist() for i in range(200)]

    single, rank0, rank1 = windows(0, 1), windows(0, 2), windows(1, 2)
    assert rank0 == single  # rank 0 reads exactly what one process reads
    assert sum(a == b for a, b in zip(rank0, rank1)) == 0  # rank 1 reads other windows
    with pytest.raises(ValueError, match="rank must be"):
        RandomWindows(ids, 64, 10, rank=2, world_size=2)


@pytest.mark.parametrize("output", ["uint8", "float"])
def test_fashion_batched_fetch_gives_the_per_sample_batches(fashion_mnist_dir: Path, output: str) -> None:
    """Without CPU augmentation whole batches are gathered with one index; the batches are the same."""
    kwargs = dict(
        batch_size=100, num_workers=0, augment=False, output=output, train_subset=1000, val_subset=250
    )
    batched = FashionMNISTDataModule(fashion_mnist_dir, **kwargs)  # type: ignore[arg-type]
    per_sample = FashionMNISTDataModule(fashion_mnist_dir, batched_fetch=False, **kwargs)  # type: ignore[arg-type]
    batched.setup(), per_sample.setup()
    assert isinstance(batched.train_set, ImageBatches) and not isinstance(per_sample.train_set, ImageBatches)
    for name in ("train_dataloader", "val_dataloader"):
        torch.manual_seed(3)  # the same shuffle for both loaders
        expected = list(getattr(per_sample, name)())
        torch.manual_seed(3)
        got = list(getattr(batched, name)())
        assert len(got) == len(expected) == (10 if name == "train_dataloader" else 3)
        for (x, y), (xe, ye) in zip(got, expected):
            assert x.dtype == xe.dtype and torch.equal(x, xe) and torch.equal(y, ye)


def test_fashion_batched_fetch_survives_lightnings_distributed_sampler(fashion_mnist_dir: Path) -> None:
    """Lightning rebuilds the loader around a DistributedSampler under DDP; each rank still gets whole batches."""
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler

    dm = FashionMNISTDataModule(fashion_mnist_dir, batch_size=50, num_workers=0, augment=False, output="uint8",
                                train_subset=400)  # fmt: skip
    dm.setup()
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(dm.train_set, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = _update_dataloader(dm.train_dataloader(), sampler)
        batches = list(loader)
        assert len(batches) == 4 and all(
            x.shape == (50, 1, 28, 28) and x.dtype == torch.uint8 for x, _ in batches
        )
        seen.append(torch.cat([y for _, y in batches]))
        expected = dm.train_set.labels[torch.tensor(list(sampler))]
        assert torch.equal(seen[-1], expected)


def test_fashion_batched_fetch_refuses_cpu_augmentation() -> None:
    with pytest.raises(ValueError, match="augment=True augments sample by sample"):
        FashionMNISTDataModule(augment=True, batched_fetch=True)
