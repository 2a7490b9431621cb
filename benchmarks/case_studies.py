"""Generates the case-study tables from the result files: README's headline block and the tables of
docs/case-studies.md.

    python benchmarks/case_studies.py            # print every generated block
    python benchmarks/case_studies.py --write    # rewrite the blocks in README.md and docs/case-studies.md
    python benchmarks/case_studies.py --check    # exit 1 and print a diff when a file disagrees with the results

Each block sits between an opening and a closing HTML comment (README: ``<!-- headline: cold-start
results -->`` ... ``<!-- /headline -->``; the case study: ``<!-- generated: NAME -->`` ...
``<!-- /generated -->``); the text around the blocks is written by hand. Every row names the machine,
driver, torch and Lightning versions, seeds, the command that reproduces it and its result file; time is
converted to GPU-hours and money at ``--price-per-gpu-hour`` (default: the bench's), and to energy where
the file recorded the GPUs' power.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_speedup.bench.report import summarize
from lightning_speedup.bench.runner import RunResult
from lightning_speedup.cli import DEFAULT_PRICE_PER_GPU_HOUR

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
CASE_STUDIES = ROOT / "docs" / "case-studies.md"

# The headline's cold bench per task: Fashion-MNIST from 2026-12-04; the char-LM from 2026-12-05, after its
# attention left cuDNN's kernel (`speedup-lm-flash`, today's `speedup`).
COLD_FOLDER = "headline/2026-12-04-h200-cold-speedup"
COLD_LM_FOLDER = "headline/2026-12-05-h200-cold"
COLD_FOLDERS = {"fashion-mnist": COLD_FOLDER, "char-lm": COLD_LM_FOLDER}
# `speedup` on Fashion-MNIST and its plain-PyTorch loop, cold, in one call.
LOOP_FOLDER = "headline/2026-12-05-h200-loop-fashion"
COMPILED_FOLDER = "headline/2026-12-04-h200-cold"
# Warm beside cold, today's `speedup` on both tasks (two calls on 2026-12-05, one folder).
WARM_FOLDER = "headline/2026-12-05-h200-warm"
WARM_FOLDERS = {"fashion-mnist": WARM_FOLDER, "char-lm": WARM_FOLDER}
ATTENTION_FOLDER = "compile/2026-12-05-h200-attention-charlm"
CANDIDATES_FOLDER = "compile/2026-12-04-h200-compile-candidates"
# The ablation ladders, one folder per task. No H200 came for the char-LM's: it ran on one H100.
ABLATION_FOLDERS = {
    "fashion-mnist": "headline/2026-12-05-h200-ablation-fashion",
    "char-lm": "headline/2026-12-05-h100-ablation-charlm",
}
TUNE_FILE = "tune/2026-12-05-h200-h100-tune-recipe-charlm.json"
TUNE_CONFIRM_FOLDER = "tune/2026-12-04-h200-tune-confirm-charlm"
# The char-LM recipes on a corpus none was tuned on (the King James Bible): the target's calibration run and
# `baseline` against `speedup`, 3 seeds, one H100 (no H200 came that session).
SECOND_CORPUS_FOLDER = "headline/2026-12-05-h100-second-corpus"
SECOND_CORPUS_GOAL = 4.0
# The second corpus's `speedup` with a longer schedule beside `baseline`, interleaved by seed in one call.
SECOND_CORPUS_LONGER = "headline/2026-12-06-h100-second-corpus-50ep"
SECOND_CORPUS_EPOCHS = 50
# The recipes of a result folder under the names they had when it was measured -> today's names. Until
# 2026-12-04 the compiled recipe was called `speedup` (today `speedup-compiled`) and the eager one
# `speedup-eager`; after the cold candidates the eager recipe without CUDA graphs became
# `speedup-eager-step` and `speedup` took the CUDA graphs of `speedup-cudagraphs`; after the next cold call
# that recipe became `speedup-autotune`, and `speedup` dropped cuDNN's benchmark mode for images (the
# ablation's `fashion-mnist:speedup-cudnn-benchmark`) and graphs the LM step too (`speedup-lm-cudagraphs`,
# whose images are `speedup-autotune`'s; it appears only in the char-lm folders). On 2026-12-05 the LM's
# `speedup` also kept attention off cuDNN's kernel (`speedup-lm-flash`); the LM step before that is
# `speedup-lm-cudagraphs`. A folder measured under today's names needs no entry.
_TODAY = {"speedup": "speedup-autotune", "fashion-mnist:speedup-cudnn-benchmark": "speedup"}
RECIPE_NAMES: dict[str, dict[str, str]] = {
    COLD_FOLDER: _TODAY,
    COLD_LM_FOLDER: {"speedup-lm-flash": "speedup"},
    ATTENTION_FOLDER: {"speedup": "speedup-lm-cudagraphs", "speedup-lm-flash": "speedup"},
    COMPILED_FOLDER: {
        "baseline": "baseline",
        "speedup": "speedup-compiled",
        "speedup-eager": "speedup-eager-step",
    },
    CANDIDATES_FOLDER: {"speedup": "speedup-eager-step", "speedup-cudagraphs": "speedup-autotune"},
}
# The full recipe each cold folder set against `baseline` (today's name; `speedup` where not listed).
FULL_RECIPE = {COMPILED_FOLDER: "speedup-eager-step"}
# What the files of a folder cannot say about themselves.
FOLDER_NOTES: dict[str, str] = {
    COLD_FOLDER: (
        "The Fashion-MNIST bench was cut by its call's time limit and finished with `--resume` in a later call "
        "on the same machine (every run is a fresh process with empty caches either way); `speedup-no-sanity` "
        "has two seeds, not three."
    ),
    COMPILED_FOLDER: (
        "The char-LM bench was stopped by its call's time limit during seed 2: two seeds per recipe, not "
        "three. The runs were made from the code of commit a12affa; their `git_commit` field reads abf4a52 "
        "because the device copy's git state was stale."
    ),
}
COLD_TASKS = ("fashion-mnist", "char-lm")
# Row order of the cold tables (today's names); recipes not listed follow in the file's order.
COLD_ORDER = ("baseline", "speedup-compiled", "speedup-eager-step", "speedup-autotune", "speedup")
# The issues' goals for the full recipe, cold, over `baseline`.
GOALS = {"fashion-mnist": 8.0, "char-lm": 6.0}
TARGET_LABEL = {"fashion-mnist": "test acc", "char-lm": "val loss"}
# A plain-PyTorch loop within this fraction of the Lightning recipe's time, cold against cold, is the goal.
LOOP_GOAL = 0.10

QUANT_ACCURACY = (
    "quantization/2026-11-27-h200-quant-accuracy.json",
    "quantization/2026-11-27-h200-quant-accuracy-all-layers-3seeds.json",
)
QUANT_SPEED = (
    "quantization/2026-11-27-h200-quant-speed.json",
    "quantization/2026-11-27-h200-quant-speed-6b-all.json",
    "quantization/2026-11-27-h200-quant-speed-6b-compiled-onegraph.json",
    "quantization/2026-12-05-h200-quant-speed-charlm.json",
    "quantization/2026-12-05-h200-quant-speed-charlm-compiled.json",
    "quantization/2026-12-05-h100-quant-speed-charlm-bnb.json",
)
DIST_TTT = (
    "distributed/2026-11-27-h200x2-distributed-charlm-ttt-sockets-b64-dropout03.json",
    "distributed/2026-11-27-h200x2-distributed-charlm-ttt-sockets-b64-dropout03-seed1.json",
    "distributed/2026-11-27-h200x4-distributed-charlm-ttt-sockets.json",
)
DIST_THROUGHPUT = (
    "distributed/2026-11-27-h200x2-distributed-charlm-throughput.json",
    "distributed/2026-11-27-h200x4-distributed-charlm-throughput.json",
)
DIST_STRATEGIES = ("ddp", "local_sgd", "diloco")


# --- formatting ---------------------------------------------------------------------------------------


def _f(x: float | None, spec: str, unit: str = "") -> str:
    return "-" if x is None else format(x, spec) + unit


def _money(x: float | None) -> str:
    return "-" if x is None else f"${x:.3f}"


def _seeds(seeds: Sequence[int]) -> str:
    seeds = sorted(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(str(s) for s in seeds)


def _machine(env: dict[str, Any]) -> str:
    return f"{env.get('gpu_count') or 1}x {env['gpu']}, driver {env['driver']}"


def _versions(env: dict[str, Any]) -> str:
    return f"torch {env['torch']}, Lightning {env['lightning']}"


def _link(rel: str, prefix: str) -> str:
    """A link to a file or folder under benchmarks/results/, ``prefix`` leading from the document to the root."""
    return f"[`{rel}`]({prefix}benchmarks/results/{rel})"


def _load(rel: str, results: Path) -> dict[str, Any]:
    return json.loads((results / rel).read_text())


def _spread(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


# --- single-GPU cold time to target --------------------------------------------------------------------


@dataclass
class ColdTask:
    """One task's cold bench: its meta (report.json) and one summary row per recipe, under today's names."""

    task: str
    folder: str
    meta: dict[str, Any]
    rows: list[dict[str, Any]]
    seeds_of: dict[str, list[int]]
    epochs_of: dict[str, list[int]]


def bench_folder(
    path: Path, price: float, names: dict[str, str], order_by: Sequence[str] = COLD_ORDER
) -> tuple[dict[str, Any], list[dict[str, Any]], list[RunResult]]:
    """A bench output folder summarized by the bench's own summary (median, min-max, speed-up over the
    folder's first recipe, GPU-hours, cost at ``price``, energy), each row also under today's name."""
    meta = json.loads((path / "report.json").read_text())
    runs = [RunResult(**json.loads(p.read_text())) for p in sorted((path / "runs").glob("*.json"))]
    rows = summarize(runs, list(meta["recipes"]), price)
    for row in rows:
        row["name"] = names.get(row["recipe"], row["recipe"])
    rank = {name: i for i, name in enumerate(order_by)}
    rows.sort(key=lambda row: rank.get(row["name"], len(rank)))
    return meta, rows, runs


def cold_task(task: str, results: Path, price: float, folder: str | None = None) -> ColdTask:
    """Summarizes ``folder/task`` (default: the headline's folder for ``task``), whose first recipe must be
    ``baseline`` (the speed-up's reference)."""
    folder = folder or COLD_FOLDERS[task]
    path = results / folder / task
    names = RECIPE_NAMES.get(folder, {})
    meta, rows, runs = bench_folder(path, price, names)
    order = list(meta["recipes"])
    if order[0] != "baseline":
        raise ValueError(
            f"{path}: the first recipe must be `baseline`, the speed-up's reference; got {order}."
        )
    seeds_of = {names.get(n, n): sorted(r.seed for r in runs if r.recipe == n) for n in order}
    epochs_of = {
        names.get(n, n): [r.epochs_to_target for r in sorted(runs, key=lambda r: r.seed) if r.recipe == n]
        for n in order
    }
    return ColdTask(task, folder, meta, rows, seeds_of, epochs_of)


def _bench_command(ct: ColdTask) -> str:
    seeds = ct.meta["seeds"]
    recipes = " ".join(f"--recipe {r['name']}" for r in ct.rows)
    first = f" --first-seed {min(seeds)}" if min(seeds) else ""
    return (
        f"lightning-speedup bench --task {ct.task} --cache {ct.meta['cache']} {recipes} "
        f"--seeds {len(seeds)}{first}"
    )


COLD_HEADER = (
    "| task (target) | recipe (today's name) | cold time to target, median (min-max) | speed-up over `baseline` "
    "| epochs per seed | compile (median) | GPU-hours | cost | energy | hardware | versions | seeds "
    "| reproduce | result |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _cold_rows(ct: ColdTask, prefix: str) -> list[str]:
    env = ct.meta["environment"]
    lines = []
    for i, r in enumerate(ct.rows):
        c = r["cold"]
        task = f"{ct.task} ({TARGET_LABEL[ct.task]} {ct.meta['target']})" if i == 0 else ""
        name, bold = f"`{r['name']}`", r["name"] == FULL_RECIPE.get(ct.folder, "speedup")
        ttt = _ttt_cell(c, bold=bold)
        speedup = _f(c["speedup"], ".2f", "x")
        if bold and c["speedup"] is not None:
            name, speedup = f"**{name}**", f"**{speedup}**"
        epochs = ", ".join(str(e) for e in ct.epochs_of[r["name"]])
        compile_s = "-" if not c["compile_s"] else f"{c['compile_s']:.1f} s"
        energy = _f(r["energy_to_target_wh"], ".1f", " Wh") if r["energy_to_target_wh"] else "not measured"
        lines.append(
            f"| {task} | {name} | {ttt} | {speedup} | {epochs} | {compile_s} | "
            f"{_f(r['gpu_hours_to_target'], '.4f')} | {_money(r['cost_to_target'])} | {energy} | "
            f"{_machine(env)} | {_versions(env)} | {_seeds(ct.seeds_of[r['name']])} | "
            f"`{_bench_command(ct)}` | {_link(f'{ct.folder}/{ct.task}/', prefix)} |"
        )
    return lines


def cold_table(tasks: Sequence[ColdTask], prefix: str) -> str:
    return "\n".join([COLD_HEADER, *(line for ct in tasks for line in _cold_rows(ct, prefix))])


def _speedup_of(ct: ColdTask, name: str) -> float | None:
    return next(r["cold"]["speedup"] for r in ct.rows if r["name"] == name)


def _full(ct: ColdTask) -> str:
    return FULL_RECIPE.get(ct.folder, "speedup")


def goals_sentence(tasks: Sequence[ColdTask]) -> str:
    """Whether the full recipe met the issues' cold goals, with the measured speed-ups."""
    parts, met = [], []
    for ct in tasks:
        s = _speedup_of(ct, _full(ct))
        parts.append(f">= {GOALS[ct.task]:g}x on {ct.task}")
        met.append(s is not None and s >= GOALS[ct.task])
    got = " and ".join(
        f"{_f(_speedup_of(ct, _full(ct)), '.2f', 'x')} ({len(ct.seeds_of[_full(ct)])} seeds)" for ct in tasks
    )
    full = {_full(ct) for ct in tasks}
    verdict = "**met**" if all(met) else ("**not met**" if not any(met) else "**met only in part**")
    text = (
        f"The goals ({', '.join(parts)}, cold, median of 3 seeds) are {verdict}: "
        f"`{'`/`'.join(sorted(full))}` measured {got}."
    )
    return text


def ablation_goals_sentence(results: Path, price: float, prefix: str) -> str:
    """`speedup` over `baseline` as each task's ablation measured it (other calls, its own `baseline`), set against
    the goals, so that a headline call's speed-up is read beside the next measurement of the same recipe."""
    parts, missed = [], []
    for task, folder in ABLATION_FOLDERS.items():
        meta, rows, _ = bench_folder(results / folder, price, RECIPE_NAMES.get(folder, {}), order_by=())
        cold = next(r["cold"] for r in rows if r["recipe"] == "speedup")
        parts.append(
            f"{_f(cold['speedup'], '.2f', 'x')} on {task} ({cold['runs']} seeds, "
            f"{meta['environment']['gpu']}, {_link(folder + '/', prefix)})"
        )
        if cold["speedup"] is None or cold["speedup"] < GOALS[task]:
            missed.append(f"{GOALS[task]:g}x on {task}")
    verdict = (
        f" By that measurement the goal of {' and '.join(missed)} is **not met**."
        if missed
        else " Both meet the goals."
    )
    return (
        "Each ablation measured `speedup` against its own `baseline` again, in other calls: "
        + " and ".join(parts)
        + "."
        + verdict
    )


def compile_sentence(tasks: Sequence[ColdTask]) -> str:
    """Whether compilation paid for itself cold: `speedup-compiled` against the eager full recipe, task by task."""
    paid = []
    for ct in tasks:
        by = {r["name"]: r["cold"]["ttt_median_s"] for r in ct.rows}
        compiled, eager = by["speedup-compiled"], by[_full(ct)]
        paid.append(compiled is not None and eager is not None and compiled < eager)
    if not any(paid):
        return (
            "Compilation did not pay for itself on a cold run of either task, so `speedup` does not compile."
        )
    won = ", ".join(ct.task for ct, p in zip(tasks, paid, strict=True) if p)
    return f"Compilation paid for itself on a cold run of {won}: `speedup-compiled` reached the target sooner there."


def headline_block(results: Path, price: float) -> str:
    """README's headline block: both tasks' cold tables, their machine, the price, the goals, the plain loop,
    warm beside cold, and what compilation did."""
    tasks = [cold_task(t, results, price) for t in COLD_TASKS]
    env = tasks[0].meta["environment"]
    dates = ", ".join(f"{ct.task} {str(ct.meta['environment']['date'])[:10]}" for ct in tasks)
    renamed = "; ".join(
        f"{ct.task}: " + ", ".join(f"`{old}` is today's `{new}`" for old, new in names.items())
        for ct in tasks
        if (
            names := {
                o: n for o, n in RECIPE_NAMES.get(ct.folder, {}).items() if o != n and o in ct.meta["recipes"]
            }
        )
    )
    notes = " ".join(FOLDER_NOTES[ct.folder] for ct in tasks if ct.folder in FOLDER_NOTES)
    lines = [
        "Cold runs, as a user's first run meets them: every run a fresh process with empty compile caches",
        f"(`lightning-speedup bench --cache cold`), one {env['gpu']} ({dates}), recipes interleaved by seed in",
        "one bench per task. Generated from the result files by `python benchmarks/case_studies.py`.",
        f"Recipe names in the files: {renamed}.",
        f"Cost at ${price:g} per GPU-hour (the bench's default `--price-per-gpu-hour`, a public on-demand H200",
        "price); energy from the mean power `nvidia-smi` reported over the runs.",
        "",
        cold_table(tasks, prefix=""),
        "",
        goals_sentence(tasks) + " " + notes,
        "",
        ablation_goals_sentence(results, price, prefix=""),
        "",
        headline_loop(results, price, prefix=""),
        "",
        warm_sentence(results, price, prefix=""),
        "",
        compile_sentence([cold_task(t, results, price, COMPILED_FOLDER) for t in COLD_TASKS])
        + f" ({_link(COMPILED_FOLDER + '/', '')}, an earlier cold call.)",
    ]
    return "\n".join(lines)


def headline_loop(results: Path, price: float, prefix: str) -> str:
    """The plain-PyTorch loop of `speedup` against `speedup`'s own cold runs of the same call."""
    _, rows, _ = bench_folder(
        results / LOOP_FOLDER / "fashion-mnist", price, RECIPE_NAMES.get(LOOP_FOLDER, {})
    )
    text = loop_paragraph(results, LOOP_FOLDER, "reference_loop_speedup_seed*.json", rows, prefix)
    bench = _link(LOOP_FOLDER + "/fashion-mnist/", prefix)
    return f"{text} The Lightning runs of that call (`speedup` alone, 3 seeds): {bench}."


def warm_sentence(results: Path, price: float, prefix: str) -> str:
    """Warm beside cold (`--cache both`), per task, and the goal that `speedup` warm is no worse than cold. A task
    whose folder measured a predecessor of today's `speedup` is shown under that name, and its goal is open."""
    parts, met, links = [], [], []
    for task in COLD_TASKS:
        folder = WARM_FOLDERS[task]
        _, rows, _ = bench_folder(results / folder / task, price, RECIPE_NAMES.get(folder, {}))
        (row,) = rows
        cold, warm = row["cold"], row["warm"]
        parts.append(
            f"{task} `{row['name']}` cold {_ttt_cell(cold)} ({cold['runs']} runs), warm {_ttt_cell(warm)} "
            f"({warm['runs']} run{'s' if warm['runs'] != 1 else ''})"
        )
        if row["name"] == "speedup":
            met.append(warm["ttt_median_s"] <= cold["ttt_median_s"])
        links.append(_link(f"{folder}/{task}/", prefix))
    verdict = "**met**" if met and all(met) else ("**not met**" if not any(met) else "**met only in part**")
    scope = ""
    if len(met) < len(COLD_TASKS):  # a task whose warm runs are of an earlier recipe
        plural = "s" if len(met) != 1 else ""
        scope = (
            f" for the task{plural} where today's `speedup` ran warm; on the other it was not measured warm"
        )
    return (
        f"Warm beside cold (`--cache both`: each seed's cold run, then a fresh process reusing its caches): "
        f"{'; '.join(parts)} ({', '.join(links)}). The goal that `speedup` warm is no worse than cold is "
        f"{verdict}{scope}."
    )


def cold_block(task: str, results: Path, price: float) -> str:
    """One task's cold table for the case study, plus the warm-up split of the same runs."""
    ct = cold_task(task, results, price)
    metric = ct.meta["metric"]
    details = [
        f"| recipe (today's name) | best {metric} (median) | warm-up | of which compile | sanity check | "
        "samples/s | peak memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in ct.rows:
        c = r["cold"]
        details.append(
            f"| `{r['name']}` | {_f(r['best_metric'], '.4f')} | {_f(c['warmup_s'], '.1f', ' s')} | "
            f"{_f(c['compile_s'], '.1f', ' s')} | {_f(c['sanity_s'], '.1f', ' s')} | "
            f"{_f(r['samples_per_s'], ',.0f')} | {_f(r['peak_mem_mb'], ',.0f', ' MiB')} |"
        )
    return "\n".join([cold_table([ct], prefix="../"), "", *details])


def compile_block(results: Path, price: float) -> str:
    """What compilation did on a cold run, per task: `speedup-compiled` against `speedup`, measured side by side."""
    lines = [
        "| task | `speedup-compiled`, cold median | `speedup-eager-step`, cold median | compiled / eager time | "
        "compile (median) | warm-up, compiled / eager (median) | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in COLD_TASKS:
        ct = cold_task(task, results, price, COMPILED_FOLDER)
        by = {r["name"]: r["cold"] for r in ct.rows}
        comp, eager = by["speedup-compiled"], by[_full(ct)]
        lines.append(
            f"| {task} | {_f(comp['ttt_median_s'], '.1f', ' s')} | {_f(eager['ttt_median_s'], '.1f', ' s')} | "
            f"{comp['ttt_median_s'] / eager['ttt_median_s']:.2f}x | {_f(comp['compile_s'], '.1f', ' s')} | "
            f"{_f(comp['warmup_s'], '.1f', ' s')} / {_f(eager['warmup_s'], '.1f', ' s')} | "
            f"{_link(f'{ct.folder}/{task}/', '../')} |"
        )
    return "\n".join(lines)


def goals_block(results: Path, price: float) -> str:
    """The goals, the plain loop and warm beside cold, as the headline states them."""
    tasks = [cold_task(t, results, price) for t in COLD_TASKS]
    return "\n\n".join(
        [
            goals_sentence(tasks),
            ablation_goals_sentence(results, price, prefix="../"),
            headline_loop(results, price, prefix="../"),
            warm_sentence(results, price, prefix="../"),
        ]
    )


# --- the cold candidates for `speedup`, the plain-PyTorch loop, the ablation, the sweep ---------------------


def _ttt_cell(c: dict[str, Any], bold: bool = False) -> str:
    """A recipe's cold time to target: the median (in bold for the headline recipe), then min-max over seeds."""
    if not c["all_reached"]:
        return f"not reached ({c['reached']} of {c['runs']} runs)"
    median = f"{c['ttt_median_s']:.1f} s"
    if bold:
        median = f"**{median}**"
    return median if c["runs"] == 1 else f"{median} ({c['ttt_min_s']:.1f}-{c['ttt_max_s']:.1f})"


def _dates_and_commits(runs: Sequence[RunResult]) -> str:
    """The days and code versions the runs come from: "2026-12-05, commit abc1234", or, for a bench resumed in a
    later call, "2026-12-05 and 2026-12-06, commits abc1234 (21 runs) and def5678 (36 runs)"."""
    envs = sorted((r.environment for r in runs if r.environment), key=lambda e: str(e.get("date", "?")))
    days = sorted({str(e.get("date", "?"))[:10] for e in envs})
    commits = Counter(str(e.get("git_commit", "?")) for e in envs)  # in order of first use
    if len(commits) == 1:
        return f"{' and '.join(days)}, commit {next(iter(commits))}"
    listed = [f"{c} ({n} runs)" for c, n in commits.items()]
    return f"{' and '.join(days)}, commits {', '.join(listed[:-1])} and {listed[-1]}"


def _seeds_of(runs: Sequence[RunResult], recipe: str) -> str:
    return _seeds([r.seed for r in runs if r.recipe == recipe])


def loop_paragraph(
    results: Path, folder: str, pattern: str, rows: Sequence[dict[str, Any]], prefix: str
) -> str:
    """The plain-PyTorch loop (``folder/pattern``, run after the Fashion-MNIST bench whose summary ``rows`` are
    given, in the same call) against the Lightning recipe of the same configuration, cold against cold, with
    the goal's verdict; the loop's arguments say which recipe it is. Loop files from before ``--cache`` shared
    the machine's CUDA cache, so only the first of them (by date) started cold: the verdict uses that one."""
    paths = sorted((results / folder).glob(pattern))
    loops = [json.loads(p.read_text()) for p in paths]
    if not loops:
        return ""
    args = loops[0]["args"]
    graphs, autotune = bool(args.get("cuda_graphs")), args.get("cudnn_benchmark", True)
    same = ("speedup-autotune" if autotune else "speedup") if graphs else "speedup-eager-step"
    flags = (" --cuda-graphs" if graphs else "") + ("" if autotune else " --no-cudnn-benchmark")
    by = {r["name"]: r["cold"] for r in rows}
    lightning = by[same]["ttt_median_s"]
    cold = [d for d in loops if d["args"].get("cache") == "cold"]
    legacy = not cold
    if legacy:
        cold = [min(loops, key=lambda d: d["date"])]
    med, lo, hi = _spread([d["time_to_target_s"] for d in cold if d["reached"]])
    over = lightning / med - 1
    verdict = "**met**" if over <= LOOP_GOAL else "**not met**"
    spread = "" if len(cold) == 1 else f" ({lo:.1f}-{hi:.1f})"
    text = (
        f"**The plain-PyTorch loop** of `{same}` on fashion-mnist (`benchmarks/reference_loop.py{flags}`, no "
        "Lightning, the same model, data, augmentation, hyper-parameters and cuDNN benchmark mode; each seed a "
        f"fresh process, in the same call as the bench), cold: {med:.2f} s{spread}, seed"
        f"{'s' if len(cold) > 1 else ''} {_seeds([d['seed'] for d in cold])}. The Lightning recipe "
        f"{'took' if over >= 0 else 'was'} {abs(over):.1%} {'longer' if over >= 0 else 'faster'} (median "
        f"{lightning:.2f} s); the goal of at most {LOOP_GOAL:.0%} longer is {verdict}. "
        "The loop has no sanity check and no per-step logging."
    )
    if legacy:
        all_med, all_lo, all_hi = _spread([d["time_to_target_s"] for d in loops if d["reached"]])
        text += (
            " These loop runs did not isolate the CUDA cache (`~/.nv`, kept between processes, where the bench "
            "gives each run an empty one), so only the first started cold; all seeds "
            f"{_seeds([d['seed'] for d in loops])}: {all_med:.1f} s ({all_lo:.1f}-{all_hi:.1f})."
        )
    text += " Results: " + ", ".join(_link(f"{folder}/{p.name}", prefix) for p in paths) + "."
    if "speedup" in by and same != "speedup":
        text += (
            f" Today's `speedup` (`{same}` without cuDNN's benchmark mode) took {by['speedup']['ttt_median_s']:.1f} s "
            "in the same call; its loop is not measured."
        )
    return text


def candidates_block(results: Path, price: float) -> str:
    """The cold candidates for `speedup` on Fashion-MNIST, side by side in one call, and the plain loop after them."""
    meta, rows, runs = bench_folder(results / CANDIDATES_FOLDER, price, RECIPE_NAMES[CANDIDATES_FOLDER])
    env = meta["environment"]
    first = next(iter(meta["recipes"]))
    ref_name = RECIPE_NAMES[CANDIDATES_FOLDER].get(first, first)
    lines = [
        f"| recipe (today's name) | cold time to target, median (min-max) | speed-up over `{ref_name}` | "
        "warm-up | of which compile | of which CUDA-graph capture | samples/s | seeds | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["cold"]
        lines.append(
            f"| `{r['name']}` | {_ttt_cell(c)} | {_f(c['speedup'], '.2f', 'x')} | {_f(c['warmup_s'], '.1f', ' s')} | "
            f"{_f(c['compile_s'], '.1f', ' s')} | {_f(c.get('cudagraph_s'), '.1f', ' s')} | "
            f"{_f(r['samples_per_s'], ',.0f')} | {_seeds_of(runs, r['recipe'])} | "
            f"{_link(CANDIDATES_FOLDER + '/', '../')} |"
        )
    text = [
        "\n".join(lines),
        "",
        f"One {env['gpu']}, driver {env['driver']}, {_versions(env)}, {str(env['date'])[:10]}; command: "
        f"`lightning-speedup bench --task fashion-mnist --cache cold "
        + " ".join(f"--recipe {r}" for r in meta["recipes"])
        + f" --seeds {len(meta['seeds'])}` (the recipes under the names of that day).",
    ]
    loops = loop_paragraph(results, CANDIDATES_FOLDER, "reference_loop_seed*.json", rows, prefix="../")
    if loops:
        text += ["", loops]
    return "\n".join(text)


def _removed(description: str) -> str:
    """What a ``speedup-<technique>`` step of the ladder leaves out, from its description ("speedup without
    drop-last, cuda-graphs (fashion-mnist)." -> "drop-last, cuda-graphs")."""
    return description.split(" without ", 1)[1].rsplit(" (", 1)[0]


def ablation_block(task: str, results: Path, price: float) -> str:
    """``task``'s ablation as measured: the ladder from ``baseline`` (each step's cold time to target and its
    change over the step before), then ``speedup`` minus one technique at a time (its change over ``speedup``)."""
    folder = ABLATION_FOLDERS[task]
    names = RECIPE_NAMES.get(folder, {})
    meta, rows, runs = bench_folder(results / folder, price, names, order_by=())
    recipes = list(meta["recipes"])
    end = recipes.index("speedup")
    forward, reverse = recipes[: end + 1], recipes[end + 1 :]
    # The technique `speedup` adds over the last step is the last one the reverse half takes away.
    last = _removed(meta["recipes"][reverse[-1]]["description"]).split(", ")[0] if reverse else "-"
    by = {r["recipe"]: r for r in rows}
    env = meta["environment"]

    def measured(recipe: str) -> dict[str, Any] | None:
        r = by.get(recipe)
        return r if r is not None and r["cold"]["runs"] else None

    def change(c: dict[str, Any], ref: dict[str, Any] | None) -> str:
        """``c``'s median time to target minus ``ref``'s, or '-' where either is missing."""
        if ref is None or c["ttt_median_s"] is None or ref["ttt_median_s"] is None:
            return "-"
        return f"{c['ttt_median_s'] - ref['ttt_median_s']:+.1f} s"

    def epochs(recipe: str) -> str:
        return ", ".join(
            "not reached" if x.epochs_to_target is None else str(x.epochs_to_target)
            for x in runs
            if x.recipe == recipe
        )

    lines = [
        "| step | technique added | cold time to target | speed-up over `baseline` | "
        "change over the step before | epochs | warm-up | samples/s | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    not_run: list[str] = []

    def ran(recipes: list[str]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
        """(recipe, its summary row, its cold summary) of the recipes that ran; the others go to ``not_run``."""
        for recipe in recipes:
            r = measured(recipe)
            if r is None:
                not_run.append(recipe)
            else:
                yield recipe, r, r["cold"]

    previous = None
    for recipe, r, c in ran(forward):
        added = recipe.rsplit("+", 1)[1] if "+" in recipe else ("-" if recipe == "baseline" else last)
        lines.append(
            f"| `{r['name']}` | {added} | {_ttt_cell(c)} | {_f(c['speedup'], '.2f', 'x')} | {change(c, previous)} | "
            f"{epochs(recipe)} | "
            f"{_f(c['warmup_s'], '.1f', ' s')} | {_f(r['samples_per_s'], ',.0f')} | {_seeds_of(runs, recipe)} |"
        )
        previous = c
    full = measured("speedup")
    back = [
        "| `speedup` without | cold time to target | change over `speedup` | speed-up over `baseline` | epochs | "
        "samples/s | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for recipe, r, c in ran(reverse):
        back.append(
            f"| {_removed(meta['recipes'][recipe]['description'])} | {_ttt_cell(c)} | "
            f"{change(c, full and full['cold'])} | {_f(c['speedup'], '.2f', 'x')} | {epochs(recipe)} | "
            f"{_f(r['samples_per_s'], ',.0f')} | "
            f"{_seeds_of(runs, recipe)} |"
        )
    asked = len(meta["seeds"])
    counts = sorted({len([x for x in runs if x.recipe == n]) for n in recipes if measured(n)})
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    text = ["\n".join(lines)]
    if len(back) > 2:
        text += ["", "\n".join(back)]
    text += [
        "",
        f"One {env['gpu']}, driver {env['driver']}, {_versions(env)}, {_dates_and_commits(runs)}: "
        f"`lightning-speedup bench --task {meta['task']} --ablation --cache cold "
        f"--seeds {asked}` ({_link(folder + '/', '../')}); {seeds} seed(s) per step"
        + (
            f", not the {asked} the command asked for (the device time ran out; `--resume` continues)"
            if counts[0] < asked
            else ""
        )
        + ". Times are medians over the seeds listed; the speed-up is over `baseline`'s median.",
    ]
    if names:
        text.append(
            "Names as today; in that file "
            + ", ".join(f"`{today}` was `{then}`" for then, today in names.items())
            + "."
        )
    if not_run:
        text.append(
            f"Not run (the call's time ran out; names as in the file): {', '.join(f'`{n}`' for n in not_run)}."
        )
    return "\n".join(text)


def tune_block(results: Path, price: float) -> str:
    """The char-LM recipe sweep on the GPU and its best config measured cold against the hand-picked recipe."""
    sweep = _load(TUNE_FILE, results)
    st = sweep["settings"]
    env = sweep["environment"]
    lines = [
        "| sweep | GPU, date | trials | failed | reached the target | first trial to reach it | fastest time to "
        "target while sharing the GPU | best config (batch, peak LR, epochs, warm-up) | wall time | result |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ttt = sweep["trials_to_target"]
    for sw in sweep["sweeps"]:
        reached = [t for t in sw["trials"] if t["reached"]]
        failed = [t for t in sw["trials"] if t["status"] == "error"]
        first = next((t["trial"] for t in sw["trials"] if t["reached"]), None)
        best = sw["best"] or {}
        cfg = best.get("config")
        cfg_cell = (
            f"{cfg['batch_size']}, {cfg['peak_lr']:.2e}, {cfg['epochs']}, {cfg['warmup']:.3f}" if cfg else "-"
        )
        lines.append(
            f"| {sw['searcher']}, seed {sw['seed']} | {sw['gpu']}, {sw['date'][:10]} | {len(sw['trials'])} | "
            f"{len(failed)} | {len(reached)} | {_f(first, 'd')} | "
            f"{_f(best.get('time_to_target_s'), '.1f', ' s')} (trial {best.get('trial', '-')}) | {cfg_cell} | "
            f"{sw['wall_s']:.0f} s | {_link(TUNE_FILE, '../')} |"
        )
    for skipped in sweep["skipped_sweeps"]:
        lines.append(
            f"| {skipped['searcher']}, seed {skipped['seed']} | - | not run (time budget) | - | - | - | - | - | - | "
            f"{_link(TUNE_FILE, '../')} |"
        )
    hp = sweep["hand_picked"]
    res = st["resources_per_trial"]
    times = (
        "Their times compare."
        if ttt["times_comparable"]
        else f"The sweeps ran on different GPUs ({' and '.join(ttt['gpus'])}), so their times do not compare: "
        "only the trials to the target (a loss threshold) do."
    )
    text = [
        "\n".join(lines),
        "",
        f"Search space: batch {st['search_space']['batch_size']}, peak LR {st['search_space']['peak_lr']} "
        f"(log-uniform), epochs {st['search_space']['epochs']}, warm-up {st['search_space']['warmup']}; "
        f"{int(1 / res['gpu'])} trials shared the GPU ({res['gpu']:g} GPU and {res['cpu']:g} CPU cores each); "
        f"hand-picked: batch {hp['batch_size']}, peak LR {hp['peak_lr']:g}, {hp['epochs']} epochs, warm-up "
        f"{hp['warmup']:g}. {_versions(env)}, Ray {env['ray']}, Optuna {env['optuna']}. {times}",
    ]
    confirm = results / TUNE_CONFIRM_FOLDER
    if confirm.is_dir():
        meta, rows, _runs = bench_folder(confirm, price, {}, order_by=())
        cells = "; ".join(f"`{r['name']}` {_ttt_cell(r['cold'])}" for r in rows)
        tuned = next(r for r in rows if r["name"] != next(iter(meta["recipes"])))
        verdict = (
            "faster than the hand-picked recipe, so it would replace it"
            if tuned["cold"]["speedup"] and tuned["cold"]["speedup"] > 1
            else "not faster than the hand-picked recipe, which stays"
        )
        text += [
            "",
            f"**Cold, alone on one {meta['environment']['gpu']} ({str(meta['environment']['date'])[:10]}), "
            f"{len(meta['seeds'])} seeds, one call** (`LIGHTNING_SPEEDUP_RECIPES=speedup_tuned.py "
            f"lightning-speedup bench --task char-lm --cache cold --recipe speedup --recipe speedup-tuned --seeds "
            f"{len(meta['seeds'])}`; the file is written by `python benchmarks/tune_recipe.py --task char-lm "
            f"--from-result benchmarks/results/{TUNE_FILE} --from-searcher bayes --recipe-out speedup_tuned.py`): "
            f"{cells}. The Bayesian sweep's best config is {verdict} "
            f"({_f(tuned['cold']['speedup'], '.2f', 'x')}). Result: {_link(TUNE_CONFIRM_FOLDER + '/', '../')}.",
        ]
    return "\n".join(text)


def _second_corpus_table(target: float, rows: Sequence[dict[str, Any]], runs: Sequence[RunResult]) -> str:
    lines = [
        f"| recipe | cold time to val loss {target:.2f} (median, min-max) | speed-up over `baseline` | best val loss "
        "per seed | epochs per seed | samples/s | GPU-hours | cost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c, own = r["cold"], sorted((x for x in runs if x.recipe == r["recipe"]), key=lambda x: x.seed)
        lines.append(
            f"| {r['name']} | {_ttt_cell(c)} | {_f(c['speedup'], '.2f', 'x')} | "
            f"{', '.join(f'{x.best_metric:.4f}' for x in own)} | {', '.join(str(x.epochs) for x in own)} | "
            f"{_f(r['samples_per_s'], ',.0f')} | {_f(r['gpu_hours_to_target'], '.4f')} | "
            f"{_money(r['cost_to_target'])} |"
        )
    return "\n".join(lines)


def _second_corpus_verdict(rows: Sequence[dict[str, Any]], runs: Sequence[RunResult]) -> str:
    speedup = next(r for r in rows if r["recipe"] == "speedup")["cold"]
    if speedup["all_reached"] and speedup["speedup"] is not None and speedup["speedup"] >= SECOND_CORPUS_GOAL:
        return f"**met**: {speedup['speedup']:.2f}x"
    if speedup["all_reached"]:
        return f"**not met**: {_f(speedup['speedup'], '.2f', 'x')}"
    missed = [x.best_metric for x in runs if x.recipe == "speedup" and not x.reached]
    return (
        f"**not met**: `speedup` reached the target in {speedup['reached']} of {speedup['runs']} runs; the "
        f"other {len(missed)} ended their schedule at val loss {min(missed):.4f}-{max(missed):.4f}"
    )


def second_corpus_block(results: Path, price: float) -> str:
    """`baseline` against `speedup` on the second corpus, per seed, and whether `speedup` kept its goal: the recipe
    as tuned on Tiny Shakespeare, then with a longer schedule beside `baseline` in one later call."""
    folder = results / SECOND_CORPUS_FOLDER
    meta, rows, runs = bench_folder(
        folder / "second-corpus", price, {"baseline": "`baseline`", "speedup": "`speedup`"}
    )
    calibration = json.loads((folder / "corpus-calibrate" / "report.json").read_text())
    env, target = meta["environment"], meta["target"]
    cal = calibration["runs"][0]
    seeds = meta["seeds"]
    text = [
        _second_corpus_table(target, rows, runs),
        "",
        f"The goal (>= {SECOND_CORPUS_GOAL:g}x, cold, median of {len(seeds)} seeds) is "
        f"{_second_corpus_verdict(rows, runs)}. One {env['gpu']} "
        f"(not the H200 of the tables above), driver {env['driver']}, {_versions(env)}, {str(env['date'])[:10]}, "
        f"seeds {_seeds(seeds)}. The target was fixed before `speedup` ran: one `baseline` run of "
        f"{calibration['max_epochs']} epochs reached val loss {cal['best_metric']:.4f}; + 0.02, rounded up to "
        f"0.01, is {target:.2f} ({_link(SECOND_CORPUS_FOLDER + '/corpus-calibrate/', '../')}). Command: "
        f"`lightning-speedup bench --task char-lm --data kjv.txt --train-subset {meta['train_subset']} "
        f"--val-subset {meta['val_subset']} --cache cold --target {target:g} --recipe baseline --recipe speedup "
        f"--seeds {len(seeds)}` ({_link(SECOND_CORPUS_FOLDER + '/second-corpus/', '../')}).",
    ]
    # The longer schedule: each recipe in its own folder (one bench has one epoch budget), run seed by seed.
    longer = results / SECOND_CORPUS_LONGER
    base_meta, _, base_runs = bench_folder(longer / "second-corpus-baseline", price, {})
    sp_meta, _, sp_runs = bench_folder(longer / f"second-corpus-speedup-{SECOND_CORPUS_EPOCHS}ep", price, {})
    if sp_meta["max_epochs"] != SECOND_CORPUS_EPOCHS or {sp_meta["target"], base_meta["target"]} != {target}:
        raise ValueError(
            f"{longer}: expected `speedup` with {SECOND_CORPUS_EPOCHS} epochs at target {target}."
        )
    rows = summarize([*base_runs, *sp_runs], ["baseline", "speedup"], price)
    for row in rows:
        row["name"] = (
            "`baseline`" if row["recipe"] == "baseline" else f"`speedup`, {SECOND_CORPUS_EPOCHS} epochs"
        )
    env, seeds = sp_meta["environment"], sorted({r.seed for r in sp_runs})
    dates = sorted({str(r.environment.get("date", ""))[:10] for r in (*base_runs, *sp_runs)})
    text += [
        "",
        f"**With a {SECOND_CORPUS_EPOCHS}-epoch schedule** (`--max-epochs {SECOND_CORPUS_EPOCHS}` for `speedup` "
        f"only; its warm-up, peak and decay fractions unchanged), beside `baseline` on one machine, the two "
        f"recipes' runs interleaved by seed (seeds 0-1 in one call, seed 2 in the next on the same machine):",
        "",
        _second_corpus_table(target, rows, [*base_runs, *sp_runs]),
        "",
        f"With that schedule the goal is {_second_corpus_verdict(rows, [*base_runs, *sp_runs])}. One {env['gpu']}, "
        f"driver {env['driver']}, {_versions(env)}, {' and '.join(dates)}, seeds {_seeds(seeds)}, target "
        f"{target:.2f} as above. Command: `bash benchmarks/run_on_gpu.sh second-corpus-paired` (per seed `lightning-"
        f"speedup bench ... --recipe baseline --first-seed N --seeds 1`, then `... --recipe speedup --max-epochs "
        f"{SECOND_CORPUS_EPOCHS} --first-seed N --seeds 1`, each recipe in its own folder: "
        f"{_link(SECOND_CORPUS_LONGER + '/', '../')}).",
    ]
    return "\n".join(text)


# --- inference: quantized against float ------------------------------------------------------------------


def _loss_cell(values: Sequence[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    return f"{statistics.mean(vals):.4f} ({min(vals):.4f}-{max(vals):.4f})"


def inference_accuracy_block(results: Path) -> str:
    """The char-LM's validation loss in float and after PTQ and QAT, per format, over the file's seeds."""
    lines = [
        "| format | layers quantized | kernel | val loss, mean (min-max): float model, or after PTQ "
        "| val loss after QAT, mean (min-max) | QAT minus float, mean | hardware | versions | seeds | reproduce | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rel in QUANT_ACCURACY:
        d = _load(rel, results)
        env, args, summary = d["env"], d["args"], d["summary"]["char-lm"]
        per_seed = d["per_seed"]["char-lm"]
        seeds = d["seeds"]
        command = (
            f"python benchmarks/quant_accuracy.py --tasks char-lm --formats {' '.join(args['formats'])} "
            f"--seeds {' '.join(str(s) for s in seeds)}"
        )
        common = f"{_machine(env)} | {_versions(env)} | {_seeds(seeds)} | `{command}` | {_link(rel, '../')} |"
        lines.append(f"| float | - | - | {_loss_cell(summary['float_loss']['values'])} | - | - | {common}")
        for fmt in args["formats"]:
            s = summary[fmt]
            one = next(iter(per_seed.values()))["formats"][fmt]
            lines.append(
                f"| {fmt} | {one['quantized_layers']} | {', '.join(one['backends'])} | "
                f"{_loss_cell(s['ptq_loss']['values'])} | {_loss_cell(s['qat_loss']['values'])} | "
                f"{s['qat_minus_float_loss']['mean']:+.5f} | {common}"
            )
    return "\n".join(lines)


def _tok_cell(values: Sequence[float]) -> str:
    med, lo, hi = _spread(values)
    return f"{med:,.0f} ({lo:,.0f}-{hi:,.0f})"


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def inference_speed_block(results: Path) -> str:
    """Decode and prefill speed and weight memory of the quantized GPTs against bf16, per result file."""
    lines = [
        "| model | configuration | weights | batch-1 decode tokens/s, median (min-max) | ms per token "
        "(1000 / median tokens/s) | vs bf16 "
        "| prefill tokens/s, median (min-max) | vs bf16 | peak memory while prefilling, beyond the weights "
        "| hardware | versions | repeats | reproduce | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rel in QUANT_SPEED:
        d = _load(rel, results)
        env, args = d["env"], d["args"]
        char_lm = args.get("model") == "char-lm"
        size = f"{d['parameters'] / 1e6:.1f}M" if char_lm else f"{d['parameters'] / 1e9:.2f}B"
        model = f"{'char-LM ' if char_lm else ''}GPT {size}, {'compiled' if args.get('compile') else 'eager'}"
        if not args.get("no_graphs"):
            model += ", CUDA graphs"
        # the char-LM preset fixes the shape; the GPT's was given as flags
        flags = (
            ["--model char-lm"]
            if char_lm
            else [f"--layers {args['layers']} --heads {args['heads']} --width {args['width']}"]
        )
        flags.append(f"--repeats {args['repeats']}")
        if args.get("compile"):
            flags.append("--compile")
        if args.get("only"):
            flags.append("--only " + " ".join(args["only"]))
        command = "python benchmarks/quant_speed.py " + " ".join(flags)
        for name, med in d["medians"].items():
            runs, cfg = d["runs"][name], d["configs"][name]
            decode, prefill = runs["decode_tok_s"], runs["prefill_tok_s"]
            peak = cfg.get("prefill_peak_extra_bytes")
            lines.append(
                f"| {model} | {name} | {_bytes(cfg['weight_bytes_total'])} | {_tok_cell(decode)} | "
                f"{1000 / statistics.median(decode):.2f} | {med['decode_vs_bf16']:.2f}x | {_tok_cell(prefill)} | "
                f"{med['prefill_vs_bf16']:.2f}x | {'not recorded' if peak is None else _bytes(peak)} | "
                f"{_machine(env)} | {_versions(env)} | {len(decode)} | "
                f"`{command}` | {_link(rel, '../')} |"
            )
    return "\n".join(lines)


# --- multi-GPU -----------------------------------------------------------------------------------------


def _dist_command(args: dict[str, Any], strategies: str) -> str:
    caps = args.get("caps")
    if isinstance(caps, dict):
        caps = ",".join(f"{k}={v:g}" for k, v in caps.items())
    flags = [
        f"--devices {args['devices']}",
        f"--mode {args['mode']}",
        f"--networks {args['networks']}",
        f"--strategies {strategies}",
        f"--batch-size {args['batch_size']}",
    ]
    if args["mode"] == "ttt":
        flags += [f"--schedule-steps {args['schedule_steps']}", f"--eval-every {args['eval_every']}"]
        if caps:
            flags.append(f"--caps {caps}")
        if args.get("dropout") is not None:
            flags.append(f"--dropout {args['dropout']:g}")
        flags.append(f"--seed {args['seed']}")
    else:
        flags.append(f"--repeats {args['repeats']}")
    return "source benchmarks/device_env.sh && python benchmarks/distributed_charlm.py " + " ".join(flags)


def multi_gpu_ttt_block(results: Path, price: float) -> str:
    """Time to the char-LM target through sockets, per strategy, with GPU-hours and cost for all GPUs."""
    lines = [
        "| GPUs, link (all-reduce bus bandwidth) | strategy | seed | time to val loss 1.47 | vs DDP | time to DDP's best loss | vs DDP "
        "| GPU-hours | cost | energy | measured | hardware | versions | reproduce | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rel in DIST_TTT:
        d = _load(rel, results)
        env, n = d["env"], d["world_size"]
        calls = d.get("calls") or [{"args": d["args"], "strategies": d["args"]["strategies"].split(",")}]
        bw = d["networks"]["sockets"]["busbw_gbytes_per_s"]
        for s in d["ttt_summary"]:
            call = next(c for c in calls if s["strategy"] in c["strategies"])
            strategies = ",".join(call["strategies"])
            together = "one call" if len(calls) == 1 else f"call {calls.index(call) + 1} of {len(calls)}"
            others = [x for x in call["strategies"] if x != s["strategy"]]
            together += f", with {', '.join(others)}" if others else ", alone"
            if s["time_to_target_s"] is not None:
                ttt, hours = f"{s['time_to_target_s']:.1f} s", n * s["time_to_target_s"] / 3600
                cost = _money(hours * price)
                gpu_h = f"{hours:.4f}"
            else:
                ttt = f"not reached in {s['run_s']:.0f} s (best {s['best_val_loss']:.3f})"
                hours = n * s["run_s"] / 3600
                gpu_h, cost = f"{hours:.4f} spent", f"{_money(hours * price)} spent"
            if s["target_speedup"] is not None:
                vs = f"{s['target_speedup']:.2f}x"
            elif s["target_speedup_at_least"] is not None:
                vs = f">= {s['target_speedup_at_least']:.2f}x"
            else:
                vs = "-"
            to_best = "-"
            if s["time_to_ddp_best_s"] is not None:
                to_best = f"{s['time_to_ddp_best_s']:.1f} s ({s['ddp_best']:.3f})"
            lines.append(
                f"| {n}, sockets ({bw:.2f} GB/s) | `{s['strategy']}` | {d['args']['seed']} | {ttt} | {vs} | {to_best} | "
                f"{_f(s['speedup_to_ddp_best'], '.2f', 'x')} | {gpu_h} | {cost} | not measured | {together} | "
                f"{_machine(env)} | {_versions(env)} | `{_dist_command(call['args'], strategies)}` | "
                f"{_link(rel, '../')} |"
            )
    return "\n".join(lines)


def multi_gpu_throughput_block(results: Path, price: float) -> str:
    """Tokens/s of DDP, local SGD and DiLoCo over NVLink and sockets, with GPU-hours and cost per 1B tokens."""
    lines = [
        "| GPUs, link (all-reduce bus bandwidth) | strategy | step | tokens/s | vs DDP | GPU-hours per 1B tokens | cost per 1B tokens "
        "| energy | repeats | hardware | versions | reproduce | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rel in DIST_THROUGHPUT:
        d = _load(rel, results)
        env, n, args = d["env"], d["world_size"], d["args"]
        command = _dist_command(args, args["strategies"])
        for s in d["summary"]:
            if s["strategy"] not in DIST_STRATEGIES:
                continue
            bw = d["networks"][s["network"]]["busbw_gbytes_per_s"]
            hours = n * 1e9 / s["tokens_per_s"] / 3600
            lines.append(
                f"| {n}, {s['network']} ({bw:.2f} GB/s) | `{s['strategy']}` | {s['step_time_s'] * 1000:.1f} ms | "
                f"{s['tokens_per_s']:,.0f} | {s['speedup_vs_ddp']:.2f}x | {hours:.2f} | {_money(hours * price)} | "
                f"not measured | {s['repeats']} | {_machine(env)} | {_versions(env)} | `{command}` | "
                f"{_link(rel, '../')} |"
            )
    return "\n".join(lines)


# --- the documents ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A generated block: the text between ``start`` and ``end`` in ``path``, rendered by ``render``."""

    path: Path
    start: str
    end: str
    render: Callable[[Path, float], str]


def _generated(name: str) -> tuple[str, str]:
    return f"<!-- generated: {name} -->", "<!-- /generated -->"


def blocks(readme: Path = README, case_studies: Path = CASE_STUDIES) -> list[Block]:
    return [
        Block(readme, "<!-- headline: cold-start results -->", "<!-- /headline -->", headline_block),
        *(
            Block(case_studies, *_generated(f"cold {task}"), lambda r, p, t=task: cold_block(t, r, p))
            for task in COLD_TASKS
        ),
        Block(case_studies, *_generated("cold compile"), compile_block),
        Block(case_studies, *_generated("cold goals"), goals_block),
        Block(case_studies, *_generated("cold candidates"), candidates_block),
        *(
            Block(
                case_studies,
                *_generated(f"cold ablation {task}"),
                lambda r, p, t=task: ablation_block(t, r, p),
            )
            for task in ABLATION_FOLDERS
        ),
        Block(case_studies, *_generated("tune sweep"), tune_block),
        Block(case_studies, *_generated("second corpus"), second_corpus_block),
        Block(case_studies, *_generated("inference accuracy"), lambda r, p: inference_accuracy_block(r)),
        Block(case_studies, *_generated("inference speed"), lambda r, p: inference_speed_block(r)),
        Block(case_studies, *_generated("multi-gpu time to target"), multi_gpu_ttt_block),
        Block(case_studies, *_generated("multi-gpu throughput"), multi_gpu_throughput_block),
    ]


def fill(text: str, block: Block, body: str, where: str = "") -> str:
    """``text`` with the body of ``block`` replaced by ``body``; the markers must occur exactly once."""
    pattern = re.compile(re.escape(block.start) + r"\n.*?" + re.escape(block.end), re.DOTALL)
    found = pattern.findall(text)
    if len(found) != 1:
        raise ValueError(
            f"{where or block.path}: expected the block '{block.start}' ... '{block.end}' exactly once, found it "
            f"{len(found)} times; put the two markers on lines of their own around the generated text."
        )
    return pattern.sub(lambda _: f"{block.start}\n{body}\n{block.end}", text)


def render_files(
    results: Path = RESULTS, price: float = DEFAULT_PRICE_PER_GPU_HOUR, files: Sequence[Block] | None = None
) -> dict[Path, tuple[str, str]]:
    """Per file: (its text now, its text with every block regenerated from ``results``)."""
    out: dict[Path, tuple[str, str]] = {}
    for block in files if files is not None else blocks():
        old, new = out.get(block.path, (None, None))
        if old is None:
            old = new = block.path.read_text()
        out[block.path] = (old, fill(new, block, block.render(results, price)))
    return out


def check(
    results: Path = RESULTS, price: float = DEFAULT_PRICE_PER_GPU_HOUR, files: Sequence[Block] | None = None
) -> str:
    """A unified diff of every file whose generated blocks disagree with ``results``; empty when none do."""
    diffs = []
    for path, (old, new) in render_files(results, price, files).items():
        if old != new:
            name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            diffs.extend(
                difflib.unified_diff(
                    old.splitlines(keepends=True), new.splitlines(keepends=True), f"{name} (committed)",
                    f"{name} (from the result files)",
                )
            )  # fmt: skip
    return "".join(diffs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the generated blocks in place")
    mode.add_argument("--check", action="store_true", help="exit 1 with a diff when a file disagrees")
    parser.add_argument(
        "--price-per-gpu-hour", type=float, default=DEFAULT_PRICE_PER_GPU_HOUR, metavar="USD",
        help=f"US dollars per GPU-hour (default {DEFAULT_PRICE_PER_GPU_HOUR}, the bench's; see "
        "`lightning-speedup bench --help`)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.price_per_gpu_hour < 0:
        parser.error(f"--price-per-gpu-hour must be >= 0 (US dollars), got {args.price_per_gpu_hour}.")
    if args.check:
        diff = check(price=args.price_per_gpu_hour)
        if diff:
            sys.stdout.write(diff)
            print(
                "\nThe files disagree with the results: run python benchmarks/case_studies.py --write",
                file=sys.stderr,
            )
            return 1
        return 0
    if args.write:
        for path, (old, new) in render_files(price=args.price_per_gpu_hour).items():
            if old != new:
                path.write_text(new)
        return 0
    for block in blocks():
        print(f"{block.start}\n{block.render(RESULTS, args.price_per_gpu_hour)}\n{block.end}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
