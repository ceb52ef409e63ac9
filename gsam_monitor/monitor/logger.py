"""The log cycle: close windows into a log, publish it, start the next windows.

A log syncs the windows over the ranks, keeps the held-out fits, computes the report where
it is written (the process group's rank zero; the other ranks only sync), and advances the
windows. Inline (``log()``, or ``background=False``) the report is computed before the windows
advance; in the background the windows are handed over first and the report reaches the
sinks from a later step. Either way its warnings and errors are issued, and its metrics
written, when it is published; ``Diagnostics`` reads it then (alerts, outlier dimensions), in
step order.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from gsam_monitor.monitor import ranks, report
from gsam_monitor.monitor.background import BackgroundLogger
from gsam_monitor.monitor.config import MonitorConfig
from gsam_monitor.monitor.diagnostics import Diagnosis, Diagnostics
from gsam_monitor.monitor.faults import Faults
from gsam_monitor.monitor.reference import Reference
from gsam_monitor.monitor.report import LogResult
from gsam_monitor.monitor.schedule import Schedule
from gsam_monitor.monitor.windows import Key, WindowStore
from gsam_monitor.sinks import SinkFanout
from gsam_monitor.sinks.keys import META_PREFIX
from gsam_monitor.stats import LayerStats

__all__ = ["WindowLogger"]


class WindowLogger:
    """Turns windows into logs, inline or with a ``BackgroundLogger``, and writes them.

    Args:
        config: The monitor's settings.
        layers: The monitored layers' names, in order.
        windows: The window store.
        fanout: The sinks.
        faults: Where warnings and errors are counted and issued.

    Attributes:
        n_logs: Logs made so far.
        last_log_step: The step count at the last log.
        last_metrics: What the last published log wrote.
        missing_layers: The layer keys the last published log found without activations.
        diagnostics: Alerts, outlier dimensions and the quantization summary of the logs.
    """

    def __init__(
        self,
        config: MonitorConfig,
        layers: Sequence[str],
        windows: WindowStore,
        fanout: SinkFanout,
        faults: Faults,
        *,
        own: Sequence[str] | None = None,
    ) -> None:
        self.config = config
        self.layers = tuple(layers)
        self.own = self.layers if own is None else tuple(own)  # the layers this rank collects
        self.n_logs = 0
        self.last_log_step = 0
        self.last_metrics: dict[str, float] = {}
        self.missing_layers: list[str] = []
        self._windows = windows
        self._fanout = fanout
        self._faults = faults
        self._background = BackgroundLogger()
        # Sharded background logs: each rank computes its own layers on its worker; the results
        # meet on the writer at the next collective point (a log step, log(), close()).
        self._sharded_background = config.shard_layers and config.background
        self._awaiting: int | None = None  # the step of this rank's sharded log not gathered yet
        self._held: LogResult | None = None  # its result, when a state_dict() waited for it
        self.diagnostics = Diagnostics(config.alert_rules)

    def on_step(self, step_count: int, schedule: Schedule) -> dict[str, float] | None:
        """What a ``step()`` writes: a finished background log, and the scheduled log when due."""
        result = self.drain(wait=False)
        if not schedule.is_log_step(step_count, self.last_log_step):
            return result
        if self.config.background:
            drained = self.flush()  # at most one log in flight: wait for the previous one
            if drained:
                result = {**(result or {}), **drained}
            self.submit(step_count)
            return result
        return {**(result or {}), **self.log(self.config.phases, step_count, step_count)}

    def log(self, phases: Sequence[str], step: int, step_count: int) -> dict[str, float]:
        """Log ``phases`` now, inline, at ``step`` (the monitor's count is ``step_count``)."""
        self.flush()  # an earlier background log reaches the sinks first
        try:
            active = None
            if self.config.shard_layers:  # each rank computes the layers it collects, from its own rows
                windows, owned, active = self._own_windows(phases)
            else:  # each window summed onto the rank that owns it (round robin), which computes it
                windows, owned = self._windows.reduced(phases, in_place=self.config.window == "interval", spread=True)
            probes = self._windows.close_probes(phases)  # summed over ranks: the writer reports it
            refs = self._windows.references_for(owned)
            result = self._metrics_of(
                windows, refs, step, self.n_logs, frozenset(self._windows.disabled),
                owned=owned, probes=probes if self._is_writer() else None, active=active,
            )  # fmt: skip
            self._windows.advance(windows, owned=owned)
        except Exception as err:
            result = LogResult(step, errors=[(err, "log", f"step {step}")])
        self._count(step_count)
        return self._publish(self._gather(result))

    def submit(self, step: int) -> None:
        """Sync the windows now, hand them to the background logger and start the next ones
        (the caller has written the previous log)."""
        if self._sharded_background:
            self._submit_sharded(step)
            return
        n_logs, snapshot = self.n_logs, None
        try:
            # A background log is computed on the writer alone (a collective from the worker
            # thread could interleave with training's): every window is summed onto it.
            windows, owned = self._windows.reduced(
                self.config.phases, in_place=self.config.window == "interval", spread=False
            )
            probes = self._windows.close_probes(self.config.phases)
            if self._is_writer():
                refs = self._windows.references_for(windows)
                snapshot = self._windows.hand_off(windows)
            else:  # the metrics are computed where they are written
                self._windows.advance(windows, owned=owned)
        except Exception as err:
            self._faults.error("log", f"step {step}", err)
            snapshot = None
        self._count(step)
        if snapshot is not None:
            job = functools.partial(
                self._metrics_of, snapshot, refs, step, n_logs, frozenset(self._windows.disabled), probes=probes
            )
            self._background.submit(job, {stats.device for stats in snapshot.values()}, step)

    def _own_windows(self, phases: Sequence[str]) -> tuple[dict[Key, LayerStats], set[Key], set[str]]:
        """A sharded log's windows: this rank's own totals, the keys it computes, and the phases
        any rank saw data in (a collective: every rank calls it)."""
        windows, owned = self._windows.local(phases, self.own)
        return windows, owned, ranks.active_phases(windows, phases, self.config.process_group)

    def _submit_sharded(self, step: int) -> None:
        """A sharded background log: this rank's own windows to its worker (the active phases
        and the attention windows agreed now, on the training thread); every rank takes part,
        also one owning nothing, so that the gather of the results meets on every rank."""
        phases, n_logs = self.config.phases, self.n_logs
        try:
            windows, owned, active = self._own_windows(phases)
            probes = self._windows.close_probes(phases)
            refs = self._windows.references_for(owned)
            snapshot = self._windows.hand_off(windows)
            job = functools.partial(
                self._metrics_of, snapshot, refs, step, n_logs, frozenset(self._windows.disabled),
                owned=set(snapshot), probes=probes if self._is_writer() else None, active=active,
            )  # fmt: skip
            self._background.submit(job, {stats.device for stats in snapshot.values()}, step)
        except Exception as err:
            self._held = LogResult(step, errors=[(err, "log", f"step {step}")])
        self._awaiting = step
        self._count(step)

    def flush(self) -> dict[str, float]:
        """Wait for a log being computed in the background and write it; ``{}`` if none. With
        sharded layers a collective: every rank calls it (``step``, ``log``, ``close`` do)."""
        return self.drain(wait=True) or {}

    def settle(self) -> None:
        """Wait for this rank's background log without writing it where writing it would need
        the other ranks (sharded layers: ``state_dict()`` may run on one rank only); else ``flush``."""
        if not self._sharded_background:
            self.flush()
        elif self._awaiting is not None and self._held is None:
            self._held = self._background.drain(wait=True)

    def drain(self, *, wait: bool) -> dict[str, float] | None:
        """Write the background log's result if it is ready (or, with ``wait``, once it is).
        Sharded results are gathered to the writer only when waited for: every rank waits at
        the same calls."""
        if self._sharded_background:
            if not wait or self._awaiting is None:
                return None
            result = self._held or self._background.drain(wait=True) or LogResult(self._awaiting)
            self._awaiting, self._held = None, None
            return self._publish(self._gather(result))
        result = self._background.drain(wait=wait)
        return None if result is None else self._publish(result)

    def shutdown(self) -> None:
        """Stop the background thread (the caller has flushed)."""
        self._background.shutdown()

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_log_step": self.last_log_step,
            "n_logs": self.n_logs,
            "diagnostics": self.diagnostics.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last_log_step = int(state["last_log_step"])
        self.n_logs = int(state["n_logs"])
        if "diagnostics" in state:  # states saved before alerts existed start without baselines
            self.diagnostics.load_state_dict(state["diagnostics"])

    def write_quantization(self) -> None:
        """Send each layer's int8 readiness (``quantization_summary``) to the sinks that take it,
        at the last log's step; a failure is counted and warned, never raised (it runs in close)."""
        try:
            summary = self.diagnostics.quantization_summary(self.config.phases)
        except Exception as err:
            self._faults.error("int8 summary", "every layer", err)
            return
        if summary:
            self._fanout.write_quantization(summary, max(int(e["step"]) for e in summary.values()))

    def _metrics_of(
        self,
        windows: Mapping[Key, LayerStats],
        refs: Mapping[Key, Reference],
        step: int,
        n_logs: int,
        disabled: frozenset[str],
        *,
        owned: Collection[Key] | None = None,
        probes: Mapping[str, Mapping[Key, Any]] | None = None,
        active: Collection[str] | None = None,
    ) -> LogResult:
        """The report of closed windows (``report.build_report``: pure, it reads only its
        arguments and the immutable settings, and returns its warnings as data); the metrics
        of the ``owned`` windows only, when given."""
        every = self.config.spectrum_every_n_logs
        return report.build_report(
            windows,
            refs,
            layers=self.own if self.config.shard_layers else self.layers,
            phases=self.config.phases,
            metric_names=self.config.metric_names,
            disabled=disabled,
            step=step,
            want_spectrum=every is not None and n_logs % every == 0,
            probes=probes,
            want_fits=self.config.fits_windows,
            owned=owned,
            active=active,
        )

    def _gather(self, result: LogResult) -> LogResult:
        """Every rank's share of an inline log, merged on the writer (``gather_object`` of the
        scalars, spectra, per-dimension vectors and errors: O(d) per window, against the d²
        state the owners kept); elsewhere only this rank's fits stay, kept as its windows' next
        references. A collective: every rank calls it."""
        fits, result.fits = result.fits, {}
        if not self._is_writer():  # what reaches the writer must pickle: errors as their text
            rank = ranks.global_rank()
            result.errors = [(RuntimeError(f"rank {rank}: {err!r}"), kind, where) for err, kind, where in result.errors]
        shares = ranks.gather_to_writer(result, self.config.process_group)
        if shares is None or not self._is_writer():
            return LogResult(result.step, fits=fits)
        for share in shares[1:]:
            if self.config.shard_layers:  # each rank reported its own layers: counts add up
                for key, value in share.flat.items():
                    if key.startswith(f"{META_PREFIX}/missing_layers") and key in result.flat:
                        value += result.flat[key]
                    result.flat[key] = value
                result.missing.extend(share.missing)
                result.warnings.extend(w for w in share.warnings if w[0] != "empty-window")
            else:
                result.flat.update(share.flat)
            result.spectra.update(share.spectra)
            result.values.update(share.values)
            result.dims.update(share.dims)
            result.errors.extend(share.errors)
        result.fits = fits
        return result

    def _count(self, step_count: int) -> None:
        self.last_log_step = step_count
        self.n_logs += 1

    def _publish(self, result: LogResult) -> dict[str, float]:
        """Warn about and count what the log reports, and write its metrics to the sinks."""
        for key, message in result.warnings:
            self._faults.warn_once(key, message)
        for err, kind, where in result.errors:
            self._faults.error(kind, where, err)
        flat = result.flat
        try:
            diagnosis = self.diagnostics.observe(result)
        except Exception as err:  # a diagnostics failure never costs the log its metrics
            self._faults.error("alerts", f"step {result.step}", err)
            diagnosis = Diagnosis()
        if flat:
            flat.update(diagnosis.flags)
            flat[f"{META_PREFIX}/errors"] = float(self._faults.errors)
        self.missing_layers = result.missing
        self._windows.keep_fits(result.fits)  # after the windows advanced: the next log's references
        self.last_metrics = flat
        if flat:
            self._fanout.write(flat, result.spectra, result.step)
            self._fanout.write_diagnostics(diagnosis.alerts, diagnosis.outliers, result.step)
        return flat

    def _is_writer(self) -> bool:
        return ranks.is_writer(self.config.process_group)
