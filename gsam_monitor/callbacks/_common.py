"""Helpers shared by the framework callbacks (no framework imports here)."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

from gsam_monitor.monitor import GSAMMonitor

__all__ = ["MONITOR_ARGS", "check_monitor_kwargs"]

MONITOR_ARGS = frozenset(inspect.signature(GSAMMonitor.__init__).parameters) - {"self", "model"}
"""The keyword arguments a callback passes on to ``GSAMMonitor``."""


def check_monitor_kwargs(kwargs: Mapping[str, Any], owner: str) -> None:
    """Fail when the callback is built, not when training starts, on a keyword GSAMMonitor does not take.

    Raises:
        TypeError: naming the unknown keywords, a close match when there is one, and the valid ones.
    """
    unknown = sorted(set(kwargs) - MONITOR_ARGS)
    if not unknown:
        return
    hints = []
    for name in unknown:
        match = difflib.get_close_matches(name, MONITOR_ARGS, n=1)
        hints.append(f"{name!r} (did you mean {match[0]!r}?)" if match else repr(name))
    raise TypeError(
        f"{owner}: unknown keyword argument(s) {', '.join(hints)}. It passes these on to GSAMMonitor: "
        f"{', '.join(sorted(MONITOR_ARGS))}."
    )
