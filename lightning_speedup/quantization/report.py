"""The float vs PTQ vs QAT table: quality, the share of the PTQ loss that QAT wins back, memory, speed.

``recovered = (loss_ptq - loss_qat) / (loss_ptq - loss_float)``: 1.0 means QAT is as good as the
float model, 0.0 means it is no better than post-training quantization (torchao reports this
number, 68% for Llama3 on wikitext perplexity, in its QAT README). It is undefined (``None``) when
PTQ loses nothing.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_speedup.quantization.modules import weight_bytes

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ModelResult:
    """One row of the report."""

    name: str
    loss: float
    accuracy: float | None
    weight_bytes: int
    latency_ms: float
    throughput: float  # samples per second at the data loader's batch size


@dataclass(frozen=True)
class QuantReport:
    """Rows for float, PTQ and QAT plus the recovered shares."""

    rows: list[ModelResult]
    recovered_loss: float | None
    recovered_accuracy: float | None
    notes: list[str] = field(default_factory=list)

    def row(self, name: str) -> ModelResult:
        return next(r for r in self.rows if r.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [asdict(r) for r in self.rows],
            "recovered_loss": self.recovered_loss,
            "recovered_accuracy": self.recovered_accuracy,
            "notes": list(self.notes),
        }

    def to_markdown(self) -> str:
        lines = [
            "| model | loss | accuracy | weights (MiB) | latency (ms/batch) | throughput (samples/s) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in self.rows:
            acc = "-" if r.accuracy is None else f"{r.accuracy:.4f}"
            lines.append(
                f"| {r.name} | {r.loss:.4f} | {acc} | {r.weight_bytes / 2**20:.2f} | {r.latency_ms:.2f} | "
                f"{r.throughput:.0f} |"
            )
        rec = "undefined (PTQ lost nothing)" if self.recovered_loss is None else f"{self.recovered_loss:.1%}"
        lines.append(f"\nShare of the PTQ loss degradation recovered by QAT: {rec}")
        return "\n".join(lines)


def default_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy over the last dimension of ``logits`` (classifiers and language models alike)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))


def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataloader: Iterable[Any],
    loss_fn: LossFn = default_loss,
    autocast_dtype: torch.dtype | None = None,
    max_batches: int | None = None,
) -> tuple[float, float | None]:
    """Sample-weighted mean loss and (when logits and targets fit) top-1 accuracy of ``model``."""
    device = _device_of(model)
    was_training = model.training
    model.eval()
    total_loss, total_correct, total, has_acc = 0.0, 0.0, 0, True
    try:
        for i, (x, y) in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(device), y.to(device)
            ctx = (
                torch.autocast(device.type, dtype=autocast_dtype)
                if autocast_dtype
                else contextlib.nullcontext()
            )
            with ctx:
                logits = model(x)
            n = y.numel()
            total_loss += float(loss_fn(logits, y)) * n
            if logits.shape[:-1] == y.shape:
                total_correct += float((logits.argmax(dim=-1) == y).sum())
            else:
                has_acc = False
            total += n
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("The data loader yielded no batches to evaluate.")
    return total_loss / total, (total_correct / total if has_acc else None)


@torch.no_grad()
def measure_latency(
    model: nn.Module, x: Tensor, autocast_dtype: torch.dtype | None = None, warmup: int = 2, repeats: int = 5
) -> float:
    """Median wall time in milliseconds of one forward of ``x`` (CUDA synchronised)."""
    device = _device_of(model)
    x = x.to(device)
    was_training = model.training
    model.eval()
    times = []
    try:
        for i in range(warmup + repeats):
            ctx = (
                torch.autocast(device.type, dtype=autocast_dtype)
                if autocast_dtype
                else contextlib.nullcontext()
            )
            _sync(device)
            start = time.perf_counter()
            with ctx:
                model(x)
            _sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    finally:
        model.train(was_training)
    return statistics.median(times)


def recovered_share(fp: float, ptq: float, qat: float, higher_is_better: bool = False) -> float | None:
    """Share of the PTQ degradation (relative to float) that QAT recovers; None if PTQ lost nothing."""
    lost = (fp - ptq) if higher_is_better else (ptq - fp)
    if lost <= 0:
        return None
    gained = (qat - ptq) if higher_is_better else (ptq - qat)
    return gained / lost


def compare(
    fp: nn.Module,
    ptq: nn.Module,
    qat: nn.Module,
    dataloader: Iterable[Any],
    *,
    loss_fn: LossFn = default_loss,
    autocast_dtype: torch.dtype | None = None,
    max_batches: int | None = None,
    timing_repeats: int = 5,
) -> QuantReport:
    """Evaluate the float, post-training-quantized and QAT(-converted) models on the same batches.

    ``dataloader`` yields ``(inputs, targets)``; each model is evaluated on its own device. Latency is
    the median forward time of the first batch (after warm-up) and throughput its batch size divided
    by that latency; compare speeds only between models on the same device.

    Raises:
        ValueError: the data loader is empty.
    """
    first = next(iter(dataloader), None)
    if first is None:
        raise ValueError("The data loader yielded no batches to evaluate.")
    x0 = first[0]
    rows = []
    for name, model in (("float", fp), ("ptq", ptq), ("qat", qat)):
        loss, acc = evaluate(model, dataloader, loss_fn, autocast_dtype, max_batches)
        latency = measure_latency(model, x0, autocast_dtype, repeats=timing_repeats)
        rows.append(ModelResult(name, loss, acc, weight_bytes(model), latency, x0.shape[0] / (latency / 1e3)))
    f, p, q = rows
    rec_acc = None
    if f.accuracy is not None and p.accuracy is not None and q.accuracy is not None:
        rec_acc = recovered_share(f.accuracy, p.accuracy, q.accuracy, higher_is_better=True)
    return QuantReport(
        rows=rows, recovered_loss=recovered_share(f.loss, p.loss, q.loss), recovered_accuracy=rec_acc
    )
