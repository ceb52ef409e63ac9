"""``WandbSink``: scalars and spectrum histograms in a Weights & Biases run, on their own x-axis."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from gsam_monitor.sinks.protocol import describe_alert, log10_spectrum, require_package

__all__ = ["WandbSink"]


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
        alert_every_s: At most one ``run.alert`` (a W&B notification: e-mail, Slack) per this
            many seconds; the geometry alerts of a log are sent as one, and those held back by
            the limit are counted in the next. ``None``: never call ``run.alert`` (the
            ``alert/{metric}/{layer}`` scalars are logged either way).
        clock: Seconds for the rate limit (``time.monotonic``; injectable for tests).

    Outlier dimensions go into the run summary, ``outliers/{layer}`` = the indices of the last log,
    and so does the monitor's end-of-run int8 readiness, ``int8/{layer}/{name}``.

    Raises:
        ImportError: if wandb is not installed.
    """

    def __init__(
        self,
        run: Any | None = None,
        *,
        step_metric: str = "gsam_step",
        commit: bool | None = None,
        alert_every_s: float | None = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if run is None:
            require_package("wandb", "wandb")
        self._run = run
        self.step_metric = step_metric
        self.commit = commit
        self._defined: set[str] = set()
        self._pending_step: int | None = None
        self._pending_keys: set[str] = set()
        self._pending_value: int | None = None
        if alert_every_s is not None and (isinstance(alert_every_s, bool) or not alert_every_s >= 0):
            raise ValueError(f"WandbSink(alert_every_s=) must be seconds >= 0 or None; got {alert_every_s!r}.")
        self.alert_every_s = alert_every_s
        self._clock = clock
        self._last_alert: float | None = None
        self._held_back = 0

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
            values = log10_spectrum(eigenvalues)
            if values.numel():
                data[f"spectrum/{key}"] = wandb.Histogram(values.numpy())
        if data:
            self._log(self.run, data, step)

    def write_alerts(self, alerts: list[Mapping[str, Any]], step: int) -> None:
        """One ``run.alert`` (level WARN) for a log's geometry alerts, rate-limited."""
        if self.alert_every_s is None or not alerts:
            return
        now = self._clock()
        if self._last_alert is not None and now - self._last_alert < self.alert_every_s:
            self._held_back += len(alerts)
            return
        text = "\n".join(describe_alert(a) for a in alerts)
        if self._held_back:
            text += f"\n({self._held_back} earlier alert(s) held back by the rate limit; see the alert/* charts.)"
        self.run.alert(title=f"gsam_monitor: {len(alerts)} geometry alert(s) at step {step}"[:63], text=text,
                       level="WARN")
        self._last_alert, self._held_back = now, 0

    def write_outliers(self, outliers: Mapping[str, list[int]], step: int) -> None:
        """The last log's outlier dimension indices per layer, in the run summary ``outliers/{layer}``."""
        summary = getattr(self.run, "summary", None)
        if summary is not None:
            for key, dims in outliers.items():
                summary[f"outliers/{key}"] = list(dims)

    def write_quantization(self, summary: Mapping[str, Mapping[str, Any]], step: int) -> None:
        """The int8 readiness in the run summary, ``int8/{layer}/{name}`` (finite numbers and the
        outlier dimension list)."""
        run_summary = getattr(self.run, "summary", None)
        if run_summary is None:
            return
        for key, entry in summary.items():
            for name, value in entry.items():
                if isinstance(value, list) or (isinstance(value, (int, float)) and math.isfinite(value)):
                    run_summary[f"int8/{key}/{name}"] = value

    def close(self) -> None:
        return None  # the run belongs to the user (or to the Trainer / Lightning logger)

    def __repr__(self) -> str:
        run = self._run
        if run is None:  # wandb.run, read at the first write
            return "WandbSink(run=None)"
        name = getattr(run, "name", None) or getattr(run, "id", None)
        return f"WandbSink(run={name!r})" if isinstance(name, str) else f"WandbSink(run=<{type(run).__name__}>)"
