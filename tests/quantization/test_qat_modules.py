"""QAT layers and the prepare/to_float swaps: selection, reversibility, flags, bad input, torch.compile."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn

from lightning_speedup.bench.models import GPT, GPTConfig, ResNet9
from lightning_speedup.quantization import (
    QATConfig,
    QATConv2d,
    QATLinear,
    QATPrecision,
    QuantSpec,
    fake_quantize_weight,
    freeze_scales,
    prepare,
    qat_modules,
    select_layers,
    set_fake_quant,
    to_float,
)


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(32, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def test_first_and_last_layers_stay_float_by_default() -> None:
    net = ResNet9(width=8)
    prepare(net, "int8")
    names = [n for n, _ in qat_modules(net)]
    assert "net.0.0" not in names and "head" not in names  # stem conv and classifier
    assert "net.1.0" in names and "net.5.body.1.0" in names
    assert isinstance(net.net[0][0], nn.Conv2d) and not isinstance(net.net[0][0], QATConv2d)

    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16))
    prepare(gpt, "nf4")
    names = [n for n, _ in qat_modules(gpt)]
    assert names[0] == "blocks.0.attn.proj" and "lm_head" not in names and "blocks.0.attn.qkv" not in names
    assert gpt.lm_head.weight is gpt.tok_emb.weight  # the tie survives

    everything = prepare(_mlp(), "int8", exclude_first_last=False)
    assert len(list(qat_modules(everything))) == 4


def test_include_and_exclude_by_name_and_type() -> None:
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16))
    picked = [n for n, _ in select_layers(gpt, include=["blocks.*.mlp.*"], exclude=["blocks.1.*"])]
    assert picked == ["blocks.0.mlp.fc", "blocks.0.mlp.proj"]
    net = ResNet9(width=8)
    assert all(
        isinstance(m, nn.Linear) for _, m in select_layers(net, include=[nn.Linear], exclude_first_last=False)
    )
    assert not any(isinstance(m, nn.Linear) for _, m in select_layers(net, exclude=[nn.Linear]))


def test_swap_shares_parameters_and_to_float_restores_outputs() -> None:
    net = _mlp()
    x = torch.randn(5, 32)
    expected = net(x)
    weight = net[2].weight
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    prepare(net, "int4")
    assert isinstance(net[2], QATLinear) and net[2].weight is weight
    assert opt.param_groups[0]["params"][2] is net[2].weight  # the optimizer still updates the live weight
    quantized = net(x)
    assert not torch.equal(quantized, expected)
    torch.testing.assert_close(net[2].quantized_weight(), fake_quantize_weight(weight, net[2].spec))

    set_fake_quant(net, False)
    assert torch.equal(net(x), expected)
    set_fake_quant(net, True)
    to_float(net)
    assert type(net[2]) is nn.Linear and net[2].weight is weight
    assert torch.equal(net(x), expected)


def test_prepare_twice_is_a_no_op_but_another_recipe_is_an_error() -> None:
    net = prepare(_mlp(), "nf4")
    layer = net[2]
    prepare(net, "nf4")
    assert net[2] is layer
    with pytest.raises(ValueError, match=r"Layer '2' is already prepared for nf4.*to_float"):
        prepare(net, "int8")


def test_freeze_keeps_the_grid_while_weights_move() -> None:
    net = prepare(_mlp(), "int4", exclude_first_last=False)
    layer = net[2]
    before = layer.effective_scale().clone()
    freeze_scales(net)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    assert torch.equal(layer.effective_scale(), before)
    freeze_scales(net, False)
    torch.testing.assert_close(layer.effective_scale(), before * 3.0)


def test_lsq_scale_is_a_parameter_initialised_when_fake_quant_turns_on() -> None:
    net = prepare(_mlp(), "int8", scale="lsq", enabled=False)
    layer = net[2]
    assert any(p is layer.weight_scale for p in net.parameters())
    with torch.no_grad():
        layer.weight.mul_(2.0)
    layer.set_fake_quant(True)
    torch.testing.assert_close(layer.weight_scale.detach(), layer.weight.abs().amax(dim=1) / 127)
    # Unused (disabled) learnable scales still receive a (zero) gradient, as DDP requires.
    layer.set_fake_quant(False)
    net(torch.randn(3, 32)).sum().backward()
    assert layer.weight_scale.grad is not None and torch.count_nonzero(layer.weight_scale.grad) == 0


def test_state_dict_round_trip_between_qat_models() -> None:
    a = prepare(_mlp(), "int4", scale="lsq")
    freeze_scales(a)
    b = prepare(_mlp(), "int4", scale="lsq")
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 32)
    assert b[2].scales_frozen and torch.equal(a(x), b(x))
    c = prepare(_mlp(), "nf4", scale="lsq")
    with pytest.raises(ValueError, match="saved from a QAT layer with"):
        c.load_state_dict(a.state_dict(), strict=False)


def test_indivisible_layers_are_skipped_with_a_warning_naming_them_or_rejected() -> None:
    net = nn.Sequential(nn.Linear(8, 48), nn.Linear(48, 64), nn.Linear(64, 64), nn.Linear(64, 4))
    with pytest.warns(
        UserWarning, match=r"Layer '1' \(Linear, weight \(64, 48\)\): group_size 32 does not divide"
    ):
        prepare(net, "int4")
    assert type(net[1]) is nn.Linear and isinstance(net[2], QATLinear)
    with pytest.raises(ValueError, match=r"Layer '1' .* group_size 32 does not divide the reduction size 48"):
        prepare(
            nn.Sequential(nn.Linear(8, 48), nn.Linear(48, 64), nn.Linear(64, 4)), "int4", indivisible="error"
        )
    with pytest.raises(ValueError, match="none of the 1 selected layers"), pytest.warns(UserWarning):
        prepare(nn.Sequential(nn.Linear(8, 48), nn.Linear(48, 64), nn.Linear(64, 4)), "int4")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"include": ["blocks.*"]},
            ValueError,
            "The include pattern 'blocks.*' matches no quantizable layer",
        ),
        ({"exclude": ["2", "nope"]}, ValueError, "The exclude pattern 'nope' matches no quantizable layer"),
        ({"include": [3]}, TypeError, "include entries must be name patterns"),
        ({"include": ["0", "6"]}, ValueError, "No layer of Sequential was selected"),
        ({"indivisible": "ignore"}, ValueError, "indivisible must be 'skip' or 'error'"),
        ({"weights": "int2"}, ValueError, "Unknown weight format 'int2'"),
    ],
)
def test_bad_prepare_arguments(kwargs: dict, error: type[Exception], message: str) -> None:
    kwargs = {"weights": "int8", **kwargs}
    with pytest.raises(error, match=message):
        prepare(_mlp(), **kwargs)


def test_int8_activations_apply_to_linear_only_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    net = ResNet9(width=8)
    with caplog.at_level(logging.WARNING):
        prepare(net, "int8", "int8", exclude_first_last=False)
    assert "Conv2d layers" in caplog.text and "weight-only" in caplog.text
    layer = net.head
    x = torch.randn(3, 64) * 5
    from lightning_speedup.quantization import fake_quantize_activation

    expected = nn.functional.linear(fake_quantize_activation(x), layer.quantized_weight(), layer.bias)
    assert torch.equal(layer(x), expected)


def test_no_graph_breaks_under_torch_compile() -> None:
    """Dynamo traces the QAT forward in one graph; flipping a flag only recompiles."""
    net = prepare(_mlp(), "nf4", "int8", scale="lsq", exclude_first_last=False)
    x = torch.randn(4, 32)
    explanation = torch._dynamo.explain(net)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="eager")
    for enabled in (True, False, True):
        set_fake_quant(net, enabled)
        assert torch.equal(compiled(x), net(x))


def test_spec_objects_are_accepted() -> None:
    spec = QuantSpec.create("int4", group_size=64)
    net = prepare(_mlp(), spec)
    assert net[2].spec == spec


def test_recipe_arguments_beside_a_spec_are_refused_instead_of_dropped() -> None:
    spec = QuantSpec.create("int4")
    with pytest.raises(ValueError, match="Got a QuantSpec and also activations, group_size, scale"):
        prepare(_mlp(), spec, "int8", group_size=128, scale="lsq")
    with pytest.raises(ValueError, match="Got a QuantSpec and also group_size"):
        QATPrecision(spec, group_size=128)


def test_a_float_state_dict_loads_into_a_prepared_model() -> None:
    """The plain model's keys (weight, bias) load strictly; the QAT scales follow the loaded weights."""
    source = _mlp()
    net = prepare(_mlp(), "int4", scale="lsq")
    net.load_state_dict(source.state_dict())
    assert torch.equal(net[2].weight, source[2].weight)
    assert torch.equal(net[2].weight_scale, prepare(source, "int4", scale="lsq")[2].weight_scale)
    with pytest.raises(
        RuntimeError, match="Missing key"
    ):  # a state dict without the weights is still refused
        net.load_state_dict({k: v for k, v in source.state_dict().items() if k != "2.weight"})


