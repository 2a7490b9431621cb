"""Run batched per-sample augmentation on the device, inside the training loop.

Lightning has no place for augmentation that runs after the batch reaches the GPU except the
LightningModule's own ``on_after_batch_transfer`` hook, which a callback cannot set. This callback uses
``on_train_batch_start``: Lightning calls it with the batch already on the device (after
``batch_to_device``) and then passes *the same batch object* to ``training_step``. The callback replaces
the image (and, for MixUp/CutMix, label) tensors inside that object: by item assignment in a list,
dict or mutable dataclass, and by swapping the tensors' contents (``torch.utils.swap_tensors``) inside
an immutable tuple. No Lightning internals are touched. (A custom ``Strategy.batch_to_device`` would
also work but a callback cannot swap the user's strategy, and wrapping the loader as the prefetcher does
would run before the batch reaches the device when there is no prefetcher.) The ops are the batched,
per-sample ops of :mod:`lightning_speedup.data.augment` (airbench-style GPU augmentation).

Randomness is reproducible and checkpointable: before every training batch the generator is re-seeded
from ``(seed, global rank, batch counter)``, so DDP ranks draw different streams and the only state is
the seed and the counter, identical on every rank, which a checkpoint saved by rank 0 restores exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_speedup._validation import check_bool, check_int
from lightning_speedup.data.augment import Compose, ImageOp, MixOp, batch_seed

__all__ = ["GPUAugment"]

Key = int | str
# Mixed into the seed of batches augmented outside the training stream (GPUAugment.augment_outside_stream).
_OUTSIDE_STREAM = 0x5EED_0F_0D_D_BA7C4


def _get(batch: Any, key: Key, role: str) -> Any:
    if isinstance(batch, Tensor):
        # A loader that yields images only (typical for predict): the batch is the images.
        if role == "image":
            return batch
        raise ValueError(
            f"GPUAugment's mixing ops (MixUp, CutMix) need the labels, but the batch is a bare tensor of shape "
            f"{tuple(batch.shape)} (images only). Yield (images, labels) from the training loader, or drop the "
            f"mixing ops."
        )
    try:
        if isinstance(key, int):
            if not isinstance(batch, Sequence) or isinstance(batch, str):
                raise TypeError
            return batch[key]
        if isinstance(batch, Mapping):
            return batch[key]
        if dataclasses.is_dataclass(batch) or hasattr(batch, key):
            return getattr(batch, key)
        raise TypeError
    except (TypeError, KeyError, IndexError, AttributeError):
        raise ValueError(
            f"GPUAugment could not find the {role} at {role}_key={key!r} in a batch of type {type(batch).__name__}. "
            f"Batches must be sequences like (images, labels) (use int keys) or dicts/dataclasses (use str keys); "
            f"set GPUAugment(..., image_key=..., label_key=...) to match your collate output."
        ) from None


def _set(batch: Any, key: Key, value: Tensor, role: str) -> None:
    old = _get(batch, key, role)
    if old is value:
        return
    if isinstance(batch, (list, MutableMapping)):
        batch[key] = value
        return
    if dataclasses.is_dataclass(batch) and not type(batch).__dataclass_params__.frozen:  # type: ignore[attr-defined]
        setattr(batch, key, value)  # type: ignore[arg-type]
        return
    # Immutable container (tuple, namedtuple, frozen dataclass) or a bare tensor: that object is what reaches
    # the step, so the tensor object (inside it, or the batch itself) takes the new contents.
    try:
        torch.utils.swap_tensors(old, value)
    except RuntimeError as err:
        where = "bare-tensor" if isinstance(batch, Tensor) else f"immutable {type(batch).__name__}"
        raise RuntimeError(
            f"GPUAugment cannot replace the {role} inside a {where} batch: {err}. "
            "Return a list or dict from your collate_fn (torch's default_collate already returns lists)."
        ) from err


class GPUAugment(Callback):
    """Apply batched per-sample augmentation to training batches on the device.

    Example::

        trainer = L.Trainer(callbacks=[
            ls.GPUPrefetcher(depth=2),   # batches arrive on the GPU as uint8
            ls.GPUAugment(ls.augment.RandomCrop(28, padding=2), ls.augment.RandomHorizontalFlip(),
                          ls.augment.Normalize(0.286, 0.353)),
        ])

    Random ops apply to training batches only. The deterministic ops (``ToDtype``, ``Normalize``,
    ``ChannelsLast``, ``CenterCrop``) also apply, in order, to validation, test and predict batches when
    ``convert_eval`` is true, so a pipeline that ships uint8 images converts them the same way
    everywhere; a ``RandomCrop`` becomes a ``CenterCrop`` to the same size there (the identity for
    ``RandomCrop(28, padding=2)`` on 28x28 images), so evaluation batches have the training shape.
    Outputs pass through the precision plugin's ``convert_input`` (as Lightning does for the batch
    before transfer), so a ``"bf16-true"`` run gets bf16 images.

    Callback order matters only relative to other callbacks that read the batch in
    ``on_train_batch_start``: they see it augmented if they come after this one. In a tuple batch the
    image tensor object itself takes the augmented contents, so a loader must hand out fresh tensors
    for every batch (DataLoader, the prefetcher and the resident module do); list and dict batches
    (``default_collate``'s output) just get new entries. A batch that is a bare tensor is taken as the
    images (whatever ``image_key`` says) and takes the new contents itself, as in a tuple; mixing ops
    need labels, so they raise ``ValueError`` on such a batch.

    Args:
        *args: ops from :mod:`lightning_speedup.augment`, applied in order.
        ops: the same as a list, instead of positionally (the form a LightningCLI YAML config uses).
        seed: seed of the augmentation stream; ``None`` draws one from torch's global RNG at setup
            (so ``seed_everything`` fixes it) and broadcasts rank 0's value. A fresh ``fit`` (one that
            starts at step 0, not from a checkpoint) starts the stream over: the step counter goes back
            to 0 and the seed to this value (``None`` draws again), as for a new callback; resuming from
            a checkpoint restores the checkpointed seed and step.
        image_key: where the images ``(B, C, H, W)`` are in the batch: an index for tuples/lists, a
            key for dicts, an attribute name for dataclasses.
        label_key: where the labels are; needed only by MixUp/CutMix (which replace them by soft labels).
        convert_eval: apply the deterministic ops to evaluation batches too.

    Raises:
        ValueError: no ops, ops given both positionally and as ``ops=``, a mixing op with ``label_key=None``, a seed
            that is not an int, or a ``convert_eval`` that is not a bool.
        TypeError: an op that is not from :mod:`lightning_speedup.augment` (or a subclass of its bases).
    """

    def __init__(
        self,
        *args: ImageOp,
        ops: Sequence[ImageOp] | None = None,
        seed: int | None = None,
        image_key: Key = 0,
        label_key: Key | None = 1,
        convert_eval: bool = True,
    ) -> None:
        if args and ops is not None:
            raise ValueError(
                "Pass the ops either positionally, GPUAugment(op1, op2), or as ops=[op1, op2]; not both."
            )
        # ``ops=`` is the keyword form a LightningCLI/jsonargparse config can set (``ops: [{class_path: ...}]``).
        ops = tuple(args) if ops is None else tuple(ops)
        if not ops:
            raise ValueError(
                "GPUAugment needs at least one op, e.g. GPUAugment(ls.augment.RandomCrop(28, padding=2))."
            )
        self.pipeline = Compose(*ops)
        if self.pipeline.needs_labels and label_key is None:
            mixers = [type(op).__name__ for op in ops if isinstance(op, MixOp)]
            raise ValueError(
                f"{', '.join(mixers)} mixes labels, so label_key must say where they are; got None."
            )
        for name, key in (("image_key", image_key), ("label_key", label_key)):
            if key is not None and (isinstance(key, bool) or not isinstance(key, (int, str))):
                raise ValueError(
                    f"{name} must be an int (tuple/list index) or a str (dict key/attribute); got {key!r}."
                )
        check_int("seed", seed, None, allow_none=True)
        check_bool("convert_eval", convert_eval)
        self.eval_pipeline = self.pipeline.deterministic() if convert_eval else None
        self._init_seed = seed
        self.seed: int | None = seed
        self.image_key, self.label_key = image_key, label_key
        self.step = 0
        self._rank = 0
        self._generator: torch.Generator | None = None
        self._state_key: tuple[Compose, Key, str] | None = None

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads every callback's state_key on every hook call (the profiler's action name, even with
        # no profiler), several times per training step; the ops' repr is built once per pipeline.
        cached = self._state_key
        if cached is None or cached[0] is not self.pipeline or cached[1] != self.image_key:
            key = self._generate_state_key(ops=repr(self.pipeline), image_key=self.image_key)
            cached = self._state_key = (self.pipeline, self.image_key, key)
        return cached[2]

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.global_step == 0:
            # A fresh fit starts the stream as a new callback would. A resumed fit loads the checkpoint's
            # seed and step after this hook (Lightning restores callback state after setup); a second fit
            # that continues the same Trainer (global_step > 0) continues the stream.
            self.step = 0
            self.seed = self._init_seed
        if self.seed is None:
            drawn = int(torch.randint(0, 2**62, (1,)).item())
            self.seed = int(trainer.strategy.broadcast(drawn, src=0))
        self._rank = trainer.global_rank
        self._generator = torch.Generator(device=trainer.strategy.root_device)

    def augment(
        self,
        batch: Any,
        generator: torch.Generator | None = None,
        pipeline: Compose | None = None,
        convert: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """Apply ``pipeline`` (default: all ops) to ``batch`` in place; ``convert`` post-processes each output."""
        pipeline = pipeline or self.pipeline
        images = _get(batch, self.image_key, "image")
        labels = _get(batch, self.label_key, "label") if pipeline.needs_labels else None
        out, out_labels = pipeline(images, labels, generator)
        _set(batch, self.image_key, convert(out) if convert else out, "image")
        if out_labels is not None and self.label_key is not None:
            _set(batch, self.label_key, convert(out_labels) if convert else out_labels, "label")

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._generator is None or self.seed is None:
            raise RuntimeError("GPUAugment.setup() has not run; add the callback to the Trainer's callbacks.")
        self._generator.manual_seed(batch_seed(self.seed, self._rank, self.step))
        self.step += 1
        self.augment(batch, self._generator, convert=trainer.precision_plugin.convert_input)

    def augment_outside_stream(self, trainer: L.Trainer, batch: Any, index: int) -> None:
        """Augment ``batch`` in place as a training batch, from a stream of its own that leaves the training
        stream (and the checkpointed step counter) untouched: for work before training that runs the training
        step on real batches, such as the LR range test."""
        if self._generator is None or self.seed is None:
            raise RuntimeError("GPUAugment.setup() has not run; add the callback to the Trainer's callbacks.")
        self._generator.manual_seed(batch_seed(self.seed ^ _OUTSIDE_STREAM, self._rank, index))
        self.augment(batch, self._generator, convert=trainer.precision_plugin.convert_input)

    def _convert_eval(self, trainer: L.Trainer, batch: Any) -> None:
        if self.eval_pipeline is not None:
            self.augment(batch, pipeline=self.eval_pipeline, convert=trainer.precision_plugin.convert_input)

    @override
    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._convert_eval(trainer, batch)

    @override
    def on_test_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._convert_eval(trainer, batch)

    @override
    def on_predict_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._convert_eval(trainer, batch)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "step": self.step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]
        self.step = state_dict["step"]
