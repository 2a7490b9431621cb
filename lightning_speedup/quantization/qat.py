"""QAT modules and the reversible swap that puts them into a model (the *prepare* phase).

``QATLinear`` and ``QATConv2d`` are ``nn.Linear``/``nn.Conv2d`` subclasses that share the float
layer's own ``weight``/``bias`` parameters (same objects, so optimizer references and weight tying
survive the swap) and fake-quantize the weight (and, for Linear, optionally the input) in
``forward``. ``from_float``/``to_float`` swap one layer each way; :func:`prepare` and
:func:`to_float` do it for a whole model, in place (torchao's prepare/convert split).

Which layers are swapped: exactly-typed ``nn.Linear`` and ``nn.Conv2d`` modules (subclasses such as
bitsandbytes' layers or ``MultiheadAttention.out_proj``, whose weight is used without calling
``forward``, are left alone), filtered by ``include``/``exclude`` (fnmatch patterns on the module
name, or module types). By default the first and the last quantizable layer in ``named_modules()``
order stay in float, the usual practice for CNNs (stem conv and classifier, the layers most
sensitive to quantization). For the reference GPT those are ``blocks.0.attn.qkv`` and the tied
``lm_head``; pass ``exclude_first_last=False`` to quantize them too.

State of a QAT layer: ``fake_quant_enabled`` and ``scales_frozen`` (plain Python flags: under
``torch.compile`` flipping one costs one recompilation, never a graph break), ``frozen_scale`` (a
buffer holding the scale snapshot taken when scales are frozen) and, with ``scale="lsq"``, the
learnable ``weight_scale`` parameter. The flags travel in the module's ``_extra_state``.
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_speedup.quantization.fake_quant import (
    absmax_scale,
    fake_quantize_activation,
    fake_quantize_weight,
)
from lightning_speedup.quantization.formats import QuantSpec, indivisible_reason, scale_shape

log = logging.getLogger(__name__)

LayerFilter = str | type
Indivisible = Literal["skip", "error"]
QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
_CONV_ATTRS = (
    "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
    "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice",
)  # fmt: skip


def _accept_float_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Lets a float state dict (the plain layer's ``weight`` and ``bias`` only) load into a prepared layer.

    Lightning saves checkpoints float-shaped (``QATPrecision`` keeps the QAT state apart) and loads them strictly
    into the model, which after a ``fit`` in the same process still holds its QAT layers (``trainer.test(
    ckpt_path="best")``). The missing QAT entries are filled in: the scales derived from the incoming weights as
    ``prepare`` derives them, the flags as they are; the plugin restores the checkpoint's own scales and flags
    afterwards. A state dict that has any QAT entry of the layer, or no weight, is loaded as it is.
    """
    assert isinstance(module, _FakeQuantMixin)
    weight = state_dict.get(prefix + "weight")
    qat_keys = [prefix + k for k in ("frozen_scale", "weight_scale", "_extra_state")]
    if not isinstance(weight, Tensor) or any(k in state_dict for k in qat_keys):
        return
    with torch.no_grad():
        derived = absmax_scale(weight.to(module.weight.device), module.spec)  # float32, as prepare() makes it
    state_dict[prefix + "frozen_scale"] = (
        derived if module.scales_frozen else module.frozen_scale.detach().clone()
    )
    if module.weight_scale is not None:
        state_dict[prefix + "weight_scale"] = derived
    state_dict[prefix + "_extra_state"] = module.get_extra_state()


