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


def test_power_is_read_from_the_gpu_the_process_uses() -> None:
    """nvidia-smi numbers GPUs its own way; CUDA_VISIBLE_DEVICES may name them by index or by UUID."""
    rows = "0, GPU-aaaa1111-0000\n1, GPU-bbbb2222-0000\n2, GPU-cccc3333-0000"
    assert env.smi_index(None, rows) == 0  # every GPU visible
    assert env.smi_index("2,0", rows) == 2 and env.smi_index("2,0", rows, ordinal=1) == 0
    assert env.smi_index("GPU-bbbb2222-0000", rows) == 1
    assert env.smi_index("GPU-cccc", rows) == 2  # CUDA takes a unique UUID prefix too
    assert env.smi_index("1", rows, uuid="cccc3333-0000") == 2  # torch's UUID (no GPU- prefix) is surest
    for unknown in ("GPU-dddd", "GPU-", "MIG-aaaa1111-0000/1/0"):  # no match, ambiguous, a MIG slice
        assert env.smi_index(unknown, rows) is None, unknown
    assert env.smi_index("0", rows, ordinal=1) is None  # fewer visible devices than the ordinal
