"""``Window``: one monitored (layer, phase), owning everything the monitor keeps for it.

Where rows are added is kept apart from what the window holds:

* ``buffer``: the accumulation buffer, a ``LayerStats`` where the activations are (the
  accelerator): the rows since the last flush. The hooks add rows through ``add`` (small CPU
  updates held back in a ``RowBuffer`` first). It is the only d x d state on the device.
* ``stats``: the window's totals, an fp64 ``LayerStats`` on the host: every row since the window
  began. ``flush`` moves the buffer into them (``transfer`` makes the host copy; the totals
  merge it with the shift algebra of ``LayerStats.merge``, never a plain add) and empties the
  buffer, which takes a fresh shift from its next rows (the first flush of a window takes the
  host copy itself as the totals; on the host that is the buffer, and the next rows get a new
  one). An EMA window's decay reaches the
  buffer at every step (on the device) and the totals at the next flush, as one factor.

Beside them the window keeps its reference (the window a log compares it with) and that
reference's fit, and its reservoir sample: host state too. The window's ``lock`` serialises
its updates (``nn.DataParallel`` runs a layer's hook from several threads at once) and the
flushes that come before every read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from gsam_monitor.metrics.fit import GaussianFit
from gsam_monitor.stats import LayerStats, ReservoirSample
from gsam_monitor.stats.feed import RowBuffer

__all__ = ["HOST", "TOTALS_DTYPE", "Transfer", "Window", "empty_totals", "host_copy"]

HOST = torch.device("cpu")
"""Where the totals, references, fits and log copies live."""

TOTALS_DTYPE = torch.float64
"""The totals' dtype, whatever the buffer's: a window's sums over many flushes keep every digit."""

Transfer = Callable[[LayerStats], LayerStats]
"""Makes the host copy of an accumulation buffer that a flush merges (``host_copy``)."""


def host_copy(buffer: LayerStats) -> LayerStats:
    """``buffer`` itself when it is on the host already (the merge reads it there, in order,
    before the buffer is emptied), else a copy of it on the host."""
    if buffer.device == HOST:
        return buffer
    return buffer.clone(device=HOST)


class Window:
    """One (layer, phase) of a monitor.

    Attributes:
        buffer: The accumulation buffer: rows since the last flush, where the activations are
            (``None`` before the first rows, and after a flush that released it).
        stats: The totals: every row since the window began, on the host (``None`` before
            the first flush, or after a log handed them on).
        reference: The window a log compares this one with (``gsam_monitor.monitor.reference``).
        fit: The reference's ``GaussianFit``, when one was made (``fit_of``: the reference it
            was made from, for a fixed reference factorised at its first use).
        sample: The reservoir sample of the values (``CollectOptions(reservoir_size=)``).
        lock: Held by every update and by ``flush``.
    """

    __slots__ = ("_decay", "_held", "buffer", "fit", "fit_of", "lock", "reference", "sample", "stats")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buffer: LayerStats | None = None
        self.stats: LayerStats | None = None
        self.reference: LayerStats | None = None
        self.fit: GaussianFit | None = None
        self.fit_of: LayerStats | None = None
        self.sample: ReservoirSample | None = None
        self._held: RowBuffer | None = None
        self._decay = 1.0  # what the totals still owe the EMA decay since the last flush

    @property
    def held_rows(self) -> int:
        """Rows the hooks hold back, not in the buffer yet (``flush`` adds them)."""
        return 0 if self._held is None or self._held.stats is not self.buffer else self._held.n_rows

    def add(self, rows: torch.Tensor, keep: torch.Tensor | None) -> None:
        """Rows ``(N, d)`` (keep-mask ``(N,)``) into ``buffer`` (which exists), small CPU ones
        held back until they fill the ``RowBuffer`` or ``flush()``. The caller holds ``lock``."""
        held = self._held
        if held is None or held.stats is not self.buffer:
            held = self._held = RowBuffer(self.buffer)
        held.add(rows, mask=keep)

    def flush(self, transfer: Transfer = host_copy, *, release: bool = False) -> None:
        """Move every row added so far into the totals, under ``lock``: the held rows into the
        buffer, the buffer (its host copy) into ``stats``, created like the buffer on the host
        at the first flush; then the buffer is emptied, or freed with ``release`` (the end of a
        window: the next rows allocate it again). Every read of the window comes after this.

        A failing ``transfer`` leaves the buffer as it was: its rows go with the next flush.
        """
        with self.lock:
            self.flush_locked(transfer, release=release)

    def flush_locked(self, transfer: Transfer = host_copy, *, release: bool = False) -> None:
        """``flush`` for a caller that holds ``lock`` already (a hook whose model moved)."""
        self._flush_held()
        if self.stats is not None and self._decay != 1.0:
            self.stats.decay_(self._decay)
        self._decay = 1.0
        buffer = self.buffer
        if buffer is None:
            return
        if not buffer.untouched:  # an untouched buffer holds nothing: no transfer
            staged = transfer(buffer)  # first: if it raises, nothing has moved
            if self.stats is None and staged.state_dtype == TOTALS_DTYPE:
                self.stats = staged  # the first flush: the host copy is the totals, no merge
                if staged is buffer:  # a buffer on the host is its own copy: the next rows get a new one
                    self.buffer = self._held = None
                    return
            else:
                if self.stats is None:
                    self.stats = empty_totals(buffer.dim, buffer.product_dtype, buffer.higher_moments)
                self.stats.merge(staged)
            buffer.reset()
        if release:
            self.buffer = self._held = None

    def _flush_held(self) -> None:
        """The rows held back for the current buffer into it (the caller holds ``lock``)."""
        if self._held is not None and self._held.stats is self.buffer:
            self._held.flush()

    def decay(self, factor: float) -> None:
        """An EMA step: the buffer's sums now (on its device), the totals' at the next flush."""
        with self.lock:
            self._flush_held()  # this step's rows decay with the window
            if self.buffer is not None:
                self.buffer.decay_(factor)
            if self.stats is not None:
                self._decay *= factor

    def set_reference(self, reference: LayerStats | None) -> None:
        """Replace the reference; its fit, made from the one before, goes with it."""
        self.reference, self.fit, self.fit_of = reference, None, None

    def drop_rows(self) -> None:
        """Forget the rows not in the totals yet and any decay they owe (the window is reset,
        replaced or freed)."""
        self._held = None
        self._decay = 1.0
        if self.buffer is not None:
            self.buffer.reset()


def empty_totals(dim: int, product_dtype: torch.dtype | None, higher_moments: bool) -> LayerStats:
    """Empty fp64 totals on the host for rows of ``dim`` whose Gram products ran in
    ``product_dtype`` (the buffer's, resolved where it lives: the error model of those rows)."""
    with torch.inference_mode(False):
        return LayerStats(
            dim, device=HOST, state_dtype=TOTALS_DTYPE, product_dtype=product_dtype, higher_moments=higher_moments
        )
