"""Sinks: where the monitor's scalars go (TensorBoard, Weights & Biases, JSONL, a callable).

A sink is anything with ``write(metrics, step)`` and ``close()`` (the ``Sink`` protocol);
a plain callable ``fn(metrics, step)`` is wrapped in ``CallableSink``. Sinks that can draw a
histogram also implement ``write_spectrum(spectra, step)``, which the monitor calls at a
lower cadence with each layer's covariance eigenvalues.

Keys are ``"{metric}/{layer}"`` for the training phase and ``"{metric}/{layer}/eval"`` for
evaluation, so TensorBoard and W&B group the curves by metric, one line per layer.

Optional backends are probed at construction (``importlib.util.find_spec``), so a missing
package fails at setup with the install command, and imported at the first write, so a sink
created on a non-zero rank never opens a file. The monitor, not the sink, decides that only
global rank zero writes and disables a sink that raises (one warning; training goes on).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = [
    "CallableSink",
    "JsonlSink",
    "LoggingSink",
    "Sink",
    "TensorBoardSink",
    "WandbSink",
    "format_metrics_table",
    "layer_key",
    "make_sink",
    "metric_key",
]

log = logging.getLogger(__name__)


@runtime_checkable
class Sink(Protocol):
    """The interface the monitor writes to."""

    def write(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar ``metrics`` (finite floats) at ``step``."""

    def close(self) -> None:
        """Flush and release resources (called once, by ``GSAMMonitor.close``)."""


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


