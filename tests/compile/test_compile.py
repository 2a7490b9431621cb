"""Regional compilation, the artifact cache and its key, the auto decision, the callback's errors."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

from lightning_speedup.bench.models import GPT, GPTConfig
from lightning_speedup.compile import (
    ArtifactCache,
    Compile,
    CompileRecord,
    EagerCUDAGraphs,
    cache_key,
    compile_regions,
    decide_compile,
    default_cache_dir,
    find_regions,
)
from lightning_speedup.compile.core import CACHE_ENV, PRIOR_COMPILE_S, expected_costs


def _gpt(n_layer: int = 3, width: int = 16) -> GPT:
    return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=n_layer, n_head=2, n_embd=width, dropout=0.0))


class _TwoKinds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3)])
        self.b = nn.ModuleList([_Wide() for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in (*self.a, *self.b):
            x = m(x)
        return x


class _Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


def test_find_regions_picks_the_repeated_block() -> None:
    gpt = _gpt()
    found = find_regions(gpt)
    assert [type(m).__name__ for m in found] == ["Block"] * 3
    assert find_regions(nn.Linear(2, 2)) == []
    assert [type(m).__name__ for m in find_regions(_TwoKinds(), ["_Wide"])] == ["_Wide", "_Wide"]
    with pytest.raises(ValueError, match=r"\['Nope'\] are not submodule classes of GPT.*Block"):
        find_regions(gpt, ["Nope"])


def test_regional_compile_compiles_each_block_class_once() -> None:
    torch._dynamo.reset()
    gpt = _gpt(n_layer=4)
    idx = torch.randint(0, 11, (2, 8))
    expected = gpt(idx)
    keys = list(gpt.state_dict())
    counter = CompileCounter()
    regions = compile_regions(gpt, backend=counter)  # type: ignore[arg-type]
    assert len(regions) == 4
    out = gpt(idx)
    out.sum().backward()
    gpt(idx)
    assert counter.frame_count == 1, "four identical blocks should compile once"
    torch.testing.assert_close(out, expected)
    assert list(gpt.state_dict()) == keys  # in-place compile: checkpoints keep their keys

    torch._dynamo.reset()
    counter = CompileCounter()
    two = _TwoKinds()
    compile_regions(two, ["_Wide"], backend=counter)  # type: ignore[arg-type]
    two(torch.randn(2, 4))
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_cache_key_hits_and_misses() -> None:
    gpt, x = _gpt(), torch.zeros(2, 8, dtype=torch.long)
    key = cache_key(gpt, x, None, "regional", "cpu")
    assert key == cache_key(_gpt(), torch.ones(2, 8, dtype=torch.long), None, "regional", "cpu")
    assert key != cache_key(gpt, torch.zeros(4, 8, dtype=torch.long), None, "regional", "cpu")  # shape
    assert key != cache_key(_gpt(n_layer=4), x, None, "regional", "cpu")  # model
    assert key != cache_key(_gpt(width=32), x, None, "regional", "cpu")  # parameter shapes
    assert key != cache_key(gpt.to(torch.bfloat16), x, None, "regional", "cpu")  # dtype
    assert key != cache_key(_gpt(), x, "max-autotune", "regional", "cpu")
    assert key != cache_key(_gpt(), x, None, "full", "cpu")
    assert key != cache_key(_gpt(), x, None, "regional", "NVIDIA H200")
    assert key != cache_key(_gpt(), x, None, "regional", "cpu", torch_version="2.11.0")
    # What is compiled, and how: an aot_eager run's artifacts and timings are not an inductor run's.
    assert key == cache_key(
        _gpt(), x, None, "regional", "cpu", backend="inductor", regions=None, fullgraph=False
    )
    assert key != cache_key(_gpt(), x, None, "regional", "cpu", backend="aot_eager")
    assert key != cache_key(_gpt(), x, None, "regional", "cpu", regions=["Block"])
    assert key != cache_key(_gpt(), x, None, "regional", "cpu", fullgraph=True)
    assert key != cache_key(_gpt(), x, None, "regional", "cpu", precision="bf16-mixed")
    two = cache_key(_gpt(), x, None, "regional", "cpu", regions=["Block", "MLP"])
    assert two == cache_key(_gpt(), x, None, "regional", "cpu", regions=["MLP", "Block"])


def test_cache_dir_default_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert str(default_cache_dir()).endswith(".cache/lightning_speedup/compile")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    assert ArtifactCache().directory == tmp_path / "c"
    assert ArtifactCache(tmp_path / "d").directory == tmp_path / "d"


def test_artifact_cache_round_trip_and_corrupt_file(tmp_path) -> None:
    """Real Inductor artifacts (a tiny CPU function) are saved, reloaded; a corrupt file warns and is rebuilt."""
    torch._dynamo.reset()
    cache = ArtifactCache(tmp_path)
    assert not cache.load_artifacts("k")  # miss

    @torch.compile(backend="inductor")
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) + 1

    f(torch.randn(8))
    assert cache.save_artifacts("k")
    assert cache.artifact_path("k").stat().st_size > 0
    assert cache.load_artifacts("k")  # hit

    cache.artifact_path("k").write_bytes(b"not an artifact")
    with pytest.warns(UserWarning, match=r"unreadable compile cache file .*k\.bin"):
        assert not cache.load_artifacts("k")
    assert not cache.artifact_path("k").exists()
    assert cache.save_artifacts("k") and cache.load_artifacts("k")  # rebuilt
    torch._dynamo.reset()


def test_records_round_trip_and_corrupt(tmp_path) -> None:
    cache = ArtifactCache(tmp_path)
    assert cache.read_record("k") is None
    cache.write_record("k", CompileRecord(compile_s=3.5, speedup=1.8))
    assert cache.read_record("k") == CompileRecord(3.5, 1.8)
    cache.record_path("k").write_text("{truncated")
    with pytest.warns(UserWarning, match=r"k\.json"):
        assert cache.read_record("k") is None
    assert not cache.record_path("k").exists()


@pytest.mark.parametrize(
    "content",
    [
        '{"compile_s": 1.0, "speedup": 0}',
        '{"compile_s": 1.0, "speedup": -2.0}',
        '{"compile_s": -3.0, "speedup": 2.0}',
        '{"compile_s": NaN, "speedup": 2.0}',
        '{"compile_s": 1.0, "speedup": Infinity}',
    ],
)
def test_records_out_of_range_are_discarded(tmp_path, content: str) -> None:
    """A record decide_compile cannot use is handled as a corrupt file: warned about, removed, re-measured."""
    cache = ArtifactCache(tmp_path)
    cache.record_path("k").write_text(content)
    with pytest.warns(UserWarning, match=r"k\.json \(ValueError: (compile_s|speedup) must be a finite"):
        assert cache.read_record("k") is None
    assert not cache.record_path("k").exists()


@pytest.mark.parametrize(
    ("eager_ms", "steps", "compile_s", "speedup", "want"),
    [
        (10.0, 10_000, 20.0, 1.5, True),  # 33 s saved > 20 s
        (10.0, 1_000, 20.0, 1.5, False),  # 3.3 s saved < 20 s
        (1.0, math.inf, 60.0, 1.1, True),  # a run bounded by time
        (10.0, 10_000, 1.0, 0.9, False),  # compiled is slower
        (10.0, 0, 0.0, 2.0, False),  # nothing left to save
    ],
)
def test_auto_decision_on_stubbed_timings(
    eager_ms: float, steps: float, compile_s: float, speedup: float, want: bool
) -> None:
    d = decide_compile(eager_ms / 1e3, steps, compile_s, speedup)
    assert d.compile is want
    if want:
        assert d.reason.startswith("compiling pays for itself") and d.expected_saving_s > 0
    else:
        assert d.reason.startswith(("compiling would not pay for itself", "compiled steps are not expected"))


def test_auto_costs_prefer_records() -> None:
    assert expected_costs("regional", CompileRecord(2.0, 3.0), False) == (
        2.0,
        3.0,
        "measured by an earlier run with the same key",
    )
    s, _, src = expected_costs("full", None, False)
    assert s == PRIOR_COMPILE_S["full"] and src == "documented priors"
    assert expected_costs("full", None, True)[0] < s
    with pytest.raises(ValueError, match="positive speed-up"):
        decide_compile(0.01, 10, 1.0, 0.0)


@pytest.mark.parametrize(
    "args",
    [
        (math.nan, 10, 1.0, 2.0),
        (0.01, math.nan, 1.0, 2.0),
        (0.01, 10, math.inf, 2.0),
        (0.01, 10, 1.0, math.nan),
        (0.01, 10, 1.0, math.inf),
    ],
)
def test_decide_compile_rejects_non_finite_inputs(args: tuple[float, float, float, float]) -> None:
    with pytest.raises(ValueError, match="finite"):
        decide_compile(*args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scope": "whole"}, "choose 'regional'"),
        ({"mode": "fast"}, "torch.compile's modes"),
        ({"measure_steps": 0}, "Compile: measure_steps must be an int >= 1"),
        (
            {"measure_steps": True},
            "Compile: measure_steps must be an int >= 1",
        ),  # bool is an int to isinstance
        ({"measure_steps": 2.0}, "Compile: measure_steps must be an int >= 1"),
        ({"regions": "Block"}, "list of class names"),
        ({"scope": "full", "regions": ["Block"]}, "only applies to scope='regional'"),
    ],
)
def test_compile_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Compile(**kwargs)


def test_cuda_graphs_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="must name an attribute"):
        EagerCUDAGraphs(module_attr="a.b")
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="EagerCUDAGraphs: num_warmup_iters must be an int >= 1"):
            EagerCUDAGraphs(num_warmup_iters=bad)  # type: ignore[arg-type]


class _LM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _gpt(n_layer=2)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(
    callback: L.Callback,
    steps: int,
    tmp_path,
    batches: int | None = None,
    before: tuple[L.Callback, ...] = (),
    module: type[_LM] | None = None,
    **trainer_kwargs: Any,
) -> _LM:
    """Train a fresh 2-layer GPT (``module``, default ``_LM``) for ``max_steps=steps`` on ``batches`` batches an
    epoch (default ``steps``), with ``before``'s callbacks ahead of ``callback``; ``trainer_kwargs`` override the
    Trainer's."""
    torch.manual_seed(0)
    data = torch.randint(0, 11, ((batches or steps) * 2, 9))
    ds = torch.utils.data.TensorDataset(data[:, :-1], data[:, 1:])
    model = (module or _LM)()
    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "max_steps": steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
        **trainer_kwargs,
    }
    L.Trainer(callbacks=[*before, callback], **kwargs).fit(
        model, torch.utils.data.DataLoader(ds, batch_size=2, drop_last=True)
    )
    return model


