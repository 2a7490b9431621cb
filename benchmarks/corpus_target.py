"""The target of the second-corpus case study: the validation loss the `baseline` reaches on a corpus no
recipe was tuned on, read from a calibration bench and loosened by a margin, so that every baseline seed
reaches it within the budget it was calibrated on.

Rule: ``ceil((best + margin) * 100) / 100``, with ``best`` the lowest validation loss of the calibration
folder's `baseline` runs (run with an unreachable ``--target 0`` for a fixed number of epochs) and
``margin`` 0.02 by default. Prints the target, for ``lightning-speedup bench --target``:

    lightning-speedup bench --task char-lm --data kjv.txt --train-subset 3840 --val-subset 435 \\
        --recipe baseline --seeds 1 --target 0 --max-epochs 60 --out calibrate
    lightning-speedup bench ... --target "$(python benchmarks/corpus_target.py calibrate)"
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

DEFAULT_MARGIN = 0.02


def corpus_target(folder: Path, margin: float = DEFAULT_MARGIN, recipe: str = "baseline") -> float:
    """The target the rule above gives for the bench output ``folder``; a clear error when it has no run of
    ``recipe`` with a validation loss, or when the folder's runs were not `char-lm` (a loss, lower is better)."""
    if margin < 0:
        raise ValueError(f"--margin must be >= 0, got {margin}.")
    runs = sorted((folder / "runs").glob(f"{recipe}-seed*.json"))
    results = [json.loads(p.read_text()) for p in runs]
    if any(r.get("task") != "char-lm" for r in results):
        raise ValueError(f"{folder}: the calibration runs must be char-lm runs (a validation loss).")
    losses = [m for r in results if r.get("error") is None for m in [r.get("best_metric")] if m is not None]
    if not losses:
        raise ValueError(
            f"{folder}: no finished `{recipe}` run with a validation loss in {folder / 'runs'}; run the "
            "calibration bench first (see this script's docstring)."
        )
    return math.ceil(round((min(losses) + margin) * 100, 6)) / 100


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="the calibration bench's --out folder")
    p.add_argument(
        "--margin", type=float, default=DEFAULT_MARGIN, help="added to the best loss (default 0.02)"
    )
    p.add_argument("--recipe", default="baseline", help="the calibrated recipe (default baseline)")
    args = p.parse_args(argv)
    try:
        print(f"{corpus_target(args.folder, args.margin, args.recipe):.2f}")
    except ValueError as e:
        print(f"corpus_target: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
