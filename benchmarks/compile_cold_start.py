"""Cold-start cost of torch.compile, each variant in its own fresh process with its own empty Inductor and
Triton caches: eager, whole-model compile, regional compile (each repeated block compiled once), and
regional compile started from the artifacts a previous process saved (torch.compiler.save_cache_artifacts /
load_cache_artifacts). Reports the first step (compilation included) and the time of N steps after it, each
step timed on its own (median beside mean), and how many graphs Dynamo compiled after the first step.

Models: the bench's GPT (6 layers, 384 wide, context 256, batch 64), a deeper GPT (24 layers) and the
ResNet-9 (batch 512, 28x28). bf16 autocast, AdamW (fused on CUDA). About 4 minutes on one H200:

    python benchmarks/compile_cold_start.py --out results/compile-cold-start.json

CPU smoke test (Inductor's C++ backend is slow on CPU, so a tiny 2-layer model with backend aot_eager):

    python benchmarks/compile_cold_start.py --device cpu --tiny --backend aot_eager --models gpt6 --steps 2 --out /tmp/c.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("eager", "full", "regional", "regional+cache")
MODELS = ("gpt6", "gpt24", "resnet9")


def _build(model: str, tiny: bool, device: str):  # type: ignore[no-untyped-def]
    import torch

    from lightning_speedup.bench.models import GPT, GPTConfig, ResNet9

    if model.startswith("gpt"):
        layers = 2 if tiny else int(model[3:])
        width, ctx, batch = (16, 16, 2) if tiny else (384, 256, 64)
        net = GPT(
            GPTConfig(vocab_size=65, block_size=ctx, n_layer=layers, n_head=2 if tiny else 6, n_embd=width)
        )
        x = torch.randint(0, 65, (batch, ctx), device=device)
        y = torch.randint(0, 65, (batch, ctx), device=device)
    else:
        width, batch = (4, 8) if tiny else (64, 512)
        net = ResNet9(width=width)
        x = torch.randn(batch, 1, 28, 28, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
    return net.to(device), x, y


def worker(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from lightning_speedup.compile.core import compile_model, load_artifacts_bytes, save_artifacts_bytes

    torch.manual_seed(0)
    net, x, y = _build(args.model, args.tiny, args.device)
    on_cuda = args.device.startswith("cuda")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=on_cuda)
    loaded = False
    if args.variant == "regional+cache" and args.load and Path(args.load).is_file():
        load_artifacts_bytes(Path(args.load).read_bytes())
        loaded = True
    if args.variant != "eager":
        compile_model(net, "full" if args.variant == "full" else "regional", backend=args.backend)

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize()

    def step() -> None:
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=on_cuda):
            out = net(x)
            loss = F.cross_entropy(out.flatten(0, -2).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def graphs() -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    sync()
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    graphs_first = graphs()
    # Each step timed on its own (synchronised), so a recompilation shows as one slow step, not a higher mean.
    step_ms = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        sync()
        step_ms.append(1e3 * (time.perf_counter() - t))
    steps_s = sum(step_ms) / 1e3
    saved = False
    if args.save:
        data = save_artifacts_bytes()
        if data:
            Path(args.save).write_bytes(data)
            saved = True
    ordered = sorted(step_ms)
    return {"first_step_s": first, "steps_s": steps_s, "step_ms": 1e3 * steps_s / max(args.steps, 1),
            "step_ms_median": ordered[len(ordered) // 2] if ordered else None,
            "step_ms_max": ordered[-1] if ordered else None,
            # Graphs Dynamo compiled in the first step, and in the timed steps after it (recompilations).
            "graphs_first_step": graphs_first, "graphs_later": graphs() - graphs_first,
            "artifacts_loaded": loaded, "artifacts_saved": saved}  # fmt: skip


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def _run(args: argparse.Namespace, model: str, variant: str, save: str | None, load: str | None) -> dict:
    """One fresh process with its own empty compile caches."""
    with tempfile.TemporaryDirectory(prefix="cold-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{cache}/inductor", "TRITON_CACHE_DIR": f"{cache}/triton",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
        cmd = [sys.executable, __file__, "--worker", "--model", model, "--variant", variant, "--device", args.device,
               "--steps", str(args.steps), "--backend", args.backend] + (["--tiny"] if args.tiny else [])  # fmt: skip
        cmd += ["--save", save] if save else []
        cmd += ["--load", load] if load else []
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"model": model, "variant": variant, "error": proc.stderr[-2000:], "process_s": wall}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"model": model, "variant": variant, "process_s": wall, **result}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    p.add_argument("--load", help=argparse.SUPPRESS)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--backend", default="inductor", help="torch.compile backend (aot_eager for the CPU smoke test)"
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="2-layer GPT / width-4 ResNet (CPU smoke test)")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return {}
    if not args.out:
        p.error("--out is required")

    import torch

    on_cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    result = {
        "script": "benchmarks/compile_cold_start.py",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name() if on_cuda else None,
        "driver": _driver() if on_cuda else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "args": {
            k: v for k, v in vars(args).items() if k not in ("worker", "model", "variant", "save", "load")
        },
        "rows": [],
    }
    rows: list[dict] = result["rows"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="artifacts-") as art:
        for model in args.models:
            for variant in args.variants:
                if variant == "regional+cache":
                    # A first process compiles and saves the artifacts; the measured second one loads them.
                    blob = f"{art}/{model}.bin"
                    _run(args, model, "regional", save=blob, load=None)
                    rows.append(_run(args, model, variant, save=None, load=blob))
                else:
                    rows.append(_run(args, model, variant, save=None, load=None))
                print(json.dumps(rows[-1])[:300], flush=True)
                # Written after every row, so a run cut short by a time limit keeps what it measured.
                Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"\n| model | variant | first step (s) | {args.steps} steps (s) | ms/step | median | recompiled | process (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['variant']} | error | | | | | {r['process_s']:.1f} |")
        else:
            print(f"| {r['model']} | {r['variant']} | {r['first_step_s']:.2f} | {r['steps_s']:.3f} | "
                  f"{r['step_ms']:.2f} | {r['step_ms_median']:.2f} | {r['graphs_later']} | {r['process_s']:.1f} |")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