def test_inductor_on_cpu_warns_and_does_nothing(tmp_path) -> None:
    cb = Compile(cache_dir=str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="training uncompiled"):
        _fit(cb, 3, tmp_path)
    assert not cb.compiled and not (tmp_path / "cache").exists()


def test_auto_logs_its_decision(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    torch._dynamo.reset()
    cb = Compile(auto=True, backend="eager", measure_steps=2, cache_dir=str(tmp_path / "cache"))
    # The decision goes through Lightning's rank-zero logger, which may not propagate to the root logger
    # that caplog listens on (Lightning gives it its own handler when the root has none).
    lightning_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    lightning_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
            _fit(cb, 6, tmp_path)
    finally:
        lightning_log.removeHandler(caplog.handler)
    assert cb.decision is not None and not cb.decision.compile and not cb.compiled  # 3 steps left: no
    assert "Compile(auto): not compiling (regional): compiling would not pay for itself" in caplog.text
    torch._dynamo.reset()


class _CompiledAtTrainEnd(L.Callback):
    """Records which modules are compiled in place at the end of training (before the fit's teardown)."""

    def __init__(self) -> None:
        self.names: list[str] | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.names = _compiled_names(pl_module)


def _compiled_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]


def test_compile_always_regional_trains_with_eager_backend(tmp_path) -> None:
    torch._dynamo.reset()
    cb = Compile(backend="eager", measure_steps=2, cache_dir=str(tmp_path / "cache"))
    probe = _CompiledAtTrainEnd()
    model = _fit(cb, 5, tmp_path, before=(probe,))
    assert cb.compiled and probe.names == ["net.blocks.0", "net.blocks.1"]
    assert _compiled_names(model) == []  # undone at the end of the fit
    torch._dynamo.reset()


