"""The *convert* phase: QAT layers -> real low-bit layers; PTQ; save and load of converted models.

``convert(model)`` reads each QAT layer's codes and scales with the same function its fake quantizer
used (:func:`.fake_quant.quantize_weight`, with the frozen or learned scale where there is one), so
the converted model computes with exactly the trained quantized weights. ``quantize(model, fmt)``
is post-training quantization (PTQ): prepare + convert in one call, the baseline QAT is measured
against (torchao's ``quantize_``).

``backend="auto"`` picks, per layer, the first backend of ``AUTO_BACKENDS[(device, weights,
activations)]`` that can run the layer's shape and is installed, and logs what it picked. The
order on CUDA follows ``benchmarks/quant_speed.py`` (see docs/methods/quantization.md); on CPU it is
always ``"torch"``, whose outputs equal the QAT model's.

File format (``save``/``load``): one ``torch.save`` archive holding a header (format name, version,
per-layer recipe, backend and shapes), the compact codes and float32 scales of every quantized
layer, and the rest of the model's state dict. It loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_speedup.quantization.fake_quant import quantize_weight
from lightning_speedup.quantization.formats import QuantSpec
from lightning_speedup.quantization.modules import (
    BACKENDS,
    QuantizedConv2d,
    QuantizedLinear,
    codes_to_storage,
    storage_to_codes,
)
from lightning_speedup.quantization.qat import (
    Indivisible,
    LayerFilter,
    QATConfig,
    QATConv2d,
    QATLinear,
    _replace_everywhere,
    _set_submodule,
    prepare,
    qat_modules,
)
from lightning_speedup.quantization.triton_gemv import triton_unavailable

log = logging.getLogger(__name__)

FILE_FORMAT = "lightning_speedup.quantized"
FILE_VERSION = 1

# Preference order per (device type, weight format, activation format); the first backend that can run
# a layer wins. The CUDA order is fastest batch-1 decode first, as measured by benchmarks/quant_speed.py
# (docs/methods/quantization.md); W8A8 puts triton first because it has by far the fastest prefill (the
# format is for compute-bound work) and is bit-exact with the torch backend. The Triton kernel runs fp4
# as it runs nf4 (another 16-entry codebook), so fp4 takes nf4's order.
# Triton needs the triton package (PyTorch's CUDA wheels ship it); without it the next backend is used.
AUTO_BACKENDS: dict[tuple[str, str, str | None], tuple[str, ...]] = {
    ("cuda", "int8", None): ("torch",),
    ("cuda", "int8", "int8"): ("triton", "bnb", "torch"),
    ("cuda", "int4", None): ("triton", "tinygemm", "torch"),
    ("cuda", "int4", "int8"): ("torch",),
    ("cuda", "nf4", None): ("triton", "bnb", "torch"),
    ("cuda", "nf4", "int8"): ("torch",),
    ("cuda", "fp4", None): ("triton", "bnb", "torch"),
    ("cuda", "fp4", "int8"): ("torch",),
}


def _bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def _candidates(backend: str, spec: QuantSpec, device_type: str) -> tuple[str, ...]:
    if backend != "auto":
        return (backend,)
    return AUTO_BACKENDS.get((device_type, spec.weights, spec.activations), ("torch",))


def resolve_backend(backend: str, spec: QuantSpec, device: torch.device, in_features: int, out_features: int,
                    layer: str) -> str:  # fmt: skip
    """The backend that will run a Linear layer, or a ValueError/RuntimeError naming the layer.

    Raises:
        ValueError: unknown backend name; the backend cannot run this recipe or shape.
        RuntimeError: the backend does not run on the layer's device.
        ImportError: ``backend="bnb"`` without bitsandbytes installed, ``backend="triton"`` without
            Triton.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}. Choose 'auto' or one of {sorted(BACKENDS)}.")
    problems = []
    for name in _candidates(backend, spec, device.type):
        cls = BACKENDS[name]
        if device.type not in cls.devices:
            problems.append(f"{name}: runs on {'/'.join(cls.devices)}, the layer is on {device}")
            continue
        reason = cls.unsupported(spec, in_features, out_features, device.type)
        if reason is not None:
            problems.append(f"{name}: {reason}")
            continue
        if name == "bnb" and not _bnb_available():
            if backend == "bnb":
                from lightning_speedup.quantization.modules import import_bitsandbytes

                import_bitsandbytes()  # raises the ImportError with the install hint
            problems.append("bnb: bitsandbytes is not installed")
            continue
        if name == "triton" and (missing := triton_unavailable()) is not None:
            if backend == "triton":
                raise ImportError(f"Cannot convert layer {layer!r} with backend='triton': {missing}.")
            problems.append(f"triton: {missing}")
            continue
        return name
    detail = "; ".join(problems)
    if backend != "auto" and any("runs on" in p for p in problems):
        raise RuntimeError(
            f"Cannot convert layer {layer!r} with backend={backend!r}: {detail}. Move the model to a supported "
            "device first or choose another backend ('torch' runs everywhere)."
        )
    raise ValueError(
        f"Cannot convert layer {layer!r} ({spec.describe()}) with backend={backend!r}: {detail}."
    )


