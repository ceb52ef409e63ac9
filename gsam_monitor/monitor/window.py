"""``Window``: one monitored (layer, phase), owning everything the monitor keeps for it.

Where rows are added is kept apart from what the window holds: the hooks add rows through
``add`` (small CPU updates held back in a ``RowBuffer`` until ``flush``), into ``stats``, the
statistics of the rows since the window began; beside them the window keeps its reference
(the window a log compares it with) and that reference's fit, and its reservoir sample. The
window's ``lock`` serialises its updates (``nn.DataParallel`` runs a layer's hook from
several threads at once) and the flushes that come before every read.
"""

from __future__ import annotations

import threading

import torch

from gsam_monitor.metrics.fit import GaussianFit
from gsam_monitor.stats import LayerStats, ReservoirSample
from gsam_monitor.stats.feed import RowBuffer

__all__ = ["Window"]


class Window:
    """One (layer, phase) of a monitor.

    Attributes:
        stats: The statistics of the rows since the window began (``None`` before its first
            rows, or after a log handed them on).
        reference: The window a log compares this one with (``gsam_monitor.monitor.reference``).
        fit: The reference's ``GaussianFit``, when one was made (``fit_of``: the reference it
            was made from, for a fixed reference factorised at its first use).
        sample: The reservoir sample of the values (``reservoir_size=``).
        lock: Held by every update and by ``flush``.
    """

    __slots__ = ("_held", "fit", "fit_of", "lock", "reference", "sample", "stats")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stats: LayerStats | None = None
        self.reference: LayerStats | None = None
        self.fit: GaussianFit | None = None
        self.fit_of: LayerStats | None = None
        self.sample: ReservoirSample | None = None
        self._held: RowBuffer | None = None

    @property
    def held_rows(self) -> int:
        """Rows the hooks hold back, not in ``stats`` yet (``flush`` adds them)."""
        return 0 if self._held is None or self._held.stats is not self.stats else self._held.n_rows

    def add(self, rows: torch.Tensor, keep: torch.Tensor | None) -> None:
        """Rows ``(N, d)`` (keep-mask ``(N,)``) into ``stats`` (which exists), small CPU ones
        held back until they fill the buffer or ``flush()``. The caller holds ``lock``."""
        held = self._held
        if held is None or held.stats is not self.stats:  # a new window: the old one's rows went with it
            held = self._held = RowBuffer(self.stats)
        held.add(rows, mask=keep)

    def flush(self) -> None:
        """Add the held rows to ``stats``, under ``lock``: every read of the window comes after this."""
        with self.lock:
            if self._held is not None and self._held.stats is self.stats:
                self._held.flush()

    def set_reference(self, reference: LayerStats | None) -> None:
        """Replace the reference; its fit, made from the one before, goes with it."""
        self.reference, self.fit, self.fit_of = reference, None, None

    def drop_rows(self) -> None:
        """Forget the held rows (the window is reset or replaced)."""
        self._held = None