def test_compile_reused_for_a_second_fit_starts_afresh(tmp_path) -> None:
    """One callback, two fits (each a new Trainer and model): the second compiles its own model, and auto
    measures and decides again for the second run's length."""
    torch._dynamo.reset()
    cache = str(tmp_path / "cache")
    cb = Compile(backend="eager", measure_steps=2, cache_dir=cache)
    for _ in range(2):
        probe = _CompiledAtTrainEnd()
        _fit(cb, 4, tmp_path, before=(probe,))
        assert probe.names == ["net.blocks.0", "net.blocks.1"]

    auto = Compile(auto=True, backend="eager", measure_steps=2, cache_dir=cache)
    _fit(auto, 6, tmp_path)  # decides after 3 batches (1 warm-up + 2 timed)
    assert auto.decision is not None and "3 batches left" in auto.decision.reason
    _fit(auto, 8, tmp_path)
    assert auto.decision is not None and "5 batches left" in auto.decision.reason
    torch._dynamo.reset()


def test_auto_uses_only_a_record_of_the_same_backend_regions_and_precision(tmp_path) -> None:
    """An aot_eager run's record steers another aot_eager run, not an eager one, one with other regions or
    one at another precision."""
    torch._dynamo.reset()
    cache = str(tmp_path / "cache")
    first = Compile(auto=True, backend="aot_eager", measure_steps=1, cache_dir=cache)
    _fit(first, 3, tmp_path)
    assert first.decision is not None and not first.decision.compile and first._key is not None
    # As if that run had measured a large saving for free.
    ArtifactCache(cache).write_record(first._key, CompileRecord(compile_s=0.0, speedup=100.0))
    for kwargs, trainer_kwargs in [
        ({"backend": "eager"}, {}),
        ({"backend": "aot_eager", "regions": ["Block"]}, {}),
        ({"backend": "aot_eager"}, {"precision": "bf16-mixed"}),
    ]:
        other = Compile(auto=True, measure_steps=1, cache_dir=cache, **kwargs)
        _fit(other, 3, tmp_path, **trainer_kwargs)
        assert other.decision is not None and "documented priors" in other.decision.reason, kwargs
    same = Compile(auto=True, backend="aot_eager", measure_steps=1, cache_dir=cache)
    _fit(same, 3, tmp_path)
    assert same.decision is not None and "measured by an earlier run" in same.decision.reason
    assert same.decision.compile and same.compiled
    torch._dynamo.reset()


