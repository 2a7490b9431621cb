"""The float vs PTQ vs QAT report: numbers equal a direct evaluation; the recovered share is defined right."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_speedup.quantization import compare, convert, evaluate, prepare, quantize, weight_bytes
from lightning_speedup.quantization.report import recovered_share


def test_recovered_share() -> None:
    assert recovered_share(1.0, 1.5, 1.1) == pytest.approx(0.8)
    assert recovered_share(1.0, 1.5, 1.6) == pytest.approx(-0.2)  # QAT worse than PTQ: negative, not hidden
    assert recovered_share(1.0, 0.99, 1.0) is None  # PTQ lost nothing
    assert recovered_share(0.9, 0.8, 0.85, higher_is_better=True) == pytest.approx(0.5)


def test_compare_matches_direct_evaluation(fmnist: Any) -> None:
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    ptq = quantize(fp, "nf4")
    qat = convert(prepare(copy.deepcopy(fp), "int8"))  # stands in for a QAT-trained model
    loader = DataLoader(TensorDataset(fmnist.x_test[:600], fmnist.y_test[:600]), batch_size=200)
    report = compare(fp, ptq, qat, loader, timing_repeats=2)

    with torch.no_grad():
        logits = fp(fmnist.x_test[:600])
    assert report.row("float").loss == pytest.approx(
        F.cross_entropy(logits, fmnist.y_test[:600]).item(), rel=1e-5
    )
    accuracy = (logits.argmax(1) == fmnist.y_test[:600]).float().mean().item()
    assert report.row("float").accuracy == pytest.approx(accuracy)
    assert report.row("ptq").loss == pytest.approx(evaluate(ptq, loader)[0])
    assert report.row("ptq").weight_bytes == weight_bytes(ptq) < report.row("float").weight_bytes
    assert all(r.latency_ms > 0 and r.throughput > 0 for r in report.rows)
    table = report.to_markdown()
    assert "| ptq |" in table and "recovered by QAT" in table
    assert report.to_dict()["rows"][0]["name"] == "float"


def test_language_model_shapes_and_empty_loaders() -> None:
    model = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 11))
    x = torch.randint(0, 11, (4, 6))
    loss, acc = evaluate(model, [(x, x)])
    with torch.no_grad():
        expected = F.cross_entropy(model(x).reshape(-1, 11), x.reshape(-1)).item()
    assert loss == pytest.approx(expected, rel=1e-6) and acc is not None
    with pytest.raises(ValueError, match="yielded no batches"):
        compare(model, model, model, [])
