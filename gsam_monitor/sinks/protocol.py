"""The ``Sink`` protocol, the adapter for plain callables, and what the backends share.

A sink is anything with ``write(metrics, step)`` and ``close()``; a plain callable
``fn(metrics, step)`` is wrapped in ``CallableSink``. Sinks that can draw a histogram also
implement ``write_spectrum(spectra, step)``, which the monitor calls at a lower cadence with
each layer's covariance eigenvalues. Optional too: ``write_alerts(alerts, step)`` (the
alert dicts of a log, when it raised any) and ``write_outliers(outliers, step)``
(``{layer key: [outlier dimension indices]}`` at every log) and
``write_quantization(summary, step)`` (the int8 readiness per layer key, once, at ``close()``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from gsam_monitor._install import install_hint

__all__ = ["CallableSink", "Sink", "describe_alert", "describe_quantization", "log10_spectrum", "require_package"]


@runtime_checkable
class Sink(Protocol):
    """The interface the monitor writes to."""

    def write(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar ``metrics`` (finite floats) at ``step``."""

    def close(self) -> None:
        """Flush and release resources (called once, by ``GSAMMonitor.close``)."""


class CallableSink:
    """Adapts a function ``fn(metrics, step)`` to the ``Sink`` protocol."""

    def __init__(self, fn: Callable[[Mapping[str, float], int], Any]) -> None:
        if not callable(fn):
            raise TypeError(f"CallableSink needs a callable (metrics, step); got {type(fn).__name__}.")
        self.fn = fn

    def write(self, metrics: Mapping[str, float], step: int) -> None:
        self.fn(dict(metrics), step)

    def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"CallableSink({getattr(self.fn, '__qualname__', self.fn)!r})"


def require_package(package: str, extra: str) -> None:
    """Fail at setup, with the install command, when an optional backend is missing.

    Raises:
        ImportError: if ``package`` cannot be found.
    """
    if importlib.util.find_spec(package) is None:
        raise ImportError(
            f"{package} is not installed; install it with {install_hint(extra, package)}."
        )


def log10_spectrum(eigenvalues: torch.Tensor) -> torch.Tensor:
    """log10 of the positive eigenvalues, fp64 on the CPU (what the histograms show)."""
    lam = eigenvalues.detach().to("cpu", torch.float64)
    positive = lam[lam > 0]
    return torch.log10(positive)


def describe_alert(alert: Mapping[str, Any]) -> str:
    """One line for an alert dict: kind, layer, value against its band and baseline."""
    layer = alert["layer"] if alert.get("phase", "train") == "train" else f"{alert['layer']}/{alert['phase']}"
    low, high = alert["band"]
    side = f"above {high:.4g}" if alert["value"] > high else f"below {low:.4g}"
    base = "" if alert.get("baseline") is None else f", baseline {alert['baseline']:.4g}"
    dims = f", dims {alert['dims']}" if alert.get("dims") else ""
    what = f"{alert['kind']}: {alert['metric']} of {layer} = {alert['value']:.4g} at step {alert['step']}"
    return f"{what}, {side}{base}{dims}"


def describe_quantization(key: str, entry: Mapping[str, Any]) -> str:
    """One line for a layer's int8 readiness (``metrics.int8_absmax_error`` plus its outlier dims)."""
    dims = entry.get("outlier_dims") or []
    return (
        f"{key}: int8 absmax SQNR {entry['sqnr_db']:.1f} dB (scale {entry['scale']:.3g}, set by dim "
        f"{entry['scale_dim']}); without the {len(dims)} outlier dim(s) {list(dims)[:8]}: "
        f"{entry['sqnr_db_without_outliers']:.1f} dB"
    )