class _FakeQuantMixin:
    """Shared state and weight fake quantization of :class:`QATLinear` and :class:`QATConv2d`."""

    weight: nn.Parameter
    weight_scale: nn.Parameter | None
    frozen_scale: Tensor
    spec: QuantSpec
    fake_quant_enabled: bool
    scales_frozen: bool
    training: bool

    def _init_qat(self, spec: QuantSpec, enabled: bool) -> None:
        self.spec = spec
        self.fake_quant_enabled = enabled
        self.scales_frozen = False
        shape = scale_shape(spec, self.weight.shape)
        self.register_buffer("frozen_scale", torch.zeros(shape, device=self.weight.device))  # type: ignore[attr-defined]
        if spec.scale == "lsq":
            self.weight_scale = nn.Parameter(absmax_scale(self.weight, spec))
        else:
            self.register_parameter("weight_scale", None)  # type: ignore[attr-defined]
        self.register_load_state_dict_pre_hook(_accept_float_state)  # type: ignore[attr-defined]

    def current_scale(self) -> Tensor | None:
        """The scale the forward uses: frozen snapshot, learned scale, or None (absmax of the weight)."""
        if self.scales_frozen:
            return self.frozen_scale
        if self.weight_scale is not None:
            # abs() keeps a learned scale that an optimizer pushed through zero usable and consistent
            # between training and convert().
            return self.weight_scale.abs()
        return None

    def effective_scale(self) -> Tensor:
        """The scale (detached float32) the next forward would quantize with. A learnable scale that was never
        switched on (fake quantization off, scales not frozen) is stale: enabling re-initialises it from the
        weights, so the absmax of the weights is what it would start from."""
        scale = self.current_scale()
        stale = self.weight_scale is not None and not self.fake_quant_enabled and not self.scales_frozen
        return absmax_scale(self.weight, self.spec) if scale is None or stale else scale.detach().float()

    def quantized_weight(self) -> Tensor:
        """The fake-quantized weight (differentiable, straight-through)."""
        return fake_quantize_weight(self.weight, self.spec, self.current_scale())

    def _weight_for_forward(self) -> Tensor:
        return self.quantized_weight() if self.fake_quant_enabled else self.weight

    def _keep_scale_in_graph(self, out: Tensor) -> Tensor:
        # A learnable scale that this forward does not use would get no gradient, which DDP (without
        # find_unused_parameters) reports as an error; a zero-weighted term gives it a zero gradient.
        if (
            self.weight_scale is not None
            and self.training
            and (self.scales_frozen or not self.fake_quant_enabled)
        ):
            return out + 0.0 * self.weight_scale.sum()
        return out

    @torch.no_grad()
    def set_fake_quant(self, enabled: bool) -> None:
        """Turn fake quantization on or off. Turning it on re-initialises a learnable scale from the weights."""
        if (
            enabled
            and not self.fake_quant_enabled
            and self.weight_scale is not None
            and not self.scales_frozen
        ):
            self.weight_scale.copy_(absmax_scale(self.weight, self.spec))
        self.fake_quant_enabled = bool(enabled)

    @torch.no_grad()
    def freeze_scale(self, frozen: bool = True) -> None:
        """Freeze the scale at its current value (the weights keep training on a fixed grid), or unfreeze."""
        if frozen and not self.scales_frozen:
            self.frozen_scale.copy_(self.effective_scale())
        self.scales_frozen = bool(frozen)

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "fake_quant_enabled": self.fake_quant_enabled,
            "scales_frozen": self.scales_frozen,
            "spec": self.spec.to_dict(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("spec") != self.spec.to_dict():
            raise ValueError(
                f"This state was saved from a QAT layer with {state.get('spec')}, but the layer it is loaded "
                f"into uses {self.spec.to_dict()}. Prepare the model with the same settings before loading."
            )
        self.fake_quant_enabled = bool(state["fake_quant_enabled"])
        self.scales_frozen = bool(state["scales_frozen"])

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        flags = f"enabled={self.fake_quant_enabled}, frozen={self.scales_frozen}"
        return f"{base}, quant={self.spec.describe()}, scale={self.spec.scale}, {flags}"


class QATLinear(_FakeQuantMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weights and optional int8 dynamic per-token inputs."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        spec: QuantSpec | None = None,
        enabled: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_qat(spec or QuantSpec.create("int8"), enabled)

    @classmethod
    def from_float(cls, module: nn.Linear, spec: QuantSpec, enabled: bool = True) -> QATLinear:
        """Wrap ``module``'s own parameters (not copies) in a QAT layer."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = module.in_features, module.out_features
        new.weight, new.bias = module.weight, module.bias
        new._init_qat(spec, enabled)
        new.train(module.training)
        return new

    def to_float(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding this layer's parameters (the fake quantizer is dropped)."""
        new = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(new)
        new.in_features, new.out_features = self.in_features, self.out_features
        new.weight, new.bias = self.weight, self.bias
        new.train(self.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        if self.fake_quant_enabled and self.spec.activations == "int8":
            x = fake_quantize_activation(x)
        return self._keep_scale_in_graph(F.linear(x, self._weight_for_forward(), self.bias))


class QATConv2d(_FakeQuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weights (activations stay float: see :func:`prepare`)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        spec: QuantSpec | None = None,
        enabled: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        self._init_qat(spec or QuantSpec.create("int8"), enabled)

    @classmethod
    def from_float(cls, module: nn.Conv2d, spec: QuantSpec, enabled: bool = True) -> QATConv2d:
        """Wrap ``module``'s own parameters (not copies) in a QAT layer."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for attr in _CONV_ATTRS:
            setattr(new, attr, getattr(module, attr))
        new.weight, new.bias = module.weight, module.bias
        new._init_qat(spec, enabled)
        new.train(module.training)
        return new

    def to_float(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding this layer's parameters."""
        new = nn.Conv2d.__new__(nn.Conv2d)
        nn.Module.__init__(new)
        for attr in _CONV_ATTRS:
            setattr(new, attr, getattr(self, attr))
        new.weight, new.bias = self.weight, self.bias
        new.train(self.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return self._keep_scale_in_graph(self._conv_forward(x, self._weight_for_forward(), self.bias))


QATModule = QATLinear | QATConv2d
_QAT_FOR: dict[type[nn.Module], type[QATLinear] | type[QATConv2d]] = {
    nn.Linear: QATLinear,
    nn.Conv2d: QATConv2d,
}


# --------------------------------------------------------------------------------------------------
# The recipe and the layer selection, validated once
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QATConfig:
    """What to quantize and how: the recipe (a :class:`QuantSpec`) and which layers get it.

    One object for :func:`prepare`, :func:`~lightning_speedup.quantization.quantize` and
    :class:`~lightning_speedup.quantization.QATPrecision` (as torchao's ``QATConfig``), validated
    when it is built; each of those also takes the same fields as keyword arguments and builds one.

    Args:
        weights: ``"int8"``, ``"int4"``, ``"nf4"``, ``"fp4"`` (or 8/4).
        activations: ``None`` or ``"int8"`` (dynamic per token, Linear layers only).
        group_size: int4 group / nf4-fp4 block size (defaults 32 and 64; ``None`` for int8).
        scale: ``"absmax"`` (default, no extra parameters) or ``"lsq"`` (learnable scales).
        include, exclude: fnmatch patterns on module names, or module types (see :func:`select_layers`).
        exclude_first_last: keep the first and last quantizable layers in float.
        indivisible: what to do with an int4 layer whose reduction size the group size does not divide:
            ``"skip"`` (keep it float, one warning naming it) or ``"error"``.

    Example::

        config = QATConfig("int4", group_size=128, exclude=["lm_head"])
        prepare(model, config)

    Raises:
        ValueError: a bad recipe (see :meth:`QuantSpec.create`) or ``indivisible`` not in ("skip", "error").
        TypeError: ``include``/``exclude`` not a list of name patterns and ``nn.Module`` types, or
            ``exclude_first_last`` not a bool.
    """

    weights: str | int
    activations: str | None = None
    group_size: int | None = None
    scale: str = "absmax"
    include: Sequence[LayerFilter] = ()
    exclude: Sequence[LayerFilter] = ()
    exclude_first_last: bool = True
    indivisible: Indivisible = "skip"
    spec: QuantSpec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        spec = QuantSpec.create(self.weights, self.activations, self.group_size, self.scale)
        if self.indivisible not in ("skip", "error"):
            raise ValueError(f"indivisible must be 'skip' or 'error', got {self.indivisible!r}.")
        if not isinstance(self.exclude_first_last, bool):
            raise TypeError(f"exclude_first_last must be True or False, got {self.exclude_first_last!r}.")
        # Normalised in place (frozen: through object.__setattr__) so that equal configs compare equal.
        object.__setattr__(self, "weights", spec.weights)
        object.__setattr__(self, "group_size", spec.group_size)
        object.__setattr__(self, "include", _filters("include", self.include))
        object.__setattr__(self, "exclude", _filters("exclude", self.exclude))
        object.__setattr__(self, "spec", spec)

    @classmethod
    def build(
        cls,
        weights: str | int | QuantSpec | QATConfig,
        activations: str | None = None,
        *,
        group_size: int | None = None,
        scale: str = "absmax",
        include: Sequence[LayerFilter] | None = None,
        exclude: Sequence[LayerFilter] | None = None,
        exclude_first_last: bool = True,
        indivisible: Indivisible = "skip",
    ) -> QATConfig:
        """The config of a call that takes either a :class:`QATConfig` or its fields as arguments.

        Raises:
            ValueError: a :class:`QATConfig` together with other recipe or filter arguments (ambiguous),
                or invalid fields (see the class).
        """
        if isinstance(weights, QATConfig):
            given = {
                "activations": activations, "group_size": group_size, "include": include, "exclude": exclude,
            }  # fmt: skip
            extra = [k for k, v in given.items() if v is not None]
            extra += ["scale"] if scale != "absmax" else []
            extra += ["exclude_first_last"] if exclude_first_last is not True else []
            extra += ["indivisible"] if indivisible != "skip" else []
            if extra:
                raise ValueError(
                    f"Got a QATConfig and also {', '.join(extra)}; put every setting in the QATConfig "
                    "(dataclasses.replace(config, ...)) or pass no QATConfig."
                )
            return weights
        if isinstance(weights, QuantSpec):
            extra = ["activations"] if activations is not None else []
            extra += ["group_size"] if group_size is not None else []
            extra += ["scale"] if scale != "absmax" else []
            if extra:
                raise ValueError(
                    f"Got a QuantSpec and also {', '.join(extra)}; the QuantSpec sets the whole recipe "
                    f"({weights.describe()}, scale={weights.scale}). Put them in it (QuantSpec.create(...)) or pass "
                    "the format name instead."
                )
            weights, activations, group_size, scale = (
                weights.weights, weights.activations, weights.group_size, weights.scale,
            )  # fmt: skip
        return cls(
            weights,
            activations,
            group_size,
            scale,
            include or (),
            exclude or (),
            exclude_first_last,
            indivisible,
        )


def _filters(kind: str, entries: object) -> tuple[LayerFilter, ...]:
    if isinstance(entries, (str, type)) or not isinstance(entries, Sequence):
        raise TypeError(
            f"{kind} must be a list of name patterns (str) and nn.Module types, got {entries!r}; "
            f"write {kind}=[{entries!r}] for a single entry."
        )
    for entry in entries:
        if not isinstance(entry, str) and not (isinstance(entry, type) and issubclass(entry, nn.Module)):
            raise TypeError(f"{kind} entries must be name patterns (str) or nn.Module types, got {entry!r}.")
    return tuple(entries)


# Whole-model helpers
# --------------------------------------------------------------------------------------------------


def _is_candidate(module: nn.Module) -> bool:
    return type(module) in QUANTIZABLE_TYPES or isinstance(module, (QATLinear, QATConv2d))


def _matches(name: str, module: nn.Module, entry: LayerFilter) -> bool:
    if isinstance(entry, str):
        return fnmatch.fnmatchcase(name, entry)
    return isinstance(module, entry)


def _check_patterns(
    kind: str, entries: Sequence[LayerFilter], candidates: list[tuple[str, nn.Module]]
) -> None:
    for entry in entries:
        if isinstance(entry, str) and not any(fnmatch.fnmatchcase(n, entry) for n, _ in candidates):
            examples = ", ".join(repr(n) for n, _ in candidates[:4])
            raise ValueError(
                f"The {kind} pattern {entry!r} matches no quantizable layer. Patterns are fnmatch "
                f"patterns on module names such as {examples}."
            )


def select_layers(
    model: nn.Module,
    include: Sequence[LayerFilter] | None = None,
    exclude: Sequence[LayerFilter] | None = None,
    exclude_first_last: bool = True,
) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs :func:`prepare` would swap, in ``named_modules()`` order.

    Raises:
        ValueError: an include/exclude pattern matches no layer, or nothing is left to quantize.
        TypeError: a filter entry is neither a string nor an ``nn.Module`` type.
    """
    candidates = [(n, m) for n, m in model.named_modules() if n and _is_candidate(m)]
    include, exclude = _filters("include", include or ()), _filters("exclude", exclude or ())
    _check_patterns("include", include, candidates)
    _check_patterns("exclude", exclude, candidates)
    ends = {candidates[0][0], candidates[-1][0]} if exclude_first_last and candidates else set()
    chosen = [
        (n, m)
        for n, m in candidates
        if n not in ends
        and (not include or any(_matches(n, m, e) for e in include))
        and not any(_matches(n, m, e) for e in exclude)
    ]
    if not chosen:
        found = ", ".join(repr(n) for n, _ in candidates[:6]) or "none"
        raise ValueError(
            f"No layer of {type(model).__name__} was selected for quantization (quantizable layers: {found}; "
            f"exclude_first_last={exclude_first_last}). Loosen include/exclude or pass exclude_first_last=False."
        )
    return chosen


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _replace_everywhere(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Install ``replacements[id(old)]`` under every name of each replaced module: a layer registered twice (shared
    weights, ``self.a = self.b = nn.Linear(...)``) would otherwise keep its old type under its second name."""
    names = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if id(m) in replacements]
    for name, old in names:
        _set_submodule(model, name, replacements[id(old)])


def prepare(
    model: nn.Module,
    weights: str | int | QuantSpec | QATConfig,
    activations: str | None = None,
    *,
    group_size: int | None = None,
    scale: str = "absmax",
    include: Sequence[LayerFilter] | None = None,
    exclude: Sequence[LayerFilter] | None = None,
    exclude_first_last: bool = True,
    indivisible: Indivisible = "skip",
    enabled: bool = True,
) -> nn.Module:
    """Swap the selected Linear/Conv2d layers of ``model`` for QAT layers, in place; returns ``model``.

    Layers that are already QAT layers with the same recipe are left as they are, so calling this
    twice is harmless. Int8 activation quantization applies to Linear layers only (Conv2d layers get
    weight-only fake quantization, and one log line says so).

    Args:
        weights: a :class:`QATConfig` (then no other recipe or filter argument), or ``"int8"``,
            ``"int4"``, ``"nf4"``, ``"fp4"`` (or 8/4), or a :class:`QuantSpec`.
        activations, group_size, scale, include, exclude, exclude_first_last, indivisible: the fields of
            :class:`QATConfig`, when ``weights`` is not one.
        enabled: initial state of fake quantization.

    Raises:
        ValueError: bad format/group/scale/filters (see :class:`QATConfig`), an include/exclude pattern
            that matches no layer, an indivisible layer with ``indivisible="error"``, or a layer already
            prepared with a different recipe.
        TypeError: a filter entry is neither a string nor an ``nn.Module`` type.
    """
    config = QATConfig.build(
        weights, activations, group_size=group_size, scale=scale, include=include, exclude=exclude,
        exclude_first_last=exclude_first_last, indivisible=indivisible,
    )  # fmt: skip
    spec, indivisible = config.spec, config.indivisible
    weight_only_convs: list[str] = []
    selected = select_layers(model, config.include, config.exclude, config.exclude_first_last)
    skipped: list[str] = []
    replacements: dict[int, nn.Module] = {}
    for name, module in selected:
        if isinstance(module, (QATLinear, QATConv2d)):
            if module.spec != spec:
                raise ValueError(
                    f"Layer {name!r} is already prepared for {module.spec.describe()} (scale={module.spec.scale}); "
                    f"cannot prepare it for {spec.describe()} (scale={spec.scale}). Call to_float(model) first."
                )
            continue
        reason = indivisible_reason(spec, module.weight.shape)
        if reason is not None:
            message = (
                f"Layer {name!r} ({type(module).__name__}, weight {tuple(module.weight.shape)}): {reason}, so it "
                f"cannot be quantized to {spec.describe()}."
            )
            if indivisible == "error":
                raise ValueError(f"{message} Pick a group size that divides it or exclude the layer.")
            warnings.warn(
                f"{message} It stays in float (pass indivisible='error' to fail instead).", stacklevel=2
            )
            skipped.append(name)
            continue
        if isinstance(module, nn.Conv2d) and spec.activations:
            weight_only_convs.append(name)
        replacements[id(module)] = _QAT_FOR[type(module)].from_float(module, spec, enabled)
    _replace_everywhere(model, replacements)
    if len(skipped) == len(selected):
        raise ValueError(
            f"none of the {len(selected)} selected layers can be quantized to {spec.describe()} (group size does "
            f"not divide their reduction size, e.g. {skipped[0]!r}); choose a smaller group_size."
        )
    if weight_only_convs:
        log.warning(
            "Int8 activation quantization applies to Linear layers only; %d Conv2d layers (%s...) get "
            "weight-only fake quantization, matching what convert() runs for convolutions.",
            len(weight_only_convs),
            weight_only_convs[0],
        )
    return model


def qat_modules(model: nn.Module) -> Iterator[tuple[str, QATLinear | QATConv2d]]:
    """The (name, module) pairs of every QAT layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, (QATLinear, QATConv2d)):
            yield name, module


def to_float(model: nn.Module) -> nn.Module:
    """Swap every QAT layer back to its plain float layer, in place (the inverse of :func:`prepare`)."""
    _replace_everywhere(model, {id(m): m.to_float() for _, m in qat_modules(model)})
    return model


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Turn fake quantization on or off in every QAT layer."""
    for _, module in qat_modules(model):
        module.set_fake_quant(enabled)


def freeze_scales(model: nn.Module, frozen: bool = True) -> None:
    """Freeze (or unfreeze) the quantization scales of every QAT layer."""
    for _, module in qat_modules(model):
        module.freeze_scale(frozen)


def qat_state_keys(model: nn.Module) -> list[str]:
    """State-dict keys that exist only because of QAT (scales and flags), not in the float model.

    Read from ``model.state_dict()`` itself, so a QAT layer reachable under two names (a module
    registered twice) contributes both keys.
    """
    keys = []
    for key in model.state_dict(keep_vars=True):
        owner_name, _, leaf = key.rpartition(".")
        if leaf in ("weight", "bias"):
            continue
        owner = model.get_submodule(owner_name) if owner_name else model
        if isinstance(owner, (QATLinear, QATConv2d)):
            keys.append(key)
    return keys
