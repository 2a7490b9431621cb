"""How often a 2-process gloo run aborts at interpreter exit, with and without the exit handler of
``lightning_speedup._process_group``.

Each try spawns two fresh processes (``torch.multiprocessing``, ``spawn``) that initialise a gloo group, talk a
little and exit. ``collectives``: four all-reduces and object broadcasts on the default group.
``p2p-subgroups``: the same over a subgroup, with ``isend``/``recv`` between the two processes and two
one-process subgroups, as a pipeline does. ``none`` leaves the groups to interpreter finalisation (what
Lightning does for gloo); ``exit-handler`` calls ``destroy_process_group_at_exit()`` after initialising, as the
project's strategies do. A try fails when a process exits with a non-zero code or a signal. Configurations are
interleaved try by try. No GPU is involved.

    python benchmarks/gloo_exit.py --tries 40 --out benchmarks/results/distributed/DATE-cpu-gloo-exit.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _cli import tries_and_out

CONFIGS = [(work, exit_) for exit_ in ("none", "exit-handler") for work in ("collectives", "p2p-subgroups")]


def _worker(rank: int, port: int, work: str, exit_: str) -> None:
    import torch
    import torch.distributed as dist

    from lightning_speedup._process_group import destroy_process_group_at_exit

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if exit_ == "exit-handler":
        destroy_process_group_at_exit()
    group = None
    if work == "p2p-subgroups":
        group = dist.new_group([0, 1])
        dist.new_group([0])
        dist.new_group([1])
    for i in range(4):
        t = torch.full((8,), float(i))
        if work == "collectives":
            dist.all_reduce(t)
        else:
            peer, buf = 1 - rank, torch.empty(8)
            if rank == 0:
                sent = dist.isend(t, peer, group=group)
                dist.recv(buf, peer, group=group)
            else:
                dist.recv(buf, peer, group=group)
                sent = dist.isend(buf, peer, group=group)
            sent.wait()
        box: list[object] = [{"step": i}]
        dist.broadcast_object_list(box, src=0, group=group)


def _one_try(work: str, exit_: str) -> tuple[bool, str]:
    # Imported here, in the parent only: the tries' processes import this module and should not pay for that one.
    from distributed_cpu_algorithmic import free_port

    code = (
        "import sys, torch.multiprocessing as mp; sys.path.insert(0, sys.argv[1]); from gloo_exit import _worker; "
        "mp.start_processes(_worker, args=(int(sys.argv[2]), sys.argv[3], sys.argv[4]), nprocs=2, "
        "start_method='spawn')"
    )
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(here.parent)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(here), str(free_port()), work, exit_],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    reason = next((line for line in done.stderr.splitlines() if "terminate" in line or "signal" in line), "")
    return done.returncode == 0, reason


def main() -> None:
    args = tries_and_out(__doc__, 40)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lightning_speedup.bench.env import environment

    failures = {f"{w}/{e}": [] for w, e in CONFIGS}
    start = time.perf_counter()
    for i in range(args.tries):
        for work, exit_ in CONFIGS:
            ok, reason = _one_try(work, exit_)
            if not ok:
                failures[f"{work}/{exit_}"].append({"try": i, "stderr": reason})
        print(f"try {i + 1}/{args.tries}: " + ", ".join(f"{k} {len(v)} failed" for k, v in failures.items()),
              flush=True)  # fmt: skip
    result = {
        "what": "2-process gloo runs (spawn) that abort at interpreter exit, by exit handling",
        "tries_per_configuration": args.tries,
        "failed": {k: len(v) for k, v in failures.items()},
        "failures": failures,
        "seconds": round(time.perf_counter() - start, 1),
        "command": "python benchmarks/gloo_exit.py " + " ".join(sys.argv[1:]),
        "env": environment(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["failed"]))


if __name__ == "__main__":
    main()
