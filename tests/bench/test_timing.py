"""TimeToTarget on tiny real CPU runs: what it records, when it stops, and when it says 'not reached'."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

from lightning_speedup.bench import TimeToTarget
from lightning_speedup.bench.datamodules import FashionMNISTDataModule
from lightning_speedup.bench.modules import ImageClassifier


def _fit(data_dir: Path, timer: TimeToTarget, epochs: int) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    dm = FashionMNISTDataModule(data_dir, batch_size=64, num_workers=0, train_subset=512, val_subset=256)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=epochs, callbacks=[timer], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
    )  # fmt: skip
    trainer.fit(ImageClassifier(width=4, lr=3e-3), datamodule=dm)
    return trainer


def test_reached_stops_at_first_validation_past_target(fashion_mnist_dir: Path) -> None:
    timer = TimeToTarget("val_acc", target=0.0, mode="max")
    trainer = _fit(fashion_mnist_dir, timer, epochs=3)
    s = timer.summary()
    assert s["reached"] and s["epochs_to_target"] == 1 and s["steps_to_target"] == 8
    assert trainer.current_epoch == 1  # stopped after the first epoch
    assert len(s["history"]) == 1 and s["time_to_target_s"] == pytest.approx(s["history"][0]["time_s"])
    assert 0 < s["time_to_target_s"] <= s["total_s"]
    assert s["samples_per_s"] > 0 and s["warmup_s"] >= timer.sanity_s > 0
    assert s["history"][0]["samples"] == 512


def test_not_reached_runs_the_budget_and_keeps_history(fashion_mnist_dir: Path) -> None:
    timer = TimeToTarget("val_loss", target=0.0, mode="min")
    _fit(fashion_mnist_dir, timer, epochs=2)
    s = timer.summary()
    assert not s["reached"] and s["time_to_target_s"] is None and s["epochs"] == 2
    times = [h["time_s"] for h in s["history"]]
    assert len(times) == 2 and times[0] < times[1]
    assert s["best_metric"] == min(h["metric"] for h in s["history"])


def test_missing_metric_names_what_was_logged(fashion_mnist_dir: Path) -> None:
    with pytest.raises(KeyError, match=r"watches 'val_f1'.*val_acc"):
        _fit(fashion_mnist_dir, TimeToTarget("val_f1", target=0.5), epochs=1)


def test_bad_mode() -> None:
    with pytest.raises(ValueError, match="mode must be"):
        TimeToTarget("val_acc", 0.9, mode="up")


def test_image_classifier_logs_the_train_loss_unless_asked_not_to(fashion_mnist_dir: Path) -> None:
    for log_train_loss in (True, False):
        dm = FashionMNISTDataModule(
            data_dir=str(fashion_mnist_dir), batch_size=8, num_workers=0, train_subset=16, val_subset=8
        )
        trainer = L.Trainer(
            max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0,
        )  # fmt: skip
        trainer.fit(ImageClassifier(width=2, log_train_loss=log_train_loss), datamodule=dm)
        assert ("train_loss" in trainer.callback_metrics) is log_train_loss
        assert "val_acc" in trainer.callback_metrics
    with pytest.raises(ValueError, match="log_train_loss must be True or False, got 'false'"):
        ImageClassifier(log_train_loss="false")  # type: ignore[arg-type]
