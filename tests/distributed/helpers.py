"""Shared pieces of the distributed tests: forked process groups, a small real char model, per-rank dumps.

Processes are forked (not spawned) so a 4-process gloo group costs a fraction of a second on a
2-core machine; Lightning runs use ``start_method="fork"`` for the same reason.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_speedup.bench.datasets import load_text_corpus

CONTEXT = 8


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int, world_size: int, port: int, backend: str, fn: Callable[..., None], args: tuple[Any, ...]
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_processes(fn: Callable[..., None], world_size: int, *args: Any, backend: str = "gloo") -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes of one process group (see ``start_method``).

    An exception in any process fails the calling test with that process's traceback. With
    ``backend="nccl"`` process ``r`` uses ``cuda:r`` (the parent must not have initialized CUDA).
    """
    mp.start_processes(
        _entry,
        args=(world_size, free_port(), backend, fn, args),
        nprocs=world_size,
        start_method=start_method(),
    )


def start_method() -> str:
    """``"fork"`` (fast), or ``"spawn"`` once CUDA is initialized in this process: a forked child cannot use
    CUDA then, and on a GPU machine importing bitsandbytes (collected with the quantization tests) initializes it."""
    return "spawn" if torch.cuda.is_initialized() else "fork"


@cache
def char_windows(
    path: str, n_train: int = 4096, n_val: int = 1024
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Fixed windows of Tiny Shakespeare: (x_train, y_train, x_val, y_val, vocab) with ``CONTEXT`` chars -> next."""
    corpus = load_text_corpus(path)
    g = torch.Generator().manual_seed(0)

    def windows(ids: Tensor, n: int) -> tuple[Tensor, Tensor]:
        starts = torch.randint(0, len(ids) - CONTEXT - 1, (n,), generator=g)
        idx = starts[:, None] + torch.arange(CONTEXT + 1)
        w = ids[idx]  # (n, CONTEXT + 1)
        return w[:, :-1].contiguous(), w[:, -1].contiguous()

    xt, yt = windows(corpus.train_ids, n_train)
    xv, yv = windows(corpus.val_ids, n_val)
    return xt, yt, xv, yv, corpus.vocab_size


class CharMLP(L.LightningModule):
    """A small next-character model (embedding, MLP with BatchNorm) on real text; logs ``val_loss``.

    BatchNorm gives the strategies floating-point buffers (running statistics) and an integer one
    (``num_batches_tracked``) to keep consistent.
    """

    def __init__(
        self,
        vocab: int,
        optimizer: str = "adam",
        lr: float = 3e-3,
        momentum: float = 0.0,
        n_optimizers: int = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.emb = nn.Embedding(vocab, 16)
        self.net = nn.Sequential(
            nn.Linear(16 * CONTEXT, 64), nn.BatchNorm1d(64), nn.Tanh(), nn.Linear(64, vocab)
        )
        if n_optimizers > 1:
            self.automatic_optimization = False

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.emb(x).flatten(1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x).float(), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x).float(), y), on_epoch=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.n_optimizers > 1:
            return [
                torch.optim.SGD(self.emb.parameters(), lr=hp.lr),
                torch.optim.SGD(self.net.parameters(), lr=hp.lr),
            ]
        if hp.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=1e-4)
        return torch.optim.Adam(self.parameters(), lr=hp.lr)


def loaders(path: Path, batch_size: int = 32, n_train: int = 4096) -> tuple[DataLoader, DataLoader, int]:
    xt, yt, xv, yv, vocab = char_windows(str(path), n_train)
    train = DataLoader(TensorDataset(xt, yt), batch_size=batch_size, shuffle=True)
    val = DataLoader(TensorDataset(xv, yv), batch_size=256)
    return train, val, vocab


def flat_params(module: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])


class DumpState(L.Callback):
    """Saves each rank's parameters, buffers and optimizer state at the end of fit to ``folder/rank{r}.pt``.

    ``on_fit_end`` runs after the strategy's final synchronization; ``before_final`` (captured in
    ``on_train_end``, which callbacks get before the strategy) is each rank's own copy before it.
    Everything is saved on the CPU, so that loading it never initializes CUDA in the test process.
    """

    def __init__(self, folder: Path, tag: str) -> None:
        self.folder, self.tag = Path(folder), tag
        self.before_final: dict[str, Tensor] | None = None

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.before_final = _cpu(pl_module.state_dict())

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "state": _cpu(pl_module.state_dict()),
                "before_final": self.before_final,
                "optimizer": _cpu([o.state_dict() for o in trainer.optimizers]),
                "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
                "comm_stats": getattr(trainer.strategy, "comm_stats", {}),
            },
            self.folder / f"{self.tag}_rank{trainer.global_rank}.pt",
        )


def _cpu(obj: Any) -> Any:
    return apply_to_collection(obj, Tensor, lambda t: t.detach().cpu().clone())


def load_dumps(folder: Path, tag: str, world_size: int) -> list[dict[str, Any]]:
    return [torch.load(Path(folder) / f"{tag}_rank{r}.pt", weights_only=False) for r in range(world_size)]


def trainer(
    strategy: Any,
    devices: int,
    tmp_path: Path,
    callbacks: list[L.Callback] | None = None,
    accelerator: str = "cpu",
    **kwargs: Any,
) -> L.Trainer:
    """A quiet Trainer (CPU unless told) with a fresh rendezvous port (forked runs in one test reuse none)."""
    os.environ["MASTER_PORT"] = str(free_port())
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("logger", False)
    kwargs.setdefault("num_sanity_val_steps", 0)
    return L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        callbacks=callbacks or [],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        deterministic=True,
        **kwargs,
    )
