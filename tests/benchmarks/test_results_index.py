"""The result files the docs cite exist, and the committed results index is the generated one."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# A path into benchmarks/results/ as the docs write it: plain or relative (../../benchmarks/results/...).
CITED = re.compile(r"benchmarks/results/[A-Za-z0-9_./-]*[A-Za-z0-9_/-]")


def _results_index():
    spec = importlib.util.spec_from_file_location("results_index", ROOT / "benchmarks" / "results_index.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_cited_result_file_exists() -> None:
    cited = {(doc.name, m) for doc in DOCS for m in CITED.findall(doc.read_text())}
    assert len(cited) > 20, "the pattern no longer finds the docs' citations"
    missing = sorted(f"{doc}: {path}" for doc, path in cited if not (ROOT / path).exists())
    assert not missing, "cited result files that do not exist:\n" + "\n".join(missing)


def test_the_result_documents_are_searched_for_citations() -> None:
    # The documents that present results (the case study's tables are generated) must be among those
    # searched, and the pattern must find their citations, or a missing file there would go unnoticed.
    for name in ("README.md", "docs/results.md", "docs/case-studies.md"):
        doc = ROOT / name
        assert doc in DOCS, name
        assert CITED.findall(doc.read_text()), f"{name}: no citation of benchmarks/results/ found"


def test_committed_index_is_the_generated_one() -> None:
    index = _results_index()
    assert index.INDEX.read_text() == index.render(), "run: python benchmarks/results_index.py"


def test_a_bench_folder_resumed_in_later_calls_lists_the_days_and_commits_of_all_its_runs() -> None:
    index = _results_index()
    folder = index.RESULTS / "headline" / "2026-12-05-h200-ablation-fashion"  # 21 runs, then 36 a day later
    assert index._spans(folder) == (["2026-12-05", "2026-12-06"], ["730ae06", "33ec8b2"])
    row = next(line for line in index.render().splitlines() if "2026-12-05-h200-ablation-fashion/`" in line)
    assert row.endswith(
        "| 2026-12-05 to 2026-12-06 | torch 2.11.0+cu130, Lightning 2.6.6 | 730ae06, 33ec8b2 |"
    )


def test_index_lists_every_entry() -> None:
    index = _results_index()
    text = index.render()
    for topic in (p for p in index.RESULTS.iterdir() if p.is_dir()):
        for entry in topic.iterdir():
            if entry.is_dir() or entry.suffix == ".json":
                assert f"({topic.name}/{entry.name}" in text, entry


LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def test_relative_links_in_the_docs_resolve() -> None:
    broken = [
        f"{doc.relative_to(ROOT)}: {target}"
        for doc in DOCS
        for target in LINK.findall(doc.read_text())
        if "://" not in target and not target.startswith("mailto:") and not (doc.parent / target).exists()
    ]
    assert not broken, "broken links:\n" + "\n".join(broken)
