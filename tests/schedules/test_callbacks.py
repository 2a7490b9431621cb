"""Schedule callbacks in real Lightning runs on CPU: torch equality, run length, resume, logging, errors."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_speedup.schedules import LRRangeTest, OneCycle, WarmupCosine, WarmupStableDecay
from lightning_speedup.schedules.functional import warmup_cosine, warmup_stable_decay
from tests.schedules.common import (
    Recorder,
    Regressor,
    assert_close_sequences,
    make_trainer,
    regression_loader,
    single_thread,  # noqa: F401 (autouse fixture)
    torch_one_cycle_reference,
)

# ------------------------------------------------------------------------------------------------
# step-by-step equality with torch.optim.lr_scheduler.OneCycleLR
# ------------------------------------------------------------------------------------------------

CASES = {
    "sgd-cos-two-phase": ("sgd", (0.05,), {"max_lr": 0.3}),
    "adam-linear-three-phase-per-group": (
        "adam",
        (1e-3, 1e-3),
        {
            "max_lr": [0.01, 0.02],
            "anneal_strategy": "linear",
            "three_phase": True,
            "pct_start": 0.25,
            "div_factor": 10.0,
            "final_div_factor": 100.0,
            "base_momentum": [0.8, 0.85],
            "max_momentum": [0.9, 0.95],
        },
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_cycle_matches_torch_every_step(case: str) -> None:
    optimizer, group_lrs, kwargs = CASES[case]
    recorder = Recorder()
    callback = OneCycle(**kwargs)
    trainer = make_trainer(
        max_epochs=2, callbacks=[recorder, callback]
    )  # recorder first: order must not matter
    trainer.fit(Regressor(optimizer, group_lrs), regression_loader(n_batches=10))
    assert callback.schedule_total_steps == 20
    expected = torch_one_cycle_reference(optimizer, group_lrs, 20, **kwargs)
    assert_close_sequences(recorder.of(0), expected)


@pytest.mark.parametrize("accumulate", [2, 4])
def test_gradient_accumulation_steps_once_per_optimizer_step(accumulate: int) -> None:
    recorder, callback = Recorder(), OneCycle(max_lr=0.2)
    trainer = make_trainer(max_epochs=2, accumulate_grad_batches=accumulate, callbacks=[recorder, callback])
    trainer.fit(Regressor("sgd"), regression_loader(n_batches=10))
    total = math.ceil(10 / accumulate) * 2  # Lightning steps on the epoch's last batch too
    assert callback.schedule_total_steps == total == trainer.global_step
    assert callback.steps_taken == [total]
    assert_close_sequences(recorder.of(0), torch_one_cycle_reference("sgd", (0.1,), total, max_lr=0.2))


@pytest.mark.parametrize(
    ("trainer_kwargs", "total"),
    [({"max_epochs": 3, "limit_train_batches": 4}, 12), ({"max_epochs": 5, "max_steps": 7}, 7)],
)
def test_run_length_follows_the_trainer(trainer_kwargs: dict[str, Any], total: int) -> None:
    recorder, callback = Recorder(), OneCycle(max_lr=0.2, pct_start=0.25)
    trainer = make_trainer(callbacks=[recorder, callback], **trainer_kwargs)
    trainer.fit(Regressor("sgd"), regression_loader(n_batches=10))
    assert callback.schedule_total_steps == total == len(recorder.records)
    expected = torch_one_cycle_reference("sgd", (0.1,), total, max_lr=0.2, pct_start=0.25)
    assert_close_sequences(recorder.of(0), expected)


# ------------------------------------------------------------------------------------------------
# groups, several optimizers, the warmup schedules
# ------------------------------------------------------------------------------------------------


class TwoOptimizers(Regressor):
    """Manual optimization: SGD with two groups on body/head plus Adam on a separate scale parameter."""

    def __init__(self) -> None:
        super().__init__("sgd", (0.02, 0.002))
        self.automatic_optimization = False
        self.scale = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        sgd, adam = self.optimizers()  # type: ignore[misc]
        loss = torch.nn.functional.mse_loss(self(x) * self.scale, y)
        sgd.zero_grad()
        adam.zero_grad()
        self.manual_backward(loss)
        sgd.step()
        if batch_idx % 2 == 0:  # the second optimizer steps every other batch only
            adam.step()

    def configure_optimizers(self) -> Any:
        sgd = torch.optim.SGD(
            [{"params": self.body.parameters()}, {"params": self.head.parameters(), "lr": 0.002}],
            lr=0.02,
            momentum=0.9,
        )
        return [sgd, torch.optim.Adam([self.scale], lr=0.01)]


def test_groups_keep_their_ratio_and_each_optimizer_has_its_own_clock() -> None:
    recorder, callback = Recorder(), WarmupCosine(peak_lr=0.1, warmup=0.2, cycle_momentum=True)
    trainer = make_trainer(max_epochs=2, callbacks=[recorder, callback])
    with pytest.warns(UserWarning, match=r"optimizer 1 \(Adam\) took only 10"):
        trainer.fit(TwoOptimizers(), regression_loader(n_batches=10))
    total = 20
    # Largest base LR (0.02) peaks at 0.1; the others keep their ratio to it.
    assert callback.peak_lrs == [[0.1, pytest.approx(0.01)], [pytest.approx(0.05)]]
    assert callback.steps_taken == [20, 10]
    for opt_index, peaks in enumerate(callback.peak_lrs):
        got = recorder.of(opt_index)
        for t, (lrs, moms) in enumerate(got):
            fraction = warmup_cosine(t, total, warmup=0.2)
            assert lrs == pytest.approx([p * fraction for p in peaks], abs=1e-15)
            assert moms == pytest.approx([0.95 - 0.1 * fraction] * len(peaks), abs=1e-15)


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_warmup_stable_decay_uses_each_groups_own_lr_as_peak(shape: str) -> None:
    recorder = Recorder()
    callback = WarmupStableDecay(warmup=0.1, decay=0.3, decay_shape=shape, min_lr_ratio=0.05)  # type: ignore[arg-type]
    trainer = make_trainer(max_epochs=2, callbacks=[recorder, callback])
    trainer.fit(Regressor("adam", (1e-3, 4e-3)), regression_loader(n_batches=10))
    for t, (lrs, moms) in enumerate(recorder.of(0)):
        f = warmup_stable_decay(t, 20, warmup=0.1, decay=0.3, decay_shape=shape, min_lr_ratio=0.05)  # type: ignore[arg-type]
        assert lrs == [1e-3 * f, 4e-3 * f]
        assert moms == [0.9, 0.9]  # momentum cycling is off by default for the warmup schedules


def test_a_run_too_short_for_a_phase_warns_and_trains_to_the_end() -> None:
    """4 steps: decay=0.1 of them rounds to none (it divided by zero at the last step before), warmup=0.9 to all."""
    recorder = Recorder()
    wsd = WarmupStableDecay(peak_lr=0.01, warmup=0.0, decay=0.1)
    trainer = make_trainer(max_epochs=1, callbacks=[recorder, wsd])
    with pytest.warns(
        UserWarning, match=r"decay=0.1 of this 4-step run rounds to no step, so the LR stays at the peak"
    ):
        trainer.fit(Regressor("adam", (1e-3,)), regression_loader(n_batches=4))
    assert wsd.steps_taken == [4] and [lrs for lrs, _ in recorder.of(0)] == [[0.01]] * 4
    cosine = WarmupCosine(peak_lr=0.01, warmup=0.9)
    trainer = make_trainer(max_epochs=1, callbacks=[cosine])
    with pytest.warns(UserWarning, match=r"warmup=0.9 fills the whole 4-step run, so the LR never decays"):
        trainer.fit(Regressor("adam", (1e-3,)), regression_loader(n_batches=4))
    assert cosine.steps_taken == [4]


@pytest.mark.parametrize("anneal", ["cos", "linear"])
def test_a_run_longer_than_the_one_cycle_keeps_its_final_lr(anneal: str) -> None:
    """Steps past the schedule's end use its final LR (min_lr); before, they extrapolated past it, which for
    "linear" was a negative LR (gradient ascent) and for "cos" one 3000x the final LR."""
    recorder = Recorder()
    schedule = OneCycle(max_lr=0.1, anneal_strategy=anneal, total_steps=20)  # type: ignore[arg-type]
    trainer = make_trainer(max_epochs=None, max_steps=24, callbacks=[recorder, schedule])
    with pytest.warns(
        UserWarning, match=r"taking step 21 of a schedule of 20 steps; it keeps the schedule's final"
    ):
        trainer.fit(Regressor("sgd", (0.05,)), regression_loader(n_batches=10))
    final = 0.1 / 25 / 1e4
    lrs = [lrs[0] for lrs, _ in recorder.of(0)]
    assert lrs[19] == pytest.approx(final, rel=1e-12) and lrs[20:] == [lrs[19]] * 4
    moms = [moms[0] for _, moms in recorder.of(0)]
    assert moms[20:] == [0.95] * 4
    assert trainer.optimizers[0].param_groups[0]["lr"] == lrs[19]


def test_manual_optimization_with_several_optimizers_and_max_steps_warns() -> None:
    """Lightning counts max_steps over every optimizer's steps, so the per-optimizer schedule is too long."""
    schedule = WarmupCosine(peak_lr=0.1)
    trainer = make_trainer(max_epochs=None, max_steps=20, callbacks=[schedule])
    with pytest.warns(
        UserWarning, match=r"steps 2 optimizers itself.*Pass WarmupCosine\(total_steps=\.\.\.\)"
    ):
        trainer.fit(TwoOptimizers(), regression_loader(n_batches=10))


class StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.should_stop = True


def test_an_optimizer_that_steps_on_fewer_batches_than_the_run_is_warned_about_at_the_end() -> None:
    """The schedule is sized in batches (Lightning's estimate under manual optimization); an optimizer that steps
    every other batch ended the run halfway through it, mid-decay, and nothing said so."""
    schedule = WarmupCosine(peak_lr=0.1, warmup=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_epochs=2, callbacks=[schedule]).fit(TwoOptimizers(), regression_loader(n_batches=10))
    assert schedule.schedule_total_steps == 20 and schedule.steps_taken == [20, 10]
    short = [str(w.message) for w in caught if "took only" in str(w.message)]
    assert len(short) == 1, short
    assert "optimizer 1 (Adam) took only 10 of the schedule's 20 steps" in short[0]
    assert "50% of the way through" in short[0] and "Pass WarmupCosine(total_steps=10)" in short[0]

    # A run stopped early (early stopping, max_time) leaves every optimizer short, as asked: no warning.
    schedule = WarmupCosine(peak_lr=0.1, warmup=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(max_epochs=2, callbacks=[schedule, StopAfterFirstEpoch()])
        trainer.fit(TwoOptimizers(), regression_loader(n_batches=10))
    assert schedule.steps_taken == [10, 5]
    assert not [w for w in caught if "took only" in str(w.message)]


@pytest.mark.parametrize("how", ["second-fit", "checkpoint-without-schedule"])
def test_a_schedule_added_to_a_trained_trainer_covers_the_steps_to_come(how: str, tmp_path: Path) -> None:
    """Before, it started the whole schedule again at the Trainer's global step: a second warmup, and a run that
    ended halfway down the decay."""
    loader = regression_loader(n_batches=10)
    recorder, schedule = Recorder(), WarmupCosine(peak_lr=0.1, warmup=0.1)
    if how == "second-fit":
        trainer = make_trainer(max_epochs=1, callbacks=[recorder, schedule])
        trainer.fit(Regressor("sgd"), loader)
        recorder.records.clear()
        trainer.fit_loop.max_epochs = 3
        ckpt = None
    else:
        first = make_trainer(max_epochs=1)
        first.fit(Regressor("sgd"), loader)
        ckpt = tmp_path / "no-schedule.ckpt"
        first.save_checkpoint(ckpt)
        trainer = make_trainer(max_epochs=3, callbacks=[recorder, schedule])
    with pytest.warns(
        UserWarning, match=r"10 steps into the run .* covers the 20 steps still to come \(of 30\)"
    ):
        trainer.fit(Regressor("sgd") if ckpt else trainer.lightning_module, loader, ckpt_path=ckpt)
    assert schedule.schedule_total_steps == 20 and schedule.steps_taken == [20]
    expected = [0.1 * warmup_cosine(t, 20, warmup=0.1) for t in range(20)]
    assert [lrs[0] for lrs, _ in recorder.of(0)] == pytest.approx(expected, rel=1e-12)


def test_a_late_schedule_counts_batches_where_several_optimizers_step_by_hand(tmp_path: Path) -> None:
    """Lightning's global step counts both optimizers' steps (15 after a 10-batch epoch here: the second steps
    every other batch), the run's estimate counts batches: the schedule covers the 20 batches to come."""
    loader = regression_loader(n_batches=10)
    first = make_trainer(max_epochs=1)
    first.fit(TwoOptimizers(), loader)
    assert first.global_step == 15
    ckpt = tmp_path / "no-schedule.ckpt"
    first.save_checkpoint(ckpt)
    schedule = WarmupCosine(peak_lr=0.1, warmup=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_epochs=3, callbacks=[schedule]).fit(TwoOptimizers(), loader, ckpt_path=ckpt)
    said = [str(w.message) for w in caught if "WarmupCosine" in str(w.message)]
    assert any(
        "10 steps into the run" in m and "covers the 20 steps still to come (of 30)" in m for m in said
    )
    assert schedule.schedule_total_steps == 20 and schedule.steps_taken == [20, 10]
    # The optimizer that steps every other batch runs half the schedule, and the end of training says so.
    short = [m for m in said if "took only" in m]
    assert len(short) == 1 and "optimizer 1 (Adam) took only 10 of the schedule's 20 steps" in short[0]


@pytest.mark.parametrize("make", [lambda: OneCycle(max_lr="auto"), lambda: WarmupStableDecay(peak_lr=0.5)])
def test_limit_train_batches_0_validates_and_the_schedule_warns_that_it_does_nothing(make: Any) -> None:
    """Lightning skips training with limit_train_batches=0 (a validation-only debugging run); the schedule used to
    raise that it could not tell the run's length."""
    model = Regressor("sgd", (0.1,))
    trainer = make_trainer(max_epochs=2, limit_train_batches=0, limit_val_batches=2, callbacks=[make()])
    model.validation_step = lambda batch, batch_idx: None  # type: ignore[method-assign]
    with pytest.warns(UserWarning, match="limit_train_batches=0, so no training step runs"):
        trainer.fit(model, regression_loader(), regression_loader())
    assert trainer.global_step == 0 and model.training_steps == 0
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.1


class LBFGSRegressor(Regressor):
    def configure_optimizers(self) -> Any:
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=4)