def _require(package: str, extra: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ImportError(
            f"{package} is not installed; install it with `pip install gsam-monitor[{extra}]` "
            f"(or `pip install {package}`)."
        )


def _log10_spectrum(eigenvalues: torch.Tensor) -> torch.Tensor:
    lam = eigenvalues.detach().to("cpu", torch.float64)
    positive = lam[lam > 0]
    return torch.log10(positive)


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


class LoggingSink:
    """Writes one line per write to the ``gsam_monitor.sinks`` logger (INFO)."""

    def __init__(self, level: int = logging.INFO) -> None:
        self.level = level

    def write(self, metrics: Mapping[str, float], step: int) -> None:
        body = ", ".join(f"{k}={v:.6g}" for k, v in metrics.items())
        log.log(self.level, "gsam step %d: %s", step, body)

    def close(self) -> None:
        return None


class TensorBoardSink:
    """Scalars (``add_scalar``) and log10-eigenvalue histograms (``add_histogram``) to TensorBoard.

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
        if log_dir is None or isinstance(log_dir, (str, os.PathLike)):
            _require("tensorboard", "tensorboard")
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
            values = _log10_spectrum(eigenvalues)
            if values.numel():
                writer.add_histogram(f"spectrum/{key}", values.numpy(), global_step=step)
        writer.flush()

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


class WandbSink:
    """Scalars to a Weights & Biases run, against their own x-axis ``gsam_step``.

    The sink never passes ``step=`` to ``run.log``: it declares ``gsam_step`` with
    ``define_metric`` and every logged metric prefix (``"gsam/*"``, ``"rank/*"``, ...) with
    ``step_metric="gsam_step"``, so W&B never drops a point with "Step must only increase",
    whatever the training loop logs. With ``commit=None`` (default) the values join the row in
    progress (``commit=False``), so the sink never advances the step of a loop that logs with
    ``step=``; a row still holding the sink's previous values is committed first, and W&B
    commits the last one at ``finish()``.

    Args:
        run: A ``wandb`` run; ``None`` uses ``wandb.run`` at the first write.
        step_metric: Name of the x-axis metric.
        commit: ``True``/``False`` to force ``run.log(commit=...)``; ``None`` for the rule above.
            ``True`` gives every write a row of its own (fine when the loop logs without ``step=``).

    Raises:
        ImportError: if wandb is not installed.
    """

    def __init__(self, run: Any | None = None, *, step_metric: str = "gsam_step", commit: bool | None = None) -> None:
        if run is None:
            _require("wandb", "wandb")
        self._run = run
        self.step_metric = step_metric
        self.commit = commit
        self._defined: set[str] = set()
        self._pending_step: int | None = None
        self._pending_keys: set[str] = set()
        self._pending_value: int | None = None

    @property
    def run(self) -> Any:
        run = self._run
        if run is None:
            import wandb

            run = wandb.run
            if run is None:
                raise RuntimeError("WandbSink: no active W&B run; call wandb.init() before training, or pass run=.")
        return run

    def _define(self, run: Any, keys: list[str]) -> None:
        if self.step_metric not in self._defined:
            run.define_metric(self.step_metric)
            self._defined.add(self.step_metric)
        for key in keys:
            prefix = key.split("/", 1)[0]
            if prefix not in self._defined:
                run.define_metric(f"{prefix}/*", step_metric=self.step_metric)
                self._defined.add(prefix)

    def _run_step(self, run: Any) -> int | None:
        try:
            return int(run.step)
        except Exception:  # shared-mode runs and fakes have no step counter
            return None

    def _log(self, run: Any, data: dict[str, Any], step: int) -> None:
        self._define(run, list(data))
        if self.commit is not None:
            run.log({**data, self.step_metric: step}, commit=self.commit)
            return
        current = self._run_step(run)
        if current is None:  # no step counter to reason with: a row of our own
            run.log({**data, self.step_metric: step}, commit=True)
            return
        # Our values join the row in progress (commit=False), so the training loop's own step
        # sequence is never advanced by us. If nobody committed since our last write, that row
        # still holds our previous values: commit it first when they would be overwritten.
        same_row = current == self._pending_step
        if same_row and (set(data) & self._pending_keys or self._pending_value != step):
            run.log({}, commit=True)
            same_row = False
        run.log({**data, self.step_metric: step}, commit=False)
        self._pending_keys = (self._pending_keys if same_row else set()) | set(data)
        self._pending_value = step
        self._pending_step = self._run_step(run)

    def write(self, metrics: Mapping[str, float], step: int) -> None:
        self._log(self.run, dict(metrics), step)

    def write_spectrum(self, spectra: Mapping[str, torch.Tensor], step: int) -> None:
        """One ``wandb.Histogram`` of log10 eigenvalues per layer, keyed ``"spectrum/{layer}"``."""
        import wandb

        data = {}
        for key, eigenvalues in spectra.items():
            values = _log10_spectrum(eigenvalues)
            if values.numel():
                data[f"spectrum/{key}"] = wandb.Histogram(values.numpy())
        if data:
            self._log(self.run, data, step)

    def close(self) -> None:
        return None  # the run belongs to the user (or to the Trainer / Lightning logger)


class JsonlSink:
    """One JSON object per write, ``{"step": step, **metrics}``, appended to ``path``.

    Args:
        path: The file; its directory is created at the first write.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"JsonlSink(path=) must be a file path; got {type(path).__name__}.")
        self.path = Path(path)
        self._file: Any = None

    def write(self, metrics: Mapping[str, float], step: int) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        record = {"step": int(step), **{k: _json_number(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __repr__(self) -> str:
        return f"JsonlSink({str(self.path)!r})"


def _json_number(value: float) -> float | int | None:
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


_NAMED_SINKS: dict[str, Callable[[], Sink]] = {
    "tensorboard": TensorBoardSink,
    "wandb": WandbSink,
    "jsonl": lambda: JsonlSink("gsam_metrics.jsonl"),
    "logging": LoggingSink,
}


def make_sink(spec: Any) -> Sink:
    """A sink from a ``Sink`` object, a callable ``(metrics, step)``, or a name:
    ``"tensorboard"`` (``runs/...``), ``"wandb"`` (the active run), ``"jsonl"``
    (``gsam_metrics.jsonl``) or ``"logging"``.

    Raises:
        ValueError: an unknown sink name (listing the known ones).
        TypeError: an object that is neither a sink nor callable.
    """
    if isinstance(spec, str):
        factory = _NAMED_SINKS.get(spec)
        if factory is None:
            import difflib

            close = difflib.get_close_matches(spec, _NAMED_SINKS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"sinks=: unknown sink name {spec!r}.{hint} Known names: {', '.join(_NAMED_SINKS)}; or pass a "
                f"sink object (TensorBoardSink(log_dir), WandbSink(), JsonlSink(path)) or a callable (metrics, step)."
            )
        return factory()
    if hasattr(spec, "write") and callable(spec.write):
        return spec
    if callable(spec):
        return CallableSink(spec)
    raise TypeError(
        f"sinks= entries must be Sink objects (with write(metrics, step) and close()), callables "
        f"(metrics, step) or names; got {type(spec).__name__}."
    )
