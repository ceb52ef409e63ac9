"""gsam_monitor: watch the geometry of hidden activations during training and inference.

Forward hooks on chosen layers feed streaming covariance statistics (``LayerStats``); at
intervals ``metrics.compute`` turns them into the Gaussian Semantic Alignment Metric (GSAM),
its scale-invariant and shrinkage variants, spectral metrics and Gaussianity checks, logged
to TensorBoard, Weights & Biases, Lightning loggers or JSONL.
"""

from gsam_monitor import metrics, sinks
from gsam_monitor.metrics import MardiaAccumulator
from gsam_monitor.monitor import GSAMMonitor
from gsam_monitor.sinks import JsonlSink, TensorBoardSink, WandbSink
from gsam_monitor.stats import LayerStats

__version__ = "0.1.0"

__all__ = [
    "GSAMMonitor",
    "JsonlSink",
    "LayerStats",
    "MardiaAccumulator",
    "TensorBoardSink",
    "WandbSink",
    "__version__",
    "metrics",
    "sinks",
]