def test_one_config_object_is_validated_once_and_equals_the_keyword_form() -> None:
    config = QATConfig(4, group_size=32, exclude=["0"], exclude_first_last=False)
    assert (
        config.weights == "int4"
        and config.exclude == ("0",)
        and config.spec == QuantSpec.create("int4", None, 32)
    )
    assert config == QATConfig.build("int4", group_size=32, exclude=["0"], exclude_first_last=False)
    assert QATConfig.build(config) is config
    by_config, by_keywords = (
        prepare(_mlp(), config),
        prepare(_mlp(), 4, group_size=32, exclude=["0"], exclude_first_last=False),
    )
    assert (
        [n for n, _ in qat_modules(by_config)] == [n for n, _ in qat_modules(by_keywords)] == ["2", "4", "6"]
    )
    precision = QATPrecision(config, base="32-true")
    assert precision.config is config and precision.spec == config.spec
    assert (
        QATPrecision("int4", base="32-true", group_size=32, exclude=["0"], exclude_first_last=False).config
        == config
    )


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: QATConfig("int3"), ValueError, "int3"),
        (lambda: QATConfig("int8", indivisible="warn"), ValueError, "indivisible must be 'skip' or 'error'"),
        (lambda: QATConfig("int8", include="lm_head"), TypeError, r"write include=\['lm_head'\]"),
        (lambda: QATConfig("int8", exclude=[3]), TypeError, "exclude entries must be name patterns"),
        (
            lambda: QATConfig("int8", exclude_first_last="no"),
            TypeError,
            "exclude_first_last must be True or False",
        ),
        (
            lambda: prepare(_mlp(), QATConfig("int8"), group_size=32),
            ValueError,
            "Got a QATConfig and also group_size",
        ),
        (
            lambda: QATPrecision(QATConfig("int8"), exclude_first_last=False),
            ValueError,
            "also exclude_first_last",
        ),
    ],
)
def test_bad_configs_fail_when_built(make: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make()
