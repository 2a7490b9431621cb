"""What a LightningModule declares to be pipelined, and the checks on it.

The contract, in a few lines of the user's module::

    class LitGPT(L.LightningModule):
        def pipeline_layers(self) -> list[nn.Module]:   # ordered; each maps one tensor to one tensor
            return [self.embed, *self.blocks, self.head]

        def pipeline_loss(self, output, target):         # mean over the micro-batch
            return F.cross_entropy(output.flatten(0, 1), target.flatten())

Optional: ``pipeline_batch(batch) -> (inputs, target)`` (default: ``batch[0], batch[1]``),
``pipeline_metrics(output, target) -> dict[str, Tensor]`` (extra validation metrics, computed on the last
stage), ``pipeline_init_weights(layer)`` (initialises a layer materialised from the meta device; default:
each submodule's ``reset_parameters()``). The layers must be submodules of the LightningModule (or wrappers
holding its submodules), so parameter names stay those of the full model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from lightning_speedup.pipeline.partition import StagePlan

__all__ = ["PipelineLayers", "collect_layers", "retie_", "shared_parameters", "split_batch"]

_CONTRACT = (
    "define `pipeline_layers(self) -> list[nn.Module]` (the model's layers in order, each mapping one tensor to "
    "one tensor) and `pipeline_loss(self, output, target) -> Tensor` on your LightningModule; see "
    "docs/methods/pipeline.md"
)


@dataclass
class PipelineLayers:
    """The declared layers, their names in the module, and which layer owns each parameter."""

    modules: list[nn.Module]
    names: list[str]
    owner: dict[int, list[int]]  # id(parameter) -> indices of the layers that hold it
    param_names: dict[int, str]
    # The names of each parameter the module holds under several names (tied weights), as found before any layer
    # moved: moving one layer at a time to or from the meta device gives each name its own parameter.
    ties: list[list[str]] = field(default_factory=list)

    def check_stages(self, plan: StagePlan) -> None:
        """A parameter used by layers of two stages would need its gradients joined across processes."""
        stage_of = {}
        for s, (a, b) in enumerate(plan.bounds):
            for i in range(a, b):
                stage_of[i] = s
        for pid, idx in self.owner.items():
            stages = sorted({stage_of[i] for i in idx})
            if len(stages) > 1:
                raise ValueError(
                    f"Parameter {self.param_names.get(pid, '?')!r} is shared by layers in pipeline stages {stages} "
                    "(tied weights, e.g. an input embedding tied to the output head). Stages cannot share "
                    "parameters: untie them (e.g. GPTConfig(tie_weights=False)) or keep the sharing layers in one "
                    "layer of pipeline_layers()."
                )

    def materialize_(self, layer: nn.Module, device: torch.device) -> None:
        """Move ``layer`` to ``device``; a layer built on the meta device is allocated there and initialised."""
        if holds_meta(layer):
            layer.to_empty(device=device)
            self._init(layer)
        else:
            layer.to(device)

    def materialized_copy(self, layer: nn.Module, device: torch.device) -> nn.Module:
        """A copy of ``layer`` on ``device`` for measuring (the original is left as it is); a layer built on the
        meta device is allocated there and initialised."""
        twin = copy.deepcopy(layer)
        if holds_meta(twin):
            twin.to_empty(device=device)
            self._init(twin)
        else:
            twin.to(device)
        return twin

    init_hook: Any = None

    def _init(self, layer: nn.Module) -> None:
        if callable(self.init_hook):
            self.init_hook(layer)
            return
        for sub in layer.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()


def holds_meta(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is on the meta device (built without storage)."""
    return any(t.device.type == "meta" for t in (*module.parameters(), *module.buffers()))


