"""README's headline table and docs/case-studies.md agree with the result files they are generated from."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _case_studies() -> ModuleType:
    spec = importlib.util.spec_from_file_location("case_studies", ROOT / "benchmarks" / "case_studies.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


cs = _case_studies()


def test_committed_readme_and_case_study_agree_with_the_result_files() -> None:
    diff = cs.check()
    assert diff == "", "run: python benchmarks/case_studies.py --write\n" + diff
    assert cs.main(["--check"]) == 0


def test_every_block_is_in_its_file() -> None:
    for block in cs.blocks():
        text = block.path.read_text()
        assert text.count(block.start) == 1 and block.end in text, f"{block.path.name}: {block.start}"


@pytest.fixture
def results_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(cs.RESULTS, tmp_path / "results"))


def test_a_changed_result_file_is_detected(results_copy: Path) -> None:
    # Today's `speedup` on Fashion-MNIST is stored as `speedup-eager`: double its runs' time to target.
    runs = results_copy / cs.COLD_FOLDER / "fashion-mnist" / "runs"
    medians = []
    for path in sorted(runs.glob("speedup-eager-seed*.json")):
        run = json.loads(path.read_text())
        run["time_to_target_s"] *= 2
        medians.append(run["time_to_target_s"])
        path.write_text(json.dumps(run))
    assert len(medians) == 3
    new = sorted(medians)[1]
    diff = cs.check(results=results_copy)
    changed = [line for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert (
        "README.md (from the result files)" in diff and "docs/case-studies.md (from the result files)" in diff
    )
    assert any(f"**{new:.1f} s**" in line and "`speedup`" in line for line in changed), diff
    assert any("**15.4 s**" in line for line in diff.splitlines() if line.startswith("-")), diff


def test_a_changed_number_in_the_readme_is_detected(tmp_path: Path) -> None:
    readme, doc = tmp_path / "README.md", tmp_path / "case-studies.md"
    readme.write_text(cs.README.read_text().replace("**3.12x**", "**3.21x**", 1))
    doc.write_text(cs.CASE_STUDIES.read_text())
    diff = cs.check(files=cs.blocks(readme, doc))
    removed = [line for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert len(removed) == len(added) == 1, diff
    assert "**3.21x**" in removed[0] and "**3.12x**" in added[0]
    assert str(readme) in diff and str(doc) not in diff


def test_old_recipe_names_are_shown_under_todays_and_match_the_bench_report() -> None:
    """The 2026-12-04 files call the compiled recipe `speedup` and the eager one `speedup-eager`."""
    task = cs.cold_task("fashion-mnist", cs.RESULTS, price=4.54)
    assert [r["name"] for r in task.rows] == ["baseline", "speedup-compiled", "speedup"]
    stored = {r["recipe"]: r["name"] for r in task.rows}
    assert stored == {"baseline": "baseline", "speedup": "speedup-compiled", "speedup-eager": "speedup"}
    by_name = {r["name"]: r for r in task.rows}
    assert by_name["speedup"]["compile_s"] == 0.0 and by_name["speedup-compiled"]["compile_s"] > 10
    report = {r["recipe"]: r for r in task.meta["summary"]}  # the bench's own summary of the same runs
    for row in task.rows:
        assert row["ttt_median_s"] == report[row["recipe"]]["ttt_median_s"]
        assert row["speedup"] == pytest.approx(report[row["recipe"]]["speedup"])


def test_cost_is_gpu_hours_at_the_stated_price() -> None:
    for price in (4.54, 1.0):
        for row in cs.cold_task("char-lm", cs.RESULTS, price=price).rows:
            assert row["gpu_hours_to_target"] == pytest.approx(row["ttt_median_s"] / 3600)
            assert row["cost_to_target"] == pytest.approx(row["gpu_hours_to_target"] * price)
            assert row["energy_to_target_wh"] > 0  # the bench recorded nvidia-smi's power
    assert "Cost at $1 per GPU-hour" in cs.headline_block(cs.RESULTS, 1.0)
    assert "| $0.126 |" in cs.headline_block(cs.RESULTS, cs.DEFAULT_PRICE_PER_GPU_HOUR)  # char-LM baseline


def test_goals_are_reported_as_not_met_with_the_measured_speed_ups() -> None:
    text = cs.goals_block(cs.RESULTS, 4.54)
    assert "**not met**" in text and "3.12x (3 seeds)" in text and "4.38x (2 seeds)" in text


def test_a_negative_price_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cs.main(["--price-per-gpu-hour", "-1"])
    assert "--price-per-gpu-hour must be >= 0" in capsys.readouterr().err


def test_missing_markers_raise_an_error_that_names_them() -> None:
    block = cs.blocks()[0]
    with pytest.raises(ValueError, match="exactly once, found it 0 times"):
        cs.fill("no markers here\n", block, "body", where="README.md")
    twice = f"{block.start}\na\n{block.end}\n{block.start}\nb\n{block.end}\n"
    with pytest.raises(ValueError, match="found it 2 times"):
        cs.fill(twice, block, "body")