def _build_linear(backend: str, spec: QuantSpec, module: nn.Linear, codes: Tensor, scale: Tensor,
                  dtype: torch.dtype) -> QuantizedLinear:  # fmt: skip
    bias = None if module.bias is None else module.bias.detach().to(dtype)
    return BACKENDS[backend](spec, module.in_features, module.out_features, codes, scale, bias, dtype)  # type: ignore[call-arg]


def _convert_layer(
    name: str, module: QATLinear | QATConv2d, backend: str, dtype: torch.dtype | None
) -> tuple[nn.Module, str]:
    spec = module.spec
    with torch.no_grad():
        codes, scale = quantize_weight(module.weight, spec, module.effective_scale())
    weight_dtype = dtype or module.weight.dtype
    if isinstance(module, QATConv2d):
        if backend not in ("auto", "torch"):
            raise ValueError(
                f"Conv2d layer {name!r} can only be stored weight-only by the 'torch' backend, not {backend!r}; "
                "exclude convolutions or use backend='auto'."
            )
        conv = QuantizedConv2d(spec, module, codes, scale, weight_dtype)
        if conv.bias is not None:
            conv.bias.data = conv.bias.data.to(weight_dtype)
        return conv, "torch"
    chosen = resolve_backend(
        backend, spec, module.weight.device, module.in_features, module.out_features, name
    )
    return _build_linear(chosen, spec, module, codes, scale, weight_dtype), chosen


def convert(
    model: nn.Module, backend: str = "auto", *, dtype: torch.dtype | None = None, inplace: bool = False
) -> nn.Module:
    """Replace every QAT layer of ``model`` with a real low-bit layer on the layer's current device.

    Args:
        model: a model prepared with :func:`.qat.prepare` or trained with ``QATPrecision``.
        backend: ``"auto"``, ``"torch"``, ``"tinygemm"``, ``"triton"`` or ``"bnb"`` (see :mod:`.modules`);
            ``"auto"`` follows ``AUTO_BACKENDS`` (Triton first for 4-bit weights and W8A8 on CUDA).
        dtype: compute dtype of the quantized layers and dtype of every other floating parameter and
            buffer; ``None`` keeps the model's dtypes. Scales stay float32.
        inplace: modify ``model`` itself instead of a deep copy.

    Raises:
        ValueError: the model has no QAT layers; unknown backend; a backend that cannot run a layer
            (the message names the layer).
        RuntimeError: the backend does not run on the layer's device (tinygemm and triton: CUDA only).
        ImportError: ``backend="bnb"`` without bitsandbytes, ``backend="triton"`` without Triton.
    """
    if not any(True for _ in qat_modules(model)):
        raise ValueError(
            f"{type(model).__name__} has no QAT layers to convert. For a float model use "
            "quantize(model, weights) (post-training quantization); for QAT, train with QATPrecision or "
            "call prepare(model, weights) first."
        )
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}. Choose 'auto' or one of {sorted(BACKENDS)}.")
    if not inplace:
        model = copy.deepcopy(model)
    disabled = [n for n, m in qat_modules(model) if not m.fake_quant_enabled]
    if disabled:
        log.warning(
            "convert(): %d QAT layers (%s...) never had fake quantization enabled (start_step not reached?); "
            "they are quantized anyway, without QAT.",
            len(disabled),
            disabled[0],
        )
    picked: Counter[str] = Counter()
    replacements: dict[int, nn.Module] = {}
    for name, module in list(qat_modules(model)):
        new, chosen = _convert_layer(name, module, backend, dtype)
        new.train(module.training)
        replacements[id(module)] = new
        picked[chosen] += 1
    _replace_everywhere(model, replacements)
    if dtype is not None:
        _cast_float_tensors(model, dtype)
    if backend == "auto":
        summary = ", ".join(f"{b} for {n} layers" for b, n in sorted(picked.items()))
        log.info("convert(backend='auto') picked %s.", summary)
    return model


