"""The Ray bound declared in pyproject admits only versions whose ``ray.tune`` has what the package uses.

Ray 2.40 lacks ``ray.tune.RunConfig``, ``CheckpointConfig``, ``FailureConfig``, ``report`` and
``get_context`` (they moved there from ``ray.train`` in 2.41): the bound is 2.41.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'lightning-speedup[tune]'")

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
# Every name the package takes from ray.tune's top level.
USED = ("Callback", "Checkpoint", "CheckpointConfig", "FailureConfig", "ResultGrid", "ResumeConfig",
        "RunConfig", "TuneConfig", "Tuner", "get_context", "report", "with_parameters", "with_resources")  # fmt: skip


def _ray_requirement() -> Requirement:
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    (req,) = [Requirement(r) for r in extras["tune"] if Requirement(r).name == "ray"]
    return req


def test_declared_ray_bound_is_2_41_and_the_installed_ray_satisfies_it() -> None:
    req = _ray_requirement()
    assert "tune" in req.extras
    assert not req.specifier.contains("2.40.0") and req.specifier.contains("2.41.0"), req
    assert req.specifier.contains(Version(importlib.metadata.version("ray")))


def test_installed_ray_tune_has_every_name_the_package_imports() -> None:
    from ray import tune

    missing = [name for name in USED if not hasattr(tune, name)]
    assert not missing, f"ray.tune {importlib.metadata.version('ray')} lacks {missing}"
    import lightning_speedup.tune.sweep  # noqa: F401  (imports the config classes from ray.tune)


def test_build_requirements_can_read_the_spdx_license() -> None:
    data = tomllib.loads(PYPROJECT.read_text())
    assert isinstance(data["project"]["license"], str)
    (setuptools,) = [Requirement(r) for r in data["build-system"]["requires"] if r.startswith("setuptools")]
    assert not setuptools.specifier.contains("76.1") and setuptools.specifier.contains("77.0")
    assert "Framework :: Pytest" not in data["project"]["classifiers"]
