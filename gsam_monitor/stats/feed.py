"""How rows reach ``LayerStats``' sums: chunks through the update kernel (``add_rows``), and
small CPU updates held back to be added together (``RowBuffer``).

An update of a few dozen rows costs the kernel's fixed cost (a dozen small ops) several times
over its products. A caller that feeds many small CPU updates (the monitor's hooks; Delve
feeds 32 rows per forward) puts a ``RowBuffer`` in front of its ``LayerStats``: the rows are
copied and go through the kernel together when they fill ``min(2**16, dim²/2)`` elements, or
at the buffer's explicit ``flush()``, which the caller runs before it reads the statistics.
Reading a ``LayerStats`` never adds anything: its reads have no side effects.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Protocol

import torch

from gsam_monitor.stats.kernel import chunk_rows, update_chunk
from gsam_monitor.stats.precision import exact_numerics

__all__ = ["PENDING_ELEMENTS", "RowBuffer", "Updatable", "add_rows"]

PENDING_ELEMENTS = 1 << 16
"""Rows x dim a ``RowBuffer`` may hold back (and at most dim²/2)."""


def add_rows(
    sums: MutableMapping[str, torch.Tensor],
    rows: torch.Tensor,
    keep_in: torch.Tensor | None,
    product_dtype: torch.dtype | None,
    *,
    set_shift: bool,
) -> None:
    """Rows ``(N, d)`` (keep-weights ``(N,)`` or ``None``) into ``sums``, in chunks that bound
    the kernel's workspace; ``set_shift``: the first chunk sets the shift (a state without data)."""
    step = chunk_rows(rows.shape[-1])
    with exact_numerics(rows.device.type):
        for start in range(0, rows.shape[0], step):
            keep = None if keep_in is None else keep_in[start : start + step]
            update_chunk(sums, rows[start : start + step], keep, product_dtype, set_shift=set_shift)
            set_shift = False


class Updatable(Protocol):
    """What a ``RowBuffer`` feeds (a ``LayerStats``)."""

    dim: int

    @property
    def device(self) -> torch.device: ...

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None: ...


class RowBuffer:
    """``stats.update`` with small CPU updates held and added together.

    Args:
        stats: The statistics the rows go to.

    Example::

        buffer = RowBuffer(stats)
        for hidden in small_batches:
            buffer.add(hidden)
        buffer.flush()            # before reading stats
    """

    def __init__(self, stats: Updatable) -> None:
        self.stats = stats
        self.limit = min(PENDING_ELEMENTS, stats.dim * stats.dim // 2)
        self._rows: list[torch.Tensor] = []
        self.n_rows = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """``stats.update(x, mask)``, but CPU rows of at most ``limit`` elements (padding
        dropped) are copied and held, in order, until they fill ``limit``, a larger update
        comes, or ``flush()``. Anything else goes to ``stats.update`` at once (which checks it)."""
        stats = self.stats
        small = (
            x.device.type == "cpu" and stats.device.type == "cpu" and x.is_floating_point()
            and x.dim() >= 1 and x.shape[-1] == stats.dim
            and (mask is None or tuple(mask.shape) == tuple(x.shape[:-1]))
        )  # fmt: skip
        rows = x.detach().reshape(-1, x.shape[-1]) if small else x
        if small and mask is not None:
            rows = rows[mask.detach().reshape(-1).bool()]
        if not small or rows.numel() > self.limit:
            self.flush()  # the rows held before these go first
            stats.update(rows, mask=None if small else mask)
            return
        if self._rows and ((self.n_rows + rows.shape[0]) * stats.dim > self.limit or rows.dtype != self._rows[0].dtype):
            self.flush()
        with torch.inference_mode(False):  # an ordinary copy: it may be added outside the mode
            self._rows.append(rows.clone())
        self.n_rows += rows.shape[0]

    def flush(self) -> Updatable:
        """Add the held rows to the statistics; returns them."""
        held, self._rows, self.n_rows = self._rows, [], 0
        if held:
            self.stats.update(held[0] if len(held) == 1 else torch.cat(held))
        return self.stats

    def clear(self) -> None:
        """Drop the held rows (the window they belong to is being reset)."""
        self._rows, self.n_rows = [], 0