def test_an_optimizer_that_runs_its_closure_several_times_advances_the_schedule_once_per_step() -> None:
    """LBFGS evaluates the closure up to max_iter times per step, and Lightning calls on_before_optimizer_step
    after each evaluation: the schedule counted each one and ran out early."""
    recorder, schedule = Recorder(), WarmupCosine(peak_lr=0.1, warmup=0.2)
    trainer = make_trainer(max_epochs=1, callbacks=[recorder, schedule])
    trainer.fit(LBFGSRegressor(), regression_loader(n_batches=10))
    assert trainer.global_step == 10 and schedule.steps_taken == [10]
    assert len(recorder.records) > 10  # several evaluations per step did happen
    # every evaluation of step t saw step t's LR
    per_step: dict[float, int] = {}
    for lrs, _ in recorder.of(0):
        per_step[lrs[0]] = per_step.get(lrs[0], 0) + 1
    expected = [0.1 * warmup_cosine(t, 10, warmup=0.2) for t in range(10)]
    assert sorted(per_step) == pytest.approx(sorted(set(expected)), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# exact resume
# ------------------------------------------------------------------------------------------------


def test_resume_from_mid_training_checkpoint_is_exact(tmp_path: Path) -> None:
    def run(ckpt: str | None) -> tuple[Recorder, Regressor, ModelCheckpoint]:
        torch.manual_seed(1)
        model, recorder = Regressor("adam", (1e-3,)), Recorder()
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
        callbacks = [recorder, OneCycle(max_lr=0.05, pct_start=0.4), checkpoint]
        trainer = make_trainer(max_epochs=4, callbacks=callbacks, enable_checkpointing=True)
        trainer.fit(model, regression_loader(n_batches=6), ckpt_path=ckpt)
        return recorder, model, checkpoint

    full, full_model, _ = run(None)
    mid = tmp_path / "ckpt" / "epoch=1-step=12.ckpt"  # after 2 of 4 epochs: 12 of 24 steps, past the peak
    assert mid.exists()
    state = torch.load(mid, weights_only=False)["callbacks"]
    (one_cycle_state,) = [v for k, v in state.items() if k.startswith("OneCycle")]
    assert one_cycle_state["steps"] == [12] and one_cycle_state["total_steps"] == 24

    resumed, resumed_model, _ = run(str(mid))
    assert len(resumed.records) == 12
    assert resumed.records == full.records[12:]  # identical floats, LR and betas
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)


