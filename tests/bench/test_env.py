"""The facts recorded with every result: the optional packages' versions."""

from __future__ import annotations

import importlib.metadata

import pytest

from lightning_speedup.bench import env


def test_environment_records_the_installed_optional_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    # numpy stands in for an optional package that is installed (every environment has it); a name no
    # distribution has is left out, not recorded as None.
    monkeypatch.setattr(env, "OPTIONAL_PACKAGES", ("numpy", "lightning-speedup-no-such-package"))
    info = env.environment()
    assert info["numpy"] == importlib.metadata.version("numpy")
    assert "lightning-speedup-no-such-package" not in info
