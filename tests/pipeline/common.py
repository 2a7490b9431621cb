"""A small pipeline-ready model and the runs the pipeline tests compare."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_speedup.pipeline.strategy import adjacent_local_stages_problem
from tests.launch_env import LAUNCH_RANK_VARIABLES

VOCAB, CONTEXT, WIDTH = 16, 8, 16
# What Lightning's launchers leave in os.environ; a process that inherits them launches no peers.
LAUNCH_VARIABLES = (*LAUNCH_RANK_VARIABLES, "MASTER_PORT")
# For a training run whose schedule puts two adjacent stages in one process: the strategy refuses it on a torch
# that cannot pass between them.
needs_local_stages = pytest.mark.skipif(
    adjacent_local_stages_problem("zbv", 2, 2, torch.__version__) is not None,
    reason=f"torch {torch.__version__} cannot pass between adjacent stages of one process",
)


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, WIDTH)

    def forward(self, idx: Tensor) -> Tensor:
        return self.tok(idx)  # (B, T, C)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.tanh(self.fc(self.norm(x)))


class TinyLM(L.LightningModule):
    """Embedding, ``n_blocks`` residual blocks, a head: the shape of a GPT, small enough for many CPU runs."""

    def __init__(self, n_blocks: int = 4, lr: float = 0.05, optimizer: str = "adam") -> None:
        super().__init__()
        self.embed = Embed()
        self.blocks = nn.ModuleList([Block() for _ in range(n_blocks)])
        self.head = nn.Linear(WIDTH, VOCAB)
        self.lr, self.optimizer_name = lr, optimizer
        self.train_losses: list[float] = []

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def pipeline_layers(self) -> list[nn.Module]:
        return [self.embed, *self.blocks, self.head]

    def pipeline_loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output.flatten(0, 1), target.flatten())

    def pipeline_metrics(self, output: Tensor, target: Tensor) -> dict[str, Tensor]:
        return {"acc": (output.argmax(-1) == target).float().mean()}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.pipeline_loss(self(batch[0]), batch[1])
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        out = self(batch[0])
        self.log("val_loss", self.pipeline_loss(out, batch[1]))
        self.log("val_acc", self.pipeline_metrics(out, batch[1])["acc"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def in_fresh_interpreter(*argv: str) -> None:
    """Runs ``python *argv`` in a new interpreter at the repository root, without the launch variables of this
    one, so that no launch inherits a process group, thread or environment variable that the suite's earlier
    modules or launches left behind; fails with the tail of its output if it exits non-zero."""
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": repo, "PYTHONWARNINGS": "ignore"}
    for key in LAUNCH_VARIABLES:
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, *argv], cwd=repo, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def dataset(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, CONTEXT), generator=g)
    y = (x + 1) % VOCAB  # learnable: next symbol
    return TensorDataset(x, y)


def loader(n: int = 64, batch_size: int = 8, drop_last: bool = True) -> DataLoader:
    return DataLoader(dataset(n), batch_size=batch_size, shuffle=False, drop_last=drop_last)


class RecordLosses(L.Callback):
    """Writes the per-step train loss (rank 0), what every rank logged and returned as the train loss, and the
    final full checkpoint (every rank takes part)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.losses: list[float] = []
        self.returned: list[float] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        m = trainer.callback_metrics
        self.losses.append(float(m["train_loss_step"] if "train_loss_step" in m else m["train_loss"]))
        self.returned.append(float(outputs["loss"]))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        held = sum(p.numel() for p in pl_module.parameters() if p.device.type != "meta")
        (self.out / f"held_params_rank{trainer.global_rank}.json").write_text(json.dumps(held))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.out / "final.ckpt")
        seen = {
            "logged": self.losses,
            "returned": self.returned,
            "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if "loss" in k},
            "progress_bar": {k: float(v) for k, v in trainer.progress_bar_metrics.items() if "loss" in k},
        }
        (self.out / f"train_loss_rank{trainer.global_rank}.json").write_text(json.dumps(seen))
        if trainer.global_rank == 0:
            (self.out / "losses.json").write_text(json.dumps(self.losses))
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            (self.out / "metrics.json").write_text(json.dumps(metrics))


