"""Bench reports: the speed-up table, ``report.json``, ``report.md`` and a metric-vs-wall-time plot."""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_speedup.bench.env import device_label
from lightning_speedup.bench.runner import RunResult, describe_epoch_budgets, write_atomic

REPORT_FILES = ("report.json", "report.md", "report.png")


def _median(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _stats(runs: Sequence[RunResult], base: float | None) -> dict[str, Any]:
    """Time to target of one recipe's runs of one cache kind; counted as reached only if every run was. The
    warm-up, process and power medians leave failed runs out (a run that failed at once would read as no
    warm-up)."""
    ok = [r for r in runs if r.error is None]
    n_reached = sum(r.reached for r in runs)
    all_reached = bool(runs) and n_reached == len(runs)
    ttts = [r.time_to_target_s for r in runs if r.reached and r.time_to_target_s is not None]
    ttt = _median(ttts) if all_reached else None
    return {
        "runs": len(runs),
        "reached": n_reached,
        "failed": sum(r.error is not None for r in runs),
        "all_reached": all_reached,
        "ttt_median_s": ttt,
        "ttt_min_s": min(ttts) if all_reached else None,
        "ttt_max_s": max(ttts) if all_reached else None,
        "speedup": (base / ttt) if (base and ttt) else None,
        "warmup_s": _median([r.warmup_s for r in ok]),
        "compile_s": _median([r.compile_s for r in ok]),
        "sanity_s": _median([r.sanity_s for r in ok]),
        "cudagraph_s": _median([r.cudagraph_s for r in ok]),
        "process_s": _median([r.process_s for r in ok]),
        "startup_s": _median([r.startup_s for r in ok]),
        "avg_power_w": _median([r.avg_power_w for r in ok]),
        # Devices per run (a strategy may train on several); files from before it was recorded: one.
        "devices": _median([r.devices or 1 for r in ok]) or 1,
    }


def summarize(
    results: Sequence[RunResult], recipes: Sequence[str], price: float | None = None
) -> list[dict[str, Any]]:
    """One row per recipe, with its cold and warm runs side by side.

    The row's top-level time to target and speed-up are the headline: cold when the bench ran cold runs,
    else warm. A recipe counts as reaching the target only if every run (cold and warm) reached it.
    """
    rows = []
    base: dict[str, float | None] = {}
    for i, name in enumerate(recipes):
        runs = [r for r in results if r.recipe == name]
        by_cache = {c: [r for r in runs if r.cache == c] for c in ("cold", "warm")}
        kinds: dict[str, dict[str, Any]] = {}
        for c, rs in by_cache.items():
            kinds[c] = _stats(rs, None)
            if i == 0:
                base[c] = kinds[c]["ttt_median_s"]
            b, t = base.get(c), kinds[c]["ttt_median_s"]
            kinds[c]["speedup"] = (b / t) if (b and t) else None
        headline = "cold" if by_cache["cold"] or not by_cache["warm"] else "warm"
        h = kinds[headline]
        # Time to target times the run's devices in device-hours, money at the given price, and energy from the
        # mean power nvidia-smi reported over the run (of the run's first device, taken for each of them).
        gpu_h = h["ttt_median_s"] * h["devices"] / 3600 if h["ttt_median_s"] is not None else None
        ok = [r for r in runs if r.error is None]
        energy_wh = gpu_h * h["avg_power_w"] if (gpu_h is not None and h["avg_power_w"] is not None) else None
        rows.append(
            {
                "recipe": name,
                "headline": headline,
                "runs": len(runs),
                "reached": sum(r.reached for r in runs),
                "all_reached": bool(runs) and all(r.reached for r in runs),
                "ttt_median_s": h["ttt_median_s"],
                "ttt_min_s": h["ttt_min_s"],
                "ttt_max_s": h["ttt_max_s"],
                "speedup": h["speedup"],
                "cold": kinds["cold"],
                "warm": kinds["warm"],
                "epochs_to_target": _median([r.epochs_to_target for r in runs if r.reached])
                if any(r.reached for r in runs) else None,
                "best_metric": _median([r.best_metric for r in ok]),
                "devices": h["devices"],
                "warmup_s": h["warmup_s"],
                "compile_s": h["compile_s"],
                "sanity_s": h["sanity_s"],
                "cudagraph_s": h["cudagraph_s"],
                "process_s": h["process_s"],
                "startup_s": h["startup_s"],
                "gpu_hours_to_target": gpu_h,
                "cost_to_target": gpu_h * price if (gpu_h is not None and price is not None) else None,
                "energy_to_target_wh": energy_wh,
                "samples_per_s": _median([r.samples_per_s for r in ok]),
                "peak_mem_mb": max((r.peak_mem_mb for r in ok if r.peak_mem_mb is not None), default=None),
                "errors": [r.error for r in runs if r.error],
            }
        )  # fmt: skip
    return rows


def _fmt(x: float | None, spec: str, unit: str = "") -> str:
    return "-" if x is None else format(x, spec) + unit


def _ttt_cell(k: dict[str, Any]) -> str:
    if k["runs"] == 0:
        return "-"
    if k["all_reached"]:
        return f"{k['ttt_median_s']:.1f} s ({k['ttt_min_s']:.1f}-{k['ttt_max_s']:.1f})"
    if k["failed"]:
        return f"failed ({k['failed']}/{k['runs']} runs)"
    return f"not reached ({k['reached']}/{k['runs']} runs reached)"


def _process_cell(row: dict[str, Any]) -> str:
    """The run's whole process (median), with its part before ``fit`` in brackets where recorded."""
    process, startup = row.get("process_s"), row.get("startup_s")
    cell = _fmt(process, ".1f", " s")
    return cell if startup is None or process is None else f"{cell} ({startup:.1f} s before fit)"


def table(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Markdown table; also what the CLI prints. Cold and warm time to target side by side; the warm-up
    columns are those of the headline (cold) runs."""
    metric = meta["metric"]
    header = (
        f"| recipe | cold: time to target (median, min-max) | speed-up | warm: time to target | speed-up | "
        f"epochs | epoch budget | best {metric} | warm-up | compile | sanity check | CUDA graphs | process | "
        "samples/s | peak mem | GPU-hours | cost | energy |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    budgets = meta.get("epoch_budgets") or {}
    for r in rows:
        if r["runs"] == 0:
            cold, warm = "not run yet", "-"
        else:
            cold, warm = _ttt_cell(r["cold"]), _ttt_cell(r["warm"])
        lines.append(
            f"| {r['recipe']} | {cold} | {_fmt(r['cold']['speedup'], '.2f', 'x')} | {warm} | "
            f"{_fmt(r['warm']['speedup'], '.2f', 'x')} | {_fmt(r['epochs_to_target'], '.0f')} | "
            f"{budgets.get(r['recipe'], meta.get('max_epochs', '-'))} | {_fmt(r['best_metric'], '.4f')} | {_fmt(r['warmup_s'], '.1f', ' s')} | "
            f"{_fmt(r['compile_s'], '.1f', ' s')} | {_fmt(r['sanity_s'], '.1f', ' s')} | "
            f"{_fmt(r['cudagraph_s'], '.1f', ' s')} | {_process_cell(r)} | "
            f"{_fmt(r['samples_per_s'], ',.0f')} | "
            f"{_fmt(r['peak_mem_mb'], ',.0f', ' MiB')} | {_fmt(r.get('gpu_hours_to_target'), '.4f')} | "
            f"{_fmt(r.get('cost_to_target'), '.3f', ' $')} | {_fmt(r.get('energy_to_target_wh'), '.1f', ' Wh')} |"
        )
    return "\n".join(lines)


COLUMNS = (
    "**cold**: every run is a fresh process whose compile caches (Inductor, Triton, CUDA, the compiled-artifact "
    "cache) start empty, as a user's first run. **warm**: a fresh process that reuses caches an earlier run of "
    "the same recipe filled. Time to target is wall time from the start of `fit` to the end of the first "
    "validation at or past the target, everything included. **speed-up**: the first recipe's median time over "
    "this recipe's, cold against cold and warm against warm. **epochs**: epochs to target (median); **epoch budget**: "
    "the most epochs a run of the recipe may train (`--max-epochs` for every recipe, else the recipe's own, else the "
    "task's). **warm-up**: the first training step's time beyond "
    "the median step, plus the sanity check; **compile**: seconds in Dynamo and Inductor compilation "
    "(`torch._dynamo.utils.compilation_time_metrics`); **sanity check**: the sanity-check validation (Lightning's "
    "hooks); **CUDA graphs**: `EagerCUDAGraphs`' graph capture, warm-up iterations included (Inductor's "
    "`reduce-overhead` capture is not separated from its warm-up: '-'). **process**: the run's whole process "
    "from start to exit (interpreter, imports, CUDA initialisation, set-up, fit, teardown), and in brackets its "
    "part before `fit` started; time to target leaves both out, and every run pays them. Warm-up columns are medians "
    "of the headline (cold) runs, failed runs left out; '-' means not measured or not applicable. **GPU-hours**: the "
    "headline median time to target times the devices a run trained on; **cost**: GPU-hours at the price per GPU-hour stated below the table; "
    "**energy**: GPU-hours times the mean power `nvidia-smi` reported over the runs (empty on a CPU)."
)


def markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    env = meta["environment"]
    op = ">=" if meta["mode"] == "max" else "<="
    reduced = meta.get("train_subset") or meta.get("val_subset") or meta.get("model_kwargs")
    if reduced:
        # Describe what ran, not the full task.
        what = (
            f"Reduced budget of the {meta['task']} task: train_subset={meta.get('train_subset')}, "
            f"val_subset={meta.get('val_subset')}, model overrides={meta.get('model_kwargs') or {}}."
        )
    else:
        what = f"Task: {meta['task_description']}."
    parts = [
        f"# Bench: {meta['task']}",
        "",
        f"Target: {meta['metric']} {op} {meta['target']} within {describe_epoch_budgets(meta)}; "
        f"seeds {meta['seeds']}; cache {meta.get('cache', 'cold')}; runs interleaved by seed, each in a fresh process.",
        what,
    ]
    data = meta.get("data")
    if data:
        parts.append(f"Data: `{data['path']}` (sha256 {data['sha256'][:16]}...).")
    if meta.get("precision"):
        parts.append(
            f"Every recipe ran at precision {meta['precision']} (the recipes' own precision replaced)."
        )
    if meta.get("stop_at_target") is False:
        parts.append("Runs kept training after reaching the target (`--no-stop`).")
    parts += ["", table(rows, meta), "", COLUMNS]
    if meta.get("price_per_gpu_hour") is not None:
        parts.append(f"Price: {meta['price_per_gpu_hour']} $ per GPU-hour (`--price-per-gpu-hour`).")
    fills = meta.get("warm_fills")
    if fills:
        parts += ["", "Throw-away runs that filled the warm caches (not measured runs):"]
        for name, f in fills.items():
            parts.append(
                f"- {name}: {_fmt(f['total_s'], '.1f', ' s')} in all, warm-up {_fmt(f['warmup_s'], '.1f', ' s')}, "
                f"compile {_fmt(f['compile_s'], '.1f', ' s')}"
                + (f", failed: {f['error']}" if f.get("error") else "")
            )
    if meta.get("stopped"):
        hint = meta.get("resume_hint") or "rerun the command with `--resume` to finish"
        parts += ["", f"**Incomplete**: stopped by {meta['stopped']}; {hint}."]
    commits = meta.get("commits") or {}
    if len(commits) > 1:
        # A resumed bench continued by a later checkout: which runs ran which code.
        code = "commits " + ", ".join(f"{c} ({n} run{'s' if n != 1 else ''})" for c, n in commits.items())
    else:
        code = f"commit {env.get('git_commit')}"
    parts += [
        "",
        f"Hardware: {device_label(env)}, driver {env.get('driver')}, CUDA {env.get('cuda')}; "
        f"torch {env['torch']}, lightning {env['lightning']}, python {env['python']}; {env['date']}; {code}.",
    ]
    if len(commits) > 1:
        parts.append("**The runs come from several commits**: compare times only between runs of one commit.")
    if len(meta.get("environments", [])) > 1:
        machines = "; ".join(
            f"{device_label(e)} (driver {e.get('driver')}, torch {e.get('torch')})"
            for e in meta["environments"]
        )
        parts.append(
            f"**The runs come from several machines** ({machines}): compare times only within one machine."
        )
    parts += ["", "## Recipes", ""]
    compiles_on_cpu = env.get("gpu") is None
    for name, summ in meta["recipes"].items():
        note = " (torch.compile is skipped on CPU)" if compiles_on_cpu and summ.get("compile") else ""
        parts.append(f"- **{name}**: {summ['description']}{note}")
    return "\n".join(parts) + "\n"


def plot(results: Sequence[RunResult], meta: dict[str, Any], path: Path) -> None:
    """Metric vs wall time, one line per run, one colour per recipe, the target as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    recipes = list(meta["recipes"])
    rows = {row["recipe"]: row for row in summarize(results, recipes, meta.get("price_per_gpu_hour"))}
    for r in results:
        if not r.history:
            continue
        c = colours[recipes.index(r.recipe) % len(colours)]
        # The metric is known only at validations: a step, not a line between them.
        ts, ms = (
            [0.0] + [h["time_s"] for h in r.history],
            [r.history[0]["metric"]] + [h["metric"] for h in r.history],
        )
        ax.step(ts, ms, where="post", color=c, linestyle="-" if r.cache == "cold" else ":",
                label=f"{r.recipe} seed {r.seed} ({r.cache})")  # fmt: skip
        if r.reached and r.time_to_target_s is not None:
            ax.plot([r.time_to_target_s], [meta["target"]], marker="o", color=c)
    for name, row in rows.items():
        if row["ttt_median_s"] is not None:
            c = colours[recipes.index(name) % len(colours)]
            ax.axvline(row["ttt_median_s"], color=c, linewidth=0.8, alpha=0.6)
            speed = f", {row['speedup']:.1f}x" if row["speedup"] else ""
            ax.annotate(f"{name}: {row['ttt_median_s']:.1f} s{speed}", (row["ttt_median_s"], meta["target"]),
                        textcoords="offset points", xytext=(4, -12), fontsize=8, color=c)  # fmt: skip
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
    existing = [f for f in (*REPORT_FILES, "runs", "bench.json") if (out_dir / f).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds {', '.join(existing)} from an earlier bench. Choose another --out, pass "
            "--resume to finish that bench, or --overwrite to remove its files (runs/, caches/, bench.json, "
            "report.*; nothing else) and start afresh."
        )


def remove_demo_report(out_dir: Path) -> None:
    """The demo replaces its own earlier report in ``out_dir``; a report another command wrote (or one
    that cannot be read) is refused, never deleted."""
    existing = [f for f in (*REPORT_FILES, "runs", "bench.json") if (out_dir / f).exists()]
    if not existing:
        return
    try:
        command = json.loads((out_dir / "report.json").read_text()).get("command")
    except (OSError, ValueError):
        command = None
    if command != "demo":
        raise FileExistsError(
            f"{out_dir} holds {', '.join(existing)} that the demo did not write; the demo replaces only its own "
            "report. Choose another --out (the default is demo-out)."
        )
    for name in existing:
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()


def write_report(results: Sequence[RunResult], meta: dict[str, Any], out_dir: Path) -> list[dict[str, Any]]:
    rows = summarize(results, list(meta["recipes"]), meta.get("price_per_gpu_hour"))
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {**meta, "summary": rows, "runs": [r.to_dict() for r in results]}
    write_atomic(out_dir / "report.json", json.dumps(payload, indent=2) + "\n")
    write_atomic(out_dir / "report.md", markdown(rows, meta))
    plot(results, meta, out_dir / "report.png")
    return rows
