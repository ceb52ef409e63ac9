"""The ``Sink`` protocol, the adapter for plain callables, and what the backends share.

A sink is anything with ``write(metrics, step)`` and ``close()``; a plain callable
``fn(metrics, step)`` is wrapped in ``CallableSink``. Sinks that can draw a histogram also
implement ``write_spectrum(spectra, step)``, which the monitor calls at a lower cadence with
each layer's covariance eigenvalues.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["CallableSink", "Sink", "log10_spectrum", "require_package"]


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
            f"{package} is not installed; install it with `pip install gsam-monitor[{extra}]` "
            f"(or `pip install {package}`)."
        )


def log10_spectrum(eigenvalues: torch.Tensor) -> torch.Tensor:
    """log10 of the positive eigenvalues, fp64 on the CPU (what the histograms show)."""
    lam = eigenvalues.detach().to("cpu", torch.float64)
    positive = lam[lam > 0]
    return torch.log10(positive)