def _checkpoint_after_one_epoch(tmp_path: Path, schedule: L.Callback) -> Path:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer = make_trainer(max_epochs=1, callbacks=[schedule, checkpoint], enable_checkpointing=True)
    trainer.fit(Regressor("sgd"), regression_loader(n_batches=6))
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    return path


def test_resume_with_changed_settings_warns_naming_them(tmp_path: Path) -> None:
    """The checkpointed schedule continues (exact resume), and the warning names what was ignored."""
    ckpt = _checkpoint_after_one_epoch(tmp_path, OneCycle(max_lr=0.1, pct_start=0.3))
    schedule = OneCycle(max_lr=0.2, pct_start=0.4)
    trainer = make_trainer(max_epochs=2, callbacks=[schedule])
    with pytest.warns(UserWarning, match=r"max_lr: 0.1 -> 0.2; pct_start: 0.3 -> 0.4.*continues exactly as"):
        trainer.fit(Regressor("sgd"), regression_loader(n_batches=6), ckpt_path=str(ckpt))
    assert schedule.peak_lrs == [[0.1]] and schedule.steps_taken == [12]


def test_warmup_stable_decay_resumed_in_its_stable_phase_takes_the_new_length(tmp_path: Path) -> None:
    """The WSD promise: a checkpoint from the stable phase can be trained on and cooled down later. A resume into
    a longer run moves the decay to the new end; a resume already in the decay keeps its length and warns."""

    def checkpoint_at_step_6_of_12(dirpath: Path, schedule: WarmupStableDecay) -> str:
        checkpoint = ModelCheckpoint(dirpath=dirpath, save_top_k=-1, every_n_epochs=1)
        trainer = make_trainer(max_epochs=2, callbacks=[schedule, checkpoint], enable_checkpointing=True)
        trainer.fit(Regressor("sgd"), regression_loader(n_batches=6))
        return str(dirpath / "epoch=0-step=6.ckpt")

    ckpt = checkpoint_at_step_6_of_12(
        tmp_path / "stable", WarmupStableDecay(peak_lr=0.1, warmup=0.1, decay=0.2)
    )
    # 6 of 12 steps: warmup 1 step, decay 2 (steps 10-11); step 6 is stable under 12 and under 30 steps.
    recorder, schedule = Recorder(), WarmupStableDecay(peak_lr=0.1, warmup=0.1, decay=0.2)
    trainer = make_trainer(max_epochs=5, callbacks=[recorder, schedule])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*WarmupStableDecay")
        trainer.fit(Regressor("sgd"), regression_loader(n_batches=6), ckpt_path=ckpt)
    assert schedule.schedule_total_steps == 30 and schedule.steps_taken == [30]
    expected = [0.1 * warmup_stable_decay(t, 30, warmup=0.1, decay=0.2) for t in range(6, 30)]
    assert [lrs[0] for lrs, _ in recorder.of(0)] == pytest.approx(expected, rel=1e-12)

    in_decay = checkpoint_at_step_6_of_12(tmp_path / "decay", WarmupStableDecay(peak_lr=0.1, decay=0.6))
    schedule = WarmupStableDecay(peak_lr=0.1, decay=0.6)
    trainer = make_trainer(max_epochs=5, callbacks=[schedule])
    with pytest.warns(UserWarning, match=r"schedule is 12 steps long but this run is estimated at 30"):
        trainer.fit(Regressor("sgd"), regression_loader(n_batches=6), ckpt_path=in_decay)
    assert schedule.schedule_total_steps == 12


