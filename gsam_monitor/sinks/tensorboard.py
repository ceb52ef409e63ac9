"""``TensorBoardSink``: scalars and log10-eigenvalue histograms in a TensorBoard run.

The backend is probed at construction (``importlib.util.find_spec``), so a missing package
fails at setup with the install command, and the writer is created at the first write, so a
sink built on a non-zero rank never opens a file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from gsam_monitor.sinks.protocol import describe_alert, describe_quantization, log10_spectrum, require_package

__all__ = ["TensorBoardSink"]


class TensorBoardSink:
    """Scalars (``add_scalar``) and log10-eigenvalue histograms (``add_histogram``) to TensorBoard;
    alerts, outlier dimension indices and the int8 readiness as text (``add_text``).

    Args:
        log_dir: A directory for a new ``SummaryWriter`` (``None``: its default ``runs/...``),
            or an existing writer (``torch.utils.tensorboard.SummaryWriter`` or anything with
            ``add_scalar``), e.g. the Trainer's, which this sink then never closes.

    Raises:
        ImportError: if ``log_dir`` is a path and tensorboard is not installed.

    Example::

        monitor = GSAMMonitor(model, sinks=[TensorBoardSink("runs/gsam")])
    """

    def __init__(self, log_dir: str | os.PathLike[str] | Any | None = None) -> None:
        self._outliers: dict[str, list[int]] = {}  # the indices last written per layer
        if log_dir is None or isinstance(log_dir, (str, os.PathLike)):
            require_package("tensorboard", "tensorboard")
            self._writer: Any = None
            self._owns_writer = True
            self.log_dir = None if log_dir is None else str(log_dir)
        elif hasattr(log_dir, "add_scalar"):
            self._writer = log_dir
            self._owns_writer = False
            self.log_dir = getattr(log_dir, "log_dir", None)
        else:
            raise TypeError(
                f"TensorBoardSink(log_dir=) must be a directory path or a SummaryWriter; got {type(log_dir).__name__}."
            )

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter``, created (and its directory made) on first use."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
            self.log_dir = self._writer.log_dir
        return self._writer

    def write(self, metrics: Mapping[str, float], step: int) -> None:
        writer = self.writer
        for key, value in metrics.items():
            writer.add_scalar(key, value, global_step=step)
        writer.flush()

    def write_spectrum(self, spectra: Mapping[str, torch.Tensor], step: int) -> None:
        """One histogram of log10 eigenvalues per layer, tagged ``"spectrum/{layer}"``."""
        writer = self.writer
        for key, eigenvalues in spectra.items():
            values = log10_spectrum(eigenvalues)
            if values.numel():
                writer.add_histogram(f"spectrum/{key}", values.numpy(), global_step=step)
        writer.flush()

    def write_alerts(self, alerts: list[Mapping[str, Any]], step: int) -> None:
        """The step's alerts as one text entry, ``"alerts"``."""
        self.writer.add_text("alerts", "\n\n".join(describe_alert(a) for a in alerts), global_step=step)
        self.writer.flush()

    def write_outliers(self, outliers: Mapping[str, list[int]], step: int) -> None:
        """Each layer's outlier dimension indices as text, ``"outliers/{layer}"``, when they change."""
        for key, dims in outliers.items():
            if self._outliers.get(key) != dims:
                self._outliers[key] = list(dims)
                self.writer.add_text(f"outliers/{key}", ", ".join(map(str, dims)) or "none", global_step=step)
        self.writer.flush()

    def write_quantization(self, summary: Mapping[str, Mapping[str, Any]], step: int) -> None:
        """The int8 readiness as one text entry, ``"quantization"``, one line per layer."""
        text = "\n\n".join(describe_quantization(k, v) for k, v in summary.items())
        self.writer.add_text("quantization", text, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self._writer is None:
            return
        if self._owns_writer:
            self._writer.close()
            self._writer = None  # a later write opens a new event file in the same directory
        elif hasattr(self._writer, "flush"):
            self._writer.flush()

    def __repr__(self) -> str:
        return f"TensorBoardSink({self.log_dir!r})"