def _cast_float_tensors(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the float tensors outside quantized layers (whose scales stay float32)."""
    quantized = [n + "." for n, _ in quantized_layers(model)]
    for name, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedConv2d)) or name.startswith(tuple(quantized)):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for key, b in module._buffers.items():
            if b is not None and b.is_floating_point():
                module._buffers[key] = b.to(dtype)


def quantize(
    model: nn.Module,
    weights: str | int | QuantSpec | QATConfig,
    activations: str | None = None,
    *,
    group_size: int | None = None,
    backend: str = "auto",
    include: Sequence[LayerFilter] | None = None,
    exclude: Sequence[LayerFilter] | None = None,
    exclude_first_last: bool = True,
    indivisible: Indivisible = "skip",
    dtype: torch.dtype | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Post-training quantization: absmax scales from the float weights, real low-bit layers.

    ``weights`` is a :class:`~lightning_speedup.quantization.QATConfig` or its fields are given as
    arguments. Same layer selection and errors as :func:`.qat.prepare` and
    :func:`convert`; returns a new model unless ``inplace=True``, so the float model stays usable for
    comparison.
    """
    config = QATConfig.build(
        weights, activations, group_size=group_size, include=include, exclude=exclude,
        exclude_first_last=exclude_first_last, indivisible=indivisible,
    )  # fmt: skip
    if not inplace:
        model = copy.deepcopy(model)
    prepare(model, config)
    return convert(model, backend, dtype=dtype, inplace=True)


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLinear | QuantizedConv2d]]:
    """The (name, layer) pairs of every real low-bit layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedConv2d))]


# --------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------


def save(model: nn.Module, path: str | Path) -> None:
    """Write a converted model (codes, scales, recipe per layer, remaining state) to ``path``.

    Raises:
        ValueError: ``model`` holds no converted layers, or still holds QAT layers (convert first).
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no quantized layers; convert() or quantize() it before save()."
        )
    leftover = [n for n, _ in qat_modules(model)]
    if leftover:
        raise ValueError(f"Layer {leftover[0]!r} is still a QAT layer; call convert(model) before save().")
    header: dict[str, Any] = {"format": FILE_FORMAT, "version": FILE_VERSION, "layers": {}}
    tensors: dict[str, dict[str, Tensor]] = {}
    prefixes = []
    for name, layer in layers:
        codes, scale = layer.canonical()
        kind = "conv2d" if isinstance(layer, QuantizedConv2d) else "linear"
        header["layers"][name] = {
            "kind": kind,
            "spec": layer.spec.to_dict(),
            "backend": layer.backend,
            "weight_shape": list(layer.weight_shape),
            "weight_dtype": str(layer.weight_dtype).removeprefix("torch."),
        }
        entry = {"codes": codes_to_storage(codes, layer.spec).cpu(), "scale": scale.detach().float().cpu()}
        if layer.bias is not None:
            entry["bias"] = layer.bias.detach().cpu()
        tensors[name] = entry
        prefixes.append(name + ".")
    rest = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(tuple(prefixes))}
    _save_atomically({"header": header, "layers": tensors, "state_dict": rest}, Path(path))


