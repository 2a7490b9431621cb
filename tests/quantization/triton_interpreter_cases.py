"""Triton-interpreter runs of the 4-bit GEMV and its layer; test_triton_gemv.py starts them in a child process.

``TRITON_INTERPRET=1`` has to be in the environment before ``triton`` is imported (its language
helpers are jitted at import), and Lightning imports triton as soon as it is installed, so these
tests cannot share a process with the rest of the suite. pytest does not collect this file by name
(it is not ``test_*.py``); run it alone with
``TRITON_INTERPRET=1 python -m pytest tests/quantization/triton_interpreter_cases.py``. The
interpreter is slow, so the layers are small.
"""

from __future__ import annotations

import pytest
import torch

from lightning_speedup.quantization import QuantSpec, TorchQuantizedLinear, TritonLinear, quantize_weight
from lightning_speedup.quantization.fake_quant import dequantize_weight, quantize_activation
from lightning_speedup.quantization.formats import codebook
from lightning_speedup.quantization.modules import codes_to_storage
from lightning_speedup.quantization.triton_gemv import (
    GEMV_MAX_ROWS,
    dequantize_packed,
    interpreting,
    lut_gemv,
)
from lightning_speedup.quantization.triton_int8 import int8_gemm_scaled, quantize_rows
from tests.quantization.test_triton_gemv import assert_close_to_reference, quantized_weight

if not interpreting():
    pytest.skip(
        "runs only under TRITON_INTERPRET=1 (test_triton_gemv.py::test_in_the_triton_interpreter starts it)",
        allow_module_level=True,
    )


# ------------------------------------------------------------------------------------------------
# The kernel, in the interpreter
# ------------------------------------------------------------------------------------------------


# (format, group, M, N, K, x dtype, tile): odd N leaves the last row tile partial; KB = K/2 not a multiple
# of BLOCK_KB takes the masked-tail path; M = 3 checks the row index of the grid.
KERNEL_CASES = [
    ("int4", 32, 1, 37, 128, torch.float32, {"BLOCK_N": 8, "BLOCK_KB": 32}),
    ("int4", 64, 3, 20, 192, torch.bfloat16, {"BLOCK_N": 4, "BLOCK_KB": 64}),
    ("int4", 128, 1, 13, 256, torch.bfloat16, None),
    ("int4", 128, 2, 6, 384, torch.bfloat16, {"BLOCK_N": 4, "BLOCK_KB": 32}),  # a group spans two steps
    ("nf4", 4096, 1, 3, 4096, torch.bfloat16, None),  # the largest blocks: one per row
    ("nf4", 64, 1, 33, 128, torch.bfloat16, {"BLOCK_N": 16, "BLOCK_KB": 32}),
    ("nf4", 64, 3, 8, 192, torch.float16, None),
    ("fp4", 64, 2, 5, 64, torch.bfloat16, {"BLOCK_N": 2, "BLOCK_KB": 128}),
]


@pytest.mark.parametrize(("fmt", "group", "m", "n", "k", "dtype", "tile"), KERNEL_CASES)
def test_kernel_matches_float64_reference(
    fmt: str, group: int, m: int, n: int, k: int, dtype: torch.dtype, tile: dict[str, int] | None
) -> None:
    spec, codes, scale, w64 = quantized_weight(fmt, group, n, k)
    x = torch.randn(m, k).to(dtype)
    lut = None if fmt == "int4" else codebook(fmt)
    out = lut_gemv(x, codes_to_storage(codes, spec), scale, lut, group, n, k, config=tile)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert_close_to_reference(out, x, w64)


