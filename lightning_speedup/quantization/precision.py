"""QATPrecision: quantization-aware training as a Lightning ``Precision`` plugin.

Lightning calls ``Precision.convert_module`` in ``Strategy.setup`` before it builds the optimizer
(and before DDP wraps the model), so swapping the Linear/Conv2d layers for QAT layers there puts
learnable scales into the optimizer and under DDP's gradient reduction with no user code. The base
precision (``"bf16-mixed"`` through Lightning's own ``MixedPrecision``, or ``"32-true"``) supplies
autocast and the optimizer step; this plugin counts optimizer steps in ``optimizer_step`` to turn
fake quantization on at ``start_step`` and freeze the scales at ``freeze_step`` (the "observer
freeze" of PyTorch's eager-mode QAT recipe, Krishnamoorthi 2018).

Checkpoints: the step counter, the recipe and every QAT-only tensor (scales, flags) go into the
plugin's entry of the checkpoint, and ``on_save_checkpoint`` removes those tensors from the model's
``state_dict``, because Lightning restores model weights *before* ``convert_module`` runs: the saved
``state_dict`` therefore loads into the plain float model (also with ``load_from_checkpoint``), and
``load_state_dict`` puts the QAT state back into the swapped layers, so a resumed run continues
bitwise-identically (on CPU). Checked against Lightning 2.6.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_speedup._validation import check_int
from lightning_speedup.quantization.qat import (
    Indivisible,
    LayerFilter,
    QATConfig,
    prepare,
    qat_modules,
    qat_state_keys,
)

BASES: tuple[str, ...] = ("bf16-mixed", "32-true")
STATE_VERSION = 1


def _autocast_supports(device: object) -> bool:
    """Whether ``device`` names a device type torch autocast runs on (unknown names raise inside torch)."""
    if not isinstance(device, str):
        return False
    try:
        return torch.amp.is_autocast_available(device)
    except RuntimeError:
        return False


class QATPrecision(Precision):
    """Train with fake-quantized weights (and optionally int8 activations) on top of a base precision.

    Args:
        weights: a :class:`~lightning_speedup.quantization.QATConfig` (the recipe and the layers it
            applies to; then no other recipe or filter argument), or ``"int8"``, ``"int4"``, ``"nf4"``,
            ``"fp4"`` (or 8/4).
        activations: ``None`` or ``"int8"`` (dynamic per token, Linear layers only).
        base: ``"bf16-mixed"`` (autocast to bfloat16, float32 master weights) or ``"32-true"``.
        start_step: optimizer steps taken with this plugin before fake quantization turns on; training
            float first and quantizing late is the usual QAT fine-tuning recipe.
        freeze_step: optimizer step at which the scales freeze (None: never); must be >= start_step.
        group_size, scale, include, exclude, exclude_first_last, indivisible: the fields of
            :class:`~lightning_speedup.quantization.QATConfig`, when ``weights`` is not one.
        device: autocast device type; by default the device the model is on when training starts.

    Example::

        trainer = L.Trainer(plugins=[QATPrecision(weights="nf4", base="bf16-mixed", start_step=500)])
        trainer.fit(model, datamodule)
        qmodel = lightning_speedup.quantization.convert(model)

    Raises:
        ValueError: bad recipe or filters (see :class:`~lightning_speedup.quantization.QATConfig`), unknown base, negative ``start_step``,
            ``freeze_step < start_step``, a ``device`` autocast does not support, or a checkpoint written with
            another recipe.
    """

    def __init__(
        self,
        weights: str | int | QATConfig,
        activations: str | None = None,
        base: Literal["bf16-mixed", "32-true"] = "bf16-mixed",
        start_step: int = 0,
        freeze_step: int | None = None,
        *,
        group_size: int | None = None,
        scale: str = "absmax",
        include: Sequence[LayerFilter] | None = None,
        exclude: Sequence[LayerFilter] | None = None,
        exclude_first_last: bool = True,
        indivisible: Indivisible = "skip",
        device: str | None = None,
    ) -> None:
        self.config = QATConfig.build(
            weights, activations, group_size=group_size, scale=scale, include=include, exclude=exclude,
            exclude_first_last=exclude_first_last, indivisible=indivisible,
        )  # fmt: skip
        self.spec = self.config.spec
        if base not in BASES:
            raise ValueError(
                f"base={base!r} is not supported; choose one of {BASES}. (fp16 mixed precision is not offered: "
                "its loss scaler may skip steps, which would shift start_step/freeze_step.)"
            )
        check_int("start_step", start_step, 0)
        if freeze_step is not None and (
            isinstance(freeze_step, bool) or not isinstance(freeze_step, int) or freeze_step < start_step
        ):
            raise ValueError(
                f"freeze_step must be None or an int >= start_step ({start_step}), got {freeze_step!r}: scales can "
                "only be frozen once fake quantization is on."
            )
        if device is not None and not _autocast_supports(device):
            raise ValueError(
                f"device={device!r} is not a device type torch autocast supports (e.g. 'cuda', 'cpu'); pass one "
                "of those, or None to follow the device the model is on."
            )
        self.precision = base  # type: ignore[assignment]
        self.start_step = start_step
        self.freeze_step = freeze_step
        self._device_given = device is not None
        autocast_device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._base: Precision = MixedPrecision(base, autocast_device) if base == "bf16-mixed" else Precision()
        self._step = 0
        self._model: nn.Module | None = None
        self._pending_state: dict[str, Any] | None = None

    # ---------------------------------------------------------------------------------------------
    # schedule
    # ---------------------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Optimizer steps taken under this plugin (restored from checkpoints)."""
        return self._step

    @property
    def fake_quant_active(self) -> bool:
        return self._step >= self.start_step

    @property
    def scales_frozen(self) -> bool:
        return self.freeze_step is not None and self._step >= self.freeze_step

    def _apply_schedule(self) -> None:
        if self._model is None:
            return
        enabled, frozen = self.fake_quant_active, self.scales_frozen
        for _, module in qat_modules(self._model):
            module.set_fake_quant(enabled)  # enable first: a learnable scale is initialised on enabling
            module.freeze_scale(frozen)

    # ---------------------------------------------------------------------------------------------
    # Lightning hooks
    # ---------------------------------------------------------------------------------------------

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        # In place: DDPStrategy.setup ignores the return value of convert_module.
        trained = [m for _, m in qat_modules(module)]
        prepare(module, self.config, enabled=self.fake_quant_active)
        self._model = module
        if self._pending_state is not None:
            self._load_module_state(self._pending_state)
            self._pending_state = None
        elif trained:
            self._continue_from(trained)
        self._apply_schedule()
        return module

    def _continue_from(self, layers: list[nn.Module]) -> None:
        """A model whose QAT layers an earlier Trainer switched on (validated, tested or trained further with a new
        plugin): the schedule continues from the phase they are in, instead of switching fake quantization off and
        unfreezing the scales at its step 0. A checkpoint restored afterwards sets the step it saved."""
        step = self._step
        if any(m.fake_quant_enabled for m in layers):  # type: ignore[attr-defined]
            step = max(step, self.start_step)
        frozen = any(m.scales_frozen for m in layers)  # type: ignore[attr-defined]
        if frozen and self.freeze_step is not None:
            step = max(step, self.freeze_step)
        elif frozen:
            rank_zero_warn(
                "QATPrecision: the model's QAT scales are frozen (by an earlier run), and this plugin has "
                "freeze_step=None, so it unfreezes them. Pass the freeze_step the model was trained with to keep them."
            )
        if step != self._step:
            rank_zero_info(
                f"QATPrecision: the model's QAT layers are already on (prepared and switched on by an earlier run); "
                f"the schedule continues from that phase (step {step}) instead of switching them back."
            )
            self._step = step

    @override
    def connect(
        self, model: nn.Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
    ) -> tuple[nn.Module, list[Optimizer], list[Any]]:
        # Called after the model reached its device: autocast follows it unless the user chose a device.
        if not self._device_given and isinstance(self._base, MixedPrecision):
            first = next(iter(model.parameters()), None)
            if first is not None:
                self._base.device = first.device.type
        return super().connect(model, optimizers, lr_schedulers)

    @override
    def forward_context(self) -> AbstractContextManager:
        return self._base.forward_context()

    @override
    def optimizer_step(  # type: ignore[override]
        self,
        optimizer: Any,
        model: pl.LightningModule,
        closure: Callable[[], Any],
        **kwargs: Any,
    ) -> Any:
        output = self._base.optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        self._step += 1
        self._apply_schedule()
        return output

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "step": self._step,
            "spec": self.spec.to_dict(),
            "base": self._base.state_dict(),
        }
        if self._model is not None:
            keys = set(qat_state_keys(self._model))
            state["qat_state"] = {k: v for k, v in self._model.state_dict().items() if k in keys}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("spec") != self.spec.to_dict():
            raise ValueError(
                f"This checkpoint was written by QATPrecision with {state_dict.get('spec')}, but this run uses "
                f"{self.spec.to_dict()}. Resume with the same weights/activations/group_size/scale."
            )
        self._step = int(state_dict["step"])
        self._base.load_state_dict(state_dict.get("base", {}))
        if self._model is None:
            self._pending_state = state_dict
            return
        self._load_module_state(state_dict)
        self._apply_schedule()

    def _load_module_state(self, state_dict: dict[str, Any]) -> None:
        assert self._model is not None
        qat_state = state_dict.get("qat_state", {})
        expected = set(qat_state_keys(self._model))
        if set(qat_state) != expected:
            missing, extra = sorted(expected - set(qat_state)), sorted(set(qat_state) - expected)
            raise ValueError(
                f"The checkpoint's QAT state does not fit this model: missing {missing[:4]}, unexpected "
                f"{extra[:4]}. Resume with the same include/exclude settings and model."
            )
        self._model.load_state_dict(qat_state, strict=False)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Keep the model's state_dict float-shaped: Lightning loads it before convert_module runs.
        if self._model is None or "state_dict" not in checkpoint:
            return
        for key in qat_state_keys(self._model):
            checkpoint["state_dict"].pop(key, None)
