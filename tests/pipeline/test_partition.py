"""The functional core: balanced contiguous partitions, parameter counts, the bubble formula."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lightning_speedup.pipeline import (
    PipelineLayers,
    layer_param_counts,
    layer_times,
    partition_costs,
    plan_stages,
    theoretical_bubble,
)


def _brute_force(costs: list[float], k: int) -> float:
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        edges = (0, *cuts, n)
        best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(edges)))
    return best


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_partition_is_optimal_and_contiguous(seed: int, k: int) -> None:
    g = torch.Generator().manual_seed(seed)
    costs = torch.randint(1, 20, (7,), generator=g).tolist()
    bounds = partition_costs(costs, k)
    assert len(bounds) == k and bounds[0][0] == 0 and bounds[-1][1] == len(costs)
    assert all(a < b for a, b in bounds) and all(b == c for (_, b), (c, _) in itertools.pairwise(bounds))
    assert max(sum(costs[a:b]) for a, b in bounds) == _brute_force(costs, k)


def test_embedding_and_head_weigh_their_parameters() -> None:
    layers = [nn.Embedding(1000, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 1000)]
    counts = layer_param_counts(layers)
    assert counts == [64000, 4160, 4160, 65000]
    plan = plan_stages([float(c) for c in counts], counts, 2, 2, "params")
    # embedding and head weigh what they hold: each ends up beside one small layer
    assert plan.bounds == ((0, 2), (2, 4))
    assert plan.params == (68160, 69160)
    assert "stage 1 on pipeline rank 1" in plan.describe(["emb", "l1", "l2", "head"])


def test_shared_parameter_counted_once() -> None:
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert layer_param_counts([emb, head]) == [40, 0]


def test_layer_times_leave_grads_alone() -> None:
    layers = [nn.Linear(8, 8), nn.Linear(8, 8)]
    times = layer_times(layers, torch.randn(4, 8), torch.device("cpu"), repeats=2)
    assert len(times) == 2 and all(t > 0 for t in times)
    assert all(p.grad is None for layer in layers for p in layer.parameters())


def test_loop_placement() -> None:
    plan = plan_stages([1.0] * 8, [1] * 8, 4, 2, "params")
    assert [plan.rank_of(s) for s in range(4)] == [0, 1, 0, 1]
    assert plan.stages_of(1) == [1, 3]


def test_v_placement() -> None:
    plan = plan_stages([1.0] * 12, [1] * 12, 6, 3, "params", placement="v")
    assert [plan.rank_of(s) for s in range(6)] == [0, 1, 2, 2, 1, 0]
    assert plan.stages_of(0) == [0, 5] and plan.stages_of(2) == [2, 3]
    with pytest.raises(ValueError, match=r"num_stages must be 2 \* pipeline_size \(6\), got 4"):
        plan_stages([1.0] * 12, [1] * 12, 4, 3, "params", placement="v")
    with pytest.raises(ValueError, match="placement must be 'loop' or 'v'"):
        plan_stages([1.0] * 12, [1] * 12, 6, 3, "params", placement="w")


def test_theoretical_bubble() -> None:
    assert theoretical_bubble("gpipe", 4, 4) == pytest.approx(3 / 7)
    assert theoretical_bubble("1f1b", 4, 12) == pytest.approx(3 / 15)
    assert theoretical_bubble("interleaved_1f1b", 4, 4, 2) == pytest.approx(3 / 7 / 2)
    assert theoretical_bubble("1f1b", 1, 4) == 0.0


def test_too_many_stages_named() -> None:
    with pytest.raises(ValueError, match="Cannot split 3 layer"):
        partition_costs([1, 2, 3], 4)


def test_layer_times_measure_a_copy_on_the_measuring_device() -> None:
    """balance="time" measures a copy of each layer on the stage's device, fed the example moved there. The meta
    device stands in for a GPU: before, a layer's copy stayed on the CPU while the example moved (on a GPU:
    "Expected all tensors to be on the same device")."""
    with torch.device("meta"):
        built_on_meta = nn.Linear(8, 8)
    layers = PipelineLayers([nn.Linear(8, 8), built_on_meta], ["a", "b"], {}, {})
    meta = torch.device("meta")
    times = layer_times(
        layers.modules, torch.randn(4, 8), meta, repeats=1, materialize=layers.materialized_copy
    )
    assert len(times) == 2
    assert (
        layers.modules[0].weight.device.type == "cpu" and built_on_meta.weight.device.type == "meta"
    )  # untouched
    on_cpu = layers.materialized_copy(built_on_meta, torch.device("cpu"))
    assert on_cpu.weight.device.type == "cpu" and bool(
        on_cpu.weight.abs().sum() > 0
    )  # allocated and initialised
