"""Every benchmark script runs end to end on the CPU at toy sizes and writes its JSON.

The numbers are meaningless; what is tested is the plumbing, which otherwise first runs on the device,
where a crash costs a whole call (2026-11-27: two scripts crashed after their runs, on a renamed
environment key, and a bench crashed writing its report). Each script is a subprocess, as on the device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_speedup.bench.models import GPT, GPTConfig
from lightning_speedup.quantization.triton_gemv import triton_unavailable
from tests.pipeline.common import needs_local_stages

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, timeout: int = 240) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, (
        f"{script} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )


def test_gpu_data_script(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu_data.json"
    _run(
        "gpu_data.py", "--accelerator", "cpu", "--precision", "32-true", "--repeats", "1", "--steps", "2",
        "--warmup", "1", "--compute-steps", "1", "--compute-batch-size", "16", "--compute-width", "8",
        "--batch-size", "16", "--workers", "0", "--data-dir", str(fashion_mnist_dir), "--out", str(out),
        "--profile", "c_resident_gpuaug", "--profile-steps", "2",
    )  # fmt: skip
    record = json.loads(out.read_text())
    assert set(record["medians"]) == {
        "a_baseline", "b_prefetch_gpuaug", "b_per_sample_fetch", "b_training_thread", "b_in_process",
        "c_resident_gpuaug", "b_async_metrics", "c_async_metrics", "d_compute", "d_compute_prefetch", "d_compute_async",
        "d_compute_prefetch_async",
    }  # fmt: skip
    derived = record["derived"]
    for ratio in (
        "speedup_b_batched_fetch",
        "speedup_b_fetch_thread",
        "speedup_c_async_metrics",
        "speedup_b_async_metrics",
    ):
        assert derived[ratio] > 0, ratio
    assert record["env"]["torch"] and set(record["goals"]) >= {"c_at_least_5x_a"}
    assert record["runs"]["b_in_process"][0]["sync_sites"] is None  # watched on CUDA only
    # ResNet-9 at width 64: about 1.64 GFLOP per 28x28 image, forward and backward
    assert record["fwd_bwd_flops_per_image"]["width_64"] == pytest.approx(1.644e9, rel=0.01)
    base = record["medians"]["a_baseline"]
    assert base["model_tflops_per_s"] == pytest.approx(base["images_per_s"] * 1.644e9 / 1e12, rel=0.01)
    profile = record["profiles"]["c_resident_gpuaug"]
    assert profile["steps"] == 2 and profile["wall_ms_per_step"] > 0 and profile["top_host_ops"]


def test_lr_range_validation_script(fashion_mnist_dir: Path, shakespeare_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "lr.json"
    _run(
        "lr_range_validation.py", "--smoke", "--data-dir", str(fashion_mnist_dir), "--text",
        str(shakespeare_path), "--out", str(out),
    )  # fmt: skip
    record = json.loads(out.read_text())
    assert set(record["summary"]) == {"fashion-mnist", "char-lm"}
    assert record["summary"]["char-lm"]["auto_rule"] == "minimum/2"
    again = tmp_path / "again.json"
    _run("lr_range_validation.py", "--resummarize", str(out), "--out", str(again))
    assert json.loads(again.read_text())["summary"] == record["summary"]


def test_quant_scripts(fashion_mnist_dir: Path, shakespeare_path: Path, tmp_path: Path) -> None:
    speed = tmp_path / "speed.json"
    _run(
        "quant_speed.py", "--accelerator", "cpu", "--layers", "1", "--width", "64", "--heads", "2",
        "--context", "32", "--decode-tokens", "2", "--prefill-batch", "2", "--prefill-len", "16",
        "--repeats", "1", "--out", str(speed),
    )  # fmt: skip
    assert json.loads(speed.read_text())["medians"]["bf16"]["decode_vs_bf16"] == pytest.approx(1.0)
    lm = tmp_path / "speed_charlm.json"
    _run(
        "quant_speed.py", "--accelerator", "cpu", "--model", "char-lm", "--only", "int8_torch", "--repeats", "1",
        "--decode-tokens", "2", "--prefill-batch", "1", "--prefill-len", "8", "--out", str(lm),
    )  # fmt: skip
    record = json.loads(lm.read_text())
    # the bench's char-LM: 6 layers x 384 wide, context 256, vocabulary 65 (tied head), as GPTConfig() builds it
    assert {k: record["args"][k] for k in ("layers", "heads", "width", "context", "vocab")} == {
        "layers": 6, "heads": 6, "width": 384, "context": 256, "vocab": 65,
    }  # fmt: skip
    assert record["parameters"] == sum(p.numel() for p in GPT(GPTConfig(dropout=0.0)).parameters())
    assert record["kv_cache_bytes"] == 2 * 6 * 256 * 384 * 2
    int8 = record["medians"]["int8_torch"]
    assert int8["decode_ms_per_token"] == pytest.approx(1e3 / int8["decode_tok_s"])
    assert record["configs"]["int8_torch"]["prefill_peak_extra_bytes"] is None  # measured on CUDA only
    with pytest.raises(AssertionError, match="exceeds the context"):
        _run("quant_speed.py", "--accelerator", "cpu", "--model", "char-lm", "--prefill-len", "512")
    acc = tmp_path / "acc.json"
    _run(
        "quant_accuracy.py", "--accelerator", "cpu", "--seeds", "0", "--formats", "int8", "nf4-b4096-lsq", "w4a8-lsq",
        "--fm-pre-steps", "2", "--fm-ft-steps", "2", "--fm-eval-images", "64", "--fm-batch-size", "16",
        "--lm-batch-size", "4", "--lm-pre-steps", "2", "--lm-ft-steps", "2", "--lm-eval-windows", "4",
        "--fm-width", "8", "--lm-layers", "1", "--lm-context", "32",
        "--data-dir", str(fashion_mnist_dir), "--text", str(shakespeare_path), "--out", str(acc),
    )  # fmt: skip
    record = json.loads(acc.read_text())
    assert set(record["summary"]) == {"fashion-mnist", "char-lm"} and "goals" in record
    assert record["args"]["lm_context"] == 32
    with pytest.raises(AssertionError, match="--lm-context must be 2-256 tokens"):
        _run("quant_accuracy.py", "--accelerator", "cpu", "--lm-context", "512")


def test_gloo_exit_script(tmp_path: Path) -> None:
    out = tmp_path / "gloo_exit.json"
    _run("gloo_exit.py", "--tries", "1", "--out", str(out))
    record = json.loads(out.read_text())
    assert record["tries_per_configuration"] == 1
    assert set(record["failed"]) == {
        "collectives/none", "p2p-subgroups/none", "collectives/exit-handler", "p2p-subgroups/exit-handler",
    }  # fmt: skip
    assert record["failed"]["collectives/exit-handler"] == record["failed"]["p2p-subgroups/exit-handler"] == 0
    with pytest.raises(AssertionError, match="--tries must be >= 1"):
        _run("gloo_exit.py", "--tries", "0", "--out", str(out))


def test_process_startup_script(tmp_path: Path) -> None:
    out = tmp_path / "startup.json"
    _run("process_startup.py", "--tries", "1", "--out", str(out))
    record = json.loads(out.read_text())
    alone = record["tries"]["alone"][0]  # no CUDA here: the import phases only, and no gpu-held configuration
    assert list(record["tries"]) == ["alone"]
    assert list(alone) == ["interpreter", "torch", "lightning", "lightning_speedup", "total"]
    assert alone["total"] == pytest.approx(sum(v for k, v in alone.items() if k != "total"))
    assert record["medians_s"]["alone"] == alone
    assert record["tries_per_configuration"] == record["tries_planned"] == 1


@pytest.mark.skipif(
    triton_unavailable() is not None, reason="compiling the Triton GEMV needs the triton package"
)
def test_triton_gemv_sass_script(tmp_path: Path) -> None:
    """The kernel compiles for sm_90 offline; the loop has no shared-memory traffic."""
    out = tmp_path / "sass.json"
    _run(
        "triton_gemv_sass.py",
        "--variants",
        "int4_g32_bf16",
        "nf4_b64_bf16",
        "--tiles",
        "1",
        "--out",
        str(out),
    )
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"int4_g32_bf16/4x512w4", "nf4_b64_bf16/4x512w4"}
    assert all(
        r["shared_memory_ops_in_loop"] == 0 and 0 < r["instructions_per_weight"] < 12 for r in rows.values()
    )


def test_distributed_charlm_script(shakespeare_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "dist.json"
    _run(
        "distributed_charlm.py", "--smoke", "--networks", "nvlink", "--strategies", "ddp,diloco,ddp_powersgd,compute_only",
        "--diloco-every", "4", "--diloco-outer-lr", "0.5",
        "--data", str(shakespeare_path), "--out", str(out),
    )  # fmt: skip
    record = json.loads(out.read_text())
    assert {s["strategy"] for s in record["summary"]} == {"ddp", "diloco", "ddp_powersgd", "compute_only"}
    assert {v["method"] for v in record["cost_model"]["validation"]} == {"ddp", "diloco", "ddp_powersgd"}
    diloco = next(r for r in record["throughput"] if r["strategy"] == "diloco")
    assert diloco["cost_model"]["sync_every"] == 4


def test_powersgd_profile_script(tmp_path: Path) -> None:
    out = tmp_path / "psgd.json"
    _run("powersgd_profile.py", "--smoke", "--sync-hook", "--profile-steps", "1", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"compute_only", "ddp", "ddp_powersgd", "ddp_powersgd_eager"} and all(
        r["step_ms"] > 0 for r in rows.values()
    )
    psgd = rows["ddp_powersgd"]  # every timed step compressed, and the profiler saw the hook's products
    assert 0 < psgd["hook_host_ms"] <= psgd["hook_until_gpu_done_ms"] and "aten::bmm" in psgd["profile_cpu"]


def test_distributed_charlm_ttt_script(shakespeare_path: Path, tmp_path: Path) -> None:
    """Time-to-target mode with the warm-up-stable-decay schedule and per-strategy caps."""
    out = tmp_path / "ttt.json"
    _run(
        "distributed_charlm.py", "--smoke", "--mode", "ttt", "--networks", "sockets", "--strategies", "local_sgd,ddp",
        "--schedule-steps", "8", "--caps", "ddp=0.5", "--max-minutes", "0.7", "--target", "0.1",
        "--data", str(shakespeare_path), "--out", str(out),
    )  # fmt: skip
    record = json.loads(out.read_text())
    rows = {r["strategy"]: r for r in record["ttt"]}
    assert list(rows) == ["local_sgd", "ddp"] and "incomplete" not in record
    assert rows["ddp"]["max_minutes"] == 0.5 and rows["local_sgd"]["max_minutes"] == 0.7
    assert all(not r["reached"] and r["steps"] == 10 and r["schedule_steps"] == 8 for r in rows.values())
    assert [t["strategy"] for t in record["ttt_summary"]] == ["local_sgd", "ddp"]


@pytest.mark.parametrize(
    "args",
    [["--caps", "dpp=3"], ["--schedule-steps", "-1"], ["--decay-fraction", "0"], ["--diloco-every", "0"]],
)
def test_distributed_charlm_rejects_bad_arguments(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "distributed_charlm.py"), "--mode", "ttt", *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode != 0, done.stderr[-2000:]
    assert args[0] in done.stderr


def test_ttt_summary_speedups_and_lower_bound() -> None:
    """Time to target vs DDP; a lower bound when DDP never gets there; time to DDP's best loss."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dcl", ROOT / "benchmarks" / "distributed_charlm.py")
    assert spec is not None and spec.loader is not None
    dcl = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec.loader.exec_module(dcl)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def row(strategy: str, curve: list[tuple[int, float, float]]) -> dict:
        return {
            "network": "sockets",
            "strategy": strategy,
            "curve": curve,
            "best_val_loss": min(c[2] for c in curve),
        }

    ddp = row("ddp", [(50, 10.0, 2.0), (100, 20.0, 1.6), (150, 30.0, 1.55), (200, 40.0, 1.7)])
    fast = row("local_sgd", [(50, 2.0, 1.9), (100, 4.0, 1.52), (150, 6.0, 1.45)])
    slow = row("diloco", [(50, 2.0, 2.2), (100, 4.0, 2.1)])
    got = {t["strategy"]: t for t in dcl.summarize_ttt([ddp, fast, slow], target=1.5)}
    assert got["ddp"]["time_to_target_s"] is None and got["ddp"]["ddp_best"] == 1.55
    assert got["local_sgd"]["time_to_target_s"] == 6.0
    assert got["local_sgd"]["target_speedup"] is None
    assert got["local_sgd"]["target_speedup_at_least"] == pytest.approx(40.0 / 6.0)  # DDP's whole run
    assert got["local_sgd"]["speedup_to_ddp_best"] == pytest.approx(30.0 / 4.0)  # 1.52 <= 1.55 at 4 s
    assert got["diloco"]["time_to_ddp_best_s"] is None and got["diloco"]["speedup_to_ddp_best"] is None
    both = {t["strategy"]: t for t in dcl.summarize_ttt([ddp, fast], target=1.6)}
    assert both["local_sgd"]["target_speedup"] == pytest.approx(20.0 / 4.0)


