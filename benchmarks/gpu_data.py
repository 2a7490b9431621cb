"""Keep the GPU busy (issue 4): training throughput and data-wait fraction of three input pipelines.

Fashion-MNIST, ResNet-9 ``ImageClassifier``, bf16-mixed, one GPU, Adam 1e-3:

  a_baseline        FashionMNISTDataModule(augment=True, output="float", num_workers=4): per-sample CPU
                    crop+flip+normalise in the workers, float32 batches copied on the compute stream
  b_prefetch_gpuaug FashionMNISTDataModule(augment=False, output="uint8", num_workers=4) + GPUPrefetcher(2)
                    + GPUAugment(RandomCrop(28, padding=2), RandomHorizontalFlip(), Normalize(mean, std));
                    without CPU augmentation the loader gathers whole batches (ImageBatches)
  b_per_sample_fetch the same with batched_fetch=False: the workers index and collate sample by sample
                    (what b measured before batched fetching)
  b_training_thread  b with GPUPrefetcher(background=False): batches are taken from the loader and their
                    copies issued on the training thread (what b measured before the fetch thread)
  c_resident_gpuaug DeviceResidentDataModule (uint8 on the GPU) + the same GPUAugment
  b_async_metrics, c_async_metrics
                    b and c + AsyncProgressBarMetrics. The module logs train_loss with prog_bar=True, as users
                    do, and Lightning reads progress-bar metrics with .item() after every step (a host-device
                    sync, even without a progress bar), so the host cannot run ahead of the GPU; the callback
                    shows them without that sync
  b_in_process      b_async_metrics with num_workers=0: the prefetcher's fetch thread gathers (one index per
                    batch), pins and copies; no worker processes, no inter-process queues, no pin-memory thread
  d_compute / d_compute_prefetch (and d_compute_async / d_compute_prefetch_async, with AsyncProgressBarMetrics)
                    the prefetcher's cost where data is not the bottleneck: uint8 DataLoader + GPUAugment
                    feeding a 16x heavier ResNet-9 (width 256, batch 512), without and with GPUPrefetcher(2)

Every loader drops the last incomplete batch (one batch shape: no recompilation inside the timed steps;
runs before 2026-11-28 kept it). Each run is a fresh Trainer and model; the clock covers ``--steps``
training steps after ``--warmup`` steps (cuDNN autotuning, worker start-up), synchronised at both ends. Images/s counts the images of
those steps; the data-wait fraction is DataStallMonitor's (CUDA events on the compute stream) over the
same steps. Configurations are interleaved (a b c d d' a b c d d' ...) and each number is the median of
``--repeats`` runs. Expected runtime on one H100: about 2 minutes with the defaults (under 3 even if
the baseline runs as slowly as 20k images/s).

Goals of the issue: c >= 5x a in images/s; data wait < 5% in b and c; the prefetcher costs <= 2% in d.

Run on the device (carry [".data", ".whl"]):
    source benchmarks/device_env.sh && python benchmarks/gpu_data.py --out $OUT/gpu_data.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from lightning_speedup import AsyncProgressBarMetrics
from lightning_speedup.bench.datamodules import FashionMNISTDataModule
from lightning_speedup.bench.datasets import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FashionMNIST,
    load_fashion_mnist,
)
from lightning_speedup.bench.env import device_label, environment
from lightning_speedup.bench.modules import ImageClassifier
from lightning_speedup.data.augment import Normalize, RandomCrop, RandomHorizontalFlip
from lightning_speedup.data.gpu_augment import GPUAugment
from lightning_speedup.data.prefetch import GPUPrefetcher
from lightning_speedup.data.resident import DeviceResidentDataModule
from lightning_speedup.data.stall import DataStallMonitor

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu_data.json"


class StepClock(L.Callback):
    """Wall time and images of training steps [warmup, warmup + steps), synchronised at both ends."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.batch = 0
        self.images = 0
        self.t0 = self.t1 = 0.0

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.batch == self.warmup:
            self._sync(pl_module)
            self.t0 = time.perf_counter()
        if self.warmup <= self.batch < self.warmup + self.steps:
            self.images += int(batch[0].shape[0])

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.batch += 1
        if self.batch == self.warmup + self.steps:
            self._sync(pl_module)
            self.t1 = time.perf_counter()

    @property
    def images_per_s(self) -> float:
        return self.images / (self.t1 - self.t0) if self.t1 > self.t0 else float("nan")


