"""Quantization-aware training (QAT) for Lightning and conversion to real int8/int4 kernels.

Three phases, as in torchao: *prepare* swaps Linear/Conv2d layers for fake-quantizing QAT layers
(done for you by :class:`QATPrecision` inside ``Trainer.fit``), training learns weights that survive
quantization, *convert* swaps the QAT layers for real low-bit layers (bitsandbytes, ``torch._int_mm``,
tinygemm int4, a Triton 4-bit GEMV) that compute with exactly the trained quantized weights.
:func:`quantize` is the post-training baseline, :func:`compare` the float vs PTQ vs QAT report.

bitsandbytes is imported only when a ``"bnb"`` backend layer is built, never at import time; this
package imports Triton only when a ``"triton"`` layer first runs its kernel.
"""

from __future__ import annotations

from lightning_speedup.quantization.convert import (
    AUTO_BACKENDS,
    convert,
    load,
    quantize,
    quantized_layers,
    resolve_backend,
    save,
)
from lightning_speedup.quantization.fake_quant import (
    absmax_scale,
    dequantize_weight,
    fake_quantize_activation,
    fake_quantize_weight,
    quantize_activation,
    quantize_weight,
    straight_through,
)
from lightning_speedup.quantization.formats import WEIGHT_FORMATS, QuantSpec, codebook
from lightning_speedup.quantization.modules import (
    BACKENDS,
    BnbLinear,
    QuantizedConv2d,
    QuantizedLinear,
    TinyGemmLinear,
    TorchQuantizedLinear,
    TritonLinear,
    weight_bytes,
)
from lightning_speedup.quantization.precision import QATPrecision
from lightning_speedup.quantization.qat import (
    QATConfig,
    QATConv2d,
    QATLinear,
    freeze_scales,
    prepare,
    qat_modules,
    select_layers,
    set_fake_quant,
    to_float,
)
from lightning_speedup.quantization.report import QuantReport, compare, evaluate

__all__ = [
    "AUTO_BACKENDS",
    "BACKENDS",
    "WEIGHT_FORMATS",
    "BnbLinear",
    "QATConfig",
    "QATConv2d",
    "QATLinear",
    "QATPrecision",
    "QuantReport",
    "QuantSpec",
    "QuantizedConv2d",
    "QuantizedLinear",
    "TinyGemmLinear",
    "TorchQuantizedLinear",
    "TritonLinear",
    "absmax_scale",
    "codebook",
    "compare",
    "convert",
    "dequantize_weight",
    "evaluate",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "freeze_scales",
    "load",
    "prepare",
    "qat_modules",
    "quantize",
    "quantize_activation",
    "quantize_weight",
    "quantized_layers",
    "resolve_backend",
    "save",
    "select_layers",
    "set_fake_quant",
    "straight_through",
    "to_float",
    "weight_bytes",
]