def test_a_schedule_that_joined_late_resumes_exactly_and_resizes_from_where_it_began(tmp_path: Path) -> None:
    """A WarmupStableDecay added after 20 steps covers steps 20-59 of a 6-epoch run. Its checkpoint held only
    its own 40 steps, so an unchanged resume looked like a 60-step run: the stable phase was "resized" to 60
    steps and the run ended before its decay. Now the resume continues exactly, and a longer run resizes the
    schedule to the steps from where it began."""
    loader = regression_loader(n_batches=10)
    first = make_trainer(max_epochs=2)
    first.fit(Regressor("sgd"), loader)
    plain = tmp_path / "plain.ckpt"
    first.save_checkpoint(plain)

    def wsd() -> WarmupStableDecay:
        return WarmupStableDecay(peak_lr=0.1, warmup=0.1, decay=0.3, decay_shape="linear")

    recorder, schedule = Recorder(), wsd()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer = make_trainer(
        max_epochs=6, callbacks=[recorder, schedule, checkpoint], enable_checkpointing=True
    )
    with pytest.warns(UserWarning, match="covers the 40 steps still to come"):
        trainer.fit(Regressor("sgd"), loader, ckpt_path=plain)
    assert schedule.schedule_total_steps == 40
    stable = tmp_path / "ckpt" / "epoch=2-step=30.ckpt"  # 10 steps into the schedule: stable phase

    resumed, schedule = Recorder(), wsd()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*WarmupStableDecay")
        make_trainer(max_epochs=6, callbacks=[resumed, schedule]).fit(
            Regressor("sgd"), loader, ckpt_path=stable
        )
    assert schedule.schedule_total_steps == 40 and schedule.steps_taken == [40]
    assert resumed.records == recorder.records[10:]

    longer = wsd()
    make_trainer(max_epochs=8, callbacks=[longer]).fit(Regressor("sgd"), loader, ckpt_path=stable)
    assert longer.schedule_total_steps == 60 and longer.steps_taken == [60]


