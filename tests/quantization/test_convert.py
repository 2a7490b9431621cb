"""convert / quantize / save / load: real kernels reproduce the QAT model; files round-trip; bad input."""

from __future__ import annotations

import copy
import importlib.util
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_speedup.bench.models import ResNet9
from lightning_speedup.quantization import (
    BnbLinear,
    QuantizedConv2d,
    TinyGemmLinear,
    TorchQuantizedLinear,
    TritonLinear,
    convert,
    freeze_scales,
    load,
    prepare,
    qat_modules,
    quantize,
    quantized_layers,
    save,
    to_float,
    weight_bytes,
)


def _has_bitsandbytes() -> bool:
    # find_spec, not import: importing bitsandbytes initialises CUDA in this process (see test_multigpu).
    try:
        return importlib.util.find_spec("bitsandbytes") is not None
    except ModuleNotFoundError:  # hidden by LIGHTNING_SPEEDUP_HIDE (tests/conftest.py)
        return False


needs_bnb = pytest.mark.skipif(
    not _has_bitsandbytes(),
    reason="bitsandbytes is an optional extra: pip install 'lightning-speedup[quant]'",
)

# (weights, activations, backend, exact): "exact" backends compute with the same float ops as QAT.
CASES = [
    ("int8", None, "torch", True),
    ("int4", None, "torch", True),
    ("nf4", None, "torch", True),
    ("fp4", None, "torch", True),
    ("int4", "int8", "torch", True),
    ("int8", "int8", "torch", False),  # int32 accumulation vs float32 summation: ~1e-7 relative
    pytest.param("nf4", None, "bnb", True, marks=needs_bnb),
    pytest.param("fp4", None, "bnb", True, marks=needs_bnb),
    # bitsandbytes casts activations to float16 before quantizing them
    pytest.param("int8", "int8", "bnb", False, marks=needs_bnb),
]


def _mlp(bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128, bias=bias), nn.GELU(), nn.Linear(128, 192, bias=bias), nn.GELU(),
        nn.Linear(192, 64, bias=bias), nn.GELU(), nn.Linear(64, 10),
    )  # fmt: skip


def _trained_qat(weights: str, activations: str | None, scale: str = "absmax") -> nn.Sequential:
    """A QAT model after a few optimizer steps (weights and learned scales off their initial values)."""
    net = prepare(_mlp(), weights, activations, scale=scale)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        x = torch.randn(16, 64)
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return net.eval()


@pytest.mark.parametrize(("weights", "activations", "backend", "exact"), CASES)
@pytest.mark.parametrize("scale", ["absmax", "lsq"])
def test_converted_model_reproduces_the_qat_model(
    weights: str, activations: str | None, backend: str, exact: bool, scale: str
) -> None:
    qat = _trained_qat(weights, activations, scale)
    x = torch.randn(9, 64) * 2
    with torch.no_grad():
        expected = qat(x)
        real = convert(qat, backend)
        assert {type(m).backend for _, m in quantized_layers(real)} == {backend}
        # bitsandbytes' 4-bit CPU *inference* kernel computes in bfloat16 on AVX512-BF16 machines; its
        # training path dequantizes to float32 like QAT does, which is what "exact" checks. Linear8bitLt
        # stays in eval mode: its training path on CPU does not quantize the activations.
        if backend == "bnb" and weights != "int8":
            real.train()
        out = real(x)
    if exact:
        assert torch.equal(out, expected)
    else:
        tol = 1e-5 if backend == "torch" else 1e-2
        torch.testing.assert_close(out, expected, rtol=tol, atol=tol * expected.abs().max().item())
    assert isinstance(qat[2].weight, nn.Parameter), "convert() must not modify its input by default"


@needs_bnb
def test_bnb_cpu_inference_kernel_matches_to_bfloat16_precision() -> None:
    qat = _trained_qat("nf4", None)
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = qat(x)
        out = convert(qat, "bnb").eval()(x)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("weights", ["int8", "int4", "nf4"])
def test_conv_weight_only_storage_reproduces_qat(weights: str) -> None:
    torch.manual_seed(0)
    net = prepare(ResNet9(width=32), weights).eval()  # int4 groups of 32 need in_channels * 9 % 32 == 0
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        expected = net(x)
        real = convert(net)
        assert torch.equal(real(x), expected)
    convs = [m for _, m in quantized_layers(real) if isinstance(m, QuantizedConv2d)]
    assert len(convs) == 7
    assert weight_bytes(real) < 0.6 * weight_bytes(net)


def test_frozen_scales_are_what_convert_uses() -> None:
    net = prepare(_mlp(), "nf4")
    freeze_scales(net)
    with torch.no_grad():
        net[2].weight.mul_(1.5)  # the weights move after the freeze; the grid must not
    net.eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(convert(net, "torch")(x), net(x))


