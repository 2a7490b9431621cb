"""The project's multi-process strategies refuse ``start_method="forkserver"`` on the CPU, where Lightning's launcher
gives every process the same shared-memory parameters (see ``CleanExitDDPStrategy``)."""

from __future__ import annotations

import lightning as L
import pytest

from lightning_speedup import CompressedDDPStrategy, DiLoCoStrategy, LocalSGDStrategy, PipelineStrategy


@pytest.mark.parametrize(
    "make",
    [
        lambda method: PipelineStrategy(schedule="1f1b", start_method=method),
        lambda method: LocalSGDStrategy(sync_every=4, start_method=method),
        lambda method: DiLoCoStrategy(sync_every=4, start_method=method),
        lambda method: CompressedDDPStrategy(compression="bf16", start_method=method),
    ],
    ids=["pipeline", "local_sgd", "diloco", "compressed"],
)
def test_forkserver_on_the_cpu_is_refused_when_the_trainer_is_built(make) -> None:  # type: ignore[no-untyped-def]
    strategy = make("forkserver")
    name = type(strategy).__name__
    with pytest.raises(
        ValueError, match=rf"{name}\(start_method='forkserver'\) cannot train on the CPU.*'spawn'"
    ):
        L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False)
    # spawn, the method with the same pickling, is accepted
    L.Trainer(accelerator="cpu", devices=2, strategy=make("spawn"), logger=False)
