"""gsam_monitor: watch the geometry of hidden activations during training and inference.

Forward hooks on chosen layers feed streaming covariance statistics (``LayerStats``); at
intervals ``metrics.compute`` turns them into the Gaussian Semantic Alignment Metric (GSAM),
its scale-invariant and shrinkage variants, spectral metrics and Gaussianity checks, logged
to TensorBoard, Weights & Biases, Lightning loggers or JSONL.

The public API is what ``__all__`` lists: ``GSAMMonitor`` with its option groups
(``CollectOptions``, ``WindowOptions``, ``ComputeOptions``), ``AlertRule`` and
``MonitorError``, ``memory_report`` (a monitor's memory plan without building one), the
accumulators ``LayerStats`` and ``ReservoirSample``, the ``metrics`` module, and the sinks with
their ``Sink`` protocol. The framework callbacks live in
``gsam_monitor.callbacks``, the analyses in ``gsam_monitor.analysis``, the benchmark in
``gsam_monitor.eval``.
"""

from gsam_monitor import metrics
from gsam_monitor.monitor import GSAMMonitor, memory_report
from gsam_monitor.monitor.alerts import AlertRule
from gsam_monitor.monitor.faults import MonitorError
from gsam_monitor.monitor.options import CollectOptions, ComputeOptions, WindowOptions
from gsam_monitor.sinks import JsonlSink, LoggingSink, Sink, TensorBoardSink, WandbSink
from gsam_monitor.stats import LayerStats, ReservoirSample

__version__ = "0.1.0"
"""The package version: the one source (``pyproject.toml`` reads it)."""

__all__ = [
    "AlertRule",
    "CollectOptions",
    "ComputeOptions",
    "GSAMMonitor",
    "JsonlSink",
    "LayerStats",
    "LoggingSink",
    "MonitorError",
    "ReservoirSample",
    "Sink",
    "TensorBoardSink",
    "WandbSink",
    "WindowOptions",
    "memory_report",
    "metrics",
]
