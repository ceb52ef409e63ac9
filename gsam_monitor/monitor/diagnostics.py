"""What a published log means: alerts, outlier dimensions by identity, the int8 readiness.

``Diagnostics`` reads each published ``LogResult`` (on the writing rank, in step order, after
the metrics are computed inline or in the background): the ``OutlierTracker`` records the
outlier dimensions by index, the ``AlertEngine`` checks every watched metric of every layer
and phase against its band (plus ``new_outlier_dims``, the count of indices flagged for the
first time in the run), and the last window's per-dimension mean, variance and abs-max are
kept for ``quantization_summary``. What it returns goes to the sinks: ``alert/{metric}/{layer}``
= 1 among the scalars, the alerts themselves and the outlier lists to the sinks that take them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from gsam_monitor.metrics.quantization import int8_absmax_error
from gsam_monitor.monitor.alerts import AlertEngine
from gsam_monitor.monitor.outliers import OutlierTracker
from gsam_monitor.monitor.report import DimStats, Key, LogResult
from gsam_monitor.sinks.keys import layer_key, metric_key

__all__ = ["ALERT_PREFIX", "Diagnosis", "Diagnostics"]

ALERT_PREFIX = "alert"
"""First segment of the alert flags: ``alert/{metric}/{layer}[/eval]`` = 1 at an alert's step."""


@dataclass
class Diagnosis:
    """What one log adds: alerts, their scalar flags, and the outlier indices per layer key."""

    alerts: list[dict[str, Any]] = field(default_factory=list)
    flags: dict[str, float] = field(default_factory=dict)
    outliers: dict[str, list[int]] = field(default_factory=dict)


class Diagnostics:
    """Alerts, outlier identities and the quantization summary of a monitor's logs.

    Args:
        rules: ``alerts=`` (checked rules, or ``"default"``/``None``).
    """

    def __init__(self, rules: Any) -> None:
        self.engine = AlertEngine(rules)
        self.tracker = OutlierTracker()
        self._last: dict[Key, tuple[int, DimStats]] = {}

    @property
    def alerts(self) -> list[dict[str, Any]]:
        return self.engine.alerts

    def observe(self, result: LogResult) -> Diagnosis:
        """Diagnose one published log (its metrics per layer and its per-dimension numbers)."""
        out = Diagnosis()
        step = result.step
        new: dict[Key, list[int]] = {}
        for key, dims in result.dims.items():
            new[key] = self.tracker.observe(step, key[0], key[1], dims.ratios)
            out.outliers[layer_key(*key)] = self.tracker.active(*key)
            self._last[key] = (step, dims)
        for (layer, phase), values in result.values.items():
            values = dict(values)
            if (layer, phase) in new:
                values["new_outlier_dims"] = float(len(new[(layer, phase)]))
            for alert in self.engine.observe(step, layer, phase, values):
                if alert["metric"] == "new_outlier_dims":
                    alert["dims"] = list(new[(layer, phase)])
                out.alerts.append(alert)
                out.flags[metric_key(f"{ALERT_PREFIX}/{alert['metric']}", layer, phase)] = 1.0
        return out

    def outliers(self, layer: str, phase: str) -> list[dict[str, Any]]:
        return self.tracker.outliers(layer, phase)

    def quantization_summary(self, phases: Iterable[str]) -> dict[str, dict[str, float]]:
        """``int8_absmax_error`` of each layer's last logged window, keyed by layer key, with
        ``step`` (of that window) and ``outlier_dims`` (the indices the tracker flagged then)."""
        summary: dict[str, dict[str, Any]] = {}
        wanted = set(phases)
        for (layer, phase), (step, dims) in self._last.items():
            if phase not in wanted or dims.absmax is None:
                continue
            active = self.tracker.active(layer, phase)
            entry: dict[str, Any] = {"step": step, "outlier_dims": active}
            entry.update(int8_absmax_error(mean=dims.mean, variance=dims.variance, absmax=dims.absmax, outliers=active))
            summary[layer_key(layer, phase)] = entry
        return summary

    def state_dict(self) -> dict[str, Any]:
        """The engine's baselines and alerts, the tracker's records and the last windows'
        per-dimension numbers: tensors and plain values only."""
        return {
            "engine": self.engine.state_dict(),
            "tracker": self.tracker.state_dict(),
            "last": [
                {"layer": layer, "phase": phase, "step": step, "ratios": d.ratios, "mean": d.mean,
                 "variance": d.variance, "absmax": d.absmax}
                for (layer, phase), (step, d) in self._last.items()
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.engine.load_state_dict(state["engine"])
        self.tracker.load_state_dict(state["tracker"])
        self._last = {}
        for e in state["last"]:
            absmax = e["absmax"]
            dims = DimStats(
                ratios=torch.as_tensor(e["ratios"], dtype=torch.float64),
                mean=torch.as_tensor(e["mean"], dtype=torch.float64),
                variance=torch.as_tensor(e["variance"], dtype=torch.float64),
                absmax=None if absmax is None else torch.as_tensor(absmax, dtype=torch.float64),
            )
            self._last[(e["layer"], e["phase"])] = (int(e["step"]), dims)