def test_resume_with_another_schedule_class_is_refused(tmp_path: Path) -> None:
    ckpt = _checkpoint_after_one_epoch(tmp_path, OneCycle(max_lr=0.1))
    trainer = make_trainer(max_epochs=2, callbacks=[WarmupStableDecay(peak_lr=0.1)])
    with pytest.raises(
        ValueError, match=r"checkpoint's LR schedule is OneCycle, but this run uses WarmupStableDecay"
    ):
        trainer.fit(Regressor("sgd"), regression_loader(n_batches=6), ckpt_path=str(ckpt))


def test_two_schedule_callbacks_are_refused() -> None:
    trainer = make_trainer(callbacks=[OneCycle(max_lr=0.1), WarmupStableDecay(peak_lr=0.1)])
    with pytest.raises(ValueError, match=r"OneCycle and WarmupStableDecay: each sets the learning rate"):
        trainer.fit(Regressor("sgd"), regression_loader(n_batches=6))
    assert trainer.global_step == 0


# ------------------------------------------------------------------------------------------------
# logging next to LearningRateMonitor
# ------------------------------------------------------------------------------------------------


def test_logged_values_match_learning_rate_monitor(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="run")
    callbacks = [LearningRateMonitor(log_momentum=True), OneCycle(max_lr=0.2)]
    trainer = make_trainer(max_epochs=1, callbacks=callbacks, logger=logger, log_every_n_steps=1)
    trainer.fit(Regressor("sgd"), regression_loader(n_batches=10))
    rows = list(csv.DictReader((Path(logger.log_dir) / "metrics.csv").read_text().splitlines()))
    ours = {int(r["step"]): float(r["schedule/lr-SGD"]) for r in rows if r.get("schedule/lr-SGD")}
    monitor = {int(r["step"]): float(r["lr-SGD"]) for r in rows if r.get("lr-SGD")}
    momentum = {
        int(r["step"]): float(r["schedule/momentum-SGD"]) for r in rows if r.get("schedule/momentum-SGD")
    }
    expected = torch_one_cycle_reference("sgd", (0.1,), 10, max_lr=0.2)
    assert sorted(ours) == list(range(10)) and ours == monitor
    assert [ours[t] for t in range(10)] == [e[0][0] for e in expected]
    assert [momentum[t] for t in range(10)] == [e[1][0] for e in expected]


