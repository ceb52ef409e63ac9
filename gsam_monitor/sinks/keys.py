"""Scalar keys: ``"{metric}/{layer}"`` for training, ``"{metric}/{layer}/eval"`` for evaluation.

TensorBoard and W&B group the curves by the key's first segment, so each metric is one chart
with a line per layer. The monitor's own counters live under ``META_PREFIX``.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["META_PREFIX", "format_metrics_table", "layer_key", "metric_key"]

META_PREFIX = "gsam_monitor"
"""First segment of the monitor's own scalars (``gsam_monitor/errors``, ``gsam_monitor/missing_layers``)."""


def layer_key(layer: str, phase: str = "train") -> str:
    """A layer's name in a phase: the name itself for training, ``"{layer}/eval"`` for evaluation."""
    return layer if phase == "train" else f"{layer}/{phase}"


def metric_key(metric: str, layer: str, phase: str = "train") -> str:
    """The scalar key of ``metric`` for ``layer``: ``"gsam/encoder.layer.0"``; eval adds ``"/eval"``."""
    return f"{metric}/{layer_key(layer, phase)}"


def format_metrics_table(
    metrics: Mapping[str, float], names: tuple[str, ...] = ("gsam", "rank", "effective_rank", "anisotropy")
) -> str:
    """A plain-text table, one row per layer and one column per metric in ``names``, from the
    monitor's flat ``{"metric/layer[/eval]": value}`` dict (the inverse of ``metric_key``)."""
    layers: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        metric, _, layer = key.partition("/")
        if metric in names:
            layers.setdefault(layer.removesuffix("/eval"), {})[metric] = value
    lines = ["layer".ljust(28) + "".join(n.rjust(16) for n in names)]
    for layer, row in layers.items():
        lines.append(layer.ljust(28) + "".join(f"{row.get(n, float('nan')):16.4f}" for n in names))
    return "\n".join(lines)
