"""The life of a test's gloo worker process, from ``init_process_group`` to a clean exit.

A worker that returns with the process group's backend still alive aborts at interpreter exit
now and then ("terminate called without an active exception", SIGABRT): the backend's threads
are torn down while the interpreter is. Reproduced on purpose: two DDP ranks that skip
``destroy_process_group`` abort in about half the runs. ``destroy_process_group`` alone is not
enough while something else still holds the backend: a DDP model does (its reducer), and a
model with a monitor's hooks on it sits in a reference cycle (model -> hook -> monitor -> model)
that only the garbage collector frees, at a moment of its choosing, possibly at exit. So the
body runs in its own frame; when it returns, its models and monitors are collected before the
group is destroyed, after a barrier, so that no rank closes its connections while a peer still
uses them.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["run_gloo_worker"]


def run_gloo_worker(rank: int, world: int, init_file: str, body: Callable[..., Any], *args: Any) -> None:
    """``body(rank, world, *args)`` in a gloo process group of ``world`` ranks (file rendezvous)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        body(rank, world, *args)
        dist.barrier()
    finally:
        gc.collect()  # the body's models and monitors, and with them every hold on the backend
        dist.destroy_process_group()
