"""PipelineStrategy on one CUDA GPU: bf16-mixed, CUDA stages, several stages in one process."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_speedup import PipelineStrategy
from lightning_speedup.bench.modules import CharLM

pytestmark = pytest.mark.gpu


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.losses.append(float(trainer.callback_metrics["train_loss"]))


def _run(strategy: object) -> tuple[list[float], dict[str, torch.Tensor], float]:
    losses, state, val, _ = _run_and_predict(strategy)
    return losses, state, val


def _run_and_predict(
    strategy: object,
) -> tuple[list[float], dict[str, torch.Tensor], float, list[torch.Tensor]]:
    """Train 8 steps, validate, and predict two batches of 8 (bare token tensors)."""
    L.seed_everything(0, verbose=False)
    model = CharLM(block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, tie_weights=False, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 65, (16 * 8, 64), generator=g)
    model.example_input_array = x[:4]  # one micro-batch, for balance="time"
    data = DataLoader(TensorDataset(x, torch.roll(x, -1, 1)), batch_size=16, drop_last=True)
    rec = _Losses()
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        strategy=strategy,
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[rec],
        gradient_clip_val=1.0,
    )
    trainer.fit(model, data)
    val = trainer.validate(
        model, DataLoader(TensorDataset(x[:20], torch.roll(x[:20], -1, 1)), batch_size=8), verbose=False
    )[0]["val_loss"]
    predictions = trainer.predict(model, DataLoader(x[:16], batch_size=8))
    assert predictions is not None
    state = {k: v.float().cpu() for k, v in model.state_dict().items()}
    return rec.losses, state, float(val), list(predictions)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("schedule", "stages_per_rank"), [("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble", 2)]
)
def test_bf16_pipeline_on_one_gpu_trains_like_the_plain_module(schedule: str, stages_per_rank: int) -> None:
    ref_losses, ref_state, ref_val = _run("auto")
    losses, state, val = _run(PipelineStrategy(schedule, n_microbatches=4, stages_per_rank=stages_per_rank))
    assert losses[-1] < losses[0]  # random tokens: barely learnable, but the loss goes down
    # bf16 autocast: the same arithmetic in micro-batches rounds differently; the curves stay together
    assert losses == pytest.approx(ref_losses, rel=2e-2)
    assert val == pytest.approx(ref_val, rel=2e-2)
    assert set(state) == set(ref_state)


def test_stages_live_on_the_gpu() -> None:
    strategy = PipelineStrategy("interleaved_1f1b", n_microbatches=2, stages_per_rank=2)
    _run(strategy)
    # after fit the whole trained model is reassembled (on the CPU, as Lightning leaves modules)
    assert strategy.plan is not None and strategy.plan.num_stages == 2


def test_time_balance_and_predictions_on_the_gpu() -> None:
    """balance="time" measures each layer on the GPU (before, its copy stayed on the CPU: "Expected all tensors to
    be on the same device"), and predict returns tensors on the GPU, as plain Lightning does (before, on the CPU).
    """
    ref_losses, _, _, ref_predictions = _run_and_predict("auto")
    strategy = PipelineStrategy("interleaved_1f1b", n_microbatches=4, stages_per_rank=2, balance="time")
    losses, _, _, predictions = _run_and_predict(strategy)
    assert strategy.plan is not None and strategy.plan.balance == "time"
    assert all(c > 0 for c in strategy.plan.costs)
    assert losses == pytest.approx(ref_losses, rel=2e-2)
    assert len(predictions) == len(ref_predictions) == 2
    for got, want in zip(predictions, ref_predictions):
        assert got.device.type == want.device.type == "cuda"
        assert got.shape == want.shape and got.dtype == want.dtype
        # bf16 autocast: trained in micro-batches, the weights round differently; the logits stay together
        assert float((got.float() - want.float()).abs().mean()) < 0.05 * float(want.float().abs().mean())
