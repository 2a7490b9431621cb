"""Runs notebooks/tuning_sweep.ipynb top to bottom in a fresh kernel (its own local Ray cluster) on the
small budget, as a user would, and checks what it shows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'lightning-speedup[tune]'")
# The notebook runner is in the dev extra; the GPU machines have neither it nor Ray.
pytest.importorskip("nbformat", reason="running notebooks needs nbformat and nbclient (dev extra)")
import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "tuning_sweep.ipynb"


def _text(cell: nbformat.NotebookNode) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def test_tuning_sweep_notebook_runs_on_the_small_budget(
    fashion_mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNING_SWEEP_BUDGET", "small")
    monkeypatch.setenv("TUNING_SWEEP_STORAGE", str(tmp_path / "sweeps"))
    monkeypatch.setenv("LIGHTNING_SPEEDUP_DATA", str(fashion_mnist_dir))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = "\n".join(_text(c) for c in code)
    assert "BUDGET='small'" in outputs
    # The per-trial table has the 8 trials, and the plot cell drew a figure.
    assert any(
        "image/png" in out.get("data", {}) for c in code for out in c.get("outputs", []) if "data" in out
    ), "no figure was drawn"
    best = float(re.search(r"best val_acc = ([0-9.]+)", outputs).group(1))
    assert 0.6 < best <= 1.0
    revalidated, reported = map(
        float, re.search(r"val_acc = ([0-9.]+) \(sweep reported ([0-9.]+)\)", outputs).groups()
    )
    assert revalidated == pytest.approx(reported, abs=1e-4)
    # Resuming the finished sweep loads it as it was recorded: the same trials, reports and best trial.
    resumed = re.search(
        r"8 trials, best val_acc ([0-9.]+), same best trial: True, same results: True", outputs
    )
    assert resumed, "the resumed sweep differs from the one it loaded"
    assert float(resumed.group(1)) == best
    assert (tmp_path / "sweeps" / "fashion_mnist_small").is_dir()
