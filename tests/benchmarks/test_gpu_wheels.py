"""benchmarks/gpu_wheels.py: the stripped wheel keeps everything else, byte for byte, with a RECORD that matches."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "gpu_wheels", Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_wheels.py"
)
assert _spec is not None and _spec.loader is not None
gpu_wheels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_wheels)
RAY_STRIP, strip_wheel = gpu_wheels.RAY_STRIP, gpu_wheels.strip_wheel


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("demo-1.0.dist-info/RECORD", "stale\n")
    return path


def test_strip_drops_the_prefixes_and_rewrites_record(tmp_path: Path) -> None:
    files = {
        "demo/__init__.py": b"x = 1\n",
        "demo/jars/big.jar": b"\0" * 1000,
        "demo/keep/data.bin": bytes(range(256)),
        "demo-1.0.dist-info/METADATA": b"Name: demo\nVersion: 1.0\n",
        "demo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    src = _wheel(tmp_path / "src.whl", files)
    out = tmp_path / "demo-1.0-py3-none-any.whl"
    kept, dropped = strip_wheel(src, ("demo/jars/",), out)
    assert (kept, dropped) == (4, 1)
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        assert "demo/jars/big.jar" not in names and "demo/keep/data.bin" in names
        assert z.read("demo/keep/data.bin") == files["demo/keep/data.bin"]
        record = dict(
            line.split(",", 1) for line in z.read("demo-1.0.dist-info/RECORD").decode().splitlines()
        )
    assert set(record) == names
    digest = (
        base64.urlsafe_b64encode(hashlib.sha256(files["demo/__init__.py"]).digest()).rstrip(b"=").decode()
    )
    assert record["demo/__init__.py"] == f"sha256={digest},{len(files['demo/__init__.py'])}"
    # pip installs it (RECORD checked) and the kept module imports
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
                    str(out)], check=True)  # fmt: skip
    assert (target / "demo" / "__init__.py").read_text() == "x = 1\n"
    assert not (target / "demo" / "jars").exists()


def test_ray_strip_list_names_only_parts_a_local_sweep_does_not_import() -> None:
    assert all(p.startswith("ray/") and p.endswith("/") for p in RAY_STRIP)
    assert (
        "ray/tune/" not in RAY_STRIP and "ray/dashboard/" not in RAY_STRIP
    )  # the dashboard agent runs per node


def test_bnb_strip_keeps_the_devices_cuda_library_and_the_cpu_one(tmp_path: Path) -> None:
    libs = ["cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm64", "xpu2025"]
    files = {f"bitsandbytes/libbitsandbytes_{lib}.so": lib.encode() for lib in libs}
    files["bitsandbytes/__init__.py"] = b"# bnb\n"
    wheel = _wheel(tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl", files)
    dropped = gpu_wheels.bnb_strip(wheel, "13.0")
    assert sorted(Path(n).name for n in dropped) == [
        f"libbitsandbytes_{lib}.so" for lib in ("cuda118", "cuda128", "cuda132", "rocm64", "xpu2025")
    ]
    out = tmp_path / "out" / wheel.name
    out.parent.mkdir()
    strip_wheel(wheel, dropped, out)
    with zipfile.ZipFile(out) as z:
        assert sorted(n for n in z.namelist() if n.endswith(".so")) == [
            "bitsandbytes/libbitsandbytes_cpu.so",
            "bitsandbytes/libbitsandbytes_cuda130.so",
        ]
    # A CUDA the wheel has no library for is an error that names what it has, not a wheel that cannot load.
    with pytest.raises(SystemExit, match=r"no native library for CUDA 12\.9.*libbitsandbytes_cuda130\.so"):
        gpu_wheels.bnb_strip(wheel, "12.9")
