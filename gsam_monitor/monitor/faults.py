"""Faults: a monitor problem at run time is counted, warned about once per kind, and skipped.

Training never stops for the monitor: an exception in a hook, a metric or a sink becomes one
``RuntimeWarning`` (later ones of the same kind go to the debug log) and a count in
``errors``, which every log reports as ``gsam_monitor/errors``.
"""

from __future__ import annotations

import logging
import warnings

from gsam_monitor.sinks.keys import META_PREFIX

__all__ = ["Faults"]

log = logging.getLogger(__name__)


class Faults:
    """Warn-once bookkeeping and the error count of one monitor."""

    def __init__(self) -> None:
        self.errors = 0
        self._warned: set[str] = set()

    def warn_once(self, key: str, message: str) -> None:
        """Warn with ``message`` the first time ``key`` comes up; log it at debug level after."""
        if key in self._warned:
            log.debug(message)
            return
        self._warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def fail(self, key: str, message: str) -> None:
        """Count an error and warn about its kind once."""
        self.errors += 1
        self.warn_once(key, message)

    def hook_error(self, err: BaseException, where: str = "model") -> None:
        """An exception caught in the monitor's own code (a hook, a log) at ``where``."""
        self.fail(
            "hook-error",
            f"GSAMMonitor: an error in the hook of {where!r} was caught and skipped ({type(err).__name__}: {err}); "
            f"training goes on. Further errors are counted in '{META_PREFIX}/errors'.",
        )
