"""The suite on a machine without the optional extras: the extras' tests skip with a reason, none errors.

``LIGHTNING_SPEEDUP_HIDE`` (read in ``tests/conftest.py``) makes Ray and bitsandbytes unimportable in a
pytest subprocess, as on the lent GPU machines, which have neither.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _pytest(*args: str, hide: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LIGHTNING_SPEEDUP_HIDE": hide, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_hidden_extras_cannot_be_imported() -> None:
    code = "import importlib\nfor name in ('ray', 'bitsandbytes.functional'):\n" + (
        "    try:\n        importlib.import_module(name)\n    except ModuleNotFoundError as e:\n"
        "        assert 'LIGHTNING_SPEEDUP_HIDE' in str(e), e\n    else:\n        raise SystemExit(name)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", "import tests.conftest\n" + code],
        cwd=REPO_ROOT, env={**os.environ, "LIGHTNING_SPEEDUP_HIDE": "ray,bitsandbytes", "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_collection_without_ray_and_bitsandbytes_skips_their_tests_with_a_reason() -> None:
    done = _pytest("--collect-only", "tests", hide="ray,bitsandbytes")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "error" not in done.stdout.splitlines()[-1].lower(), done.stdout[-4000:]
    skipped = "\n".join(line for line in done.stdout.splitlines() if line.startswith("SKIPPED"))
    for module in ("tests/tune/test_sweep.py", "tests/tune/test_units.py", "tests/tune/test_notebook.py"):
        assert re.search(rf"{module}:\d+: Ray is an optional extra", skipped), skipped
    assert re.search(r"test_fake_quant.py:\d+: bitsandbytes is an optional extra", skipped), skipped


def test_bnb_cases_skip_without_bitsandbytes() -> None:
    done = _pytest("tests/quantization/test_convert.py", "-k", "bnb", hide="bitsandbytes")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and "error" not in summary and "skipped" in summary, done.stdout[-3000:]
    assert "bitsandbytes is an optional extra" in done.stdout
