"""The reference windows that later windows are compared with, and their fits.

``WindowOptions(reference=...)`` says which window a log compares each window with
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
once (``ReferencePolicy``), at the first log that uses it, on the thread that computes the log.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from gsam_monitor.metrics.fit import GaussianFit
from gsam_monitor.monitor.window import Window
from gsam_monitor.stats import LayerStats

__all__ = ["ReferencePolicy", "check_reference_mode"]

Key = tuple[str, str]
Reference = Callable[[], LayerStats | GaussianFit | None]
"""What a log compares a window with, given when called: the previous window's statistics or
the fit its log made, a fixed reference's fit (factorised at the first call), or ``None``."""


class ReferencePolicy:
    """Which window becomes a window's reference, and what a log compares it with.

    Args:
        mode: ``"previous"``, ``"first"`` or ``"pinned"`` (see the module docstring).
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.fixed = mode != "previous"

    def takes(self, window: Window, logged: LayerStats) -> bool:
        """Whether the ``logged`` statistics become ``window``'s reference: always under
        ``"previous"`` (when they hold data), the first of at least 2 rows under ``"first"``,
        never under ``"pinned"`` (only ``pin_reference()`` sets it)."""
        if self.mode == "previous":
            return float(logged.count) > 0
        return self.mode == "first" and window.reference is None and float(logged.count) >= 2

    def for_log(self, window: Window) -> Reference:
        """What a log compares ``window`` with, as a callable (the log calls it on the thread
        that computes it): under ``"previous"`` the fit the previous log made of its window,
        else that window's statistics; a fixed reference's fit, factorised at the first call;
        ``None`` without a reference."""
        if self.fixed and window.reference is not None:
            return functools.partial(self._fixed_fit, window, window.reference)
        return functools.partial(_as_given, window.fit or window.reference)

    def keep_fit(self, window: Window, fit: GaussianFit) -> None:
        """Under ``"previous"``, keep the fit a log made of the window that is ``window``'s
        reference now (a fit that arrives after a ``reset`` or a newer reference is dropped). A
        fixed reference is factorised from itself: a later window of the same row count must
        never stand in for it."""
        if not self.fixed and window.reference is not None and float(window.reference.count) == fit.n:
            window.fit = fit

    @staticmethod
    def _fixed_fit(window: Window, stats: LayerStats) -> GaussianFit | None:
        """``stats``' fit (``None`` under 2 rows), made at its first use by whichever thread
        computes the log and kept on the window while ``stats`` is its reference (a fixed
        reference is replaced, never modified). Two threads asking at once may both
        factorise; either result is kept."""
        made = window.fit
        if made is not None and window.fit_of is stats:
            return made
        fit = GaussianFit.from_stats(stats) if float(stats.count) >= 2 else None
        window.fit, window.fit_of = fit, stats
        return fit


def _as_given(reference: LayerStats | GaussianFit | None) -> LayerStats | GaussianFit | None:
    return reference


def check_reference_mode(state: Mapping[str, Any], mode: str) -> None:
    """Refuse a state whose reference windows mean something else than ``mode``'s.

    Raises:
        ValueError: naming both and the fix.
    """
    saved = state.get("reference_mode", "previous")
    if saved != mode and state.get("reference"):
        raise ValueError(
            f"load_state_dict: the state's reference windows were kept with reference={saved!r}, this monitor has "
            f"reference={mode!r}; construct it with windows=WindowOptions(reference={saved!r})."
        )
