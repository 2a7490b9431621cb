"""Ablation and candidate recipes that are not the package's: registered for `lightning-speedup bench`
when it runs from the repository root (``lightning_speedup.bench.recipes.load_recipe_files`` loads this file),
or from anywhere with ``LIGHTNING_SPEEDUP_RECIPES=/path/to/benchmarks/recipes.py``.

Candidates that lost their comparison stay here so their results can be reproduced; the method cards in
docs/methods/ link the numbers.
"""

from __future__ import annotations

from lightning_speedup.bench.recipes import (
    BASELINE,
    LEVERS,
    SPEEDUP,
    async_metrics,
    get_recipe,
    one_cycle,
    register_recipe,
    wsd,
)

_LM_LEVERS = LEVERS.per_task["char-lm"]

register_recipe(
    BASELINE.extended(
        name="baseline-onecycle",
        description="baseline with a per-step OneCycle schedule (max_lr 3e-3, 10 epochs; LM: 1e-3, 40 epochs).",
        callbacks=(one_cycle(3e-3),),
        max_epochs=10,
        per_task={"char-lm": {"callbacks": (one_cycle(1e-3),), "max_epochs": 40}},
    )
)
register_recipe(
    LEVERS.extended(
        name="speedup-onecycle",
        description="speedup-levers with a per-step OneCycle schedule (max_lr 4e-3, 10 epochs; LM: 1e-3, 40 epochs).",
        callbacks=(one_cycle(4e-3),),
        max_epochs=10,
        # The LM diverged at 2e-3.
        per_task={"char-lm": {**_LM_LEVERS, "callbacks": (one_cycle(1e-3),), "max_epochs": 40}},
    )
)
register_recipe(
    LEVERS.extended(
        name="speedup-wsd",
        description=(
            "speedup-levers with warmup-stable-decay (peak 4e-3, 5% warm-up, 1-sqrt decay over the last 30%, "
            "10 epochs; LM: 1e-3, 40 epochs)."
        ),
        callbacks=(wsd(4e-3),),
        max_epochs=10,
        per_task={"char-lm": {**_LM_LEVERS, "callbacks": (wsd(1e-3),), "max_epochs": 40}},
    )
)
register_recipe(
    LEVERS.extended(
        name="speedup-gpu-data",
        description="speedup-levers fed raw uint8 batches, copied by GPUPrefetcher on a side stream and augmented by GPUAugment.",
        data="gpu",
    )
)
register_recipe(
    LEVERS.extended(
        name="speedup-resident",
        description="speedup-levers with the data set resident in GPU memory, shuffled and batched there, GPUAugment.",
        data="resident",
    )
)
register_recipe(
    SPEEDUP.extended(
        name="speedup-no-cudagraphs",
        description="speedup compiled in torch.compile's default mode and Adam's foreach kernel (no CUDA graphs).",
        compile_mode=None,
        cuda_graphs=None,
        fused_optimizer=False,
    )
)
register_recipe(
    SPEEDUP.extended(
        name="speedup-async-metrics",
        description="speedup + AsyncProgressBarMetrics (progress-bar metrics read without a per-step host-device sync).",
        extra_callbacks=(async_metrics,),
    )
)

# Cold-start candidates measured against `speedup-autotune` (then `speedup`) on 2026-12-04: Lightning's sanity check
# (two validation batches before the first training step, 1.0-2.0 s of a cold run on an H200), and the LM's
# training step as CUDA graphs with fused AdamW (since then `speedup`'s LM step).
_AUTOTUNE = get_recipe("speedup-autotune")
register_recipe(
    _AUTOTUNE.extended(
        name="speedup-no-sanity",
        description="speedup-autotune without Lightning's sanity check (Trainer(num_sanity_val_steps=0)).",
        trainer_kwargs={**_AUTOTUNE.trainer_kwargs, "num_sanity_val_steps": 0},
    )
)
register_recipe(
    _AUTOTUNE.extended(
        name="speedup-lm-cudagraphs",
        description=(
            "speedup-autotune with the LM's training forward/backward as CUDA graphs without Inductor "
            "(EagerCUDAGraphs) and the fused AdamW kernel: the LM's `speedup` from 2026-12-04 until its attention left "
            "cuDNN's kernel on 2026-12-05; images as speedup-autotune."
        ),
        per_task={
            "char-lm": {**_AUTOTUNE.per_task["char-lm"], "cuda_graphs": "eager", "fused_optimizer": True}
        },
    )
)