def collect_layers(module: LightningModule) -> PipelineLayers:
    """The module's declared layers, checked: present, non-empty, modules, covering every trainable parameter.

    Raises:
        TypeError: the module does not declare its layers or loss, or a declared layer is not an ``nn.Module``.
        ValueError: no layers, or trainable parameters outside every declared layer.
    """
    declare = getattr(module, "pipeline_layers", None)
    if not callable(declare) or not callable(getattr(module, "pipeline_loss", None)):
        raise TypeError(f"{type(module).__name__} cannot be pipelined as it is: {_CONTRACT}.")
    layers = list(declare())
    if not layers:
        raise ValueError(f"{type(module).__name__}.pipeline_layers() returned no layers; {_CONTRACT}.")
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.Module):
            raise TypeError(
                f"pipeline_layers()[{i}] is a {type(layer).__name__}, not an nn.Module; {_CONTRACT}."
            )
    param_names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
    sub_names = {id(m): n for n, m in module.named_modules()}
    owner: dict[int, list[int]] = {}
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            owner.setdefault(id(p), [])
            if i not in owner[id(p)]:
                owner[id(p)].append(i)
    outside = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in owner]
    if outside:
        raise ValueError(
            f"Trainable parameters {outside[:5]}{' ...' if len(outside) > 5 else ''} belong to no layer of "
            f"{type(module).__name__}.pipeline_layers(); every trained parameter must live in exactly one declared "
            "layer (add the module that holds them to a layer)."
        )
    names = [sub_names.get(id(m), f"{type(m).__name__}[{i}]") for i, m in enumerate(layers)]
    return PipelineLayers(
        layers,
        names,
        owner,
        param_names,
        ties=shared_parameters(module),
        init_hook=getattr(module, "pipeline_init_weights", None),
    )


def shared_parameters(module: nn.Module) -> list[list[str]]:
    """The names of each parameter that ``module`` holds under more than one name (tied weights), one list per
    parameter, in ``named_parameters`` order."""
    names: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def retie_(module: nn.Module, ties: list[list[str]]) -> None:
    """Make every name of each group in ``ties`` (see :func:`shared_parameters`) hold the first name's parameter
    again, after moves that gave each name its own copy."""
    for first, *rest in ties:
        shared = module.get_parameter(first)
        for name in rest:
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr, shared)


def batch_inputs(module: LightningModule, batch: Any) -> Tensor:
    """The inputs of a batch to predict on, which needs no target: ``module.pipeline_batch(batch)[0]`` if defined,
    else the batch itself when it is a tensor, else ``batch[0]`` (an inputs-only ``TensorDataset`` gives
    ``[inputs]``)."""
    custom = getattr(module, "pipeline_batch", None)
    if callable(custom):
        x = custom(batch)[0]
    elif isinstance(batch, Tensor):
        x = batch
    elif isinstance(batch, (list, tuple)) and batch:
        x = batch[0]
    else:
        x = None
    if not isinstance(x, Tensor):
        raise TypeError(
            f"A pipelined predict batch must be the inputs tensor or a sequence that starts with it; got "
            f"{type(batch).__name__}. Define pipeline_batch(batch) -> (inputs, target) on your LightningModule to "
            "pick the inputs out of other batch layouts."
        )
    return x


def split_batch(module: LightningModule, batch: Any) -> tuple[Tensor, Tensor]:
    """``(inputs, target)`` of a batch: ``module.pipeline_batch(batch)`` if defined, else ``batch[0], batch[1]`` of
    a list or tuple.

    Raises:
        TypeError: the batch is not such a sequence (a dict, say) and the module defines no ``pipeline_batch``, or
            the pair is not two tensors.
    """
    custom = getattr(module, "pipeline_batch", None)
    pair: Any = None
    if callable(custom):
        pair = custom(batch)
    elif isinstance(batch, (list, tuple)) and len(batch) >= 2:
        pair = (batch[0], batch[1])
    if not (
        isinstance(pair, (list, tuple))
        and len(pair) == 2
        and isinstance(pair[0], Tensor)
        and isinstance(pair[1], Tensor)
    ):
        raise TypeError(
            f"A pipelined batch must give (inputs, target) tensors; got a {type(batch).__name__} batch"
            + (" from which pipeline_batch returned no such pair" if callable(custom) else "")
            + ". Define pipeline_batch(batch) -> (inputs, target) on your LightningModule to pick them out of "
            "other batch layouts (a dict, say)."
        )
    return pair[0], pair[1]
