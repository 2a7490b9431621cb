"""Per-layer speed of the Triton 4-bit GEMV (issue 5): every tile, with and without prefetching, vs bf16.

For the four Linear shapes of one GPT block (qkv: 3W x W, proj: W x W, fc1: 4W x W, fc2: W x 4W), one
activation row (batch-1 decode), this times:

* ``bf16``: ``F.linear`` on a bfloat16 weight (cuBLAS' GEMV), the baseline of the decode goal;
* ``auto``: :func:`lut_gemv` autotuned (what ``backend="triton"`` runs);
* every tile of a grid (rows ``BLOCK_N``, bytes along K ``BLOCK_KB``, warps, ``PREFETCH``) with at most 64
  weight bytes per thread, through ``lut_gemv(config=...)``.

Weights and scales are random bytes (speed does not depend on their values). Each measurement cycles
through enough copies of the layer (>= 256 MiB) that the weights come from HBM, not from the 50 MiB L2,
as in decoding, where every layer is read once per token. A CUDA graph of ``--calls`` launches is
replayed ``--repeats`` times; the median per call is reported with the bandwidth it implies (packed
bytes + scales for 4-bit, weight bytes for bf16) and the speed-up over bf16.

    source benchmarks/device_env.sh && python benchmarks/triton_gemv_layers.py --width 4096 --format int4 \\
        --out $OUT/triton_gemv_layers.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lightning_speedup.bench.env import device_label, environment
from lightning_speedup.quantization.formats import codebook
from lightning_speedup.quantization.triton_gemv import lut_gemv

L2_FLUSH_BYTES = 256 * 2**20


def tile_grid() -> list[dict[str, int]]:
    """(BLOCK_N, BLOCK_KB, num_warps, PREFETCH) with 16, 32 or 64 weight bytes per thread."""
    tiles = []
    for bn, bkb, warps, prefetch in itertools.product(
        (1, 2, 4, 8, 16, 32), (256, 512, 1024, 2048), (4, 8), (0, 1)
    ):
        per_thread = bn * bkb // (warps * 32)
        if per_thread in (16, 32, 64):
            tiles.append({"BLOCK_N": bn, "BLOCK_KB": bkb, "num_warps": warps, "PREFETCH": prefetch})
    return tiles


def time_calls(fn: Any, copies: int, calls: int, repeats: int) -> float:
    """Median seconds per call of ``fn(i)`` over a CUDA graph of ``calls`` launches cycling the copies."""
    for i in range(3):
        fn(i % copies)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % copies)
    torch.cuda.current_stream().wait_stream(side)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def measure_layer(
    name: str, n: int, k: int, xk: torch.Tensor, lut: torch.Tensor | None, group: int,
    tiles: list[dict[str, int]], args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    """bf16, autotuned and every tile's time for one (N, K) layer, cycling copies past the L2 cache."""
    q_bytes = n * k // 2 + n * k // group * 4
    copies = max(2, -(-L2_FLUSH_BYTES // q_bytes))
    bf_copies = max(2, -(-L2_FLUSH_BYTES // (2 * n * k)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(bf_copies)]
    t_bf16 = time_calls(lambda i: F.linear(xk, weights[i]), bf_copies, args.calls, args.repeats)
    weights.clear()
    packed = [torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, device="cuda") for _ in range(copies)]
    scales = [torch.rand(n, k // group, device="cuda") * 0.01 for _ in range(copies)]

    def gemv(i: int, cfg: dict[str, int] | None) -> Any:
        return lut_gemv(xk, packed[i], scales[i], lut, group, n, k, out_dtype=torch.bfloat16, config=cfg)

    t_auto = time_calls(lambda i: gemv(i, None), copies, args.calls, args.repeats)
    row: dict[str, Any] = {
        "layer": name, "N": n, "K": k, "bf16_us": t_bf16 * 1e6, "bf16_GBps": 2 * n * k / t_bf16 / 1e9,
        "quant_bytes": q_bytes, "auto_us": t_auto * 1e6, "auto_vs_bf16": t_bf16 / t_auto, "tiles": [],
    }  # fmt: skip
    for cfg in tiles:
        if cfg["BLOCK_KB"] > k // 2:
            continue
        try:
            t = time_calls(lambda i, c=cfg: gemv(i, c), copies, args.calls, args.repeats)
        except Exception as err:  # a tile that does not compile (registers): recorded, not fatal
            row["tiles"].append({**cfg, "error": f"{type(err).__name__}: {err}".splitlines()[0][:200]})
            continue
        row["tiles"].append({**cfg, "us": t * 1e6, "GBps": q_bytes / t / 1e9, "vs_bf16": t_bf16 / t})
    ok = [r for r in row["tiles"] if "us" in r]
    row["best"] = min(ok, key=lambda r: r["us"])
    row["best_without_prefetch"] = min((r for r in ok if not r["PREFETCH"]), key=lambda r: r["us"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--format", choices=["int4", "nf4"], default="int4")
    parser.add_argument("--group", type=int, default=None, help="default: 32 for int4, 64 for nf4")
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    group = args.group or (32 if args.format == "int4" else 64)
    w = args.width
    shapes = {"qkv": (3 * w, w), "proj": (w, w), "fc1": (4 * w, w), "fc2": (w, 4 * w)}
    lut = None if args.format == "int4" else codebook(args.format).cuda()
    tiles = tile_grid()
    env = environment()
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    x = torch.randn(1, 4 * w, device="cuda", dtype=torch.bfloat16)
    for name, (n, k) in shapes.items():
        row = measure_layer(name, n, k, x[:, :k].contiguous(), lut, group, tiles, args)
        rows.append(row)
        best, plain = row["best"], row["best_without_prefetch"]
        print(
            f"[{time.perf_counter() - t0:6.1f}s] {name:5s} {n:6d}x{k:<6d} bf16 {row['bf16_us']:7.1f} us "
            f"({row['bf16_GBps']:5.0f} GB/s) | auto {row['auto_us']:7.1f} us ({row['auto_vs_bf16']:.2f}x) | best "
            f"{best['us']:7.1f} us {best['GBps']:5.0f} GB/s ({best['vs_bf16']:.2f}x) {best} | best w/o prefetch "
            f"{plain['vs_bf16']:.2f}x",
            flush=True,
        )
        torch.cuda.empty_cache()
    total_bf16 = sum(r["bf16_us"] for r in rows)
    summary = {
        "block_bf16_us": total_bf16,
        "block_auto_us": sum(r["auto_us"] for r in rows),
        "block_best_us": sum(r["best"]["us"] for r in rows),
        "block_best_without_prefetch_us": sum(r["best_without_prefetch"]["us"] for r in rows),
    }
    for key in ("auto", "best", "best_without_prefetch"):
        summary[f"block_{key}_vs_bf16"] = total_bf16 / summary[f"block_{key}_us"]
    result = {
        "benchmark": "triton_gemv_layers", "issue": 5, "env": env, "device": device_label(env),
        "args": {k: str(v) for k, v in vars(args).items()}, "group": group, "layers": rows, "summary": summary,
        "note": "random weights; one activation row; each call reads a different copy (>= 256 MiB cycled)",
        "wall_s": time.perf_counter() - t0,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{device_label(env)} | {args.format} g{group} width {w} | block: " + ", ".join(
        f"{k} {v:.2f}" for k, v in summary.items()))  # fmt: skip


if __name__ == "__main__":
    main()
