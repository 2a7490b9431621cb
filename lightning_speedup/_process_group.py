"""Tear the default process group down at interpreter exit, before Python finalises.

Lightning destroys the process group at exit only for NCCL. Left to interpreter finalisation, a gloo group's
C++ worker threads may still hold work objects with Python references, and releasing them then aborts the
process ("terminate called without an active exception", SIGABRT) at times. A spawned worker that had finished
its run then takes the whole ``fit`` down with it. Destroying the group from an exit handler, while the
interpreter is still whole, avoids it (the upstream discussion: pytorch/pytorch#179291).
"""

from __future__ import annotations

import atexit

import torch.distributed as dist
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy
from typing_extensions import override

from lightning_speedup._compat import launch_with_main_process_hook

__all__ = ["CleanExitDDPStrategy", "destroy_process_group_at_exit"]

_registered = False


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def destroy_process_group_at_exit() -> None:
    """Register, once per process, an exit handler that destroys the default process group and every
    subgroup if they still exist. Harmless where the user or Lightning already destroyed them."""
    global _registered
    if not _registered:
        atexit.register(_destroy)
        _registered = True


class CleanExitDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` whose processes destroy their process group at exit (see the module's
    docstring); the base of this project's data- and pipeline-parallel strategies.

    It refuses ``start_method="forkserver"`` on the CPU. Lightning's launcher undoes tensor sharing for
    ``"spawn"`` only: with ``"forkserver"`` every process receives the model's CPU parameters in shared memory,
    the same storage in all of them, so replicas that step apply their updates to one tensor (measured in
    docs/methods/pipeline.md).
    """

    @override
    def _configure_launcher(self) -> None:
        if self._start_method == "forkserver" and isinstance(self.accelerator, CPUAccelerator):
            raise ValueError(
                f"{type(self).__name__}(start_method='forkserver') cannot train on the CPU: Lightning's launcher "
                "hands every process the same shared-memory parameters, so each replica's optimizer step "
                "changes them for all. Use start_method='spawn' (the same pickling), 'fork' or 'popen' "
                "(the default)."
            )
        super()._configure_launcher()
        # spawn/fork: the launching process's strategy never trains; its comm_stats come back from rank 0
        launch_with_main_process_hook(self, None)

    @override
    def setup_distributed(self) -> None:
        super().setup_distributed()
        destroy_process_group_at_exit()