@pytest.mark.parametrize("bound", [{}, {"max_steps": -1, "max_epochs": 1}])
def test_auto_counts_batches_left_under_gradient_accumulation(tmp_path, bound: dict) -> None:
    """Steps are timed per batch, so the rest of the run counts batches: 8 batches, 3 of them measured, leave
    5, not the 3 optimizer steps of 2 batches each (bounded by max_steps=4, or by one epoch)."""
    cb = Compile(auto=True, backend="eager", measure_steps=2, cache_dir=str(tmp_path / "cache"))
    _fit(cb, 4, tmp_path, batches=8, accumulate_grad_batches=2, **bound)
    assert cb.decision is not None and "5 batches left x" in cb.decision.reason


def test_auto_discards_an_out_of_range_record_and_trains(tmp_path) -> None:
    """A record with speedup 0 in the cache is warned about and replaced by the priors, not an error
    mid-training."""
    cache = str(tmp_path / "cache")
    first = Compile(auto=True, backend="eager", measure_steps=1, cache_dir=cache)
    _fit(first, 3, tmp_path)
    assert first._key is not None
    record = ArtifactCache(cache).record_path(first._key)
    record.parent.mkdir(parents=True)
    record.write_text('{"compile_s": 1.0, "speedup": 0}')
    second = Compile(auto=True, backend="eager", measure_steps=1, cache_dir=cache)
    with pytest.warns(UserWarning, match="speedup must be a finite number > 0"):
        _fit(second, 3, tmp_path)
    assert second.decision is not None and "documented priors" in second.decision.reason
    assert not record.exists()


class _TrainStarted(L.Callback):
    def __init__(self) -> None:
        self.started = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = True


def test_unknown_region_fails_before_training(tmp_path) -> None:
    """A misspelt region fails at the start of fit, naming the classes present, before any batch runs."""
    started = _TrainStarted()
    cb = Compile(backend="eager", regions=["Blocks"], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"\['Blocks'\] are not submodule classes of _LM.*'Block'"):
        _fit(cb, 3, tmp_path, before=(started,))
    assert not started.started


def test_method_card_snippet_runs() -> None:
    """docs/methods/compile.md's Python snippet builds its Trainer."""
    import pathlib
    import re

    card = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "methods" / "compile.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    namespace: dict = {}
    exec(snippet, namespace)
    assert any(isinstance(c, Compile) and c.auto for c in namespace["trainer"].callbacks)


