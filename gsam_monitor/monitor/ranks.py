"""Ranks: where this process stands in ``torch.distributed``, one place to ask (and to fake in tests).

Process groups are not the world: the monitor's group (``process_group=``) decides who
writes (its rank zero, a *group* rank), while seeds are offset by the global rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "active_dist",
    "active_phases",
    "comm_device",
    "gather_to_writer",
    "global_rank",
    "group_rank",
    "is_writer",
    "layer_owners",
    "owner",
    "world_size",
]


def active_dist() -> Any | None:
    """``torch.distributed`` when a process group is initialised, else ``None``."""
    if not torch.distributed.is_available():
        return None
    import torch.distributed as dist

    return dist if dist.is_initialized() else None


def global_rank() -> int:
    """This process's rank in the world (0 outside ``torch.distributed``)."""
    dist = active_dist()
    return dist.get_rank() if dist is not None else 0


def world_size(group: Any = None) -> int:
    """The number of processes in ``group`` (1 outside ``torch.distributed``)."""
    dist = active_dist()
    return dist.get_world_size(group) if dist is not None else 1


def is_writer(group: Any = None) -> bool:
    """Whether this process is rank zero of ``group`` (its group rank: group [1, 2] writes on
    global rank 1), the one that computes and writes the metrics; every process outside
    ``torch.distributed`` is."""
    dist = active_dist()
    return dist is None or dist.get_rank(group) == 0


def group_rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 outside ``torch.distributed``)."""
    dist = active_dist()
    return dist.get_rank(group) if dist is not None else 0


def owner(index: int, group: Any = None) -> int:
    """The group rank that computes the metrics of the ``index``-th window of a log: round
    robin over the group, so that each rank's share of a log is about windows / world size."""
    return index % world_size(group)


def layer_owners(sizes: Sequence[tuple[str, int]], world: int) -> dict[str, int]:
    """The group rank that collects each layer under ``shard_layers``, balanced by bytes and
    deterministic: in the monitor's layer order, each layer goes to the rank holding the fewest
    bytes so far (the lowest such rank on a tie), so equal layers go round robin (layer ``i`` to
    rank ``i % world``). ``sizes``: ``(name, bytes)`` per layer."""
    loads = [0] * world
    owners: dict[str, int] = {}
    for name, size in sizes:
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[name] = rank
        loads[rank] += size
    return owners


def comm_device(group: Any = None) -> torch.device:
    """Where the collectives of ``group`` run: the current CUDA device under NCCL (which cannot
    reduce host tensors), else the CPU."""
    dist = active_dist()
    if dist is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def active_phases(windows: Mapping[tuple[str, str], Any], phases: Sequence[str], group: Any = None) -> set[str]:
    """The phases in which any rank's ``windows`` (``LayerStats`` by (layer, phase)) saw a row,
    kept or dropped as non-finite. A collective under ``torch.distributed``: every rank calls it."""
    seen = [0.0] * len(phases)
    for (_, phase), stats in windows.items():
        if phase in phases and (float(stats.count) > 0 or int(stats.nonfinite) > 0):
            seen[phases.index(phase)] = 1.0
    dist = active_dist()
    flags = torch.tensor(seen, dtype=torch.float64)
    if dist is not None and dist.get_world_size(group) > 1:
        flags = flags.to(comm_device(group))
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return {phase for phase, flag in zip(phases, flags.tolist(), strict=True) if flag > 0}


def gather_to_writer(obj: Any, group: Any = None) -> list[Any] | None:
    """Every rank's ``obj`` (picklable), in group-rank order, on the writer (group rank 0);
    ``None`` on the other ranks. A collective: every rank of ``group`` must call it."""
    dist = active_dist()
    if dist is None or dist.get_world_size(group) == 1:
        return [obj]
    gathered: list[Any] | None = [None] * dist.get_world_size(group) if dist.get_rank(group) == 0 else None
    dist.gather_object(obj, gathered, group=group, group_dst=0)
    return gathered