def test_quantize_is_ptq_and_leaves_the_float_model_alone(caplog: pytest.LogCaptureFixture) -> None:
    fp = _mlp().eval()
    x = torch.randn(3, 64)
    before = fp(x)
    with caplog.at_level(logging.INFO, logger="lightning_speedup.quantization.convert"):
        ptq = quantize(fp, "nf4")
    assert "convert(backend='auto') picked torch for 2 layers" in caplog.text  # CPU: always the exact backend
    assert torch.equal(fp(x), before)
    assert all(isinstance(m, TorchQuantizedLinear) for _, m in quantized_layers(ptq))
    reference = prepare(_mlp(), "nf4").eval()
    with torch.no_grad():
        assert torch.equal(ptq(x), reference(x))


def test_weight_memory() -> None:
    layer = nn.Sequential(nn.Linear(8, 8), nn.Linear(256, 512, bias=False), nn.Linear(8, 8))
    fp_bytes = 256 * 512 * 4
    for weights, expected in [("int8", 256 * 512 + 512 * 4), ("int4", 256 * 512 // 2 + 512 * 8 * 4),
                              ("nf4", 256 * 512 // 2 + 256 * 512 // 64 * 4)]:  # fmt: skip
        real = quantize(layer, weights)
        assert weight_bytes(real) - weight_bytes(layer) == expected - fp_bytes


@needs_bnb
def test_bnb_weight_memory_equals_the_torch_backends() -> None:
    layer = nn.Sequential(nn.Linear(8, 8), nn.Linear(256, 512, bias=False), nn.Linear(8, 8))
    assert weight_bytes(quantize(layer, "nf4", backend="bnb")) == weight_bytes(quantize(layer, "nf4"))


def test_dtype_casts_the_rest_of_the_model() -> None:
    real = quantize(_mlp(), "int4", dtype=torch.bfloat16)
    assert real[0].weight.dtype == torch.bfloat16 and real[2].scale.dtype == torch.float32
    assert real(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize(("weights", "activations"), [("int8", None), ("int4", None), ("int8", "int8")])
def test_casting_a_converted_model_equals_converting_to_that_dtype(
    weights: str, activations: str | None
) -> None:
    """model.to(torch.bfloat16) after convert() casts the quantized layers' scales too, and left their compute
    dtype float32: the forward refused the bf16 input (mat2 float). The layers now follow the cast as float layers
    do, scales kept float32: the same model as convert(dtype=torch.bfloat16), and .float() undoes it."""
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Conv2d(8, 8, 2, stride=2), nn.Flatten(), nn.Linear(8 * 4 * 4, 64), nn.ReLU(),
                                nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))  # fmt: skip
    spec = {"exclude_first_last": False}

    def converted(dtype: torch.dtype | None) -> nn.Module:
        return convert(
            prepare(copy.deepcopy(float_model), weights, activations, **spec), "torch", dtype=dtype
        )

    cast, direct = converted(None).to(torch.bfloat16), converted(torch.bfloat16)
    x = torch.randn(4, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(cast(x.bfloat16()), direct(x.bfloat16()))
    layers = [m for m in cast.modules() if isinstance(m, (TorchQuantizedLinear, QuantizedConv2d))]
    assert len(layers) == 4 and all(m.weight_dtype == torch.bfloat16 for m in layers)
    assert all(m.scale.dtype == torch.float32 for m in layers)
    assert cast.state_dict().keys() == direct.state_dict().keys()
    assert all(torch.equal(v, direct.state_dict()[k]) for k, v in cast.state_dict().items())
    back = cast.float()
    with torch.no_grad():
        assert back(x).dtype == torch.float32
    assert all(m.weight_dtype == torch.float32 for m in layers)


def test_a_model_saved_in_another_dtype_loads_in_it(tmp_path: Path) -> None:
    """convert(dtype=bfloat16) casts the float layers too; load() copied them into the fresh model's float32
    tensors, so the loaded model took neither bfloat16 nor float32 inputs."""
    real = quantize(_mlp(), "int4", dtype=torch.bfloat16)
    save(real, tmp_path / "bf16.pt")
    loaded = load(tmp_path / "bf16.pt", _mlp())
    assert loaded[0].weight.dtype == torch.bfloat16
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(x), real(x))


def test_lsq_layers_never_switched_on_convert_with_the_trained_weights_absmax() -> None:
    """A learnable scale is initialised when fake quantization switches on; one that never did (start_step not
    reached) still held the scale of the weights at prepare time, which clipped the trained weights."""
    net = prepare(_mlp(), "int4", scale="lsq", enabled=False)
    with torch.no_grad():
        for _, layer in qat_modules(net):
            layer.weight.mul_(3.0)  # training moved the weights
    real = convert(net, "torch")
    plain = quantize(to_float(copy.deepcopy(net)), "int4")
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(real(x), plain(x))


def test_a_layer_registered_under_two_names_is_converted_under_both() -> None:
    shared = nn.Linear(64, 64)
    net = nn.Sequential(nn.Linear(64, 64), shared, nn.ReLU(), shared, nn.Linear(64, 4))
    prepare(net, "int4")
    assert type(net[1]) is type(net[3]) and net[1] is net[3]
    real = convert(net, "torch")
    assert isinstance(real[1], TorchQuantizedLinear) and real[1] is real[3]
    # a failed prepare leaves no layer swapped
    failing = nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 48), nn.Linear(48, 64), nn.Linear(64, 4))
    with pytest.raises(ValueError, match="does not divide"):
        prepare(failing, "int4", indivisible="error")
    assert not list(qat_modules(failing))


