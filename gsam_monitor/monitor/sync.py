"""Summing the windows over the ranks of a process group for a log: on the host, or on the
device where the backend needs it.

The totals live on the host (``gsam_monitor.monitor.window``). Gloo reduces them there; NCCL
cannot reduce host tensors, so each window is copied to the current CUDA device, reduced, and
brought back, one window at a time (the device holds one window's copy at most). Ranks must
reduce the same tensors in the same order: they agree first on which windows exist anywhere
and their widths, a rank that saw no data for one taking part with empty totals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from gsam_monitor.monitor import ranks
from gsam_monitor.monitor.window import Window, host_copy
from gsam_monitor.stats import LayerStats

__all__ = ["Windows", "reduced", "synced"]

Key = tuple[str, str]


@dataclass(frozen=True)
class Windows:
    """The windows a sync reads, in the order every rank syncs them (flushed), and how to make
    the empty totals of one this rank saw no data for (``empty(key, dim)``)."""

    windows: Mapping[Key, Window]
    empty: Callable[[Key, int], LayerStats]

    def local(self) -> dict[Key, LayerStats]:
        return {k: w.stats for k, w in self.windows.items() if w.stats is not None}

    def stats_or_empty(self, key: Key, dim: int) -> LayerStats:
        window = self.windows[key]
        if window.stats is None:
            window.stats = self.empty(key, dim)
        return window.stats


def synced(windows: Windows, group: Any, *, in_place: bool) -> dict[Key, LayerStats]:
    """Each window summed over the ranks of ``group`` (``LayerStats.all_reduce_``), on the
    host; outside torch.distributed the totals themselves."""
    dist = ranks.active_dist()
    if dist is None or dist.get_world_size(group) == 1:
        return windows.local()
    comm = ranks.comm_device(group)
    out: dict[Key, LayerStats] = {}
    for key, dim in zip(windows.windows, _agreed_dims(dist, group, windows, comm), strict=True):
        if dim == 0:
            continue
        summed = _for_collective(windows.stats_or_empty(key, dim), in_place, comm)
        summed.all_reduce_(group)
        out[key] = host_copy(summed)
    return out


def reduced(windows: Windows, group: Any, *, in_place: bool, spread: bool) -> tuple[dict[Key, LayerStats], set[Key]]:
    """Each window summed onto the one rank that computes its metrics (``LayerStats.reduce_``),
    and the keys this rank owns.

    ``spread``: owners round robin over the group (``ranks.owner`` of the window's place among
    the monitored (layer, phase) windows: the same owner at every log, which holds the window's
    previous reference), so that each rank reduces and computes about windows / world size;
    else the writer owns every window (a background log, computed on the writer alone). Windows
    this rank does not own keep only their summed ``count`` and ``nonfinite``. Outside
    torch.distributed these are the totals themselves, every window owned.
    """
    dist = ranks.active_dist()
    if dist is None or dist.get_world_size(group) == 1:
        local = windows.local()
        return local, set(local)
    comm = ranks.comm_device(group)
    me = dist.get_rank(group)
    out: dict[Key, LayerStats] = {}
    owned: set[Key] = set()
    dims = _agreed_dims(dist, group, windows, comm)
    for index, (key, dim) in enumerate(zip(windows.windows, dims, strict=True)):
        if dim == 0:
            continue
        dst = ranks.owner(index, group) if spread else 0
        out[key] = host_copy(_for_collective(windows.stats_or_empty(key, dim), in_place, comm).reduce_(dst, group))
        if dst == me:
            owned.add(key)
    return out, owned


def _agreed_dims(dist: Any, group: Any, windows: Windows, device: torch.device) -> list[int]:
    """Each window's width, agreed over the ranks (0 where no rank has one)."""
    widths = [0 if w.stats is None else w.stats.dim for w in windows.windows.values()]
    dims = torch.tensor(widths, dtype=torch.int64, device=device)
    dist.all_reduce(dims, op=dist.ReduceOp.MAX, group=group)
    return dims.tolist()


def _for_collective(stats: LayerStats, in_place: bool, device: torch.device) -> LayerStats:
    """What a collective reduces: the totals themselves (``in_place``) or a copy, on ``device``."""
    if stats.device != device:
        return stats.clone(device=device)
    return stats if in_place else stats.clone()