def _save_atomically(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: an interrupted save leaves the old file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(
    path: str | Path,
    model: nn.Module,
    *,
    backend: str | None = None,
    weights: str | int | None = None,
    strict: bool = True,
) -> nn.Module:
    """Load a file written by :func:`save` into ``model``, a float (or QAT) instance of the same architecture.

    Each saved layer replaces the layer of the same name, on that layer's device. ``backend=None``
    rebuilds each layer with the backend it was saved from; any other value re-resolves it (codes and
    scales are backend-independent, except tinygemm's bfloat16 scales).

    Args:
        weights: if given, the weight format the caller expects; a file made for another format is
            rejected before anything is changed.

    Raises:
        ValueError: the file is not a quantized-model file, was made for another format, or names a
            layer the model lacks or whose shape differs (the message names the file and layer).
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(
            f"{path} is empty (0 bytes), not a quantized-model file written by quantization.save."
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise ValueError(
            f"{path} is not a quantized-model file written by lightning_speedup.quantization.save ({reason})."
        ) from err
    header = blob.get("header") if isinstance(blob, dict) else None
    if not isinstance(header, dict) or header.get("format") != FILE_FORMAT:
        raise ValueError(
            f"{path} is not a quantized-model file written by lightning_speedup.quantization.save "
            "(a Lightning checkpoint or plain state dict loads with torch.load / load_state_dict instead)."
        )
    if header.get("version") != FILE_VERSION:
        raise ValueError(
            f"{path} has file version {header.get('version')}; this library reads version {FILE_VERSION}."
        )
    _check_contents(path, blob)
    if weights is not None:
        expected = QuantSpec.create(weights).weights
        found = sorted({layer["spec"]["weights"] for layer in header["layers"].values()})
        if found != [expected]:
            raise ValueError(
                f"{path} holds {'/'.join(found)} weights, but weights={expected!r} was requested."
            )
    modules = dict(model.named_modules())
    for name, meta in header["layers"].items():
        target = modules.get(name)
        shape = tuple(meta["weight_shape"])
        ok = isinstance(target, (nn.Linear, nn.Conv2d)) and tuple(target.weight.shape) == shape
        ok = ok or (
            isinstance(target, (QuantizedLinear, QuantizedConv2d)) and tuple(target.weight_shape) == shape
        )
        if not ok:
            found = "missing" if target is None else f"{type(target).__name__}"
            raise ValueError(
                f"{path}: layer {name!r} was saved as a {meta['kind']} with weight {shape}, but the model's layer "
                f"is {found}{'' if target is None else ' of another shape'}. Load into the same architecture."
            )
    for name, meta in header["layers"].items():
        target = modules[name]
        spec = QuantSpec(**meta["spec"])
        entry = blob["layers"][name]
        device = _layer_device(target)
        shape = tuple(meta["weight_shape"])
        codes = storage_to_codes(entry["codes"], spec, shape).to(device)
        scale = entry["scale"].to(device)
        dtype = getattr(torch, meta["weight_dtype"])
        if meta["kind"] == "conv2d":
            template = target if isinstance(target, nn.Conv2d) else None
            if template is None:
                raise ValueError(
                    f"{path}: layer {name!r} is a converted conv already; load into a float model."
                )
            new: nn.Module = QuantizedConv2d(spec, template, codes, scale, dtype)
            new.bias = (
                None if "bias" not in entry else nn.Parameter(entry["bias"].to(device), requires_grad=False)
            )
        else:
            out_f, in_f = shape
            chosen = (
                meta["backend"]
                if backend is None
                else resolve_backend(backend, spec, device, in_f, out_f, name)
            )
            if backend is None:
                resolve_backend(chosen, spec, device, in_f, out_f, name)  # same device/shape checks
            bias = entry.get("bias")
            new = BACKENDS[chosen](
                spec, in_f, out_f, codes, scale, None if bias is None else bias.to(device), dtype
            )  # type: ignore[call-arg]
        new.train(target.training)
        _set_submodule(model, name, new)
    # The rest of the model in the dtypes it was saved in (convert(dtype=...) casts it): loading into the
    # fresh model's float32 tensors would cast it back and leave it unable to take the inputs it took.
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for key, value in blob["state_dict"].items():
        tensor = own.get(key)
        if (
            tensor is not None
            and isinstance(value, torch.Tensor)
            and tensor.is_floating_point()
            and value.is_floating_point()
            and tensor.dtype != value.dtype
        ):
            tensor.data = tensor.data.to(value.dtype)
    missing, unexpected = model.load_state_dict(blob["state_dict"], strict=False)
    quantized_prefixes = tuple(n + "." for n in header["layers"])
    missing = [k for k in missing if not k.startswith(quantized_prefixes)]
    if strict and (missing or unexpected):
        raise ValueError(
            f"{path} does not fit the model: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}."
        )
    return model


def _check_contents(path: Path, blob: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the file and the entry when a file with a valid header has broken contents.

    Checked before ``load`` changes the model, so a damaged file leaves the model as it was.
    """

    def broken(what: str) -> ValueError:
        return ValueError(f"{path} is damaged: {what}. Write it again with quantization.save.")

    layers, entries = blob["header"].get("layers"), blob.get("layers")
    if not isinstance(layers, dict) or not isinstance(entries, dict):
        raise broken("the header or the tensor section lacks its 'layers' table")
    if not isinstance(blob.get("state_dict"), dict):
        raise broken("the 'state_dict' section is missing")
    for name, meta in layers.items():
        fields = ("kind", "spec", "backend", "weight_shape", "weight_dtype")
        if not isinstance(meta, dict) or any(f not in meta for f in fields):
            raise broken(f"layer {name!r} lacks some of its header fields {list(fields)}")
        if meta["kind"] not in ("linear", "conv2d") or not isinstance(
            getattr(torch, str(meta["weight_dtype"]), None), torch.dtype
        ):
            raise broken(f"layer {name!r} has kind {meta['kind']!r} / weight dtype {meta['weight_dtype']!r}")
        if meta["backend"] not in BACKENDS and meta["kind"] == "linear":
            raise broken(f"layer {name!r} names an unknown backend {meta['backend']!r}")
        try:
            QuantSpec.create(**meta["spec"])
        except (TypeError, ValueError) as err:
            raise broken(f"layer {name!r} has an invalid recipe {meta['spec']!r} ({err})") from err
        entry = entries.get(name)
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), Tensor) for k in ("codes", "scale")
        ):
            raise broken(f"layer {name!r} has no 'codes'/'scale' tensors")


def _layer_device(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")
