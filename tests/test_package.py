"""The package: cheap import, strategy-string registration through one mechanism."""

from __future__ import annotations

import importlib
import subprocess
import sys

import lightning as L
import pytest
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry

import lightning_speedup
from lightning_speedup import _registry


def test_import_is_cheap() -> None:
    code = (
        "import sys, lightning_speedup; "
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('ray', 'bitsandbytes', 'optuna')]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"import lightning_speedup pulled in {proc.stdout}"


def test_version() -> None:
    assert lightning_speedup.__version__


def test_public_names() -> None:
    """``__all__`` is the Trainer-facing API; the registry plumbing stays in the private ``_registry``."""
    expected = {
        "AsyncProgressBarMetrics", "Compile", "CompressedDDPStrategy", "DataStallMonitor",
        "DeviceResidentDataModule", "DiLoCoStrategy", "EagerCUDAGraphs", "GPUAugment", "GPUPrefetcher",
        "GossipSGDStrategy", "LRRangeTest", "LRScheduleCallback", "LocalSGDStrategy", "OneCycle",
        "ParameterAveragingStrategy", "PipelineStrategy", "QATPrecision", "RangeTestDivergedError", "SDPABackends",
        "WarmupCosine", "WarmupStableDecay", "__version__", "augment", "check_strategy_name",
        "quantization", "tune",
    }  # fmt: skip
    assert set(lightning_speedup.__all__) == expected
    for name in ("register_strategies", "registered_strategy", "strategy_names"):
        assert not hasattr(lightning_speedup, name), name
    # One augment module under two names: ls.augment is ls.data.augment, and importable as either.
    assert lightning_speedup.augment is importlib.import_module("lightning_speedup.data.augment")
    assert importlib.import_module("lightning_speedup.augment") is lightning_speedup.augment
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        _ = lightning_speedup.nonexistent  # type: ignore[attr-defined]


def test_tune_is_imported_on_first_use() -> None:
    code = (
        "import sys, lightning_speedup as ls; "
        "assert 'ray' not in sys.modules and 'tune' in dir(ls); "
        "sweep = ls.tune.tune_lightning; "
        "assert 'ray' in sys.modules and sweep.__module__ == 'lightning_speedup.tune.sweep'; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_registered_strategy_reaches_lightning() -> None:
    @_registry.registered_strategy
    class _TestStrategy(SingleDeviceStrategy):
        @classmethod
        def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
            strategy_registry.register("ls_test_single", cls, description="test alias", device="cpu")

    try:
        names = _registry.register_strategies()
        assert "ls_test_single" in names
        assert _registry.register_strategies() == names  # idempotent
        trainer = L.Trainer(strategy="ls_test_single", accelerator="cpu", logger=False)
        assert isinstance(trainer.strategy, _TestStrategy)
        with pytest.raises(ValueError, match="ls_test_singel"):
            L.Trainer(strategy="ls_test_singel", accelerator="cpu")
    finally:
        _registry._STRATEGY_CLASSES.remove(_TestStrategy)
        StrategyRegistry.remove("ls_test_single")


def test_decorator_requires_register_strategies() -> None:
    with pytest.raises(TypeError, match="register_strategies"):

        @_registry.registered_strategy
        class _NoAliases(SingleDeviceStrategy):
            pass


def test_the_oldest_supported_torch_is_declared_once() -> None:
    """pyproject's lower bound on torch is the version ``make test-torch-oldest`` installs."""
    import re
    from pathlib import Path

    from packaging.version import Version

    root = Path(__file__).resolve().parents[1]
    spec = re.search(r'^\s*"torch>=([\d.]+)"', (root / "pyproject.toml").read_text(), re.MULTILINE)
    assert spec, "pyproject.toml must bound torch from below (torch>=X.Y)"
    oldest = re.search(r"^TORCH_OLDEST \?= (\S+)$", (root / "Makefile").read_text(), re.MULTILINE)
    assert oldest, "the Makefile must name the oldest supported torch as TORCH_OLDEST"
    assert Version(oldest.group(1)) == Version(spec.group(1))
