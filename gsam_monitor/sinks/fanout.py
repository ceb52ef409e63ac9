"""Fan-out: one write reaches every sink; only the writing rank writes; a failing sink is dropped.

``make_sink`` turns a ``sinks=`` entry (a sink, a callable, a name) into a sink;
``sink_list`` normalises the argument (one entry or several); ``SinkFanout`` owns the list:
it writes only where ``is_writer()`` says so (the monitor's process-group rank zero) and
disables a sink that raises, reporting it once (training goes on).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from gsam_monitor._validate import closest
from gsam_monitor.sinks.jsonl import JsonlSink
from gsam_monitor.sinks.log import LoggingSink
from gsam_monitor.sinks.protocol import CallableSink, Sink
from gsam_monitor.sinks.tensorboard import TensorBoardSink
from gsam_monitor.sinks.wandb import WandbSink

__all__ = ["SinkFanout", "make_sink", "sink_list"]

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
            near = closest(spec, _NAMED_SINKS)
            hint = f" Did you mean {near!r}?" if near else ""
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


def sink_list(sinks: Any) -> list[Any]:
    """A ``sinks=`` argument as a list of entries: one sink, callable or name becomes a list of one."""
    if isinstance(sinks, str) or callable(sinks) or hasattr(sinks, "write"):
        return [sinks]
    return list(sinks)


class SinkFanout:
    """The monitor's sinks: every write goes to each sink still enabled, on the writing rank only.

    Args:
        sinks: ``sinks=`` entries (see ``make_sink``), built here.
        is_writer: Whether this process writes (checked at each write).
        on_failure: Called with the sink's description and the exception when a sink raises;
            the sink is then disabled for good.

    Raises:
        ValueError, TypeError: from ``make_sink``.
    """

    def __init__(
        self, sinks: Any, is_writer: Callable[[], bool], on_failure: Callable[[str, BaseException], None]
    ) -> None:
        self.sinks: list[Sink] = [make_sink(s) for s in sink_list(sinks)]
        self.disabled: set[int] = set()
        self._is_writer = is_writer
        self._on_failure = on_failure

    def write(self, flat: Mapping[str, float], spectra: Mapping[str, torch.Tensor], step: int) -> None:
        """Send the scalars (and the spectra, to the sinks that draw them) to every enabled sink."""
        if not self._is_writer():
            return
        for i, sink in self._enabled():
            try:
                sink.write(dict(flat), step)
                if spectra and hasattr(sink, "write_spectrum"):
                    sink.write_spectrum(dict(spectra), step)
            except Exception as err:
                self._failed(i, sink, err)

    def write_diagnostics(self, alerts: list[dict[str, Any]], outliers: Mapping[str, list[int]], step: int) -> None:
        """Send a log's alerts to the sinks with ``write_alerts`` (when there are any) and its
        outlier indices per layer to those with ``write_outliers``."""
        if not self._is_writer():
            return
        for i, sink in self._enabled():
            try:
                if alerts and hasattr(sink, "write_alerts"):
                    sink.write_alerts(list(alerts), step)
                if outliers and hasattr(sink, "write_outliers"):
                    sink.write_outliers(dict(outliers), step)
            except Exception as err:
                self._failed(i, sink, err)

    def write_quantization(self, summary: Mapping[str, Mapping[str, Any]], step: int) -> None:
        """Send the end-of-run int8 readiness summary (``{layer key: {...}}``) to the sinks with
        ``write_quantization``; plain sinks (callables) never see it."""
        if not summary or not self._is_writer():
            return
        for i, sink in self._enabled():
            try:
                if hasattr(sink, "write_quantization"):
                    sink.write_quantization({k: dict(v) for k, v in summary.items()}, step)
            except Exception as err:
                self._failed(i, sink, err)

    def close(self) -> None:
        """Close every enabled sink that has ``close()`` (flushing TensorBoard files)."""
        for i, sink in self._enabled():
            close = getattr(sink, "close", None)
            if close is None:
                continue
            try:
                close()
            except Exception as err:
                self._failed(i, sink, err)

    def _enabled(self) -> list[tuple[int, Sink]]:
        return [(i, sink) for i, sink in enumerate(self.sinks) if i not in self.disabled]

    def _failed(self, index: int, sink: Any, err: BaseException) -> None:
        self.disabled.add(index)
        self._on_failure(f"{sink!r} (sinks[{index}])", err)