def test_compile_from_lightning_cli_yaml() -> None:
    """The card's YAML instantiates the callback through jsonargparse, as LightningCLI does."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[L.Callback])
    cfg = parser.parse_string(
        "callbacks:\n"
        "  - class_path: lightning_speedup.Compile\n"
        "    init_args: {scope: regional, auto: true, mode: null, cache: true, regions: [Block]}\n"
    )
    (cb,) = parser.instantiate_classes(cfg).callbacks
    assert isinstance(cb, Compile) and cb.auto and cb.scope == "regional" and cb.regions == ["Block"]


# --- the fit's compilation does not outlive it; what auto counts; what is checked -----------------------


@pytest.mark.parametrize("scope", ["full", "regional"])
def test_compiled_fit_leaves_copies_and_pickles_of_the_model_independent(tmp_path, scope: str) -> None:
    """After a compiled fit the model is uncompiled: a deep copy (quantize, EMA, best-model copies) runs its
    own weights, not the original's compiled call, and torch.save(model) works. Copies made during the fit
    run their own weights too."""
    import copy
    import io

    class _CopyDuringFit(L.Callback):
        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.copy = copy.deepcopy(pl_module)

    torch._dynamo.reset()
    during = _CopyDuringFit()
    model = _fit(Compile(scope=scope, backend="aot_eager", cache=False), 2, tmp_path, before=(during,))
    assert _compiled_names(model) == []
    x = torch.randint(0, 11, (2, 8))
    model.eval()
    for twin in (copy.deepcopy(model), during.copy):
        twin.eval()
        with torch.no_grad():
            for p in twin.parameters():
                p.zero_()
            assert not torch.allclose(twin(x), model(x))
            torch.testing.assert_close(twin(x), twin.net(x))
    torch.save(model, io.BytesIO())
    torch.save(during.copy, io.BytesIO())
    torch._dynamo.reset()


def test_bench_module_copies_compile_their_own_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bench module built with compile=True: a deep copy runs its own weights and pickles."""
    import copy
    import io

    from lightning_speedup.bench.modules import CharLM

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="eager"))  # fast on CPU
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = CharLM(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.0, compile=True)
    model.configure_model()
    model.eval()
    x = torch.randint(0, 11, (2, 8))
    with torch.no_grad():
        ref = model(x)
        twin = copy.deepcopy(model)
        for p in twin.parameters():
            p.zero_()
        assert not torch.allclose(twin(x), ref)
        torch.testing.assert_close(twin(x), twin.net(x))
        assert twin._forward is not None and twin._forward is not model._forward  # compiled its own
    torch.save(model, io.BytesIO())
    torch._dynamo.reset()


class _CompiledAtTrainStart(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.names = _compiled_names(pl_module)


def test_auto_second_fit_of_the_same_model_measures_it_uncompiled(tmp_path) -> None:
    """A second fit of a model compiled by the first starts uncompiled, so auto measures eager steps."""
    torch._dynamo.reset()
    cache = str(tmp_path / "cache")
    data = torch.randint(0, 11, (12, 9))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data[:, :-1], data[:, 1:]), batch_size=2
    )
    model = _LM()
    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    L.Trainer(callbacks=[Compile(backend="eager", cache_dir=cache)], max_steps=2, **kwargs).fit(model, loader)
    auto = Compile(auto=True, backend="eager", measure_steps=2, cache_dir=cache)
    started = _CompiledAtTrainStart()
    L.Trainer(callbacks=[started, auto], max_steps=6, **kwargs).fit(model, loader)
    assert started.names == []
    assert auto.decision is not None and "3 batches left" in auto.decision.reason
    torch._dynamo.reset()


def test_a_model_compiled_by_the_user_is_left_alone(tmp_path) -> None:
    """A model the user compiled: auto's eager steps would be compiled ones, so the callback warns and
    neither measures, decides nor writes a record."""
    torch._dynamo.reset()

    class _UserCompiled(L.Callback):
        def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
            pl_module.net.blocks[0].compile(backend="eager")

    cache = tmp_path / "cache"
    cb = Compile(auto=True, backend="eager", measure_steps=1, cache_dir=str(cache))
    with pytest.warns(UserWarning, match=r"_LM is already compiled \(net\.blocks\.0\).*without measuring"):
        _fit(cb, 4, tmp_path, before=(_UserCompiled(),))
    assert cb.decision is None and not cb.compiled and not list(cache.glob("*.json"))
    torch._dynamo.reset()


