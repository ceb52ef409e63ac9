"""The output logits' log-partition windows as logged scalars (``CollectOptions(logit_partition=)``).

A window is the attention windows' layout with one "head" (``capture.logit_partition.lse_stats``):
``[Σ log Z, sampled rows, 0, max log Z]`` per (head, phase), its sums following the window kind,
its maximum covering the forwards since the previous log, both reduced over the ranks (SUM, MAX).
A log closes them with the attention windows, at one collective point (``monitor.probes``).

``logit_partition_report`` turns them into ``logit_lse_mean/{head}`` (the mean of log Z over the
window's sampled tokens, in nats) and ``logit_lse_max/{head}`` (the largest), alertable per
(head, phase).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from gsam_monitor.sinks.keys import metric_key

__all__ = [
    "LOGIT_ALERT_METRICS",
    "LOGIT_LSE_MAX_METRIC",
    "LOGIT_LSE_MEAN_METRIC",
    "logit_partition_report",
]

LOGIT_LSE_MEAN_METRIC = "logit_lse_mean"
"""The mean log-partition of the head's sampled tokens."""
LOGIT_LSE_MAX_METRIC = "logit_lse_max"
"""The largest log-partition of the head's sampled tokens."""
LOGIT_ALERT_METRICS = (LOGIT_LSE_MEAN_METRIC, LOGIT_LSE_MAX_METRIC)
"""The per-head values the alerts can watch."""

Key = tuple[str, str]


def logit_partition_report(windows: Mapping[Key, torch.Tensor]) -> tuple[dict[str, float], dict[Key, dict[str, float]]]:
    """The logged scalars of closed log-partition windows and the per-(head, phase) values the
    alerts watch (``LOGIT_ALERT_METRICS``)."""
    flat: dict[str, float] = {}
    alertable: dict[Key, dict[str, float]] = {}
    for (head, phase), acc in windows.items():
        total, rows, _, top = (float(v) for v in acc.to("cpu", torch.float64))
        values = {}
        if rows > 0:
            values[LOGIT_LSE_MEAN_METRIC] = total / rows
        if top > -float("inf"):
            values[LOGIT_LSE_MAX_METRIC] = top
        for metric, value in values.items():
            flat[metric_key(metric, head, phase)] = value
        if values:
            alertable[(head, phase)] = values
    return flat, alertable
