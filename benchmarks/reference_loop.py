"""A plain-PyTorch reference loop for the `speedup` recipes on Fashion-MNIST: what the Lightning integration
costs, measured the same way as the bench (wall time from the start of training, data placement included,
to the first validation at or past the target).

Same model (ResNet-9), data (the whole set resident on the device as uint8, shuffled and batched there),
GPU augmentation (random crop with padding 2, horizontal flip, normalisation; seeded per step as GPUAugment
does), and hyper-parameters as `speedup`: batch 512, Adam (fused on CUDA), OneCycle to 4e-3 over 10 epochs
with beta1 cycled 0.95-0.85, bf16 autocast, channels_last, no torch.compile, cuDNN benchmark mode on.
`--cuda-graphs` replays the training step as CUDA graphs captured without Inductor (the loop of
`speedup-autotune`; without it, of `speedup-eager-step`); with `--no-cudnn-benchmark` too it is the loop of
`speedup`; `--compile reduce-overhead` is the loop of `speedup-compiled`. No Lightning anywhere in the loop.
Each run is cold by default, as the bench's: a fresh process whose CUDA, Inductor and Triton caches start
empty (`--cache warm` keeps the caches of the environment).

    python benchmarks/reference_loop.py --out results/reference.json                 # the GPU run
    python benchmarks/reference_loop.py --device cpu --train-subset 512 --val-subset 256 --width 8 \\
        --max-epochs 1 --compile none --out /tmp/ref.json                           # CPU smoke test
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

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import fashion_dir

from lightning_speedup.bench.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
from lightning_speedup.bench.models import ResNet9
from lightning_speedup.bench.runner import cache_environment
from lightning_speedup.data.augment import (
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    batch_seed,
)
from lightning_speedup.data.resident import ResidentBatches
from lightning_speedup.schedules.functional import one_cycle

# Set in the fresh process a cold loop runs in (see --cache).
_COLD_CHILD = "LIGHTNING_SPEEDUP_REFERENCE_LOOP_COLD"


def _subset(n: int, k: int | None, seed: int) -> torch.Tensor:
    if k is None or k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: the package's search)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.94)
    p.add_argument("--max-epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--max-lr", type=float, default=4e-3)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--val-subset", type=int, default=None)
    p.add_argument("--compile", choices=("none", "default", "reduce-overhead"), default="none",
                   help="torch.compile mode (none, as the speedup recipe; reduce-overhead: speedup-compiled)")  # fmt: skip
    p.add_argument(
        "--cuda-graphs", action="store_true",
        help="replay the training forward/backward as CUDA graphs captured without Inductor "
        "(torch.cuda.make_graphed_callables on the first batch), as `speedup` does; CUDA and --compile none only",
    )  # fmt: skip
    p.add_argument(
        "--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false",
        help="leave cuDNN's benchmark mode off, as `speedup` does for images (on by default, as "
        "`speedup-autotune` and `speedup-eager-step`)",
    )  # fmt: skip
    p.add_argument(
        "--precision", choices=("bf16", "32"), default=None, help="default: bf16 on CUDA, 32 on CPU"
    )
    p.add_argument(
        "--cache", choices=("cold", "warm"), default="cold",
        help="cold (default): run in a fresh process whose CUDA, Inductor and Triton caches start empty in a "
        "temporary folder, as the bench's cold runs (the CUDA cache of ~/.nv otherwise persists between runs); "
        "warm: this process, with the caches its environment names",
    )  # fmt: skip
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.cuda_graphs and (args.compile != "none" or not args.device.startswith("cuda")):
        p.error(
            "--cuda-graphs graphs the uncompiled model on a CUDA device: use it with --compile none on CUDA."
        )

    if args.cache == "cold" and not os.environ.get(_COLD_CHILD):
        with tempfile.TemporaryDirectory(prefix="reference-loop-caches-") as caches:
            env = {**os.environ, **cache_environment(Path(caches)), _COLD_CHILD: "1"}
            cmd = [sys.executable, str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)]
            subprocess.run(cmd, env=env, check=True)
        return json.loads(Path(args.out).read_text())

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    mode = args.compile
    bf16 = (args.precision or ("bf16" if on_cuda else "32")) == "bf16"
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = on_cuda and args.cudnn_benchmark

    data = load_fashion_mnist(
        fashion_dir(args.data)
    )  # from disk, before the clock (as the bench's data module)
    tr = _subset(len(data.train_labels), args.train_subset, args.seed)
    va = _subset(len(data.test_labels), args.val_subset, args.seed + 1)

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    train_x = data.train_images[tr].unsqueeze(1).to(device)  # (N, 1, 28, 28) uint8
    train_y = data.train_labels[tr].to(device)
    val_x = data.test_images[va].unsqueeze(1).to(device)
    val_y = data.test_labels[va].to(device)
    train = ResidentBatches([train_x, train_y], args.batch_size, shuffle=True, drop_last=True, seed=args.seed)
    val = ResidentBatches([val_x, val_y], args.batch_size, shuffle=False)
    augment = Compose(
        RandomCrop(28, padding=2), RandomHorizontalFlip(), Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    )
    eval_transform = augment.deterministic()
    generator = torch.Generator(device=device)

    net = ResNet9(width=args.width).to(device, memory_format=torch.channels_last)
    forward = net if mode == "none" else torch.compile(net, mode=None if mode == "default" else mode)
    opt = torch.optim.Adam(net.parameters(), lr=args.max_lr, fused=on_cuda)
    total = args.max_epochs * len(train)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    history: list[dict] = []
    step, reached_s = 0, None
    for epoch in range(args.max_epochs):
        net.train()
        for x, y in train:
            lr, beta1 = one_cycle(step, total, max_lr=args.max_lr)
            for group in opt.param_groups:
                group["lr"], group["betas"] = lr, (beta1, group["betas"][1])
            generator.manual_seed(batch_seed(args.seed, 0, step))
            x, _ = augment(x, None, generator)
            x = x.contiguous(memory_format=torch.channels_last)
            if mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            if args.cuda_graphs and step == 0:
                # As EagerCUDAGraphs: capture under the same autocast, without its weight cache.
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
                    torch.cuda.make_graphed_callables(net, (x.detach().clone(),), num_warmup_iters=3)
            with autocast:
                loss = F.cross_entropy(forward(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        net.eval()
        correct = torch.zeros((), device=device, dtype=torch.long)
        with torch.no_grad(), autocast:
            for x, y in val:
                x, _ = eval_transform(x, None, None)
                x = x.contiguous(memory_format=torch.channels_last)
                if mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                correct += (forward(x).argmax(-1) == y).sum()
        acc = correct.item() / len(val_y)  # the one host sync of the epoch
        sync()
        elapsed = time.perf_counter() - t0
        history.append({"epoch": epoch, "step": step, "val_acc": acc, "elapsed_s": elapsed})
        print(f"epoch {epoch}: val_acc {acc:.4f} at {elapsed:.2f} s", flush=True)
        if acc >= args.target:
            reached_s = elapsed
            break

    result = {
        "script": "benchmarks/reference_loop.py",
        "task": "fashion-mnist",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(device) if on_cuda else None,
        "driver": _driver() if on_cuda else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "seed": args.seed,
        "target": args.target,
        "args": {**vars(args), "compile": mode, "precision": "bf16" if bf16 else "32"},
        # Where the run's compile caches were (a cold run's folder is gone afterwards).
        "cache_env": {k: os.environ.get(k) for k in cache_environment(Path("."))},
        "time_to_target_s": reached_s,
        "reached": reached_s is not None,
        "total_s": history[-1]["elapsed_s"] if history else None,
        "history": history,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
