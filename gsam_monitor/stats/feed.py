"""How rows reach ``LayerStats``' sums: chunks through the update kernel, small CPU updates
held back and added together.

An update of a few dozen rows costs the kernel's fixed cost (a dozen small ops) several times
over its products. On the CPU an update under ``min(2**16, dim²/2)`` elements is therefore
copied and held, and the held rows go through the kernel together when they fill that size
or when anything reads the state. Every read goes through ``_state`` or ``_shift_set``,
which add the held rows first: the sums are exact whenever anything looks at them.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from gsam_monitor.stats.kernel import chunk_rows, update_chunk
from gsam_monitor.stats.precision import exact_numerics

__all__ = ["PENDING_ELEMENTS", "RowFeed"]

PENDING_ELEMENTS = 1 << 16
"""Rows x dim a CPU state may hold back (and at most dim²/2)."""


class RowFeed:
    """The feeding half of ``LayerStats``: its state registry as read (held rows added
    first), and the path of rows into it. A base class: ``LayerStats`` sets ``_sums``,
    ``_pending``, ``_pending_rows``, ``_shift_known``, ``dim``, ``device`` and ``product_dtype``.
    """

    _sums: OrderedDict[str, torch.Tensor]
    _pending: list[torch.Tensor]
    _pending_rows: int
    _shift_known: bool
    dim: int
    product_dtype: torch.dtype | None
    device: torch.device

    @property
    def _state(self) -> OrderedDict[str, torch.Tensor]:
        if self._pending:
            self._flush()
        return self._sums

    @_state.setter
    def _state(self, value: OrderedDict[str, torch.Tensor]) -> None:
        self._sums = value

    @property
    def _shift_set(self) -> bool:
        if self._pending:
            self._flush()
        return self._shift_known

    @_shift_set.setter
    def _shift_set(self, value: bool) -> None:
        self._shift_known = value

    def _feed(self, rows: torch.Tensor, keep_in: torch.Tensor | None) -> None:
        """Rows (on the state's device) into the sums: held when small and on the CPU, else
        added now, after the rows held before them."""
        if keep_in is None and rows.device.type == "cpu" and self._hold(rows):
            return
        if self._pending:
            self._flush()
        self._add_rows(rows, keep_in)

    def _hold(self, rows: torch.Tensor) -> bool:
        """Keep a copy of a small CPU update for later (True); False when it is too large."""
        limit = min(PENDING_ELEMENTS, self.dim * self.dim // 2)
        if rows.numel() > limit:
            return False
        if self._pending and (
            (self._pending_rows + rows.shape[0]) * self.dim > limit or rows.dtype != self._pending[0].dtype
        ):
            self._flush()
        with torch.inference_mode(False):  # an ordinary copy: it may be added outside the mode
            self._pending.append(rows.clone())
        self._pending_rows += rows.shape[0]
        return True

    def _flush(self) -> None:
        """Add the held rows to the sums (taken first: a second reader finds none)."""
        pending, self._pending, self._pending_rows = self._pending, [], 0
        if pending:
            self._add_rows(pending[0] if len(pending) == 1 else torch.cat(pending), None)

    def _add_rows(self, rows: torch.Tensor, keep_in: torch.Tensor | None) -> None:
        """Rows into the sums, in chunks that bound the kernel's workspace."""
        step = chunk_rows(self.dim)
        with exact_numerics(self.device.type):
            for start in range(0, rows.shape[0], step):
                part = rows[start : start + step]
                self._update_rows(part, None if keep_in is None else keep_in[start : start + step])

    def _update_rows(self, rows: torch.Tensor, keep_in: torch.Tensor | None) -> None:
        """One chunk of rows into the sums (``kernel.update_chunk``); the first sets the shift."""
        update_chunk(self._sums, rows, keep_in, self.product_dtype, set_shift=not self._shift_known)
        self._shift_known = True