class _TwoOptimizers(_LM):
    """Manual optimization stepping two optimizers every batch: global_step grows by 2 a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        a, b = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        a.zero_grad()
        b.zero_grad()
        self.manual_backward(loss)
        a.step()
        b.step()

    def configure_optimizers(self) -> Any:
        params = list(self.parameters())
        half = len(params) // 2
        return torch.optim.SGD(params[:half], lr=0.1), torch.optim.SGD(params[half:], lr=0.1)


def test_auto_counts_batches_left_under_manual_optimization_with_two_optimizers(tmp_path) -> None:
    """max_steps=10 with two optimizer steps a batch ends after 5 batches: 3 measured leave 2, not 4."""
    torch._dynamo.reset()
    cb = Compile(auto=True, backend="eager", measure_steps=2, cache=False)
    _fit(cb, 10, tmp_path, module=_TwoOptimizers)
    assert cb.decision is not None and "2 batches left x" in cb.decision.reason


def test_batches_left_is_bounded_by_max_time() -> None:
    """A run bounded by Trainer(max_time=...) has the time left over the eager batch left, not inf."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import Timer

    from lightning_speedup.compile.callbacks import _batches_left

    class _Left(Timer):
        def time_remaining(self, stage: str = "train") -> float:
            return 2.0

    trainer = SimpleNamespace(
        accumulate_grad_batches=1,
        max_steps=-1,
        global_step=3,
        num_training_batches=math.inf,
        max_epochs=-1,
        current_epoch=0,
        callbacks=[_Left(duration={"seconds": 10})],
    )
    assert _batches_left(trainer, 2, eager_batch_s=0.01) == 200  # type: ignore[arg-type]
    trainer.max_steps = 50  # whichever ends the run first
    assert _batches_left(trainer, 2, eager_batch_s=0.01) == 47  # type: ignore[arg-type]


class _CallsNet(_LM):
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x).flatten(0, 1), y.flatten())


def test_full_scope_warns_when_training_step_bypasses_the_module(tmp_path) -> None:
    """scope='full' compiles the LightningModule's call; a training_step calling self.net(...) never runs it:
    warned after the first step, and no timing record is written."""
    torch._dynamo.reset()
    cache = tmp_path / "cache"
    cb = Compile(scope="full", backend="eager", measure_steps=1, cache_dir=str(cache))
    with pytest.warns(UserWarning, match=r"nothing was compiled.*training_step calls self\(\.\.\.\)"):
        _fit(cb, 4, tmp_path, module=_CallsNet)
    assert not list(cache.glob("*.json"))
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"backend": "aot-eager"},
            r"backend='aot-eager'\) is not a torch.compile backend. Did you mean 'aot_eager'",
        ),
        ({"backend": 3}, "backend name or a compiler function"),
        ({"mode": "max-autotune", "backend": "aot_eager"}, "mode is an Inductor setting"),
    ],
)
def test_compile_rejects_unknown_backends_and_modes_it_ignores(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Compile(**kwargs)


def test_compile_accepts_dynamo_backends_and_warns_about_an_unused_cache_dir(tmp_path) -> None:
    Compile(backend="cudagraphs")
    Compile(backend=CompileCounter())
    with pytest.warns(UserWarning, match="cache_dir does nothing without the cache"):
        Compile(cache=False, cache_dir=str(tmp_path))


def test_cache_key_covers_module_configuration_and_frozen_parameters() -> None:
    """Dropout's p, GELU's approximation and which parameters train change the graphs: another key."""
    x = torch.randn(2, 4)
    base = cache_key(nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Dropout(0.0)), x, None, "full", "cpu")
    assert base == cache_key(
        nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Dropout(0.0)), x, None, "full", "cpu"
    )
    assert base != cache_key(
        nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Dropout(0.3)), x, None, "full", "cpu"
    )
    tanh = nn.Sequential(nn.Linear(4, 4), nn.GELU(approximate="tanh"), nn.Dropout(0.0))
    assert base != cache_key(tanh, x, None, "full", "cpu")
    frozen = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Dropout(0.0)).requires_grad_(False)
    assert base != cache_key(frozen, x, None, "full", "cpu")


def test_sdpa_backends_reads_a_generator_once() -> None:
    from lightning_speedup.compile import SDPABackends

    assert SDPABackends(b for b in ["math"]).backends == ("math",)