@pytest.mark.parametrize(("weights", "activations", "backend", "exact"), CASES)
def test_save_load_round_trip(
    tmp_path: Path, weights: str, activations: str | None, backend: str, exact: bool
) -> None:
    real = convert(_trained_qat(weights, activations, "lsq"), backend).train()
    path = tmp_path / f"model-{weights}.pt"
    save(real, path)
    loaded = load(path, _mlp()).train()
    x = torch.randn(6, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), real(x))
    for (name, a), (_, b) in zip(quantized_layers(real), quantized_layers(loaded)):
        assert type(a) is type(b), name
        for ta, tb in zip(a.canonical(), b.canonical()):
            assert torch.equal(ta, tb)
    assert torch.equal(loaded[0].weight, real[0].weight)  # the float layers come back too
    # The same file runs on another backend with the same codes and scales.
    other = load(path, _mlp(), backend="torch")
    assert all(type(m).backend == "torch" for _, m in quantized_layers(other))


def test_save_load_conv_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    real = quantize(ResNet9(width=32), "int4").eval()
    save(real, tmp_path / "resnet.pt")
    loaded = load(tmp_path / "resnet.pt", ResNet9(width=32), weights="int4").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), real(x))


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_convert_needs_qat_layers() -> None:
    with pytest.raises(
        ValueError, match=r"Sequential has no QAT layers to convert.*quantize\(model, weights\)"
    ):
        convert(_mlp())


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="Unknown backend 'cutlass'"):
        convert(prepare(_mlp(), "nf4"), "cutlass")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize(("weights", "backend"), [("int4", "tinygemm"), ("nf4", "triton")])
def test_backend_on_an_unsupported_device_names_the_layer(weights: str, backend: str) -> None:
    with pytest.raises(
        RuntimeError,
        match=rf"layer '2' with backend='{backend}': {backend}: runs on cuda, the layer is on cpu",
    ):
        convert(prepare(_mlp(), weights), backend)


