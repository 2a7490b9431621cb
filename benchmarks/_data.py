"""Where the benchmark scripts find their data (imported by the scripts, which run from this folder).

The package's loaders search an explicit path, ``$LIGHTNING_SPEEDUP_DATA``, Debian's package and the
user cache; the scripts also look at the repository's ``.data/`` (what a device call carries) and at
``../shared/data`` (this project's workspace).
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_ENV = "LIGHTNING_SPEEDUP_DATA"
_LOCAL_ROOTS = (ROOT / ".data", ROOT.parent / "shared" / "data")


def text_path(arg: str | None, flag: str) -> Path:
    """Tiny Shakespeare: ``arg`` (the script's ``flag``), else $LIGHTNING_SPEEDUP_DATA, .data, ../shared/data."""
    roots = [Path(os.environ[_ENV])] if os.environ.get(_ENV) else []
    candidates = ([Path(arg)] if arg else []) + [
        r / "tinyshakespeare" / "input.txt" for r in (*roots, *_LOCAL_ROOTS)
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise SystemExit(f"Tiny Shakespeare not found; looked at {[str(c) for c in candidates]}. Pass {flag}.")


def fashion_dir(arg: str | None) -> str | None:
    """``arg``, else None where $LIGHTNING_SPEEDUP_DATA is set (the loader's own search), else .data or
    ../shared/data when they hold the files, else None."""
    if arg or os.environ.get(_ENV):
        return arg
    return next((str(r / "fashion-mnist") for r in _LOCAL_ROOTS if (r / "fashion-mnist").is_dir()), None)
