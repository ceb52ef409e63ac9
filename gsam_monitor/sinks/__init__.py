"""Sinks: where the monitor's scalars go (TensorBoard, Weights & Biases, JSONL, logging, a callable).

A sink is anything with ``write(metrics, step)`` and ``close()`` (the ``Sink`` protocol);
a plain callable ``fn(metrics, step)`` is wrapped in ``CallableSink``. Sinks that can draw a
histogram also implement ``write_spectrum(spectra, step)``, which the monitor calls at a
lower cadence with each layer's covariance eigenvalues.

Keys are ``"{metric}/{layer}"`` for the training phase and ``"{metric}/{layer}/eval"`` for
evaluation, so TensorBoard and W&B group the curves by metric, one line per layer.

Optional backends are probed at construction (``importlib.util.find_spec``), so a missing
package fails at setup with the install command, and imported at the first write, so a sink
created on a non-zero rank never opens a file. The fan-out (``SinkFanout``), not the sink,
makes sure that only the monitor's writing rank writes, and disables a sink that raises (one
warning; training goes on).

Modules: ``keys`` (the scalar keys), ``protocol`` (``Sink``, ``CallableSink``), ``fanout``
(``make_sink``, ``SinkFanout``), and one per backend: ``tensorboard``, ``wandb``, ``jsonl``,
``log``.
"""

from gsam_monitor.sinks.fanout import SinkFanout, make_sink, sink_list
from gsam_monitor.sinks.jsonl import JsonlSink
from gsam_monitor.sinks.keys import META_PREFIX, format_metrics_table, layer_key, metric_key
from gsam_monitor.sinks.log import LoggingSink
from gsam_monitor.sinks.protocol import CallableSink, Sink
from gsam_monitor.sinks.tensorboard import TensorBoardSink
from gsam_monitor.sinks.wandb import WandbSink

__all__ = [
    "META_PREFIX",
    "CallableSink",
    "JsonlSink",
    "LoggingSink",
    "Sink",
    "SinkFanout",
    "TensorBoardSink",
    "WandbSink",
    "format_metrics_table",
    "layer_key",
    "make_sink",
    "metric_key",
    "sink_list",
]