def test_kernel_bias_output_dtype_and_small_groups() -> None:
    """Groups of 16 (8-byte chunks; no QuantSpec makes them, the kernel allows them), bias, bf16 out."""
    n, k, g = 11, 96, 16
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    scale = torch.rand(n, k // g) * 0.1
    w64 = (codes.double().reshape(n, -1, g) * scale.double()[..., None]).reshape(n, k)
    x, bias = torch.randn(2, k), torch.randn(n)
    packed = codes_to_storage(codes, QuantSpec.create("int4"))
    tile = {"BLOCK_N": 4, "BLOCK_KB": 32}
    out = lut_gemv(x, packed, scale, None, g, n, k, config=tile)
    assert_close_to_reference(out, x, w64)
    with_bias = lut_gemv(x, packed, scale, None, g, n, k, bias=bias, out_dtype=torch.bfloat16, config=tile)
    assert with_bias.dtype == torch.bfloat16
    # The bias is added in float32, then the sum is rounded once (to nearest on GPUs; the interpreter
    # truncates, so allow one bfloat16 step here; the gpu test checks the rounding exactly).
    expected = out + bias
    assert ((with_bias.float() - expected).abs() <= expected.abs() * 2**-7).all()


@pytest.mark.parametrize(
    ("fmt", "group", "n", "k"), [("int4", 32, 37, 256), ("int4", 128, 5, 384), ("nf4", 64, 9, 256),
                                 ("fp4", 64, 3, 128), ("nf4", 4096, 3, 4096)]
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_packed_is_the_torch_dequantization(
    fmt: str, group: int, n: int, k: int, dtype: torch.dtype
) -> None:
    """Bit for bit (1000+ bytes: the last program of the grid is partial)."""
    spec, codes, scale, _ = quantized_weight(fmt, group, n, k)
    lut = None if fmt == "int4" else codebook(fmt)
    out = dequantize_packed(codes_to_storage(codes, spec), scale, lut, group, n, k, dtype)
    assert out.dtype == dtype and torch.equal(out, dequantize_weight(codes, scale, spec, (n, k), dtype))


# ------------------------------------------------------------------------------------------------
# The layer, in the interpreter
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "group"), [("int4", 32), ("int4", 128), ("nf4", 64), ("fp4", 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_matches_the_torch_backend(fmt: str, group: int, dtype: torch.dtype) -> None:
    """GEMV rows equal the torch backend to the dtype's precision; prefill rows are the torch backend."""
    n, k = 24, 256
    spec, codes, scale, _ = quantized_weight(fmt, group, n, k)
    bias = (torch.randn(n) * 0.1).to(dtype)
    reference = TorchQuantizedLinear(spec, k, n, codes, scale, bias, dtype)
    layer = TritonLinear(spec, k, n, codes, scale, bias, dtype)
    # float32: the torch backend rounds code * scale to float32 once per weight; bfloat16: it rounds the
    # weight to bfloat16, and both outputs are rounded to bfloat16 (the GEMV multiplies by the exact
    # float32 weight). The bounds are relative to the output's largest value.
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    with torch.no_grad():
        for shape in [(1, k), (3, k), (2, 4, k), (GEMV_MAX_ROWS, k)]:
            x = torch.randn(shape).to(dtype)
            out, expected = layer(x), reference(x)
            assert out.shape == expected.shape and out.dtype == expected.dtype == dtype
            torch.testing.assert_close(
                out.float(), expected.float(), rtol=tol, atol=tol * expected.abs().max().item()
            )
        prefill = torch.randn(GEMV_MAX_ROWS + 1, k).to(dtype)
        assert torch.equal(layer(prefill), reference(prefill))


def test_inputs_that_need_a_gradient_take_the_torch_path() -> None:
    spec, codes, scale, _ = quantized_weight("int4", 32, 8, 64)
    layer = TritonLinear(spec, 64, 8, codes, scale, None, torch.float32)
    x = torch.randn(1, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


# ------------------------------------------------------------------------------------------------
# W8A8: the int8 GEMM with its rescale epilogue, in the interpreter
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "n", "k", "tile", "bias"),
    [
        (1, 8, 32, None, True),  # one token
        (5, 37, 64, None, False),  # partial tiles in M and N
        (40, 70, 200, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}, True),  # K not a multiple of BLOCK_K
    ],
)
def test_int8_gemm_equals_int_mm_and_the_rescale(
    m: int, n: int, k: int, tile: dict[str, int] | None, bias: bool
) -> None:
    """Bit for bit: int32 accumulation, then float32 ``acc * (xs * ws) + bias`` as the torch backend computes."""
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    ws = torch.rand(n, generator=gen) * 0.01
    b = torch.randn(n, generator=gen) if bias else None
    xq, xs = quantize_activation(x)
    out = int8_gemm_scaled(xq, w, xs, ws, bias=b, config=tile)
    expected = (xq.to(torch.int32) @ w.to(torch.int32).t()).float() * (xs.reshape(-1, 1) * ws[None, :])
    if b is not None:
        expected = expected + b
    assert out.dtype == torch.float32 and torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_layer_equals_the_torch_backend(dtype: torch.dtype) -> None:
    spec = QuantSpec.create("int8", "int8")
    n, k = 24, 96
    w = torch.randn(n, k) * 0.05
    codes, scale = quantize_weight(w, spec)
    bias = (torch.randn(n) * 0.1).to(dtype)
    reference = TorchQuantizedLinear(spec, k, n, codes, scale, bias, dtype)
    layer = TritonLinear(spec, k, n, codes, scale, bias, dtype)
    with torch.no_grad():
        for shape in [(1, k), (3, k), (2, 20, k)]:
            x = torch.randn(shape).to(dtype)
            out, expected = layer(x), reference(x)
            assert out.dtype == expected.dtype == dtype and torch.equal(out, expected)


@pytest.mark.parametrize(
    ("m", "k", "dtype"), [(3, 100, torch.float32), (5, 64, torch.bfloat16), (1, 33, torch.float16)]
)
def test_quantize_rows_equals_quantize_activation(m: int, k: int, dtype: torch.dtype) -> None:
    """Bit for bit, ties (x = (n + 1/2) * scale) and an all-zero row included."""
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 3).to(dtype)
    x[0, :4] = (torch.tensor([0.5, -0.5, 1.5, 2.5]) * (x[0].abs().max().float() / 127)).to(dtype)
    if m > 1:
        x[1] = 0
    q, s = quantize_rows(x)
    q_ref, s_ref = quantize_activation(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


# ------------------------------------------------------------------------------------------------
# torch.compile: the kernels are custom ops, so a model of Triton layers compiles into one graph
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("weights", "activations"), [("int4", None), ("nf4", None), ("int8", "int8")])
def test_a_model_of_triton_layers_compiles_without_graph_breaks(
    weights: str, activations: str | None
) -> None:
    """fullgraph=True fails on any graph break; the compiled model computes what the eager one does."""
    spec = QuantSpec.create(weights, activations)

    def layer(n: int, k: int) -> TritonLinear:
        codes, scale = quantize_weight(torch.randn(n, k) * 0.05, spec)
        return TritonLinear(spec, k, n, codes, scale, torch.randn(n) * 0.1, torch.float32)

    torch._dynamo.reset()
    model = torch.nn.Sequential(layer(128, 64), torch.nn.GELU(), layer(32, 128)).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        for rows in (1, GEMV_MAX_ROWS + 1):  # the GEMV, then the prefill path (dequantize + F.linear)
            x = torch.randn(rows, 64)
            assert torch.equal(compiled(x), model(x))
