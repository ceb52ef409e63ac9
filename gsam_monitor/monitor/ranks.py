"""Ranks: where this process stands in ``torch.distributed``, one place to ask (and to fake in tests).

Process groups are not the world: the monitor's group (``process_group=``) decides who
writes (its rank zero, a *group* rank), while seeds are offset by the global rank.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["active_dist", "global_rank", "is_writer", "world_size"]


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
