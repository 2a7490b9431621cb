"""The "triton" backend: its 4-bit GEMV against a float64 reference, its layer against the torch backend.

Without a GPU the kernel runs in Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``)
before ``triton`` is first imported: ``triton.language``'s own jitted helpers (``tl.sum``, ...) are
built at import. Lightning imports triton whenever it is installed, so those tests live in
triton_interpreter_cases.py and :func:`test_in_the_triton_interpreter` runs them in a fresh pytest
process with the variable set (no other test sees it). They need the ``triton`` package, which CPU
wheels of PyTorch do not ship: skipped without it (``pip install triton`` runs them).

The ``gpu`` tests run the compiled, autotuned kernel on CUDA with bfloat16 inputs.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lightning_speedup.quantization import (
    QuantSpec,
    TritonLinear,
    load,
    quantize,
    quantize_weight,
    quantized_layers,
    resolve_backend,
    save,
)
from lightning_speedup.quantization.fake_quant import dequantize_weight
from lightning_speedup.quantization.formats import codebook
from lightning_speedup.quantization.modules import codes_to_storage
from lightning_speedup.quantization.triton_gemv import (
    GEMV_MAX_ROWS,
    dequantize_packed,
    interpreting,
    lut_gemv,
    triton_unavailable,
)
from tests.quantization.test_convert import _mlp

ROOT = Path(__file__).resolve().parents[2]
_MISSING = triton_unavailable()
needs_triton = pytest.mark.skipif(
    _MISSING is not None, reason=f"the Triton interpreter tests need the triton package: {_MISSING}"
)


def quantized_weight(
    fmt: str, group: int, n: int, k: int, device: str = "cpu"
) -> tuple[QuantSpec, Tensor, Tensor, Tensor]:
    """(spec, canonical codes, float32 scale, float64 dequantized (n, k) weight) of a random weight."""
    spec = QuantSpec.create(fmt, group_size=group)
    w = torch.randn(n, k, device=device) * 0.05
    w[0, :5] = 0.0  # a zero run and an outlier: the extreme codes
    w[1, 3] = 0.4
    codes, scale = quantize_weight(w, spec)
    return spec, codes, scale, dequantize64(spec, codes, scale, n, k)


def dequantize64(spec: QuantSpec, codes: Tensor, scale: Tensor, n: int, k: int) -> Tensor:
    """Exact (float64) ``LUT[code] * scale``: the weight the kernel multiplies by, without rounding."""
    g = int(spec.group_size)  # type: ignore[arg-type]
    if spec.weights == "int4":
        values = codes.double().reshape(n, k)
    else:
        values = codebook(spec.weights, codes.device).double()[codes.long()].reshape(n, k)
    return (values.reshape(n, k // g, g) * scale.double().reshape(n, k // g, 1)).reshape(n, k)


def assert_close_to_reference(out: Tensor, x: Tensor, w64: Tensor) -> None:
    """Within float32 summation error of the float64 result (bound: 1e-5 of sum |x_k w_nk| per output)."""
    ref = x.double() @ w64.T
    bound = 1e-5 * (x.double().abs() @ w64.abs().T) + 1e-30
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g}, ratio to bound {(err / bound).max():.3g}"


# ------------------------------------------------------------------------------------------------
# The kernel and the layer in Triton's interpreter (a child process; see the module docstring)
# ------------------------------------------------------------------------------------------------


def _triton_version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in importlib.metadata.version("triton").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return (0,)


@needs_triton
@pytest.mark.skipif(interpreting(), reason="this is the parent of the interpreter run")
@pytest.mark.skipif(
    _triton_version() < (3, 7),
    reason="Triton < 3.7's interpreter runs no loop with a runtime bound under numpy 2.4 (int() of a 1-d array)",
)
def test_in_the_triton_interpreter() -> None:
    """Runs triton_interpreter_cases.py under ``TRITON_INTERPRET=1`` in a fresh process."""
    cases = Path(__file__).with_name("triton_interpreter_cases.py")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)],
        capture_output=True, text=True, timeout=280, env=env, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"interpreter run failed:\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


def test_canonical_round_trips_the_codes_and_scales(tmp_path: Path) -> None:
    """Same storage as the torch backend: canonical() returns the codes and scales bit for bit, and a
    saved file loads back (here with backend='torch'; the file records backend 'triton')."""
    for fmt, group in [("int4", 32), ("nf4", 64)]:
        spec, codes, scale, _ = quantized_weight(fmt, group, 16, 128)
        layer = TritonLinear(spec, 128, 16, codes, scale, torch.randn(16), torch.float32)
        got_codes, got_scale = layer.canonical()
        assert torch.equal(got_codes, codes) and torch.equal(got_scale, scale)
        path = tmp_path / f"{fmt}.pt"
        save(nn.Sequential(layer), path)
        assert torch.load(path, weights_only=True)["header"]["layers"]["0"]["backend"] == "triton"
        loaded = load(path, nn.Sequential(nn.Linear(128, 16)), backend="torch")
        for a, b in zip(loaded[0].canonical(), (codes, scale)):
            assert torch.equal(a, b)
        assert set(layer.state_dict()) == {"qweight", "scale", "bias"}  # the codebook is never saved
    spec, codes, scale, _ = quantized_weight("nf4", 64, 4, 64)
    cast = TritonLinear(spec, 64, 4, codes, scale, None, torch.float32).to(torch.bfloat16)
    assert torch.equal(cast.lut_bits.view(torch.float32), codebook("nf4"))  # .to(dtype) cannot round it


# ------------------------------------------------------------------------------------------------
# bad input (no triton needed)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "activations", "in_features", "message"),
    [
        (
            "nf4",
            None,
            96,
            r"GEMV needs in_features divisible by the block size 64, .*\(got in_features=96\)\.$",
        ),
        ("fp4", None, 100, r"GEMV needs in_features divisible by the block size 64"),
        (
            "int8",
            None,
            128,
            r"kernels run 4-bit weight-only layers \(int4, nf4, fp4\) and int8 weights with int8 "
            r"activations, not int8",
        ),
        (
            "int4",
            "int8",
            128,
            r"kernels run 4-bit weight-only layers .*, not int4, group 32, int8 activations",
        ),
    ],
)
def test_shapes_and_recipes_the_kernel_cannot_run(
    weights: str, activations: str | None, in_features: int, message: str
) -> None:
    spec = QuantSpec.create(weights, activations)
    with pytest.raises(
        ValueError, match=r"layer 'blocks.0.fc' .* with backend='triton': triton: the Triton " + message
    ):
        resolve_backend("triton", spec, torch.device("cuda"), in_features, 256, "blocks.0.fc")


def test_missing_triton_is_an_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    convert_module = importlib.import_module("lightning_speedup.quantization.convert")  # not the function
    monkeypatch.setattr(convert_module, "triton_unavailable", lambda: "triton is not installed")
    with pytest.raises(ImportError, match=r"layer 'fc' with backend='triton': triton is not installed"):
        resolve_backend("triton", QuantSpec.create("int4"), torch.device("cuda"), 128, 64, "fc")


def test_auto_prefers_triton_on_cuda_and_falls_back_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    convert_module = importlib.import_module("lightning_speedup.quantization.convert")
    cuda = torch.device("cuda")  # resolving needs no GPU: it reads the device type only
    monkeypatch.setattr(convert_module, "triton_unavailable", lambda: None)
    monkeypatch.setattr(convert_module, "_bnb_available", lambda: True)
    w8a8 = QuantSpec.create("int8", "int8")
    for spec in (QuantSpec.create("int4"), QuantSpec.create("nf4"), QuantSpec.create("fp4"), w8a8):
        assert resolve_backend("auto", spec, cuda, 128, 64, "fc") == "triton"
    monkeypatch.setattr(convert_module, "triton_unavailable", lambda: "triton is not installed")
    assert resolve_backend("auto", QuantSpec.create("int4"), cuda, 128, 64, "fc") == "tinygemm"
    assert resolve_backend("auto", QuantSpec.create("nf4"), cuda, 128, 64, "fc") == "bnb"
    assert resolve_backend("auto", w8a8, cuda, 128, 64, "fc") == "bnb"
    monkeypatch.setattr(convert_module, "_bnb_available", lambda: False)
    assert resolve_backend("auto", QuantSpec.create("fp4"), cuda, 128, 64, "fc") == "torch"
    assert resolve_backend("auto", w8a8, cuda, 128, 64, "fc") == "torch"


def test_a_triton_layer_refuses_cpu_inputs_outside_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec, codes, scale, _ = quantized_weight("int4", 32, 8, 64)
    layer = TritonLinear(spec, 64, 8, codes, scale, None, torch.float32)
    with (
        torch.no_grad(),
        pytest.raises(RuntimeError, match=r"TritonLinear runs on CUDA, but its input is on cpu"),
    ):
        layer(torch.randn(1, 64))
    with torch.no_grad():  # prefill-sized inputs take the torch path, which runs anywhere
        assert layer(torch.randn(GEMV_MAX_ROWS + 1, 64)).shape == (GEMV_MAX_ROWS + 1, 8)
    w8a8 = QuantSpec.create("int8", "int8")
    codes, scale = quantize_weight(torch.randn(8, 64), w8a8)
    w8a8_layer = TritonLinear(w8a8, 64, 8, codes, scale, None, torch.float32)
    with (
        torch.no_grad(),
        pytest.raises(RuntimeError, match=r"TritonLinear runs on CUDA, but its input is on cpu"),
    ):
        w8a8_layer(torch.randn(GEMV_MAX_ROWS + 1, 64))  # W8A8 has no torch fallback by size


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"group_size": 24}, r"group_size must be a power of two >= 16 that divides K=64"),
        ({"k": 128}, r"x must be \(M, 128\)"),
        ({"n": 9}, r"An \(9, 64\) weight in groups of 32 needs 288 uint8 bytes"),
    ],
)
def test_lut_gemv_rejects_bad_arguments(kwargs: dict[str, int], message: str) -> None:
    args = {"group_size": 32, "n": 8, "k": 64} | kwargs
    with pytest.raises(ValueError, match=message):
        lut_gemv(
            torch.randn(1, 64), torch.zeros(256, dtype=torch.uint8), torch.ones(16), None, args["group_size"],
            args["n"], args["k"],
        )  # fmt: skip


def test_dequantize_packed_rejects_a_weight_of_another_size() -> None:
    with pytest.raises(
        ValueError, match=r"An \(8, 64\) weight in groups of 32 .* needs 256 packed bytes; got 255"
    ):
        dequantize_packed(torch.zeros(255, dtype=torch.uint8), torch.ones(16), None, 32, 8, 64, torch.float32)


# ------------------------------------------------------------------------------------------------
# CUDA (run on the device machine)
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("fmt", "group", "m", "n", "k"),
    [
        ("int4", 32, 1, 4096, 4096),
        ("int4", 128, 1, 4099, 11008),  # odd N; K / 2 = 5504 is no multiple of the 512-byte and larger tiles
        ("nf4", 64, 1, 4096, 11008),
        ("nf4", 64, 3, 1000, 2048),
        ("fp4", 64, 8, 2048, 4096),
    ],
)
def test_cuda_kernel_matches_float64_reference(fmt: str, group: int, m: int, n: int, k: int) -> None:
    """The compiled kernel, autotuned on each shape, with bf16 x."""
    spec, codes, scale, w64 = quantized_weight(fmt, group, n, k, device="cuda")
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    lut = None if fmt == "int4" else codebook(fmt, "cuda")
    out = lut_gemv(x, codes_to_storage(codes, spec), scale, lut, group, n, k)
    assert_close_to_reference(out, x, w64)


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_cuda_epilogue_adds_the_bias_in_float32_and_rounds_to_nearest(out_dtype: torch.dtype) -> None:
    spec, codes, scale, _ = quantized_weight("int4", 32, 300, 512, device="cuda")
    x, bias = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16), torch.randn(300, device="cuda")
    args = (x, codes_to_storage(codes, spec), scale, None, 32, 300, 512)
    tile = {"BLOCK_N": 8, "BLOCK_KB": 256}  # one summation order for both calls
    exact = lut_gemv(*args, config=tile)
    out = lut_gemv(*args, bias=bias.to(out_dtype), out_dtype=out_dtype, config=tile)
    assert torch.equal(out, (exact + bias.to(out_dtype).float()).to(out_dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int4", "nf4", "fp4"])
@pytest.mark.parametrize("rows", [1, 3, GEMV_MAX_ROWS, 300])
def test_cuda_layers_match_the_torch_backend_in_bf16(fmt: str, rows: int) -> None:
    model = _mlp().cuda()
    real = quantize(model, fmt, backend="triton", dtype=torch.bfloat16)
    reference = quantize(model, fmt, backend="torch", dtype=torch.bfloat16)
    assert {type(m) for _, m in quantized_layers(real)} == {TritonLinear}
    x = torch.randn(rows, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out, expected = real(x).float(), reference(x).float()
    # bf16 weights (torch) vs float32 weights (triton), then two GELUs and another layer in bf16.
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.gpu
def test_cuda_save_load_and_graph_capture(tmp_path: Path) -> None:
    """A file saved from triton layers rebuilds them; a decode step captured in a CUDA graph replays it."""
    real = quantize(_mlp().cuda(), "nf4", backend="triton", dtype=torch.bfloat16).eval()
    save(real, tmp_path / "t.pt")
    loaded = load(tmp_path / "t.pt", _mlp().cuda().to(torch.bfloat16)).eval()
    assert all(isinstance(m, TritonLinear) for _, m in quantized_layers(loaded))
    for (_, a), (_, b) in zip(quantized_layers(real), quantized_layers(loaded)):
        for ta, tb in zip(a.canonical(), b.canonical()):
            assert torch.equal(ta, tb)
    x = torch.randn(1, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = loaded(x)  # the first call autotunes, outside the capture
        assert torch.equal(eager, real(x))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = loaded(x)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("fmt", "group", "n", "k"), [("int4", 32, 4099, 4096), ("int4", 128, 64, 11008), ("nf4", 64, 1000, 11008),
                                 ("fp4", 64, 333, 2048)]
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_dequantize_is_bit_exact_with_the_torch_backend(
    fmt: str, group: int, n: int, k: int, dtype: torch.dtype
) -> None:
    """The prefill path's one-kernel dequantization rounds float32 ``code * scale`` to dtype like torch."""
    spec, codes, scale, _ = quantized_weight(fmt, group, n, k, device="cuda")
    lut = None if fmt == "int4" else codebook(fmt, "cuda")
    out = dequantize_packed(codes_to_storage(codes, spec), scale, lut, group, n, k, dtype)
    assert torch.equal(out, dequantize_weight(codes, scale, spec, (n, k), dtype))


@pytest.mark.gpu
@pytest.mark.parametrize(("weights", "activations"), [("int4", None), ("nf4", None), ("int8", "int8")])
def test_cuda_compiled_model_is_one_graph_and_computes_the_eager_outputs(
    weights: str, activations: str | None
) -> None:
    """Inductor, fullgraph=True (any graph break fails): the kernels run as custom ops inside the graph."""
    torch._dynamo.reset()
    real = quantize(_mlp().cuda(), weights, activations, backend="triton", dtype=torch.bfloat16).eval()
    compiled = torch.compile(real, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for rows in (1, 300):  # the GEMV, then prefill
            x = torch.randn(rows, 64, device="cuda", dtype=torch.bfloat16)
            out, expected = compiled(x).float(), real(x).float()
            # Inductor may fuse the GELUs and bias adds with other roundings than eager bf16 does.
            torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
