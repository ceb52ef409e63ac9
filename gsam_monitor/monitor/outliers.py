"""Outlier dimensions by identity: which indices, since when, how large at their peak.

A dimension of a layer is an outlier in a log when its ratio ``metrics.outlier_ratios`` (its
root mean square, less a sampling margin, over the median root mean square) exceeds the factor: the rule of
``metrics.outlier_dims``, which only counts them. ``OutlierTracker`` remembers each index
that ever crossed it: the step it first did, its peak ratio and the step of the peak, and
whether the last log still flagged it. New indices (never flagged before in the run) are
returned by ``observe``, so that the alert engine can report a new massive dimension. Pure:
it sees tensors of ratios, never a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["DEFAULT_OUTLIER_FACTOR", "OutlierTracker"]

DEFAULT_OUTLIER_FACTOR = 10.0
"""The factor of ``metrics.compute``'s ``outlier_dims`` (and of the tracker)."""

Key = tuple[str, str]


class OutlierTracker:
    """The outlier dimensions of each (layer, phase), by index, over a run.

    Args:
        factor: A dimension is an outlier when its ratio exceeds this (``metrics.outlier_ratios``).

    Example::

        tracker = OutlierTracker()
        new = tracker.observe(step, "layers.3", "train", metrics.outlier_ratios(stats))
        tracker.outliers("layers.3")   # [{"dim": 17, "first_step": 40, "peak_ratio": 31.2, ...}]
    """

    def __init__(self, factor: float = DEFAULT_OUTLIER_FACTOR) -> None:
        self.factor = float(factor)
        # (layer, phase) -> {dim: [first_step, peak_ratio, peak_step, last_step]}
        self._seen: dict[Key, dict[int, list[float]]] = {}
        self._active: dict[Key, list[int]] = {}

    def observe(self, step: int, layer: str, phase: str, ratios: torch.Tensor) -> list[int]:
        """Record one log's ratios; returns the indices flagged for the first time in the run."""
        ratios = ratios.detach().to("cpu", torch.float64).reshape(-1)
        flagged = torch.nonzero(ratios > self.factor).reshape(-1).tolist()
        seen = self._seen.setdefault((layer, phase), {})
        new = []
        for dim in flagged:
            ratio = float(ratios[dim])
            record = seen.get(dim)
            if record is None:
                seen[dim] = [int(step), ratio, int(step), int(step)]
                new.append(dim)
                continue
            if ratio > record[1]:
                record[1], record[2] = ratio, int(step)
            record[3] = int(step)
        self._active[(layer, phase)] = flagged
        return new

    def active(self, layer: str, phase: str = "train") -> list[int]:
        """The indices the last log of ``layer`` flagged (ascending)."""
        return list(self._active.get((layer, phase), []))

    def outliers(self, layer: str, phase: str = "train") -> list[dict[str, Any]]:
        """Every index ever flagged in ``layer``: ``{dim, first_step, peak_ratio, peak_step,
        last_step, active}``, ascending by index (``[]`` when none or never observed)."""
        active = set(self._active.get((layer, phase), []))
        return [
            {
                "dim": dim,
                "first_step": int(first),
                "peak_ratio": float(peak),
                "peak_step": int(peak_step),
                "last_step": int(last),
                "active": dim in active,
            }
            for dim, (first, peak, peak_step, last) in sorted(self._seen.get((layer, phase), {}).items())
        ]

    def keys(self) -> list[Key]:
        """The (layer, phase) pairs observed so far."""
        return list(self._active)

    def state_dict(self) -> dict[str, Any]:
        """Plain values only (``torch.load(weights_only=True)`` reads them)."""
        return {
            "factor": self.factor,
            "layers": [
                {"layer": layer, "phase": phase, "seen": {str(d): list(r) for d, r in seen.items()},
                 "active": list(self._active.get((layer, phase), []))}
                for (layer, phase), seen in self._seen.items()
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state_dict()`` output."""
        self.factor = float(state["factor"])
        self._seen, self._active = {}, {}
        for entry in state["layers"]:
            key = (entry["layer"], entry["phase"])
            self._seen[key] = {int(d): [float(v) for v in r] for d, r in entry["seen"].items()}
            self._active[key] = [int(d) for d in entry["active"]]