@dataclass
class Config:
    name: str
    description: str
    batch_size: int
    make: Callable[[FashionMNIST, argparse.Namespace, int], tuple[L.LightningDataModule, list[L.Callback]]]
    width: int = 64  # ResNet-9 width; the compute-bound pair uses a wider model
    compute: bool = False  # timed over --compute-steps instead of --steps


def gpu_augment(seed: int) -> GPUAugment:
    return GPUAugment(
        RandomCrop(28, padding=2),
        RandomHorizontalFlip(),
        Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD),
        seed=seed,
    )


class PreloadedFashionMNIST(FashionMNISTDataModule):
    """The reference data module with the IDX files parsed once per process instead of once per run."""

    def __init__(self, data: FashionMNIST, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data = data

    @override
    def prepare_data(self) -> None:
        pass


def loader_module(
    data: FashionMNIST, args: argparse.Namespace, batch_size: int, **kwargs: Any
) -> FashionMNISTDataModule:
    # drop_last: one batch shape, so no run recompiles (or records a new CUDA graph) inside its timed steps
    return PreloadedFashionMNIST(
        data, batch_size=batch_size, num_workers=args.workers, drop_last=True, **kwargs
    )


def make_baseline(
    data: FashionMNIST, args: argparse.Namespace, seed: int
) -> tuple[L.LightningDataModule, list[L.Callback]]:
    return loader_module(data, args, args.batch_size, augment=True, output="float"), []


def make_prefetch(
    batched: bool, background: bool = True, workers: int | None = None, async_metrics: bool = False
) -> Callable[..., tuple[L.LightningDataModule, list[L.Callback]]]:
    def make(
        data: FashionMNIST, args: argparse.Namespace, seed: int
    ) -> tuple[L.LightningDataModule, list[L.Callback]]:
        dm = loader_module(data, args, args.batch_size, augment=False, output="uint8", batched_fetch=batched)
        if workers is not None:
            dm.num_workers = workers
        extra = [AsyncProgressBarMetrics()] if async_metrics else []
        return dm, [*extra, GPUPrefetcher(depth=2, background=background), gpu_augment(seed)]

    return make


def make_resident(
    async_metrics: bool = False,
) -> Callable[..., tuple[L.LightningDataModule, list[L.Callback]]]:
    def make(
        data: FashionMNIST, args: argparse.Namespace, seed: int
    ) -> tuple[L.LightningDataModule, list[L.Callback]]:
        dm = DeviceResidentDataModule(
            train=(data.train_images.unsqueeze(1), data.train_labels), batch_size=args.batch_size, seed=seed,
            drop_last=True,
        )  # fmt: skip
        return dm, [*([AsyncProgressBarMetrics()] if async_metrics else []), gpu_augment(seed)]

    return make


def make_compute(
    prefetch: bool, async_metrics: bool = False
) -> Callable[..., tuple[L.LightningDataModule, list[L.Callback]]]:
    def make(
        data: FashionMNIST, args: argparse.Namespace, seed: int
    ) -> tuple[L.LightningDataModule, list[L.Callback]]:
        dm = loader_module(data, args, args.compute_batch_size, augment=False, output="uint8")
        extra = [AsyncProgressBarMetrics()] if async_metrics else []
        return dm, [*extra, *([GPUPrefetcher(depth=2)] if prefetch else []), gpu_augment(seed)]

    return make


def configs(args: argparse.Namespace) -> list[Config]:
    bs, cbs = args.batch_size, args.compute_batch_size
    return [
        Config("a_baseline", "DataLoader, per-sample CPU aug, float32", bs, make_baseline),
        Config(
            "b_prefetch_gpuaug",
            "DataLoader uint8 (whole batches gathered) + GPUPrefetcher + GPUAugment",
            bs,
            make_prefetch(True),
        ),
        Config(
            "b_per_sample_fetch",
            "the same, the DataLoader fetching sample by sample (b before batched fetching)",
            bs,
            make_prefetch(False),
        ),
        Config(
            "b_training_thread",
            "b with GPUPrefetcher(background=False): fetch and copy on the training thread",
            bs,
            make_prefetch(True, background=False),
        ),
        Config(
            "b_in_process",
            "b_async_metrics with num_workers=0: the fetch thread gathers, pins and copies",
            bs,
            make_prefetch(True, workers=0, async_metrics=True),
        ),
        Config("c_resident_gpuaug", "device-resident uint8 + GPUAugment", bs, make_resident()),
        Config(
            "b_async_metrics",
            "b + AsyncProgressBarMetrics (no per-step host-device sync for train_loss's progress-bar value)",
            bs,
            make_prefetch(True, async_metrics=True),
        ),
        Config(
            "c_async_metrics",
            "c + AsyncProgressBarMetrics",
            bs,
            make_resident(async_metrics=True),
        ),
        Config(
            "d_compute",
            f"DataLoader uint8 + GPUAugment, ResNet-9 width {args.compute_width}, batch {cbs}",
            cbs,
            make_compute(False),
            width=args.compute_width,
            compute=True,
        ),
        Config(
            "d_compute_prefetch",
            "same + GPUPrefetcher",
            cbs,
            make_compute(True),
            width=args.compute_width,
            compute=True,
        ),
        Config(
            "d_compute_async",
            "d_compute + AsyncProgressBarMetrics (the host runs ahead of the GPU)",
            cbs,
            make_compute(False, async_metrics=True),
            width=args.compute_width,
            compute=True,
        ),
        Config(
            "d_compute_prefetch_async",
            "d_compute_async + GPUPrefetcher",
            cbs,
            make_compute(True, async_metrics=True),
            width=args.compute_width,
            compute=True,
        ),
    ]


class StepProfiler(L.Callback):
    """torch.profiler over training steps [start, start + steps): host vs device time, launches, top ops."""

    def __init__(self, start: int, steps: int) -> None:
        self.start, self.steps = start, steps
        self.batch = 0
        self.prof: Any = None
        self.wall = 0.0

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *a: Any) -> None:
        if self.batch == self.start:
            from torch.profiler import ProfilerActivity, profile

            cuda = pl_module.device.type == "cuda"
            if cuda:
                torch.cuda.synchronize(pl_module.device)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            self.prof = profile(activities=activities)
            self.prof.start()
            self.wall = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *a: Any) -> None:
        self.batch += 1
        if self.prof is not None and self.batch == self.start + self.steps:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            self.wall = time.perf_counter() - self.wall
            self.prof.stop()

    def summary(self, top: int = 20) -> dict[str, Any]:
        """Per step: wall ms, kernel ms on the device, kernel launches; the ops with the most host time."""
        if self.prof is None:
            return {}
        events = self.prof.key_averages()

        def device_us(e: Any) -> float:
            return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

        kernels_us = sum(device_us(e) for e in events if getattr(e, "device_type", None) is not None
                         and "CUDA" in str(e.device_type))  # fmt: skip
        launches = sum(
            e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
        )
        ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        n = self.steps
        return {
            "steps": n,
            "wall_ms_per_step": 1e3 * self.wall / n,
            "device_kernel_ms_per_step": kernels_us / 1e3 / n,
            "device_busy_fraction": (kernels_us / 1e6) / self.wall if self.wall else None,
            "kernel_launches_per_step": launches / n,
            "top_host_ops": [
                {
                    "op": e.key,
                    "calls_per_step": e.count / n,
                    "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / n,
                }
                for e in ops
            ],
        }