# ------------------------------------------------------------------------------------------------
# bad input: clear errors, before any training step
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: OneCycle(max_lr=0.1, pct_start=0.0), r"pct_start must be in \(0, 1\)"),
        (lambda: OneCycle(max_lr=0.1, pct_start=1.0), r"pct_start must be in \(0, 1\)"),
        (lambda: OneCycle(max_lr=0.1, pct_start=-0.2), r"pct_start must be in \(0, 1\)"),
        (lambda: OneCycle(max_lr=0.0), "max_lr must be a finite number > 0"),
        (lambda: OneCycle(max_lr=-1e-3), "max_lr must be a finite number > 0"),
        (lambda: OneCycle(max_lr=[1e-3, 0.0]), r"max_lr\[1\] must be a finite number > 0"),
        (lambda: OneCycle(max_lr="best"), "max_lr must be a number"),
        (lambda: OneCycle(max_lr=0.1, div_factor=0), "div_factor must be a finite number > 0"),
        (lambda: OneCycle(max_lr=0.1, base_momentum=1.2), r"base_momentum must be in \[0, 1\)"),
        (lambda: OneCycle(max_lr=0.1, three_phase=True, pct_start=0.7), "at most 0.5"),
        (lambda: OneCycle(max_lr=0.1, range_test=LRRangeTest()), "only runs for max_lr='auto'"),
        (lambda: WarmupCosine(peak_lr=-1.0), "peak_lr must be a finite number > 0"),
        (lambda: WarmupCosine(warmup=1.0), r"warmup must be in \[0, 1\)"),
        (lambda: WarmupStableDecay(warmup=0.3, decay=0.8), r"warmup \+ decay must be at most 1"),
        (lambda: WarmupStableDecay(decay_shape="exp"), "decay_shape must be one of"),  # type: ignore[arg-type]
        (lambda: LRRangeTest(min_lr=0.0), "min_lr must be a finite number > 0"),
        (lambda: LRRangeTest(min_lr=1.0, max_lr=0.1), "must be below max_lr"),
        (
            lambda: OneCycle(max_lr=0.1, base_momentum=0.95, max_momentum=0.85),
            r"base_momentum=0.95 is above max_momentum=0.85",
        ),
        (
            lambda: WarmupCosine(cycle_momentum=True, base_momentum=[0.8, 0.9], max_momentum=0.85),
            r"base_momentum=0.9 is above max_momentum=0.85 \(param group 1\)",
        ),
        (
            lambda: WarmupCosine(peak_lr=0.1, base_momentum=0.5, max_momentum=0.99),
            r"WarmupCosine: base_momentum=0.5, max_momentum=0.99 given with cycle_momentum=False, .* would do "
            r"nothing. Pass cycle_momentum=True to cycle the momentum, or drop base_momentum and max_momentum",
        ),
        (
            lambda: WarmupStableDecay(base_momentum=[0.8, 0.85]),
            r"base_momentum=\[0.8, 0.85\] given with cycle_momentum=False",
        ),
        (
            lambda: OneCycle(max_lr=0.1, cycle_momentum=False, max_momentum=0.9),
            r"OneCycle: max_momentum=0.9 given with cycle_momentum=False.* or drop max_momentum\.",
        ),
    ],
)
def test_bad_arguments_are_rejected_at_construction(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_momentum_defaults_apply_when_cycling_and_no_momentum_is_given_otherwise() -> None:
    """base_momentum/max_momentum default to None (0.85/0.95 when cycling), so a value given without
    cycle_momentum=True is refused (above) instead of ignored, and every use without one works as before."""
    for schedule in (
        OneCycle(max_lr=0.1),
        WarmupCosine(cycle_momentum=True),
        OneCycle(max_lr=0.1, cycle_momentum=False),
        # The defaults themselves, as the configs LightningCLI saved with earlier releases write them.
        WarmupCosine(base_momentum=0.85, max_momentum=0.95),
        WarmupStableDecay(cycle_momentum=False, base_momentum=0.85, max_momentum=0.95),
    ):
        assert (schedule.base_momentum, schedule.max_momentum) == (0.85, 0.95)
    assert WarmupStableDecay(cycle_momentum=True, base_momentum=0.8).base_momentum == 0.8
    recorder = Recorder()
    make_trainer(max_epochs=1, callbacks=[recorder, WarmupCosine(peak_lr=0.1)]).fit(
        Regressor("sgd", momentum=0.5), regression_loader(n_batches=10)
    )
    assert {moms[0] for _, moms in recorder.of(0)} == {0.5}  # not cycling: the optimizer's own momentum


@pytest.mark.parametrize(
    ("model", "callback", "trainer_kwargs", "match"),
    [
        (Regressor(), OneCycle(max_lr=0.1), {"max_epochs": -1}, "train forever"),
        (
            Regressor(scheduler=True),
            OneCycle(max_lr=0.1),
            {},
            r"returns a learning-rate scheduler \(StepLR\)",
        ),
        (
            Regressor(),
            WarmupCosine(peak_lr=[0.1, 0.2]),
            {},
            "has 2 values but the optimizers have 1 param groups",
        ),
        (
            Regressor(),
            OneCycle(max_lr=0.1, pct_start=0.05),
            {},
            "phase 1 of 2 has length 0",
        ),  # 0.05 * 20 == 1
        (Regressor("adagrad"), OneCycle(max_lr=0.1), {}, "has neither. Pass cycle_momentum=False"),
        (Regressor(group_lrs=(0.0,)), OneCycle(max_lr=0.1), {}, "built with lr <= 0"),
    ],
)
def test_bad_runs_fail_before_the_first_step(
    model: Regressor, callback: L.Callback, trainer_kwargs: dict[str, Any], match: str
) -> None:
    trainer = make_trainer(callbacks=[callback], **trainer_kwargs)
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, regression_loader(n_batches=10))
    assert model.training_steps == 0 and trainer.global_step == 0
