"""Wheels for the Ray Tune sweeps on the lent GPU machines, which have neither Ray nor Optuna.

Downloads Ray, Optuna and the packages they need that the GPU image lacks, for the image's Python (3.12,
manylinux x86_64), and strips from Ray's wheel what a local Tune sweep never loads (the Java jars, the
dashboard's web client, RLlib, Serve, the LLM library), so the wheels fit the 64 MiB a device call carries
(with the repository). Pandas, pyarrow, grpcio, protobuf, msgpack, pyyaml, requests and click are in the
image already. The versions are the ones this checkout's tests run with.

    python benchmarks/gpu_wheels.py --out .whl        # then carry ".whl" (listed in .gitignore)

On the device, `bash benchmarks/run_on_gpu.sh tune` installs them into /tmp/site before it sweeps.

`--bitsandbytes` builds the bitsandbytes wheel instead (the quantization benchmarks' bnb formats; the image
lacks it too): 41 MiB as published (0.50.2), 3.4 MiB with only the native library of the device's CUDA
(`--cuda`, 13.0 there) and the CPU one, so it travels beside the data:

    python benchmarks/gpu_wheels.py --bitsandbytes --out .whl     # benchmarks/device_env.sh installs .whl/*
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGES = {
    "ray": "2.60.0",
    "optuna": "5.1.0",
    # Ray's and Optuna's requirements that the GPU image does not have.
    "jsonschema": "4.26.0",
    "jsonschema-specifications": "2025.9.1",
    "referencing": "0.37.0",
    "rpds-py": "2026.9.1",
    "alembic": "1.20.1",
    "sqlalchemy": "2.1.9",
    "mako": "1.4.3",
    "greenlet": "3.5.6",
    "colorlog": "6.12.0",
    # Ray Tune imports ray.train, whose v2 API needs pydantic (missing from the image).
    "pydantic": "2.14.4",
    "pydantic-core": "2.50.5",
    "annotated-types": "0.8.0",
    "typing-inspection": "0.4.5",
    "typing-extensions": "4.16.0",
}
# Parts of Ray's wheel that a local Tune sweep (ray.init without the dashboard) does not import.
RAY_STRIP = (
    "ray/jars/",
    "ray/dashboard/client/",
    "ray/rllib/",
    "ray/serve/",
    "ray/llm/",
)
# The bitsandbytes release the quantization benchmarks were written against (pyproject's `quant` extra allows newer).
BITSANDBYTES = "0.50.2"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)


def strip_wheel(wheel: Path, prefixes: tuple[str, ...], out: Path) -> tuple[int, int]:
    """Write ``wheel`` without the members under ``prefixes`` to ``out``, its RECORD rewritten to match.

    Returns (members kept, members dropped).
    """
    kept = dropped = 0
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        rows = []
        for info in src.infolist():
            if info.filename == record_name:
                continue
            if info.filename.startswith(prefixes):
                dropped += 1
                continue
            data = src.read(info.filename)
            dst.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{info.filename},sha256={digest},{len(data)}")
            kept += 1
        rows.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(rows) + "\n")
    return kept, dropped


def bnb_strip(wheel: Path, cuda: str) -> tuple[str, ...]:
    """The native libraries of a bitsandbytes wheel other than the one for CUDA ``cuda`` (e.g. "13.0" keeps
    ``libbitsandbytes_cuda130.so``) and the CPU one: ROCm, XPU and other CUDA versions."""
    keep = (f"libbitsandbytes_cuda{cuda.replace('.', '')}.", "libbitsandbytes_cpu.")
    with zipfile.ZipFile(wheel) as z:
        libs = [n for n in z.namelist() if n.startswith("bitsandbytes/libbitsandbytes_")]
    if not any(Path(n).name.startswith(keep[0]) for n in libs):
        found = sorted(Path(n).name for n in libs)
        raise SystemExit(f"{wheel.name} has no native library for CUDA {cuda}; it has {found}. Pass --cuda.")
    return tuple(n for n in libs if not Path(n).name.startswith(keep))


def download(names: dict[str, str], dest: Path, python: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "-d", str(dest)]  # fmt: skip
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    cmd += [f"{name}=={version}" for name, version in names.items()]
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(".whl"))
    p.add_argument("--python", default="3.12", help="the device image's Python version")
    p.add_argument(
        "--bitsandbytes", action="store_true", help="build the bitsandbytes wheel instead of Ray's"
    )
    p.add_argument("--cuda", default="13.0", help="with --bitsandbytes: the device's CUDA version (13.0)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    packages = {"bitsandbytes": BITSANDBYTES} if args.bitsandbytes else PACKAGES
    with tempfile.TemporaryDirectory() as tmp:
        download(packages, Path(tmp), args.python)
        for wheel in sorted(Path(tmp).glob("*.whl")):
            target = args.out / wheel.name
            strip = RAY_STRIP if wheel.name.startswith("ray-") else ()
            if wheel.name.startswith("bitsandbytes-"):
                strip = bnb_strip(wheel, args.cuda)
            if strip:
                kept, dropped = strip_wheel(wheel, strip, target)
                print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB -> {target.stat().st_size / 2**20:.1f} "
                      f"MiB ({dropped} files dropped, {kept} kept)")  # fmt: skip
            else:
                target.write_bytes(wheel.read_bytes())
    total = sum(f.stat().st_size for f in args.out.glob("*.whl"))
    print(f"{args.out}: {len(list(args.out.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
