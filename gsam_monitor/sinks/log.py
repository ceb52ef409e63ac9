"""``LoggingSink``: one line per write to the ``gsam_monitor.sinks`` logger."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from gsam_monitor.sinks.protocol import describe_alert, describe_quantization

__all__ = ["LoggingSink"]

# The name users configure; the sinks package's own logger, as before the package was split.
log = logging.getLogger("gsam_monitor.sinks")


class LoggingSink:
    """Writes one line per write to the ``gsam_monitor.sinks`` logger (INFO), and one WARNING
    line per geometry alert."""

    def __init__(self, level: int = logging.INFO) -> None:
        self.level = level

    def write(self, metrics: Mapping[str, float], step: int) -> None:
        body = ", ".join(f"{k}={v:.6g}" for k, v in metrics.items())
        log.log(self.level, "gsam step %d: %s", step, body)

    def write_alerts(self, alerts: list[Mapping[str, Any]], step: int) -> None:
        for alert in alerts:
            log.warning("gsam alert: %s", describe_alert(alert))

    def write_quantization(self, summary: Mapping[str, Mapping[str, Any]], step: int) -> None:
        for key, entry in summary.items():
            log.log(self.level, "gsam int8 readiness: %s", describe_quantization(key, entry))

    def close(self) -> None:
        return None