def fit(
    out: Path,
    strategy: Any = "auto",
    devices: int = 1,
    max_steps: int = 4,
    seed: int = 0,
    module_kwargs: dict[str, Any] | None = None,
    ckpt_path: str | None = None,
    data: Any = None,
    model: L.LightningModule | None = None,
    **trainer_kwargs: Any,
) -> Path:
    """Train TinyLM and leave ``final.ckpt``, ``losses.json`` and ``metrics.json`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(seed, verbose=False)
    model = model if model is not None else TinyLM(**(module_kwargs or {}))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[RecordLosses(out)],
        use_distributed_sampler=False,
        **trainer_kwargs,
    )
    if isinstance(data, L.LightningDataModule):
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    else:
        trainer.fit(model, train_dataloaders=data if data is not None else loader(), ckpt_path=ckpt_path)
    return out


def final_state(out: Path) -> dict[str, Tensor]:
    return torch.load(out / "final.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def losses(out: Path) -> list[float]:
    return json.loads((out / "losses.json").read_text())


class ReplicaShards(L.LightningDataModule):
    """Replica ``d`` of ``dp`` gets rows ``[8i + 4d, 8i + 4d + 4)`` of batch ``i``: together the replicas see
    exactly the single-process batches of :func:`loader`, so the runs are comparable."""

    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        strategy = self.trainer.strategy
        dp, d = strategy.dp_size, strategy.dp_rank
        share = self.batch_size // dp
        data = dataset()
        idx = [
            i * self.batch_size + d * share + j
            for i in range(len(data) // self.batch_size)
            for j in range(share)
        ]
        return DataLoader(torch.utils.data.Subset(data, idx), batch_size=share, shuffle=False, drop_last=True)


class PredictLM(TinyLM):
    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self(batch[0])


class SavePredictions(L.Callback):
    """Each process saves what ``predict_step`` returned (picklable, for spawned processes)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        torch.save(
            outputs, self.out / f"rank{trainer.global_rank}_loader{dataloader_idx}_batch{batch_idx}.pt"
        )


class FailsOnTrainStart(TinyLM):
    """Raises in every training process before its first step (picklable, for spawned processes)."""

    def on_train_start(self) -> None:
        raise ValueError("failed on purpose before the first step")


class ChannelBatchNorm(nn.Module):
    """BatchNorm over the channels of ``(B, T, C)``: it transposes its input, so its input gradient is strided."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x.transpose(1, 2)).transpose(1, 2).contiguous()


class BatchNormLM(TinyLM):
    """TinyLM with a BatchNorm that opens the second of two stages (its running statistics are state that every
    forward changes)."""

    def __init__(self) -> None:
        super().__init__(n_blocks=3)
        self.norm = ChannelBatchNorm()

    def forward(self, idx: Tensor) -> Tensor:
        x = idx
        for layer in self.pipeline_layers():
            x = layer(x)
        return x

    def pipeline_layers(self) -> list[nn.Module]:
        return [self.embed, *self.blocks[:2], self.norm, *self.blocks[2:], self.head]


class ReplicaOffsetLM(TinyLM):
    """TinyLM whose data-parallel replicas start apart, as models built in separate processes without one seed do:
    in ``setup`` (before the strategy places the stages) each process shifts its weights by 0.01 x its replica
    index. One process, and a pipeline's first replica, keep the weights as built."""

    def setup(self, stage: str) -> None:
        shift = getattr(self.trainer.strategy, "dp_rank", 0)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(0.01 * shift)


def tagged_rows(n: int = 32) -> TensorDataset:
    """Rows of 8 features whose first is the sample's id / 64; the target is the row itself."""
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
    x[:, 0] = torch.arange(n) / 64
    return TensorDataset(x, x.clone())


def _ids(rows: Tensor) -> list[int]:
    return (rows[:, 0] * 64).round().int().tolist()


class TaggedMLP(L.LightningModule):
    """Four Linear+Tanh layers over :func:`tagged_rows`: dropout in the first layer only, so that the processes'
    random streams (and the order a shuffled DataLoader draws from them) part after the first epoch, and the last
    two layers, which make one stage of two, share a weight. Each process writes, per step, the sample ids of the
    inputs it loaded and of the targets its loss saw (``tagged_rank<r>.json``), and whether the weight is still
    shared after fit (``ties_rank<r>.json``)."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4))
        self.layers[0].append(nn.Dropout(0.5))
        self.layers[3][0].weight = self.layers[2][0].weight
        self.out = out
        self.inputs: list[list[int]] = []
        self.targets: dict[int, list[int]] = {}

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def pipeline_layers(self) -> list[nn.Module]:
        return list(self.layers)

    def pipeline_batch(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        self.inputs.append(_ids(batch[0]))
        return batch[0], batch[1]

    def pipeline_loss(self, output: Tensor, target: Tensor) -> Tensor:
        self.targets.setdefault(self.trainer.global_step, []).extend(_ids(target))
        return F.mse_loss(output, target)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.pipeline_loss(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_train_end(self) -> None:
        seen = {"inputs": self.inputs, "targets": self.targets}
        (self.out / f"tagged_rank{self.global_rank}.json").write_text(json.dumps(seen))

    def teardown(self, stage: str) -> None:  # after the strategy's teardown has reassembled the model
        ties = {
            "tied": self.layers[3][0].weight is self.layers[2][0].weight,
            "parameters": sum(p.numel() for p in self.parameters()),
        }
        (self.out / f"ties_rank{self.global_rank}.json").write_text(json.dumps(ties))