def flops_per_image(width: int) -> float:
    """Forward + backward FLOPs of one 28x28 image through ResNet-9 of this width (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = ImageClassifier(width=width)
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(2, 1, 28, 28)).sum().backward()
    return counter.get_total_flops() / 2


def run_one(
    config: Config,
    data: FashionMNIST,
    args: argparse.Namespace,
    seed: int,
    profiler: StepProfiler | None = None,
) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    dm, extra = config.make(data, args, seed)
    steps = args.compute_steps if config.compute else args.steps
    clock = StepClock(args.warmup, steps)
    # The monitor comes before GPUAugment so augmentation counts as compute, not as data wait.
    monitor = DataStallMonitor(warmup_steps=args.warmup, log=False)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_steps=args.warmup + steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        benchmark=True,
        callbacks=[clock, monitor, *extra, *([profiler] if profiler else [])],
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model = ImageClassifier(
        compile=args.compile, compile_mode=args.compile_mode, channels_last=args.channels_last, width=config.width,
        fused_optimizer=args.fused,
    )  # fmt: skip
    trainer.fit(model, dm)
    summary = monitor.summary()
    result = {
        "images_per_s": clock.images_per_s,
        "wait_fraction": summary["wait_fraction"],
        "mean_wait_ms": summary["mean_wait_ms"],
        "mean_step_ms": summary["mean_step_ms"],
        "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else float("nan"),
        # where the host waited for the GPU in one step cycle after warm-up (CUDA only)
        "sync_sites": monitor.sync_sites,
    }
    del trainer, dm, extra
    gc.collect()  # shuts down the persistent DataLoader workers of this run
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--data-dir", default=None, help="Fashion-MNIST folder (default: the loader's search)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--compute-batch-size", type=int, default=512)
    parser.add_argument(
        "--compute-width",
        type=int,
        default=256,
        help="ResNet-9 width of the compute-bound pair (2026-11-27 used width 64 at batch 2048, which "
        "was host/loader-bound under compile: 21%% data wait)",
    )
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--steps", type=int, default=300, help="timed steps at --batch-size")
    parser.add_argument("--compute-steps", type=int, default=60, help="timed steps of the compute-bound pair")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="gpu", help="'cpu' only for a plumbing check")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--only", nargs="*", default=None, help="run only these configurations")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (as the speedup recipe does); graphs compiled by the first run are "
        "reused by later ones (same shapes), so --warmup only has to cover recompiles",
    )
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode with --compile, e.g. 'reduce-overhead' (CUDA graphs)",
    )
    parser.add_argument("--fused", action="store_true", help="the fused Adam kernel (one launch per step)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last model and inputs")
    parser.add_argument(
        "--profile",
        nargs="*",
        default=[],
        help="after the timed runs, profile these configurations for --profile-steps steps each (torch.profiler): "
        "host wall vs device kernel time per step, kernel launches, the ops with the most host time",
    )
    parser.add_argument("--profile-steps", type=int, default=20)
    args = parser.parse_args()
    unknown = set(args.profile) - {c.name for c in configs(args)}
    if unknown:
        parser.error(
            f"--profile: unknown configurations {sorted(unknown)}; choose from {[c.name for c in configs(args)]}"
        )
    if args.compile_mode and not args.compile:
        parser.error("--compile-mode needs --compile")
    if args.compile:
        # Every run builds a new module; dynamo guards on it, so allow a recompile per run (from the
        # FX/Inductor caches, seconds) instead of silently falling back to eager after 8.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    started = time.time()
    data = load_fashion_mnist(args.data_dir)
    chosen = [c for c in configs(args) if args.only is None or c.name in args.only]
    runs: dict[str, list[dict[str, float]]] = {c.name: [] for c in chosen}
    for repeat in range(args.repeats):
        for config in chosen:  # interleaved: a b c d d' a b c d d' ...
            result = run_one(config, data, args, args.seed + repeat)
            runs[config.name].append(result)
            print(
                f"[{time.time() - started:6.1f}s] repeat {repeat} {config.name:20s} "
                f"{result['images_per_s']:10,.0f} img/s  wait {result['wait_fraction']:6.1%}  "
                f"host-device syncs per step: {result['sync_sites']}",
                flush=True,
            )

    profiles: dict[str, Any] = {}
    for config in (c for c in configs(args) if c.name in args.profile):
        profiler = StepProfiler(args.warmup, args.profile_steps)
        run_one(config, data, args, args.seed, profiler)  # not timed: the profiler's own overhead is in it
        profiles[config.name] = profiler.summary()
        p = profiles[config.name]
        print(
            f"[profile] {config.name}: {p['wall_ms_per_step']:.2f} ms/step wall, {p['device_kernel_ms_per_step']:.2f} ms "
            f"kernels, {p['kernel_launches_per_step']:.0f} launches/step",
            flush=True,
        )
        for op in p["top_host_ops"][:10]:
            print(f"    {op['self_cpu_ms_per_step']:7.3f} ms  {op['calls_per_step']:6.1f}x  {op['op']}")

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name]) if runs.get(name) else float("nan")

    medians = {
        name: {
            key: median(name, key)
            for key in ("images_per_s", "wait_fraction", "mean_wait_ms", "mean_step_ms", "peak_mem_mb")
        }
        for name in runs
    }
    # What the model's arithmetic sustains: how far a configuration is from being compute-bound.
    flops = {width: flops_per_image(width) for width in {c.width for c in chosen}}
    for c in chosen:
        medians[c.name]["model_tflops_per_s"] = medians[c.name]["images_per_s"] * flops[c.width] / 1e12
    ips = {name: m["images_per_s"] for name, m in medians.items()}
    derived = {
        "speedup_b_over_a": ips.get("b_prefetch_gpuaug", float("nan")) / ips.get("a_baseline", float("nan")),
        "speedup_c_over_a": ips.get("c_resident_gpuaug", float("nan")) / ips.get("a_baseline", float("nan")),
        "speedup_b_batched_fetch": ips.get("b_prefetch_gpuaug", float("nan"))
        / ips.get("b_per_sample_fetch", float("nan")),
        "speedup_b_fetch_thread": ips.get("b_prefetch_gpuaug", float("nan"))
        / ips.get("b_training_thread", float("nan")),
        "speedup_b_async_metrics": ips.get("b_async_metrics", float("nan"))
        / ips.get("b_prefetch_gpuaug", float("nan")),
        "speedup_c_async_metrics": ips.get("c_async_metrics", float("nan"))
        / ips.get("c_resident_gpuaug", float("nan")),
        "speedup_c_async_over_a": ips.get("c_async_metrics", float("nan"))
        / ips.get("a_baseline", float("nan")),
        "prefetch_cost_compute_bound_async_metrics": 1
        - ips.get("d_compute_prefetch_async", float("nan")) / ips.get("d_compute_async", float("nan")),
        "prefetch_cost_compute_bound": 1
        - ips.get("d_compute_prefetch", float("nan")) / ips.get("d_compute", float("nan")),
    }

    def wait(name: str) -> float:
        return medians.get(name, {}).get("wait_fraction", float("nan"))

    goals = {
        "c_at_least_5x_a": derived["speedup_c_over_a"] >= 5,
        "c_async_metrics_at_least_5x_a": derived["speedup_c_async_over_a"] >= 5,
        "wait_below_5pct_b": wait("b_prefetch_gpuaug") < 0.05,
        "wait_below_5pct_b_async_metrics": wait("b_async_metrics") < 0.05,
        "wait_below_5pct_c": wait("c_resident_gpuaug") < 0.05,
        "wait_below_5pct_c_async_metrics": wait("c_async_metrics") < 0.05,
        "prefetch_cost_at_most_2pct": derived["prefetch_cost_compute_bound"] <= 0.02,
    }
    env = environment()
    record = {
        "benchmark": "gpu_data",
        "issue": 4,
        "env": env,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seeds": [args.seed + r for r in range(args.repeats)],
        "configs": {c.name: {"description": c.description, "batch_size": c.batch_size} for c in chosen},
        "runs": runs,
        "medians": medians,
        "derived": derived,
        "goals": goals,
        "fwd_bwd_flops_per_image": {f"width_{w}": f for w, f in flops.items()},
        "profiles": profiles,
        "wall_s": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=str))

    print(f"\n{device_label(env)} | torch {env['torch']} | lightning {env['lightning']} "
          f"| median of {args.repeats} | {record['wall_s']:.0f}s | {args.out}")  # fmt: skip
    print(
        f"{'config':20s} {'batch':>6s} {'img/s':>10s} {'vs a':>6s} {'wait':>7s} {'wait ms':>8s} {'step ms':>8s} "
        f"{'TFLOP/s':>8s}"
    )
    base = ips.get("a_baseline", float("nan"))
    for c in chosen:
        m = medians[c.name]
        print(
            f"{c.name:20s} {c.batch_size:6d} {m['images_per_s']:10,.0f} {m['images_per_s'] / base:5.2f}x "
            f"{m['wait_fraction']:7.1%} {m['mean_wait_ms']:8.2f} {m['mean_step_ms']:8.2f} "
            f"{m['model_tflops_per_s']:8.1f}"
        )
    print(
        f"prefetcher cost (compute-bound): {derived['prefetch_cost_compute_bound']:+.1%}   goals: "
        + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in goals.items())
    )


if __name__ == "__main__":
    main()
