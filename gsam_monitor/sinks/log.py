"""``LoggingSink``: one line per write to the ``gsam_monitor.sinks`` logger."""

from __future__ import annotations

import logging
from collections.abc import Mapping

__all__ = ["LoggingSink"]

# The name users configure; the sinks package's own logger, as before the package was split.
log = logging.getLogger("gsam_monitor.sinks")


class LoggingSink:
    """Writes one line per write to the ``gsam_monitor.sinks`` logger (INFO)."""

    def __init__(self, level: int = logging.INFO) -> None:
        self.level = level

    def write(self, metrics: Mapping[str, float], step: int) -> None:
        body = ", ".join(f"{k}={v:.6g}" for k, v in metrics.items())
        log.log(self.level, "gsam step %d: %s", step, body)

    def close(self) -> None:
        return None
