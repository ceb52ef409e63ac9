"""Faults: a monitor problem at run time is counted, warned about once per kind and place, and skipped.

Training never stops for the monitor: an exception in a hook, a metric or a sink becomes one
``RuntimeWarning`` per (kind, place) (later ones there go to the debug log) and a count in
``errors``, which every log reports as ``gsam_monitor/errors``. The kinds are named, so a
failing sink never silences a later, different failure of a metric. ``strict`` (a test, a CI
run) raises ``MonitorError`` instead, from the exception that caused it.
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal

from gsam_monitor.sinks.keys import META_PREFIX

__all__ = ["KINDS", "FaultKind", "Faults", "MonitorError"]

log = logging.getLogger(__name__)

FaultKind = Literal["hook", "flush", "metrics", "log", "alerts", "int8 summary", "sink"]
KINDS: tuple[str, ...] = ("hook", "flush", "metrics", "log", "alerts", "int8 summary", "sink")
"""What can fail: a forward hook (of a layer, or the model's context hooks), a window's flush of
its accumulation buffer into the host totals, a layer's metrics, a whole log, the alerts and
outlier bookkeeping, the end-of-run int8 summary, a sink."""


class MonitorError(RuntimeError):
    """A monitor problem, raised (not counted) by a monitor built with ``strict=True``."""


class Faults:
    """Warn-once bookkeeping and the error count of one monitor.

    Args:
        strict: Raise ``MonitorError`` at the first error instead of counting it.
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = bool(strict)
        self.errors = 0
        self._warned: set[str] = set()

    def warn_once(self, key: str, message: str) -> None:
        """Warn with ``message`` the first time ``key`` comes up; log it at debug level after."""
        if key in self._warned:
            log.debug(message)
            return
        self._warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def error(self, kind: FaultKind, where: str, err: BaseException, outcome: str = "it was skipped") -> None:
        """An exception caught in the monitor's ``kind`` of ``where`` (a quoted layer key, a
        sink's repr, a step): counted and warned about once per (kind, where), or raised when
        ``strict``; ``outcome`` says what became of the failed part.

        Raises:
            MonitorError: when ``strict``, from ``err``.
        """
        if self.strict:
            raise MonitorError(
                f"GSAMMonitor(strict=True): the {kind} of {where} raised {type(err).__name__}: {err}"
            ) from err
        self.errors += 1
        message = str(err).rstrip().removesuffix(".")  # "...: <message>; <outcome>", not ".;"
        self.warn_once(
            f"{kind}:{where}",
            f"GSAMMonitor: the {kind} of {where} raised {type(err).__name__}: {message}; {outcome} and training goes "
            f"on. Later {kind} errors of {where} are counted in '{META_PREFIX}/errors' and not warned about again.",
        )

    def hook_error(self, err: BaseException, where: str = "model") -> None:
        """An exception caught in a forward hook of ``where`` (a layer; ``"model"``: the
        context hooks on the model itself)."""
        self.error("hook", repr(where), err)
