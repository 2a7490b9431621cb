"""PipelineStrategy on real gloo process groups against single-process training of the same model.

Tolerance: torch's pipelining schedules compute the same arithmetic in another order (micro-batch sums);
over four Adam steps parameters agree to ~1e-6 and losses to ~1e-7 relative, so the tests allow 1e-5 / 1e-6.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_speedup import PipelineStrategy
from lightning_speedup.pipeline import SCHEDULES
from lightning_speedup.pipeline.strategy import adjacent_local_stages_problem
from tests.pipeline.common import (
    BatchNormLM,
    FailsOnTrainStart,
    PredictLM,
    ReplicaOffsetLM,
    ReplicaShards,
    SavePredictions,
    TaggedMLP,
    TinyLM,
    dataset,
    final_state,
    fit,
    in_fresh_interpreter,
    loader,
    losses,
    needs_local_stages,
    tagged_rows,
)

STAGES_PER_RANK = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2, "zero_bubble": 2, "zbv": 2, "dualpipev": 2}


def _pp(schedule: str, **kwargs: object) -> PipelineStrategy:
    kwargs.setdefault("n_microbatches", 4)
    # spawn, not fork: earlier test modules can leave threads (stores, loggers) whose locks a fork would copy held
    return PipelineStrategy(schedule=schedule, start_method="spawn", **kwargs)  # type: ignore[arg-type]


def _fit_pipelined(out: Path, schedule: str, n: int, **kwargs: object) -> Path:
    """``fit(out, strategy=_pp(schedule), devices=2, data=loader(n=n), **kwargs)``, in a fresh interpreter."""
    code = (
        "import json, sys; from pathlib import Path; from tests.pipeline.common import fit, loader; "
        "from tests.pipeline.test_strategy import _pp; a = json.loads(sys.argv[1]); "
        "fit(Path(a.pop('out')), strategy=_pp(a.pop('schedule')), devices=2, data=loader(n=a.pop('n')), **a)"
    )
    in_fresh_interpreter("-c", code, json.dumps({"out": str(out), "schedule": schedule, "n": n, **kwargs}))
    return out


def _assert_same_training(ref: Path, run: Path) -> None:
    assert losses(run) == pytest.approx(losses(ref), rel=1e-6)
    a, b = final_state(ref), final_state(run)
    assert list(a) == list(b)  # one full state, in the plain module's key order
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit(tmp_path_factory.mktemp("reference"))


@pytest.mark.parametrize(
    "schedule",
    [pytest.param(s, marks=needs_local_stages) if s in ("zbv", "dualpipev") else s for s in SCHEDULES],
)
def test_schedule_matches_single_process(schedule: str, reference: Path, tmp_path: Path) -> None:
    run = fit(tmp_path, strategy=_pp(schedule, metrics_every=2), devices=2)
    _assert_same_training(reference, run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["pipeline/bubble"] <= 1.0
    assert metrics["pipeline/bubble_theory"] == pytest.approx(1 / 5 / STAGES_PER_RANK[schedule])
    assert metrics["pipeline/samples_per_s"] > 0


def test_batchnorm_in_a_later_stage_trains_like_micro_batched_single_process(tmp_path: Path) -> None:
    """A BatchNorm opening stage 1, whose layer transposes its input: the reference is one process taking the
    same 4 micro-batches of 2 as 4 accumulated batches. torch's shape-finding forward ran the stage on
    uninitialised memory and left NaN running statistics, and measuring the bubble (metrics_every) ran more
    forwards; the transposed layer's strided input gradient made gloo refuse to send it."""

    def model() -> BatchNormLM:
        L.seed_everything(0, verbose=False)  # the same initial weights in both runs
        return BatchNormLM()

    ref = fit(tmp_path / "ref", model=model(), data=loader(batch_size=2), accumulate_grad_batches=4)
    run = fit(tmp_path / "pp", strategy=_pp("1f1b", metrics_every=1), devices=2, model=model(), data=loader())
    a, b = final_state(ref), final_state(run)
    assert int(b["norm.bn.num_batches_tracked"]) == 16  # 4 steps x 4 micro-batches, not one more
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)


