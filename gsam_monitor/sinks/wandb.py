"""``WandbSink``: scalars and spectrum histograms in a Weights & Biases run, on their own x-axis."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gsam_monitor.sinks.protocol import log10_spectrum, require_package

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

    Raises:
        ImportError: if wandb is not installed.
    """

    def __init__(self, run: Any | None = None, *, step_metric: str = "gsam_step", commit: bool | None = None) -> None:
        if run is None:
            require_package("wandb", "wandb")
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
            values = log10_spectrum(eigenvalues)
            if values.numel():
                data[f"spectrum/{key}"] = wandb.Histogram(values.numpy())
        if data:
            self._log(self.run, data, step)

    def close(self) -> None:
        return None  # the run belongs to the user (or to the Trainer / Lightning logger)
