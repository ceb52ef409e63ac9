"""Summing statistics over the ranks of a process group: two steps, no broadcast.

A log needs the sum on one rank only, the one that computes the window's metrics:
``sum_to_rank`` reduces onto that rank (``torch.distributed.reduce``), which moves half the
bytes of an ``all_reduce`` and leaves the other ranks' copies undefined.

Every field of the statistics but the shift and the abs-max is a plain sum, so once the ranks
agree on a common shift a sync is one ``all_reduce(SUM)`` per tensor, as torchmetrics'
``dist_reduce_fx="sum"``; the abs-max is one ``all_reduce(MAX)``. The agreement is itself one
``all_reduce``: every rank receives the same sums, so no source rank is needed and any process
group works (its ranks need not include global rank 0). ``all_reduce`` defaults to
``torch.distributed.all_reduce`` and is injectable, so most sync tests need no processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["agree_on_shift", "max_over_ranks", "sum_over_ranks", "sum_to_rank"]

AllReduce = Callable[..., Any]


def _default(all_reduce: AllReduce | None) -> AllReduce:
    if all_reduce is not None:
        return all_reduce
    import torch.distributed as dist

    return dist.all_reduce


def agree_on_shift(
    shift: torch.Tensor, has_data: bool, group: Any = None, all_reduce: AllReduce | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain (unweighted) mean of the shifts of the ranks that hold data, and how many do.

    One collective: ``[has * shift..., has]`` summed over the ranks (fp64; fp32 on MPS,
    which has no fp64). Nothing is read back to the host here.

    Returns:
        ``(common_shift, holders)``, both on ``shift``'s device; ``holders`` is a 0-dim tensor.
    """
    has = 1.0 if has_data else 0.0
    wide = torch.float64 if shift.device.type != "mps" else torch.float32
    packed = torch.cat([shift.to(wide) * has, torch.tensor([has], dtype=wide, device=shift.device)])
    _default(all_reduce)(packed, group=group)
    holders = packed[-1]
    return packed[:-1] / holders.clamp_min(1), holders


def sum_over_ranks(tensors: Iterable[torch.Tensor], group: Any = None, all_reduce: AllReduce | None = None) -> None:
    """Sum each tensor over the ranks of ``group``, in place, in the order given."""
    reduce = _default(all_reduce)
    for t in tensors:
        reduce(t, group=group)


def sum_to_rank(tensors: Iterable[torch.Tensor], dst: int, group: Any = None, reduce: AllReduce | None = None) -> None:
    """Sum each tensor over the ranks of ``group`` onto group rank ``dst``, in the order given;
    elsewhere the tensors are left undefined. ``reduce`` defaults to ``torch.distributed.reduce``
    (called as ``reduce(t, group_dst=dst, group=group)``) and is injectable."""
    if reduce is None:
        import torch.distributed as dist

        reduce = dist.reduce
    for t in tensors:
        reduce(t, group_dst=dst, group=group)
def max_over_ranks(tensors: Iterable[torch.Tensor], group: Any = None, all_reduce: AllReduce | None = None) -> None:
    """The element-wise maximum of each tensor over the ranks of ``group``, in place."""
    import torch.distributed as dist

    reduce = _default(all_reduce)
    for t in tensors:
        reduce(t, op=dist.ReduceOp.MAX, group=group)
