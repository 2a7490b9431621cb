"""Instruction counts of the Triton 4-bit GEMV, compiled offline for Hopper (sm_90) without a GPU.

Decode with 4-bit weights is memory-bound only if the kernel issues few enough instructions per weight:
an H100/H200 issues ~33e12 thread-instructions/s (132 SMs x 4 schedulers x 32 lanes x 1.98 GHz), and
at the H200's 4.8 TB/s it streams 9.6e12 weights/s, so ~3.5 instructions per weight is the budget.
This script compiles ``lightning_speedup.quantization.triton_gemv``'s kernel with the installed
Triton's own ``ptxas`` (no driver, no GPU) for each autotuned tile and reports, per tile: registers,
SASS instructions in the main loop per weight, and whether the loop touches shared memory (a layout
conversion Triton inserted). It measures no time; ``quant_speed.py`` does that on the device.

    python benchmarks/triton_gemv_sass.py --out benchmarks/results/triton_gemv_sass.json

Needs the ``triton`` package (``pip install triton`` on a CPU machine).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from lightning_speedup.quantization import triton_gemv

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "triton_gemv_sass.json"
# (name, x kind (0 bf16, 1 fp16, 2 fp32), codebook lookup, group size): the formats of the benchmarks.
VARIANTS = [("int4_g32_bf16", 0, False, 32), ("nf4_b64_bf16", 0, True, 64), ("int4_g128_bf16", 0, False, 128)]
_INSTR = re.compile(r"\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)")
_BACK_BRANCH = re.compile(r"/\*([0-9a-f]{4,})\*/\s+@!?U?P\w+\s+BRA\s+0x([0-9a-f]+)")


def compile_tile(
    x_kind: int, use_lut: bool, group: int, block_n: int, block_kb: int, warps: int, workdir: Path
) -> dict[str, Any]:
    """Compile one specialisation for sm_90 and count the SASS of its main loop."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel, _, _ = triton_gemv._kernels(False)
    sig = {
        "x_ptr": "*i32" if x_kind < 2 else "*i64", "w_ptr": "*u8", "s_ptr": "*fp32", "lut_ptr": "*fp32",
        "bias_ptr": "*bf16", "out_ptr": "*bf16", "M": "i32", "N": "i32", "KB": "i32", "NUM_GROUPS": "i32",
    }  # fmt: skip
    consts = {
        "GROUP_SIZE": group, "CHUNK": triton_gemv.chunk_bytes(group), "X_KIND": x_kind, "USE_LUT": use_lut,
        "HAS_BIAS": False, "EVEN_K": True, "BLOCK_N": block_n, "BLOCK_KB": block_kb, "INTERPRET": False,
        "PREFETCH": False,
    }  # fmt: skip
    sig.update(dict.fromkeys(consts, "constexpr"))
    aligned = ["x_ptr", "w_ptr", "s_ptr", "lut_ptr", "bias_ptr", "out_ptr", "N", "KB", "NUM_GROUPS"]
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": warps, "num_stages": 1, "enable_fp_fusion": True})
    src = triton.compiler.ASTSource(fn=kernel, constexprs=consts, signature=sig, attrs=attrs)
    compiled = triton.compile(src, target=target, options=options.__dict__)
    cubin = workdir / "k.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                           text=True, check=True).stdout  # fmt: skip
    instrs = [(int(m.group(1), 16), m.group(2)) for m in map(_INSTR.match, sass.splitlines()) if m]
    loops = [
        (int(m.group(2), 16), int(m.group(1), 16))
        for m in map(_BACK_BRANCH.search, sass.splitlines())
        if m and int(m.group(2), 16) < int(m.group(1), 16)
    ]
    start, end = max(loops, key=lambda r: r[1] - r[0])  # the K loop
    body = collections.Counter(op.split(".")[0] for addr, op in instrs if start <= addr <= end)
    weights_per_thread = block_n * block_kb * 2 / (32 * warps)
    regs = re.search(r"REG:(\d+)", usage)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "loop_instructions": sum(body.values()),
        "weights_per_thread_per_step": weights_per_thread,
        "instructions_per_weight": sum(body.values()) / weights_per_thread,
        "shared_memory_ops_in_loop": sum(body[op] for op in ("LDS", "STS", "BAR")),
        "top_ops": dict(body.most_common(8)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--variants", nargs="*", default=None, help="subset of " + ", ".join(v[0] for v in VARIANTS)
    )
    parser.add_argument("--tiles", type=int, default=None, help="only the first N autotuned tiles")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import triton

    started = time.time()
    tiles = triton_gemv.AUTOTUNE_TILES[: args.tiles]
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, x_kind, use_lut, group in VARIANTS:
            if args.variants is not None and name not in args.variants:
                continue
            for block_n, block_kb, warps in tiles:
                key = f"{name}/{block_n}x{block_kb}w{warps}"
                rows[key] = compile_tile(x_kind, use_lut, group, block_n, block_kb, warps, Path(tmp))
                r = rows[key]
                print(
                    f"{key:32s} regs {r['registers']!s:>4s}  {r['instructions_per_weight']:5.2f} instr/weight  "
                    f"smem ops in loop {r['shared_memory_ops_in_loop']}",
                    flush=True,
                )
    record = {
        "benchmark": "triton_gemv_sass",
        "target": "sm_90 (offline: Triton's bundled ptxas, no GPU)",
        "triton": triton.__version__,
        "budget_note": "~3.5 instructions per weight at 4.8 TB/s on 132 SMs at 1.98 GHz",
        "rows": rows,
        "wall_s": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"triton {triton.__version__} | {len(rows)} kernels | {args.out}")


if __name__ == "__main__":
    main()