@pytest.mark.parametrize(
    ("weights", "activations", "backend", "message"),
    [
        (
            "int4",
            None,
            "bnb",
            r"layer '2' \(int4, group 32\) with backend='bnb': bnb: bitsandbytes runs nf4/fp4",
        ),
        ("int8", None, "bnb", r"layer '2' \(int8\) with backend='bnb'"),
        ("nf4", "int8", "bnb", r"layer '2' \(nf4, group 64, int8 activations\) with backend='bnb'"),
    ],
)
def test_backend_that_cannot_run_the_recipe_names_the_layer(
    weights: str, activations: str | None, backend: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        convert(prepare(_mlp(), weights, activations), backend)


def test_conv_layers_need_the_torch_backend() -> None:
    with pytest.raises(ValueError, match=r"Conv2d layer 'net.1.0' can only be stored weight-only"):
        convert(prepare(ResNet9(width=8), "nf4"), "bnb")


def test_save_refuses_unconverted_models(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no quantized layers"):
        save(_mlp(), tmp_path / "x.pt")


def test_load_rejects_a_file_of_another_format(tmp_path: Path) -> None:
    path = tmp_path / "model-nf4.pt"
    save(quantize(_mlp(), "nf4"), path)
    with pytest.raises(ValueError, match=r"model-nf4.pt holds nf4 weights, but weights='int4' was requested"):
        load(path, _mlp(), weights="int4")


def test_load_rejects_files_that_are_not_quantized_models(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save(_mlp().state_dict(), plain)
    with pytest.raises(ValueError, match=r"plain.pt is not a quantized-model file"):
        load(plain, _mlp())
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"garbage.pt is not a quantized-model file"):
        load(garbage, _mlp())


def test_load_names_the_file_and_the_reason_for_empty_and_text_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pt is empty \(0 bytes\)"):
        load(empty, _mlp())
    text = tmp_path / "notes.pt"
    text.write_text("hello\n")
    with pytest.raises(ValueError, match=r"notes.pt is not a quantized-model file .*\(\w+Error: .+\)"):
        load(text, _mlp())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b["header"]["layers"]["2"].pop("spec"), r"layer '2' lacks some of its header fields"),
        (lambda b: b["layers"].pop("2"), r"layer '2' has no 'codes'/'scale' tensors"),
        (
            lambda b: b["header"]["layers"]["2"]["spec"].update(weights="int3"),
            r"layer '2' has an invalid recipe",
        ),
        (lambda b: b["header"]["layers"]["2"].update(weight_dtype="float99"), r"weight dtype 'float99'"),
        (lambda b: b.pop("state_dict"), r"the 'state_dict' section is missing"),
        (lambda b: b["header"].pop("layers"), r"lacks its 'layers' table"),
    ],
)
def test_load_of_a_damaged_file_names_the_file_and_leaves_the_model(
    tmp_path: Path, damage: Any, message: str
) -> None:
    path = tmp_path / "m.pt"
    save(quantize(_mlp(), "int8"), path)
    blob = torch.load(path, weights_only=True)
    damage(blob)
    torch.save(blob, path)
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"m.pt is damaged: .*{message}"):
        load(path, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not quantized_layers(model)


def test_save_replaces_the_file_atomically(tmp_path: Path) -> None:
    """save writes a temporary file and renames it: a save that fails half-way leaves the previous file whole."""
    from lightning_speedup.quantization.convert import _save_atomically

    path = tmp_path / "m.pt"
    save(quantize(_mlp(), "int8"), path)
    good = path.read_bytes()
    with pytest.raises(Exception, match="pickle"):
        _save_atomically({"tensor": torch.zeros(1000), "fn": lambda: 0}, path)  # a lambda cannot be pickled
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no temporary file left behind
    save(quantize(_mlp(), "nf4"), path)
    assert quantized_layers(load(path, _mlp(), weights="nf4"))


def test_load_rejects_another_architecture(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save(quantize(_mlp(), "int8"), path)
    wrong = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 96), nn.GELU(), nn.Linear(96, 64))
    with pytest.raises(ValueError, match=r"m.pt: layer '2' was saved as a linear with weight \(192, 128\)"):
        load(path, wrong)


# ------------------------------------------------------------------------------------------------
# CUDA backends (run on the device machine)
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("weights", "activations", "backend", "layer_type"),
    [
        ("int4", None, "tinygemm", TinyGemmLinear),
        ("int4", None, "triton", TritonLinear),
        ("nf4", None, "triton", TritonLinear),
        ("int8", "int8", "torch", TorchQuantizedLinear),
        pytest.param("nf4", None, "bnb", BnbLinear, marks=needs_bnb),
        pytest.param("fp4", None, "bnb", BnbLinear, marks=needs_bnb),
        pytest.param("int8", "int8", "bnb", BnbLinear, marks=needs_bnb),
    ],
)
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_cuda_backends_reproduce_qat_in_bf16(
    weights: str, activations: str | None, backend: str, layer_type: type, rows: int
) -> None:
    qat = _trained_qat(weights, activations).cuda()
    x = torch.randn(rows, 64, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected = qat(x).float()
        real = convert(qat, backend)
        assert all(isinstance(m, layer_type) for _, m in quantized_layers(real))
        out = real(x).float()
    torch.testing.assert_close(out, expected, rtol=3e-2, atol=3e-2 * expected.abs().max().item())


@pytest.mark.gpu
def test_tinygemm_canonical_round_trip(tmp_path: Path) -> None:
    real = convert(_trained_qat("int4", None).cuda(), "tinygemm")
    save(real, tmp_path / "t.pt")
    loaded = load(tmp_path / "t.pt", _mlp().cuda())
    x = torch.randn(4, 64, device="cuda")
    with torch.no_grad():
        assert torch.equal(loaded(x), real(x))
    codes, scale = real[2].canonical()
    assert codes.abs().max() <= 8 and scale.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("weights", ["int4", "nf4"])
def test_auto_backend_on_cuda(weights: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lightning_speedup.quantization.convert"):
        real = quantize(_mlp().cuda(), weights)
    assert "picked triton" in caplog.text and isinstance(real[2], TritonLinear)


@needs_bnb
def test_bitsandbytes_is_imported_only_for_bnb_layers() -> None:
    code = (
        "import sys, torch, lightning_speedup.quantization as q\n"
        "net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))\n"
        "q.quantize(net, 'nf4')\n"
        "assert 'bitsandbytes' not in sys.modules, 'imported too early'\n"
        "q.quantize(net, 'nf4', backend='bnb')\n"
        "assert 'bitsandbytes' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
