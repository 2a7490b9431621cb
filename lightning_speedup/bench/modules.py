"""LightningModules for the reference tasks, written the way a typical user writes them.

The modules know nothing about speed-ups: recipes add those from outside (callbacks, precision,
strategy) or through the few switches here that Lightning itself leaves to the module
(``channels_last``, ``compile``). ``configure_optimizers`` returns a bare optimizer, so the
schedule callbacks can take over its learning rate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_speedup.bench.models import GPT, GPTConfig, ResNet9

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}


def make_optimizer(
    name: str, params: Any, lr: float, weight_decay: float, fused: bool = False, **kwargs: Any
) -> torch.optim.Optimizer:
    """``name``'s optimizer; ``fused=True`` asks torch for its fused kernel (one launch per step for every
    parameter, instead of a foreach kernel per group of tensors and per update term)."""
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}.") from None
    if name == "sgd":
        kwargs.setdefault("momentum", 0.9)
        kwargs.setdefault("nesterov", True)
    if fused:
        kwargs["fused"] = True
    return cls(params, lr=lr, weight_decay=weight_decay, **kwargs)


def _fused(module: L.LightningModule) -> bool:
    """Fused optimizer kernels where asked for and the parameters are on a GPU (elsewhere torch's default)."""
    return bool(module.hparams.get("fused_optimizer", False)) and module.device.type == "cuda"


class _CompilableModule(L.LightningModule):
    """Holds ``self.net`` and, when asked, a compiled forward that leaves the state_dict keys unchanged."""

    net: nn.Module

    def __init__(self, compile: bool = False, compile_mode: str | None = None) -> None:
        super().__init__()
        self.compile_model = compile
        self.compile_mode = compile_mode
        self._forward: Callable[[Tensor], Tensor] | None = None

    @override
    def configure_model(self) -> None:
        # Compile the bound forward, not the module: a compiled module assigned here would register as
        # a child and add `_orig_mod.` keys to every checkpoint. torch.compile rejects an unknown mode here.
        if self.compile_model and self._forward is None:
            self._forward = torch.compile(self.net.forward, mode=self.compile_mode)

    @override
    def __getstate__(self) -> dict[str, Any]:
        # The compiled forward is bound to this instance's `net`: a copy (copy.deepcopy, quantize(model))
        # sharing it would run the original's weights, and pickling it fails. Copies compile their own.
        state = super().__getstate__()
        state["_forward"] = None
        return state

    @override
    def forward(self, x: Tensor) -> Tensor:
        if self._forward is None and self.compile_model:
            self.configure_model()  # a copy or an unpickled module compiles its own forward on first use
        if self._forward is None:
            return self.net(x)
        if self.compile_mode == "reduce-overhead":
            # CUDA graphs: a new step begins here, so the previous step's graph outputs may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        return self._forward(x)


class ImageClassifier(_CompilableModule):
    """ResNet-9 classifier. ``training_step`` accepts hard labels (B,) or soft labels (B, classes)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
        width: int = 64,
        compile_mode: str | None = None,
        fused_optimizer: bool = False,
        log_train_loss: bool = True,
    ) -> None:
        if not isinstance(log_train_loss, bool):
            raise ValueError(
                f"log_train_loss must be True or False, got {log_train_loss!r} ({type(log_train_loss).__name__}); "
                "pass a Python bool (on the command line: --model-arg log_train_loss=false)."
            )
        super().__init__(compile=compile, compile_mode=compile_mode)
        self.save_hyperparameters()
        # `self.log` is the largest piece of Lightning's own per-step host time (benchmarks/step_overhead.py);
        # False leaves it out to measure that share (validation metrics are logged either way).
        self.log_train_loss = log_train_loss
        self.net = ResNet9(num_classes=num_classes, in_channels=in_channels, width=width)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    def _prepare(self, x: Tensor) -> Tensor:
        if self.hparams.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(self._prepare(x))
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.hparams.label_smoothing)
        if self.log_train_loss:
            self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(self._prepare(x)).float()
        self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        acc = (logits.argmax(dim=-1) == y).float().mean()
        self.log("val_acc", acc, on_epoch=True, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return make_optimizer(
            hp.optimizer, self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, fused=_fused(self)
        )


class CharLM(_CompilableModule):
    """Character-level GPT; batches are (x, y) token windows of shape (B, T)."""

    def __init__(
        self,
        vocab_size: int = 65,
        block_size: int = 256,
        n_layer: int = 6,
        n_head: int = 6,
        n_embd: int = 384,
        dropout: float = 0.2,
        tie_weights: bool = True,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        compile: bool = False,
        compile_mode: str | None = None,
        fused_optimizer: bool = False,
    ) -> None:
        super().__init__(compile=compile, compile_mode=compile_mode)
        self.save_hyperparameters()
        cfg = GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, dropout, tie_weights=tie_weights)
        self.net = GPT(cfg)

    # The pipeline contract (PipelineStrategy): the layers in order and the loss of the last stage's output.
    def pipeline_layers(self) -> list[nn.Module]:
        return self.net.pipeline_layers()

    def pipeline_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), target.reshape(-1))  # (B*T, vocab)

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch  # (B, T), (B, T)
        logits = self(x)  # (B, T, vocab)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), on_epoch=True, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        kwargs = {"betas": tuple(hp.betas)} if hp.optimizer in ("adam", "adamw") else {}
        return make_optimizer(
            hp.optimizer,
            self.parameters(),
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            fused=_fused(self),
            **kwargs,
        )
