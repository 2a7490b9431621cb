"""The "triton" backend's W8A8 path: the int8 GEMM with its rescale epilogue, and the row quantizer.

Their interpreter runs (bit-exact against the torch backend on CPU) are in triton_interpreter_cases.py,
started by test_triton_gemv.py::test_in_the_triton_interpreter; the ``gpu`` tests here run the compiled,
autotuned kernels on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_speedup.quantization import TritonLinear, quantize, quantized_layers
from lightning_speedup.quantization.fake_quant import quantize_activation
from lightning_speedup.quantization.triton_int8 import int8_gemm_scaled, quantize_rows
from tests.quantization.test_convert import _mlp


@pytest.mark.parametrize(
    ("xq", "wq", "xs", "message"),
    [
        (torch.zeros(4, 32), torch.zeros(8, 32, dtype=torch.int8), torch.ones(4), r"must be 2-D int8, got torch.float32"),
        (torch.zeros(4, 32, dtype=torch.int8), torch.zeros(8, 16, dtype=torch.int8), torch.ones(4),
         r"xq \(M=4, K=32\) needs wq \(N, 32\), 4 activation scales and N weight scales; got wq \(8, 16\)"),
        (torch.zeros(4, 32, dtype=torch.int8), torch.zeros(8, 32, dtype=torch.int8), torch.ones(3), r"got wq \(8, 32\), 3"),
    ],
)  # fmt: skip
def test_int8_gemm_rejects_bad_arguments(xq: Tensor, wq: Tensor, xs: Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        int8_gemm_scaled(xq, wq, xs, torch.ones(8))


def test_quantize_rows_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"x must be 2-D float32/bfloat16/float16, got torch.int8 \(4, 8\)"):
        quantize_rows(torch.zeros(4, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"rows of up to 65536 values, got 65537"):
        quantize_rows(torch.zeros(1, 65537))


# ------------------------------------------------------------------------------------------------
# CUDA (run on the device machine)
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("m", "n", "k"), [(1, 4096, 4096), (17, 1000, 2048), (8192, 4096, 1000), (300, 16384, 4096)]
)
def test_cuda_int8_gemm_equals_int_mm_and_the_rescale(m: int, n: int, k: int) -> None:
    """Autotuned on each shape; bit for bit with torch._int_mm + the float32 rescale, rounded to bf16 once."""
    x = torch.randn(m, k, device="cuda")
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    ws, bias = torch.rand(n, device="cuda") * 0.01, torch.randn(n, device="cuda")
    xq, xs = quantize_activation(x)
    out = int8_gemm_scaled(xq, w, xs, ws, bias=bias.to(torch.bfloat16), out_dtype=torch.bfloat16)
    padded = torch.cat([xq, xq.new_zeros(max(0, 17 - m), k)])  # cuBLASLt needs more than 16 rows
    acc = torch._int_mm(padded, w.t())[:m]
    expected = acc.float() * (xs.reshape(-1, 1) * ws[None, :]) + bias.to(torch.bfloat16).float()
    assert torch.equal(out, expected.to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "k"), [(1, 4096), (8192, 4096), (300, 16384), (7, 1000)])
def test_cuda_quantize_rows_equals_quantize_activation(m: int, k: int) -> None:
    x = (torch.randn(m, k, device="cuda") * 3).to(torch.bfloat16)
    q, s = quantize_rows(x)
    q_ref, s_ref = quantize_activation(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_cuda_w8a8_triton_model_equals_the_torch_backend(rows: int) -> None:
    model = _mlp().cuda()
    real = quantize(model, "int8", "int8", backend="triton", dtype=torch.bfloat16)
    reference = quantize(model, "int8", "int8", backend="torch", dtype=torch.bfloat16)
    assert {type(m) for _, m in quantized_layers(real)} == {TritonLinear}
    x = torch.randn(rows, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(real(x), reference(x))
