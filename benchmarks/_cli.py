"""The command line shared by the benchmark scripts that repeat a measurement in fresh processes."""

from __future__ import annotations

import argparse
from pathlib import Path


def tries_and_out(doc: str | None, default_tries: int) -> argparse.Namespace:
    """``--tries`` (per configuration, at least 1) and ``--out`` (the JSON file to write), with ``doc`` as help."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tries", type=int, default=default_tries, help=f"tries per configuration (default {default_tries})"
    )
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = parser.parse_args()
    if args.tries < 1:
        parser.error(f"--tries must be >= 1, got {args.tries}")
    return args
