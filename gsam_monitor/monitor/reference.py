"""The reference windows that later windows are compared with, and their fits.

``GSAMMonitor(reference=...)`` says which window a log compares each window with
(``heldout_loglik`` and the drift metrics ``drift_w2``, ``drift_w2_relative``,
``drift_kl_oas``), per (layer, phase):

* ``"previous"``: the previous logged window (each log's reference is replaced by the window
  it logs); window-to-window change, sampling noise included;
* ``"first"``: the first logged window of at least 2 rows, kept for the rest of the run
  (fine-tuning: drift from the base model, as it was in the first window);
* ``"pinned"``: none until ``monitor.pin_reference()`` pins the current windows (for example
  after an evaluation pass of the base model); each later pin replaces it.

``pin_reference()`` works with ``"first"`` too. It takes each window of at least 2 rows as
the reference and restarts it empty, as a log would, without writing anything: the pinned
rows are not counted again in the next log. A fixed reference is kept as statistics (so
``state_dict`` carries it and a resumed run compares with the same window) and factorised
once (``ReferenceFits``), at the first log that uses it, on the thread that computes the log.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from typing import Any

from gsam_monitor.metrics.fit import GaussianFit
from gsam_monitor.stats import LayerStats

__all__ = ["ReferenceFits", "check_reference_mode", "takes_reference"]

Key = tuple[str, str]


def takes_reference(mode: str, key: Key, window: LayerStats, references: Mapping[Key, LayerStats]) -> bool:
    """Whether a logged ``window`` becomes ``key``'s reference: always under ``"previous"``
    (when it holds data), the first window of at least 2 rows under ``"first"``, never under
    ``"pinned"`` (only ``pin_reference()`` sets it)."""
    if mode == "previous":
        return float(window.count) > 0
    return mode == "first" and key not in references and float(window.count) >= 2


class ReferenceFits:
    """The ``GaussianFit`` of each fixed reference, made at its first use and kept.

    A fixed reference (``"first"``, ``"pinned"``) is never modified, only replaced (a new pin,
    a reset, a loaded state), so its fit is keyed on the statistics object itself. The fit is
    made by whichever thread computes the log (the background worker, or the training thread
    inline); two threads asking at once may both factorise, and either result is kept.
    """

    def __init__(self) -> None:
        self._fits: dict[Key, tuple[LayerStats, GaussianFit | None]] = {}
        self._lock = threading.Lock()

    def lazy(self, key: Key, stats: LayerStats) -> Callable[[], GaussianFit | None]:
        """A callable returning ``stats``' fit (``None`` under 2 rows), factorised once."""
        return functools.partial(self.fit, key, stats)

    def fit(self, key: Key, stats: LayerStats) -> GaussianFit | None:
        with self._lock:
            hit = self._fits.get(key)
        if hit is not None and hit[0] is stats:
            return hit[1]
        fit = GaussianFit.from_stats(stats) if float(stats.count) >= 2 else None
        with self._lock:
            self._fits[key] = (stats, fit)
        return fit

    def clear(self) -> None:
        with self._lock:
            self._fits.clear()


def check_reference_mode(state: Mapping[str, Any], mode: str) -> None:
    """Refuse a state whose reference windows mean something else than ``mode``'s.

    Raises:
        ValueError: naming both and the fix.
    """
    saved = state.get("reference_mode", "previous")
    if saved != mode and state.get("reference"):
        raise ValueError(
            f"load_state_dict: the state's reference windows were kept with reference={saved!r}, this monitor has "
            f"reference={mode!r}; construct it with reference={saved!r}."
        )
