"""QATPrecision inside Trainer.fit: schedule, autocast, exact resume, DDP, and QAT beating PTQ on real data."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_speedup._process_group import CleanExitDDPStrategy
from lightning_speedup.quantization import QATLinear, QATPrecision, convert, qat_modules, quantize
from lightning_speedup.quantization.report import compare, recovered_share


class FlatClassifier(L.LightningModule):
    """An MLP on flattened 28x28 images; records autocast state for the tests."""

    def __init__(self, width: int = 64, depth: int = 3, lr: float = 1e-3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(784, width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 10))
        self.lr = lr
        self.autocast_seen: list[tuple[bool, torch.dtype]] = []

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        self.autocast_seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return F.cross_entropy(self(x).float(), y)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class RecordFlags(Callback):
    """Per training batch: (fake quant on, scales frozen) of the first QAT layer, seen by the forward."""

    def __init__(self) -> None:
        self.flags: list[tuple[bool, bool]] = []

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int
    ) -> None:
        layer = next(m for _, m in qat_modules(pl_module))
        self.flags.append((layer.fake_quant_enabled, layer.scales_frozen))


def _trainer(tmp_path: Path, plugins: list[Any], **kwargs: Any) -> L.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        accelerator="cpu", devices=1, plugins=plugins, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


def _loader(x: Tensor, y: Tensor, batch_size: int = 128, shuffle: bool = False, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": "int5"}, "Unknown weight format 'int5'"),
        ({"base": "16-mixed"}, "base='16-mixed' is not supported"),
        ({"start_step": -1}, "start_step must be an int >= 0"),
        ({"start_step": 10, "freeze_step": 5}, r"freeze_step must be None or an int >= start_step \(10\)"),
        ({"group_size": 33, "weights": "int4"}, "group_size=33 is not supported for int4"),
        ({"indivisible": "drop"}, "indivisible must be 'skip' or 'error'"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QATPrecision(**{"weights": "nf4", **kwargs})


def test_schedule_and_bf16_autocast(tmp_path: Path, fmnist: Any) -> None:
    model = FlatClassifier()
    plugin = QATPrecision("int4", base="bf16-mixed", start_step=3, freeze_step=6)
    flags = RecordFlags()
    _trainer(tmp_path, [plugin], max_steps=8, callbacks=[flags]).fit(
        model, _loader(fmnist.x_train[:1024], fmnist.y_train[:1024])
    )
    assert flags.flags == [(False, False)] * 3 + [(True, False)] * 3 + [(True, True)] * 2
    assert plugin.step == 8 and model.trainer.precision == "bf16-mixed"
    assert set(model.autocast_seen) == {(True, torch.bfloat16)}
    assert isinstance(model.net[2], QATLinear) and type(model.net[0]) is nn.Linear  # first/last stay float
    # Learnable parameters went into the optimizer: the plugin swapped layers before it was built.
    opt_params = {id(p) for g in model.trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(model.net[2].weight) in opt_params


def _fit(
    tmp_path: Path, fmnist: Any, epochs: int, ckpt: str | None = None, **plugin_kwargs: Any
) -> tuple[L.Trainer, FlatClassifier]:
    torch.manual_seed(0)
    model = FlatClassifier()
    plugin = QATPrecision("int4", base="32-true", start_step=10, freeze_step=24, scale="lsq", **plugin_kwargs)
    trainer = _trainer(tmp_path, [plugin], max_epochs=epochs)
    trainer.fit(model, _loader(fmnist.x_train[:2048], fmnist.y_train[:2048]), ckpt_path=ckpt)
    return trainer, model


def test_resume_mid_qat_is_bitwise_exact(tmp_path: Path, fmnist: Any) -> None:
    _, straight = _fit(tmp_path, fmnist, epochs=3)  # 48 steps: QAT on at 10, scales frozen at 24

    first, _ = _fit(tmp_path, fmnist, epochs=1)  # stops at step 16: QAT on, LSQ scales learning
    ckpt = tmp_path / "mid-qat.ckpt"
    first.save_checkpoint(ckpt)
    resumed_trainer, resumed = _fit(tmp_path, fmnist, epochs=3, ckpt=str(ckpt))
    assert resumed_trainer.precision_plugin.step == 48

    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and "net.2.weight_scale" in a
    for key in a:
        if isinstance(a[key], Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key
    assert resumed.net[2].scales_frozen

    # The checkpoint's model weights are float-shaped: they load into the plain model, strictly.
    saved = torch.load(ckpt, weights_only=True)
    FlatClassifier().load_state_dict(saved["state_dict"])
    assert "net.2.weight_scale" in saved["QATPrecision"]["qat_state"]


class Evaluated(FlatClassifier):
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("test_loss", F.cross_entropy(self(batch[0]).float(), batch[1]))


def test_a_trained_model_tests_from_its_checkpoint_and_a_new_plugin_keeps_its_qat_on(
    tmp_path: Path, fmnist: Any
) -> None:
    """``fit`` then ``trainer.test(ckpt_path=...)`` on the same model: the checkpoint's float-shaped state dict was
    loaded strictly into the model that still held its QAT layers (missing frozen_scale, weight_scale, ...). And a
    new Trainer with a new plugin (its schedule at step 0) switched the trained model's fake quantization off and
    unfroze its scales, so it validated the float model and convert() gave another model."""
    torch.manual_seed(0)
    model, data = Evaluated(), _loader(fmnist.x_train[:2048], fmnist.y_train[:2048])

    def plugin() -> QATPrecision:
        return QATPrecision("int4", base="32-true", start_step=10, freeze_step=24, scale="lsq")

    trainer = _trainer(tmp_path, [plugin()], max_epochs=2)
    trainer.fit(model, data)
    ckpt = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(ckpt)
    layer = model.net[2]
    assert layer.fake_quant_enabled and layer.scales_frozen
    scale = layer.frozen_scale.clone()
    [from_memory] = _trainer(tmp_path, [plugin()]).test(model, data)
    [from_checkpoint] = trainer.test(model, data, ckpt_path=str(ckpt))
    assert from_checkpoint == from_memory
    assert layer.fake_quant_enabled and layer.scales_frozen and torch.equal(layer.frozen_scale, scale)

    fresh = (
        Evaluated()
    )  # a new process's model: plain layers, the QAT state from the checkpoint's plugin state
    [from_new_model] = _trainer(tmp_path, [plugin()]).test(fresh, data, ckpt_path=str(ckpt))
    assert from_new_model == from_memory and torch.equal(fresh.net[2].frozen_scale, scale)


def test_resume_with_another_recipe_is_refused(tmp_path: Path, fmnist: Any) -> None:
    first, _ = _fit(tmp_path, fmnist, epochs=1)
    ckpt = tmp_path / "int4.ckpt"
    first.save_checkpoint(ckpt)
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, [QATPrecision("nf4", base="32-true", scale="lsq")], max_epochs=2)
    with pytest.raises(ValueError, match=r"written by QATPrecision with \{'weights': 'int4'"):
        trainer.fit(
            FlatClassifier(), _loader(fmnist.x_train[:256], fmnist.y_train[:256]), ckpt_path=str(ckpt)
        )


def test_qat_recovers_most_of_the_ptq_loss_on_fashion_mnist(tmp_path: Path, fmnist: Any) -> None:
    """A narrow MLP whose every layer is fp4: PTQ costs a lot; the same fine-tuning budget with QAT wins it back."""
    torch.manual_seed(0)
    base = FlatClassifier(width=16, depth=2, lr=3e-3)
    train = _loader(fmnist.x_train, fmnist.y_train, batch_size=256, shuffle=True, seed=1)
    _trainer(tmp_path, [], max_steps=300).fit(base, train)

    def finetune(plugins: list[Any]) -> FlatClassifier:
        model = copy.deepcopy(base)
        model.lr = 3e-4
        loader = _loader(fmnist.x_train, fmnist.y_train, batch_size=256, shuffle=True, seed=2)
        _trainer(tmp_path, plugins, max_steps=100).fit(model, loader)
        return model

    fp = finetune([])
    qat = finetune([QATPrecision("fp4", base="32-true", exclude_first_last=False)])
    ptq = quantize(fp, "fp4", exclude_first_last=False)
    report = compare(
        fp, ptq, convert(qat), _loader(fmnist.x_test, fmnist.y_test, batch_size=500), timing_repeats=1
    )
    loss = {r.name: r.loss for r in report.rows}
    assert loss["ptq"] - loss["float"] > 0.02, f"PTQ should hurt this model: {loss}"
    assert report.recovered_loss is not None and report.recovered_loss > 0.5, report.to_markdown()
    assert report.recovered_loss == pytest.approx(recovered_share(loss["float"], loss["ptq"], loss["qat"]))
    assert report.row("qat").weight_bytes < 0.2 * report.row("float").weight_bytes


class _CheckRanksAgree(Callback):
    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        layer = pl_module.net[2]
        assert layer.fake_quant_enabled and layer.scales_frozen
        local = torch.cat(
            [layer.weight.detach().reshape(-1), layer.weight_scale.detach(), layer.frozen_scale]
        )
        gathered = trainer.strategy.all_gather(local)
        assert torch.equal(gathered[0], gathered[1]), "ranks diverged"


def test_ddp_with_learnable_scales(tmp_path: Path, fmnist: Any) -> None:
    """Two gloo ranks: learnable scales unused before start_step and after freeze_step must not break DDP."""
    torch.manual_seed(0)
    # Spawned, not forked: earlier tests in this process ran bitsandbytes' OpenMP CPU kernels, and a
    # forked child that uses an OpenMP pool inherited from its parent can deadlock (seen: both ranks
    # hung in their first broadcast when this test ran after the others). The project's DDP base class, so that
    # the spawned processes destroy their gloo group before exit (lightning_speedup/_process_group.py).
    strategy = CleanExitDDPStrategy(start_method="spawn")
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=6, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
        plugins=[QATPrecision("nf4", base="32-true", start_step=2, freeze_step=4, scale="lsq")],
        callbacks=[_CheckRanksAgree()],
    )  # fmt: skip
    model = FlatClassifier(width=32, depth=2)
    trainer.fit(model, _loader(fmnist.x_train[:512], fmnist.y_train[:512], batch_size=32))
    assert trainer.state.finished


class _SaveBetweenAveragings(Callback):
    """After step 6 of local SGD with sync_every=4 (last averaging at step 4): each parameter's mean over the ranks,
    then a checkpoint, which holds the averaged model."""

    def __init__(self, out: Path) -> None:
        self.out = out

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        gathered = {n: trainer.strategy.all_gather(p.detach()) for n, p in pl_module.named_parameters()}
        trainer.save_checkpoint(self.out / "mid-interval.ckpt")
        if trainer.is_global_zero:
            torch.save({n: g for n, g in gathered.items()}, self.out / "per-rank.pt")


def test_local_sgd_checkpoint_between_averagings(tmp_path: Path, fmnist: Any) -> None:
    """A checkpoint between averagings holds the ranks' average; with QAT layers, whose state_dict carries a
    dict of settings (``_extra_state``) beside the tensors, saving it crashed before."""
    from lightning_speedup.distributed import LocalSGDStrategy

    torch.manual_seed(0)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=LocalSGDStrategy(sync_every=4, start_method="spawn"), max_steps=6,
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=tmp_path, plugins=[QATPrecision("int8", base="32-true")],
        callbacks=[_SaveBetweenAveragings(tmp_path)],
    )  # fmt: skip
    trainer.fit(FlatClassifier(width=32, depth=2), _loader(fmnist.x_train[:512], fmnist.y_train[:512], 32))
    per_rank = torch.load(tmp_path / "per-rank.pt")
    state = torch.load(tmp_path / "mid-interval.ckpt", weights_only=False)["state_dict"]
    assert any(not torch.equal(g[0], g[1]) for g in per_rank.values()), "the ranks should differ mid-interval"
    for name, g in per_rank.items():
        torch.testing.assert_close(state[name], g.mean(0), rtol=0, atol=1e-6)


class CompiledClassifier(FlatClassifier):
    """Compiles its network in ``configure_model`` (before the plugin swaps layers), as bench modules do."""

    @override
    def configure_model(self) -> None:
        self.__dict__["compiled"] = torch.compile(self.net)

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.__dict__["compiled"](x)


@pytest.mark.gpu
def test_bf16_qat_under_torch_compile_on_cuda(tmp_path: Path, fmnist: Any) -> None:
    """No graph breaks; turning fake quant on and freezing scales each cost one recompilation, nothing more."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = CompiledClassifier()
    plugin = QATPrecision("nf4", "int8", base="bf16-mixed", start_step=2, freeze_step=4, scale="lsq")
    trainer = L.Trainer(
        accelerator="gpu", devices=1, max_steps=8, plugins=[plugin], logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, _loader(fmnist.x_train[:2048], fmnist.y_train[:2048]))
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 3 * 2  # (float, fake quant, frozen) x at most 2 graphs each
    assert model.net[2].fake_quant_enabled and model.net[2].scales_frozen
    model.cuda()  # Lightning's single-device teardown moved it to the CPU
    real = convert(model.net)  # the uncompiled network: deepcopy and compiled wrappers do not mix
    x = fmnist.x_test[:256].cuda()
    model.net.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected, out = model.net(x).float(), real(x).float()
    torch.testing.assert_close(out, expected, rtol=3e-2, atol=3e-2 * expected.abs().max().item())


def test_an_unknown_autocast_device_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match=r"device='tpu' is not a device type torch autocast supports"):
        QATPrecision("int8", device="tpu")
    assert QATPrecision("int8", device="cpu").start_step == 0
