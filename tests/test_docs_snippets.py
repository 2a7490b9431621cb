"""Every ```python block of README.md and docs/methods/*.md runs, so no snippet can drift from the code.

Each block runs on the CPU in a fresh namespace that holds small real stand-ins for the names a snippet
leaves to the reader (``model``, ``datamodule``, ``build``, ...): a ResNet-9 of width 8 and a few hundred
real Fashion-MNIST images. GPU-sized arguments are adapted by the text substitutions in ``SUBSTITUTIONS``
(``L.Trainer(...)`` becomes a CPU Trainer of a few batches, sweeps shrink to one trial of one epoch).
A block that cannot run on a CPU is marked in the markdown with ``<!-- snippet: gpu-only -->`` on the
line before it; it is compiled, not run. New method cards are picked up by the glob.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs" / "methods").glob("*.md"))]
GPU_ONLY = "<!-- snippet: gpu-only -->"
# (pattern, replacement): how a snippet's GPU-sized arguments become CPU-sized ones.
SUBSTITUTIONS: list[tuple[str, str]] = [
    (r"\bL\.Trainer\(", "_cpu_trainer("),
    (r"num_samples=\d+", "num_samples=1"),
    (r'"max_epochs": \d+', '"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1'),
    (r'"gpu": [0-9.]+', '"gpu": 0'),
    (r'"cpu": \d+', '"cpu": 1'),
    # A snippet's own bench model at the stand-ins' width (a width-64 ResNet-9 under bf16 autocast took minutes
    # per step on two CPU cores).
    (r"\bImageClassifier\((?!width)", "ImageClassifier(width=8, "),
    # The LR range test's fewest steps instead of its default 100 (QAT's fake quantization made them 30 s).
    (r'max_lr="auto"\)', 'max_lr="auto", range_test=_short_range_test())'),
    # Batches of 32: bf16 autocast on two CPU cores took 1.5 s per step of 128 or 512 images.
    (r"\bFashionMNISTDataModule\((?![^)]*batch_size)", "FashionMNISTDataModule(batch_size=32, "),
    (r"\bfrom_fashion_mnist\(batch_size=\d+", "from_fashion_mnist(batch_size=32"),
]


@dataclass
class Snippet:
    file: Path
    line: int
    code: str
    gpu_only: bool

    @property
    def id(self) -> str:
        return f"{self.file.relative_to(REPO_ROOT)}:{self.line}"


def extract(path: Path) -> list[Snippet]:
    snippets, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, body = i + 1, []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            marked = start >= 2 and lines[start - 2].strip() == GPU_ONLY
            snippets.append(Snippet(path, start + 1, "\n".join(body) + "\n", marked))
        i += 1
    return snippets


SNIPPETS = [s for doc in DOCS for s in extract(doc)]


def adapt(code: str) -> str:
    for pattern, replacement in SUBSTITUTIONS:
        code = re.sub(pattern, replacement, code)
    return code


def _cpu_trainer(tmp_path: Path) -> Any:
    def make(**kwargs: Any) -> L.Trainer:
        steps = {"max_steps": 4} if "max_steps" in kwargs else {"max_epochs": 1}
        kwargs.update(
            accelerator="cpu", devices=1, num_nodes=1, limit_train_batches=4, limit_val_batches=2,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=str(tmp_path), **steps,
        )  # fmt: skip
        kwargs.pop("max_epochs" if "max_steps" in steps else "max_steps", None)
        return L.Trainer(**kwargs)

    return make


def build(config: dict[str, Any]) -> tuple[L.LightningModule, L.LightningDataModule]:
    """The README's ``build``: a sweep's config -> (module, data), here tiny."""
    from lightning_speedup.bench.datamodules import FashionMNISTDataModule
    from lightning_speedup.bench.modules import ImageClassifier

    return ImageClassifier(lr=config["lr"], width=8), FashionMNISTDataModule(
        config.get("data_dir"), batch_size=config["batch_size"], num_workers=0, augment=False,
        train_subset=256, val_subset=128,
    )  # fmt: skip


def _namespace(tmp_path: Path, fashion_mnist_dir: Path) -> dict[str, Any]:
    from lightning_speedup.bench.datamodules import FashionMNISTDataModule
    from lightning_speedup.bench.datasets import load_fashion_mnist
    from lightning_speedup.bench.modules import ImageClassifier
    from lightning_speedup.schedules import LRRangeTest

    raw = load_fashion_mnist(fashion_mnist_dir, download=False)
    images = torch.as_tensor(raw.test_images[:64]).unsqueeze(1)  # (B, 1, 28, 28) uint8
    labels = torch.as_tensor(raw.test_labels[:64]).long()
    return {
        "__name__": "__snippet__",
        "_cpu_trainer": _cpu_trainer(tmp_path),
        "_short_range_test": lambda: LRRangeTest(num_steps=10),
        "model": ImageClassifier(width=8),
        "datamodule": FashionMNISTDataModule(
            fashion_mnist_dir, batch_size=64, num_workers=0, augment=False, train_subset=256, val_subset=128
        ),
        "build": build,
        # quantization.md: a fresh float instance of the model's architecture, a float model and its
        # validation loader.
        "MyModel": lambda: ImageClassifier(width=8),
        "float_model": ImageClassifier(width=8),
        "val_loader": DataLoader(TensorDataset(images.float().div(255), labels), batch_size=32),
        # gpu-data.md: a batch of raw images and their labels.
        "images_uint8": images,
        "labels": labels,
    }


def test_every_doc_has_been_searched() -> None:
    assert (REPO_ROOT / "README.md") in DOCS and len(DOCS) > 1
    assert any(s.file.name == "README.md" for s in SNIPPETS)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda s: s.id)
def test_snippet_runs_on_cpu(
    snippet: Snippet, tmp_path: Path, fashion_mnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled = compile(adapt(snippet.code), snippet.id, "exec")
    if snippet.gpu_only:
        pytest.skip(f"marked {GPU_ONLY}: compiled only")
    monkeypatch.setenv("HOME", str(tmp_path))  # sweeps default to ~/ray_results
    # Ray's worker processes unpickle the stand-ins from this test package: they need the repository on their path.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("LIGHTNING_SPEEDUP_DATA", str(fashion_mnist_dir))
    monkeypatch.chdir(tmp_path)
    exec(compiled, _namespace(tmp_path, fashion_mnist_dir))


@pytest.fixture(scope="module", autouse=True)
def _one_ray_cluster_for_all_snippets() -> Any:
    """The first sweep snippet starts a local Ray cluster and the later ones reuse it: starting a second
    cluster in the same process right after a shutdown can time out waiting for its GCS on a busy machine."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def test_extract_reads_the_gpu_only_marker_and_adapt_makes_a_cpu_trainer(tmp_path: Path) -> None:
    doc = tmp_path / "card.md"
    doc.write_text(
        "text\n\n```python\nx = 1\n```\n\n"
        + GPU_ONLY
        + '\n```python\nL.Trainer(accelerator="gpu", devices=4)\n```\n'
    )
    plain, gpu = extract(doc)
    assert (plain.code, plain.gpu_only, plain.line) == ("x = 1\n", False, 4)
    assert gpu.gpu_only and adapt(gpu.code) == '_cpu_trainer(accelerator="gpu", devices=4)\n'
    trainer = _cpu_trainer(tmp_path)(accelerator="gpu", devices=4, max_epochs=10)
    assert (type(trainer.accelerator).__name__, trainer.num_devices, trainer.max_epochs) == (
        "CPUAccelerator",
        1,
        1,
    )