def test_rebuild_report_script(tmp_path: Path) -> None:
    """Rebuilds a committed device bench folder's report from its runs (copied, so nothing changes)."""
    import shutil

    src = ROOT / "benchmarks" / "results" / "schedules" / "2026-11-27-h200-schedules" / "fashion-mnist"
    folder = tmp_path / "bench"
    shutil.copytree(src, folder)
    (folder / "report.md").unlink()
    _run("rebuild_report.py", str(folder))
    report = (folder / "report.md").read_text()
    assert "NVIDIA H200" in report and "speedup-onecycle" in report and "2.52x" in report


def test_pipeline_bubble_script(tmp_path: Path) -> None:
    out = tmp_path / "bubble.json"
    _run(
        "pipeline_bubble.py",
        "--pipeline-size",
        "2",
        "--microbatches",
        "1",
        "--schedules",
        "1f1b",
        "gpipe",
        "--forward-ms",
        "1",
        "--backward-ms",
        "1",
        "--steps",
        "4",
        "--out",
        str(out),
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["schedule"] for r in rows] == ["1f1b", "gpipe"]  # in the order asked for
    assert all(0.0 <= r["bubble_measured_rank0"] <= 1.0 for r in rows)


@needs_local_stages  # its default schedule interleaves two stages in one process
def test_pipeline_overhead_script(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    _run(
        "pipeline_overhead.py",
        "--accelerator",
        "cpu",
        "--layers",
        "2",
        "--width",
        "16",
        "--heads",
        "2",
        "--context",
        "8",
        "--batch-size",
        "8",
        "--steps",
        "4",
        "--warmup",
        "2",
        "--repeats",
        "1",
        "--out",
        str(out),
    )
    result = json.loads(out.read_text())
    assert set(result["median_s"]) == {"bare", "lightning"}
