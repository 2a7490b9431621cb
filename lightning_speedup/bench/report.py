"""Bench reports: the speed-up table, ``report.json``, ``report.md`` and a metric-vs-wall-time plot."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_speedup.bench.env import device_label
from lightning_speedup.bench.runner import RunResult

REPORT_FILES = ("report.json", "report.md", "report.png")


def _median(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def summarize(results: Sequence[RunResult], recipes: Sequence[str]) -> list[dict[str, Any]]:
    """One row per recipe. A recipe counts as reaching the target only if every seed reached it."""
    rows = []
    base_ttt: float | None = None
    for i, name in enumerate(recipes):
        runs = [r for r in results if r.recipe == name]
        n_reached = sum(r.reached for r in runs)
        all_reached = bool(runs) and n_reached == len(runs)
        ttts = [r.time_to_target_s for r in runs if r.reached]
        ttt = _median(ttts) if all_reached else None
        if i == 0:
            base_ttt = ttt
        row = {
            "recipe": name,
            "runs": len(runs),
            "reached": n_reached,
            "all_reached": all_reached,
            "ttt_median_s": ttt,
            "ttt_min_s": min(ttts) if all_reached else None,
            "ttt_max_s": max(ttts) if all_reached else None,
            "speedup": (base_ttt / ttt) if (base_ttt and ttt) else None,
            "epochs_to_target": _median([r.epochs_to_target for r in runs]) if all_reached else None,
            "best_metric": _median([r.best_metric for r in runs]),
            "warmup_s": _median([r.warmup_s for r in runs]),
            "samples_per_s": _median([r.samples_per_s for r in runs]),
            "peak_mem_mb": max((r.peak_mem_mb for r in runs if r.peak_mem_mb is not None), default=None),
            "errors": [r.error for r in runs if r.error],
        }
        rows.append(row)
    return rows


def _fmt(x: float | None, spec: str, unit: str = "") -> str:
    return "-" if x is None else format(x, spec) + unit


def table(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Markdown table; also what the CLI prints."""
    metric = meta["metric"]
    header = (
        f"| recipe | time to target (median, min-max) | speed-up | epochs | best {metric} | warm-up | "
        "samples/s | peak mem |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for r in rows:
        if r["runs"] == 0:
            ttt = "not run yet"
        elif r["all_reached"]:
            ttt = f"{r['ttt_median_s']:.1f} s ({r['ttt_min_s']:.1f}-{r['ttt_max_s']:.1f})"
        elif r["errors"]:
            ttt = f"failed ({len(r['errors'])}/{r['runs']} runs)"
        else:
            ttt = f"not reached ({r['reached']}/{r['runs']} runs reached)"
        lines.append(
            f"| {r['recipe']} | {ttt} | {_fmt(r['speedup'], '.2f', 'x')} | {_fmt(r['epochs_to_target'], '.0f')} | "
            f"{_fmt(r['best_metric'], '.4f')} | {_fmt(r['warmup_s'], '.1f', ' s')} | "
            f"{_fmt(r['samples_per_s'], ',.0f')} | {_fmt(r['peak_mem_mb'], ',.0f', ' MiB')} |"
        )
    return "\n".join(lines)


def markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    env = meta["environment"]
    op = ">=" if meta["mode"] == "max" else "<="
    parts = [
        f"# Bench: {meta['task']}",
        "",
        f"Target: {meta['metric']} {op} {meta['target']} within {meta['max_epochs']} epochs; "
        f"seeds {meta['seeds']}; runs interleaved by seed.",
        f"Task: {meta['task_description']}.",
        "",
        table(rows, meta),
        "",
        "Time to target is wall time from the start of `fit` to the end of the first validation at or past the "
        "target, warm-up (compilation, autotuning, sanity check) included; the warm-up column shows that part. "
        "Speed-up is the first recipe's median time over this recipe's.",
        "",
        f"Hardware: {device_label(env)}, driver {env.get('driver')}, CUDA {env.get('cuda')}; "
        f"torch {env['torch']}, lightning {env['lightning']}, python {env['python']}; {env['date']}; "
        f"commit {env.get('git_commit')}.",
    ]
    if len(meta.get("environments", [])) > 1:
        machines = "; ".join(
            f"{device_label(e)} (driver {e.get('driver')}, torch {e.get('torch')})"
            for e in meta["environments"]
        )
        parts.append(
            f"**The runs come from several machines** ({machines}): compare times only within one machine."
        )
    if meta.get("train_subset") or meta.get("val_subset") or meta.get("model_kwargs"):
        parts.append(
            f"Reduced budget: train_subset={meta.get('train_subset')}, val_subset={meta.get('val_subset')}, "
            f"model overrides={meta.get('model_kwargs') or {}}."
        )
    parts += ["", "## Recipes", ""]
    for name, summ in meta["recipes"].items():
        parts.append(f"- **{name}**: {summ['description']}")
    return "\n".join(parts) + "\n"


def plot(results: Sequence[RunResult], meta: dict[str, Any], path: Path) -> None:
    """Metric vs wall time, one line per run, one colour per recipe, the target as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    recipes = list(meta["recipes"])
    for r in results:
        if not r.history:
            continue
        c = colours[recipes.index(r.recipe) % len(colours)]
        ax.plot([h["time_s"] for h in r.history], [h["metric"] for h in r.history], color=c, marker=".",
                label=f"{r.recipe} (seed {r.seed})")  # fmt: skip
    ax.axhline(meta["target"], color="black", linestyle="--", linewidth=1, label=f"target {meta['target']}")
    ax.set_xlabel("wall time since start of fit (s)")
    ax.set_ylabel(meta["metric"])
    ax.set_title(f"{meta['task']} on {device_label(meta['environment'])}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to overwrite an earlier report unless asked to."""
    existing = [f for f in (*REPORT_FILES, "runs") if (out_dir / f).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds {', '.join(existing)} from an earlier bench. Choose another --out, "
            "or pass --overwrite to replace them."
        )


def write_report(results: Sequence[RunResult], meta: dict[str, Any], out_dir: Path) -> list[dict[str, Any]]:
    rows = summarize(results, list(meta["recipes"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {**meta, "summary": rows, "runs": [r.to_dict() for r in results]}
    (out_dir / "report.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown(rows, meta))
    plot(results, meta, out_dir / "report.png")
    return rows