def test_pipeline_times_data_parallel(tmp_path: Path) -> None:
    """4 processes: 2 stages x 2 replicas, each replica half of every batch, equal single-process training,
    with two accumulated batches per step (replicas average once per optimizer step) and global-norm clipping.
    Every process logs and returns the mean of the replicas' losses, the single-process loss of the whole batch,
    per step and for the epoch. Before, it was its own replica's half-batch loss.
    The second replica's processes build other weights than the first's (ReplicaOffsetLM); each stage starts from
    its first replica's, as under DDP. Before, the replicas trained apart from their own starts."""

    def model() -> ReplicaOffsetLM:
        L.seed_everything(0, verbose=False)  # the same weights as built in both runs
        return ReplicaOffsetLM()

    kw = {"gradient_clip_val": 0.05, "accumulate_grad_batches": 2, "max_steps": 3}
    ref = fit(tmp_path / "ref", model=model(), **kw)
    run = fit(tmp_path / "pp", strategy=_pp("1f1b", pipeline_size=2, n_microbatches=2), devices=4,
              model=model(), data=ReplicaShards(), **kw)  # fmt: skip
    a, b = final_state(ref), final_state(run)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
    want = json.loads((ref / "train_loss_rank0.json").read_text())
    assert set(want["callback_metrics"]) == {"train_loss", "train_loss_step", "train_loss_epoch"}
    assert set(want["progress_bar"]) == {"train_loss_step", "train_loss_epoch"}
    for rank in range(4):
        got = json.loads((run / f"train_loss_rank{rank}.json").read_text())
        for key in ("logged", "returned"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (rank, key)
        for key in ("callback_metrics", "progress_bar"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (rank, key)


def test_last_stage_pairs_the_first_stages_batch_and_ties_survive_fit(tmp_path: Path) -> None:
    """Every process loads its own batch. With a shuffled DataLoader outside the distributed sampler and dropout in
    the first stage only, the two processes' orders part in the second epoch: the last stage's loss must still
    take the targets of the samples the first stage fed (before, it took those of its own, other samples, from
    step 4 on, and no error said so). Weights tied inside one stage (TaggedMLP's last two layers) are still one
    parameter after fit in every process, also in the one that did not hold that stage (before, it had two)."""
    L.seed_everything(0, verbose=False)
    model = TaggedMLP(tmp_path)
    before = sum(p.numel() for p in model.parameters())
    data = DataLoader(tagged_rows(), batch_size=8, shuffle=True, drop_last=True)
    fit(tmp_path, strategy=_pp("1f1b", n_microbatches=2), devices=2, model=model, data=data, max_steps=-1,
        max_epochs=2)  # fmt: skip
    first, last = (json.loads((tmp_path / f"tagged_rank{r}.json").read_text()) for r in range(2))
    assert len(first["inputs"]) == 8  # 2 epochs of 4 batches of 8
    assert first["inputs"] != last["inputs"]  # the processes did load different batches
    # The step's last 8 targets: torch's shape-finding pass may take one more loss of the first micro-batch.
    assert [last["targets"][str(step)][-8:] for step in range(8)] == first["inputs"]
    for rank in range(2):
        assert json.loads((tmp_path / f"ties_rank{rank}.json").read_text()) == {
            "tied": True,
            "parameters": before,
        }


def test_clipping_and_accumulation_match_single_process(tmp_path: Path) -> None:
    """Clipping by the norm over all stages, with two accumulated batches per optimizer step."""
    kw = {"gradient_clip_val": 0.05, "accumulate_grad_batches": 2, "max_steps": 2}
    ref = fit(tmp_path / "ref", **kw)
    run = fit(tmp_path / "pp", strategy=_pp("interleaved_1f1b"), devices=2, **kw)
    _assert_same_training(ref, run)


def test_checkpoint_roundtrip_and_exact_resume(tmp_path: Path) -> None:
    """Pipeline (2 stages) -> checkpoint -> plain module, plain Trainer, and a 4-stage pipeline: all continue
    exactly as an uninterrupted run."""
    data = loader(n=16)  # 2 batches per epoch: checkpoints fall on epoch ends
    whole = fit(tmp_path / "whole", data=data, max_steps=-1, max_epochs=2)
    # The two pipelined launches each in a fresh interpreter (see in_fresh_interpreter).
    half = _fit_pipelined(tmp_path / "half", "1f1b", n=16, max_steps=-1, max_epochs=1)
    ckpt = torch.load(half / "final.ckpt", map_location="cpu", weights_only=False)
    plain = TinyLM()
    plain.load_state_dict(ckpt["state_dict"])  # strict: every key of the full model, no pipeline needed
    assert set(ckpt["optimizer_states"][0]["state"]) == set(range(len(list(plain.parameters()))))

    as_plain = fit(
        tmp_path / "plain", data=data, max_steps=-1, max_epochs=2, ckpt_path=str(half / "final.ckpt")
    )
    as_four = _fit_pipelined(
        tmp_path / "four",
        "interleaved_1f1b",
        n=16,
        max_steps=-1,
        max_epochs=2,
        ckpt_path=str(half / "final.ckpt"),
    )
    assert losses(half) == pytest.approx(losses(whole)[:2], rel=1e-6)
    for resumed in (as_plain, as_four):
        assert losses(resumed) == pytest.approx(losses(whole)[2:], rel=1e-6)
        for k, v in final_state(whole).items():
            torch.testing.assert_close(final_state(resumed)[k], v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("part", ["validate:zero_bubble", "validate:zbv", "predict:gpipe"])
def test_validate_and_predict_equal_the_plain_module(part: str, tmp_path: Path) -> None:
    """Each launch in a fresh interpreter (see :func:`~tests.pipeline.common.in_fresh_interpreter`); the check
    itself is :func:`check_validate_and_predict`. ``zbv`` is V-shaped: its last stage sits on process 0."""
    code = (
        "import sys; from pathlib import Path; "
        "from tests.pipeline.test_strategy import check_validate_and_predict; "
        "check_validate_and_predict(Path(sys.argv[1]), sys.argv[2])"
    )
    in_fresh_interpreter("-c", code, str(tmp_path), part)


def check_validate_and_predict(tmp_path: Path, part: str) -> None:
    """``validate:<schedule>``: pipelined validation equals the plain module's with batches of 8, 8 and 4;
    ``predict:<schedule>``: every process returns the plain module's outputs."""
    kind, schedule = part.split(":")
    L.seed_everything(0, verbose=False)
    model = TinyLM()
    val = torch.utils.data.DataLoader(dataset(20, seed=1), batch_size=8)  # batches of 8, 8 and 4
    kw = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    if kind == "validate":
        plain = L.Trainer(devices=1, **kw).validate(model, val, verbose=False)[0]
        piped = L.Trainer(devices=2, strategy=_pp(schedule), use_distributed_sampler=False, **kw).validate(
            model, val, verbose=False
        )[0]
        assert piped["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-6)
        assert piped["val_acc"] == pytest.approx(plain["val_acc"], rel=1e-6)
        return
    pm = PredictLM()
    pm.load_state_dict(model.state_dict())
    # Prediction needs no target: (inputs, target) batches, bare input tensors, and an inputs-only TensorDataset's
    # [inputs] (before, a bare tensor's first two samples were taken for inputs and target).
    inputs = dataset(20, seed=1).tensors[0]
    loaders = [val, DataLoader(inputs, batch_size=8), DataLoader(TensorDataset(inputs), batch_size=8)]
    L.Trainer(devices=2, strategy=_pp(schedule), use_distributed_sampler=False,
              callbacks=[SavePredictions(tmp_path)], **kw).predict(pm, loaders, return_predictions=False)  # fmt: skip
    expected = [model(x) for x, _ in val]
    for rank in range(2):  # every process returns the last stage's output
        for loader_index in range(3):
            for i, want in enumerate(expected):
                got = torch.load(tmp_path / f"rank{rank}_loader{loader_index}_batch{i}.pt")
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_validation_with_replicas_averages_over_all_of_them(tmp_path: Path) -> None:
    """2 stages x 2 replicas, each validating half the data: val_loss and val_acc are those of the whole set, as
    one process computes them. Before, they were replica 0's half alone."""
    code = "from tests.pipeline.test_strategy import check_validation_with_replicas; check_validation_with_replicas()"
    in_fresh_interpreter("-c", code)


def check_validation_with_replicas() -> None:
    L.seed_everything(0, verbose=False)
    model = TinyLM()
    val = torch.utils.data.DataLoader(dataset(32, seed=1), batch_size=8)  # 2 batches of 8 per replica
    kw = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    plain = L.Trainer(devices=1, **kw).validate(model, val, verbose=False)[0]
    piped = L.Trainer(devices=4, strategy=_pp("1f1b", pipeline_size=2, n_microbatches=2), **kw).validate(
        model, val, verbose=False
    )[0]
    assert piped["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-6)
    assert piped["val_acc"] == pytest.approx(plain["val_acc"], rel=1e-6)


def test_quantization_aware_training_matches_single_process(tmp_path: Path) -> None:
    """QATPrecision's fake-quantized layers, the head among them (a pipeline layer itself, which the plugin swaps):
    the pipeline trains as one process does. Before, setup failed on the layers' non-tensor state (a dict)."""
    code = (
        "import sys; from pathlib import Path; "
        "from tests.pipeline.test_strategy import check_quantization_aware_training; "
        "check_quantization_aware_training(Path(sys.argv[1]))"
    )
    in_fresh_interpreter("-c", code, str(tmp_path))


def check_quantization_aware_training(tmp_path: Path) -> None:
    from lightning_speedup.quantization import QATPrecision

    def plugins() -> list[QATPrecision]:
        return [QATPrecision("int8", base="32-true", exclude_first_last=False)]

    ref = fit(tmp_path / "ref", plugins=plugins())
    run = fit(tmp_path / "pp", strategy=_pp("1f1b"), devices=2, plugins=plugins())
    _assert_same_training(ref, run)
    float_run = fit(tmp_path / "float")
    assert losses(float_run)[1:] != pytest.approx(losses(ref)[1:], rel=1e-6)  # fake quantization was on


def test_meta_device_model_is_materialised_per_stage(tmp_path: Path) -> None:
    """Built on the meta device, the model never exists whole: each process allocates only its stages."""
    with torch.device("meta"):
        model = TinyLM()
    total = sum(p.numel() for p in TinyLM().parameters())
    run = fit(tmp_path, strategy=_pp("1f1b"), devices=2, model=model, max_steps=2)
    held = [json.loads((run / f"held_params_rank{r}.json").read_text()) for r in range(2)]
    assert sum(held) == total and max(held) < total
    assert all(torch.isfinite(torch.tensor(losses(run))))
    trained = final_state(run)
    TinyLM().load_state_dict(trained)
    # The launching process (spawn) never set up: its meta-device model receives the trained weights whole.
    assert not [n for n, t in model.state_dict().items() if t.device.type == "meta"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)


def test_a_failed_spawn_run_with_a_meta_model_raises_its_own_error(tmp_path: Path) -> None:
    """The workers fail before any weights come back: the launching process reports the workers' error, not a
    second one from moving its still-meta model to the CPU at teardown, and the model stays as it was built."""
    with torch.device("meta"):
        model = FailsOnTrainStart()
    with pytest.raises(Exception, match="failed on purpose before the first step") as raised:
        fit(tmp_path, strategy=_pp("1f1b"), devices=2, model=model, max_steps=2)
    assert "meta tensor" not in str(raised.value)
    assert all(t.device.type == "meta" for t in model.state_dict().values())
    assert "cpu" not in vars(model)  # teardown's stand-in for `.cpu()` is gone again


# ---------------------------------------------------------------------- bad input, each before training


def test_unknown_schedule_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"Unknown pipeline schedule 'pipedream'.*'gpipe', '1f1b'"):
        PipelineStrategy(schedule="pipedream")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": "1f1b", "pipeline_size": 2, "n_microbatches": 1}, "at least as many micro-batches"),
        ({"schedule": "interleaved_1f1b", "stages_per_rank": 1}, "stages_per_rank must be >= 2"),
        ({"schedule": "gpipe", "stages_per_rank": 2}, "stages_per_rank must be 1"),
        ({"schedule": "zero_bubble", "pipeline_size": 2, "n_microbatches": 3}, "multiple of pipeline_size"),
        (
            {"schedule": "zbv", "stages_per_rank": 3},
            "two stages per process in a V: stages_per_rank must be 2",
        ),
        (
            {"schedule": "dualpipev", "pipeline_size": 2, "n_microbatches": 3},
            r"n_microbatches >= 2 \* pipeline_size",
        ),
        ({"pipeline_size": 0}, r"pipeline_size must be an int >= 1 \(processes per pipeline\), got 0"),
        ({"balance": "flops"}, "balance must be 'params' or 'time'"),
    ],
)
def test_bad_settings_rejected_at_construction(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PipelineStrategy(**kwargs)  # type: ignore[arg-type]


def _one_process_trainer(strategy: PipelineStrategy | str, **trainer_kwargs: object) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        **{"max_steps": 2, **trainer_kwargs},
    )


def _fit_one_process(
    model: L.LightningModule, strategy: PipelineStrategy | str, data: object = None, **trainer_kwargs: object
) -> L.Trainer:
    trainer = _one_process_trainer(strategy, **trainer_kwargs)
    trainer.fit(model, data if data is not None else loader())
    return trainer


class _NoLayers(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 2)

    def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
        raise AssertionError("never reached: the strategy refuses the module in setup")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _PairBlock(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.block(x), None  # e.g. (hidden, attention weights)


class _TupleOut(TinyLM):
    def __init__(self) -> None:
        super().__init__()
        self.blocks[1] = _PairBlock(self.blocks[1])


class _Tied(TinyLM):
    def __init__(self) -> None:
        super().__init__()
        self.head.weight = self.embed.tok.weight  # (VOCAB, WIDTH) both: an embedding tied to the output head


class _DictRows(Dataset):
    """TinyLM's samples as ``{"x": inputs, "y": target}``."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = dataset()[i]
        return {"x": x, "y": y}


class _ManualOptimization(TinyLM):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        loss = self.pipeline_loss(self(batch[0]), batch[1])
        opt.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(loss)
        opt.step()  # type: ignore[union-attr]
        return loss


@pytest.mark.parametrize(
    ("model", "strategy", "data", "error", "match"),
    [
        (
            TinyLM(n_blocks=0),
            PipelineStrategy("interleaved_1f1b", stages_per_rank=3, n_microbatches=2),
            None,
            ValueError,
            "Cannot split 2 layer",
        ),
        (
            TinyLM(),
            PipelineStrategy("1f1b", n_microbatches=3),
            None,
            ValueError,
            "divisible by n_microbatches",
        ),
        (
            TinyLM(),
            PipelineStrategy("1f1b", n_microbatches=4),
            loader(n=12, drop_last=False),
            ValueError,
            "drop_last=True",
        ),
        (_NoLayers(), PipelineStrategy("1f1b"), None, TypeError, "define `pipeline_layers"),
        (_Tied(), PipelineStrategy("interleaved_1f1b", n_microbatches=2), None, ValueError, "tied weights"),
        (TinyLM(), PipelineStrategy("1f1b", pipeline_size=2), None, ValueError, "multiple of pipeline_size"),
        (TinyLM(), PipelineStrategy("1f1b", balance="time"), None, ValueError, "example_input_array"),
        # Before, a bare KeyError: 0.
        (
            TinyLM(),
            PipelineStrategy("1f1b", n_microbatches=2),
            DataLoader(_DictRows(), batch_size=8, drop_last=True),
            TypeError,
            r"got a dict batch\. Define pipeline_batch\(batch\) -> \(inputs, target\)",
        ),
        # Before, the batch's first two samples were taken for inputs and target.
        (
            TinyLM(),
            PipelineStrategy("1f1b", n_microbatches=2),
            DataLoader(dataset().tensors[0], batch_size=8, drop_last=True),
            TypeError,
            r"got a Tensor batch\. Define pipeline_batch",
        ),
        (
            _TupleOut(),
            PipelineStrategy("1f1b", n_microbatches=2),
            None,
            TypeError,
            r"pipeline_layers\(\)\[2\] \(_PairBlock\) returned a tuple, but a pipelined layer must return one tensor",
        ),
        # Before, the optimizer never stepped (the strategy replaces training_step), so max_steps was never
        # reached and fit looped forever.
        (
            _ManualOptimization(),
            PipelineStrategy("1f1b", n_microbatches=2),
            None,
            ValueError,
            r"needs automatic optimization.*automatic_optimization = False",
        ),
    ],
    ids=[
        "more-stages-than-layers",
        "indivisible-batch",
        "changed-shape",
        "no-layers",
        "tied",
        "world-size",
        "time-without-example",
        "dict-batch",
        "tensor-batch",
        "tuple-output",
        "manual-optimization",
    ],
)
def test_bad_input_gets_a_clear_error(
    model: L.LightningModule, strategy: PipelineStrategy, data: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        _fit_one_process(model, strategy, data)


def test_fp16_with_a_loss_scaler_is_refused() -> None:
    """precision="16-mixed" (here its plugin with a CPU GradScaler, as Lightning builds it on a GPU): the schedule
    differentiates the unscaled loss, so the scaler divided the true gradients by 65536 (SGD barely moved)."""
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(
        ValueError, match=r"fp16 mixed precision with a loss scaler.*Use precision='bf16-mixed'"
    ):
        _fit_one_process(TinyLM(), PipelineStrategy("1f1b", n_microbatches=2), plugins=[plugin])


def test_runs_in_one_process_reuse_the_process_groups() -> None:
    """Each setup (fit, validate, test, predict) asks for its pipeline and replica groups. Before, every one made
    new groups that were never destroyed, so a long-lived process (a notebook, rank 0 under popen) piled them up;
    now a second run, even with a new Trainer and strategy, reuses them."""
    from torch.distributed.distributed_c10d import _world  # private: the only census of live process groups

    alive = []
    for _ in range(3):
        _fit_one_process(TinyLM(), PipelineStrategy("1f1b", n_microbatches=2))
        alive.append(len(_world.pg_map))
    assert alive[0] == alive[1] == alive[2]


def test_sync_batchnorm_is_refused_instead_of_ignored() -> None:
    with pytest.raises(ValueError, match=r"does not support Trainer\(sync_batchnorm=True\)"):
        _fit_one_process(BatchNormLM(), PipelineStrategy("1f1b", n_microbatches=2), sync_batchnorm=True)


def test_adjacent_local_stages_are_refused_on_a_torch_that_cannot_run_them() -> None:
    for version in ("2.8.0", "2.10.0+cu128"):
        for schedule, pipeline_size in (
            ("zbv", 2),
            ("dualpipev", 4),
            ("interleaved_1f1b", 1),
            ("zero_bubble", 1),
        ):
            problem = adjacent_local_stages_problem(schedule, pipeline_size, 2, version)
            assert problem and f"torch {version}" in problem and "torch 2.11 or newer" in problem, schedule
        for schedule, pipeline_size in (
            ("gpipe", 2),
            ("1f1b", 1),
            ("interleaved_1f1b", 2),
            ("zero_bubble", 4),
        ):
            assert adjacent_local_stages_problem(schedule, pipeline_size, 2, version) is None, schedule
    assert adjacent_local_stages_problem("interleaved_1f1b", 1, 2, "2.11.0+cu130") is None
    assert adjacent_local_stages_problem("zbv", 2, 2, "2.13.0+cpu") is None
    assert adjacent_local_stages_problem("dualpipev", 2, 2, "2.15.0") is None


@needs_local_stages
def test_time_balance_measures_layers() -> None:
    model = TinyLM(n_blocks=2)
    model.example_input_array = dataset()[:2][0]
    strategy = PipelineStrategy("interleaved_1f1b", stages_per_rank=2, n_microbatches=2, balance="time")
    _fit_one_process(model, strategy)
    assert strategy.plan is not None and strategy.plan.balance == "time"
    assert all(c > 0 for c in strategy.plan.costs)


def test_bench_gpt_is_pipeline_ready(tmp_path: Path) -> None:
    """The char-LM GPT of the bench pipelines as it is (untied embeddings): same training as without."""
    from lightning_speedup.bench.modules import CharLM

    def gpt(tie: bool = False) -> CharLM:
        L.seed_everything(0, verbose=False)
        return CharLM(
            vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0, tie_weights=tie
        )

    ref = fit(tmp_path / "ref", model=gpt(), max_steps=3)
    run = fit(tmp_path / "pp", model=gpt(), strategy=_pp("1f1b"), devices=2, max_steps=3)
    a, b = final_state(ref), final_state(run)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"lm_head\.weight.*tied weights"):
        _fit_one_process(gpt(tie=True), PipelineStrategy("interleaved_1f1b", n_microbatches=2))


def test_a_second_fit_may_bring_another_batch_size() -> None:
    """``trainer.fit`` twice in one process, the second with smaller batches: trains as the plain module does.
    Before, the second fit kept the first fit's batch shapes and refused its first batch as a changed shape."""

    def two_fits(strategy: PipelineStrategy | str) -> dict[str, torch.Tensor]:
        L.seed_everything(0, verbose=False)
        model = TinyLM(optimizer="sgd")  # Adam magnifies summation-order noise on near-zero gradients
        trainer = _fit_one_process(model, strategy, loader(n=16, batch_size=8), max_steps=-1, max_epochs=1)
        trainer.fit_loop.max_epochs = 2
        trainer.fit(model, loader(n=16, batch_size=4))
        assert trainer.global_step == 6
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    plain = two_fits("auto")
    piped = two_fits(PipelineStrategy("1f1b", n_microbatches=2))
    for k, v in plain.items():
        torch.testing.assert_close(piped[k], v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("limit", [None, 2])
def test_a_short_last_training_batch_is_refused_before_the_first_step(limit: int | None) -> None:
    """Batches of 8, 8 and 4 (drop_last=False): refused before any step, naming the short batch and the fix. Before,
    the run trained the first two batches and failed only at the third (after a whole epoch, in a real run).
    With limit_train_batches=2 the short batch never comes, and training runs."""
    trainer = _one_process_trainer(
        PipelineStrategy("1f1b", n_microbatches=4), max_steps=-1, max_epochs=1, limit_train_batches=limit
    )
    data = loader(n=20, batch_size=8, drop_last=False)
    if limit is not None:
        trainer.fit(TinyLM(), data)
        assert trainer.global_step == 2
        return
    with pytest.raises(ValueError, match=r"last batch of each epoch has 4 sample\(s\).*drop_last=True"):
        trainer.fit(TinyLM(), data)
    assert trainer.global_step == 0
