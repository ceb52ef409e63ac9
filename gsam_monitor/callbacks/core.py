"""What the framework callbacks share: no framework import here, one code path for both.

``MonitorCallback`` is the framework-independent half of ``GSAMTrainerCallback`` and
``GSAMCallback``: it checks the monitor's keyword arguments when the callback is built,
builds the monitor with the framework's sinks and the user's, steps it and records what it
logs, logs the evaluation window when an evaluation ends (the monitor collects every
evaluation forward, whatever ``collect_steps`` says), restores a checkpoint (without the window in
progress on a rank other than zero: the sum over ranks would count it once per rank), decides
whether a new geometry alert asks for an action (``on_alert``: the same answer on every rank),
and closes the monitor without letting a failure there mask the exception being handled.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from torch import nn

from gsam_monitor.monitor import GSAMMonitor, ranks
from gsam_monitor.monitor.facade import MONITOR_KEYWORDS
from gsam_monitor.monitor.options import GROUPS, as_options, group_legacy
from gsam_monitor.sinks import sink_list

__all__ = ["MONITOR_ARGS", "ON_ALERT", "MonitorCallback", "check_monitor_kwargs", "close_quietly"]

log = logging.getLogger(__name__)

MONITOR_ARGS = frozenset(MONITOR_KEYWORDS)
"""The keyword arguments a callback passes on to ``GSAMMonitor`` (the previous release's flat
names, ``monitor.options.LEGACY_NAMES``, are still taken with a ``DeprecationWarning``)."""

ON_ALERT = (None, "save", "stop")
"""What a callback does when the monitor raises a geometry alert: nothing, save a checkpoint, stop."""


def check_monitor_kwargs(
    kwargs: Mapping[str, Any], owner: str, *, stacklevel: int = 1, own: Collection[str] = ()
) -> dict[str, Any]:
    """The keyword arguments for ``GSAMMonitor``, checked when the callback is built, not when
    training starts: the previous release's flat names moved into their option groups with a
    ``DeprecationWarning`` (``stacklevel`` as the caller's), each group checked now. ``own``: the
    callback's own keywords, which a misspelling may be near too (``tensorbord=``).

    Raises:
        TypeError: naming the unknown keywords, a close match when there is one, and the valid ones.
        ValueError: an option group's bad field.
    """
    out = group_legacy(kwargs, owner, valid=MONITOR_ARGS | set(own), stacklevel=stacklevel + 1)
    for group, cls in GROUPS.items():
        if group in out:
            out[group] = as_options(out[group], cls, f"{owner}({group}=)")
    return out


def close_quietly(monitor: GSAMMonitor, owner: str) -> None:
    """Close ``monitor``; a failure is logged, never raised (an exception path or a finalizer)."""
    try:
        monitor.close()
    except Exception as err:
        log.warning("%s: closing the monitor raised %r", owner, err)


class MonitorCallback:
    """The shared half of the framework callbacks (a base class, before the framework's).

    Attributes:
        monitor: The ``GSAMMonitor`` (``None`` before training begins).
        last_metrics: The last values logged per phase: ``{"train": {...}, "eval": {...}}``.
        last_steps: The global step of each phase's last log.
    """

    def _init_monitor_callback(
        self, layers: Any, sinks: Iterable[Any] | Any, monitor_kwargs: Mapping[str, Any], on_alert: str | None = None
    ) -> None:
        """Keep the monitor's arguments (checked now) and start without a monitor.

        Raises:
            TypeError: a keyword argument that ``GSAMMonitor`` does not take.
            ValueError: an ``on_alert`` not in ``ON_ALERT``, or one given with ``alerts=None``.
        """
        own = [
            name for name, p in inspect.signature(type(self).__init__).parameters.items()
            if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
        ]  # fmt: skip
        monitor_kwargs = check_monitor_kwargs(monitor_kwargs, type(self).__name__, stacklevel=3, own=own)
        owner = type(self).__name__
        if on_alert not in ON_ALERT:
            raise ValueError(f"{owner}(on_alert=) must be None, 'save' or 'stop'; got {on_alert!r}.")
        if on_alert is not None and monitor_kwargs.get("alerts", "default") is None:
            raise ValueError(
                f"{owner}(on_alert={on_alert!r}) acts on geometry alerts, but alerts=None turns them off; pass "
                f"alerts='default' (or a list of rules), or drop on_alert."
            )
        self.on_alert = on_alert
        self._alerts_seen = 0
        self._logs_checked = 0
        self.layers = layers
        self.extra_sinks = sinks
        self.monitor_kwargs = dict(monitor_kwargs)
        self.monitor: GSAMMonitor | None = None
        self.last_metrics: dict[str, dict[str, float]] = {}
        self.last_steps: dict[str, int] = {}

    def _build_monitor(self, model: nn.Module, every_n_steps: int, sinks: Iterable[Any]) -> GSAMMonitor:
        """A monitor of ``model`` writing to the framework's ``sinks`` and the user's ``sinks=``
        (when there are none, the monitor warns that its metrics go nowhere)."""
        return GSAMMonitor(
            model,
            self.layers,
            every_n_steps=every_n_steps,
            sinks=[*sinks, *sink_list(self.extra_sinks)] or None,
            **self.monitor_kwargs,
        )

    def _train_step(self, step: int) -> None:
        """Count an optimizer step (``self.monitor`` is set) and record a log it made."""
        assert self.monitor is not None
        result = self.monitor.step(int(step))
        if result:
            self._record("train", result, step)

    def _log_eval(self, step: int) -> None:
        """Log the evaluation window at ``step`` and start the next one."""
        monitor = self.monitor
        if monitor is None or not monitor.attached or "eval" not in monitor.phases:
            return
        result = monitor.log(int(step), phases=["eval"])
        if result:
            self._record("eval", result, step)

    def _mark_alerts_seen(self) -> None:
        """Alerts restored from a checkpoint are old news: act only on later ones."""
        if self.monitor is not None:
            self._alerts_seen = len(self.monitor.fired_alerts)
            self._logs_checked = self.monitor.n_logs

    def _alert_due(self, sync: Callable[[bool], bool] | None = None) -> bool:
        """Whether ``on_alert`` should act now: a new alert since the last check.

        Under ``torch.distributed`` only the writing rank sees alerts, and a stop or save must
        happen on every rank, so the answer is agreed with ``sync`` (an all-reduce of the flag),
        called on every rank at the steps where the monitor logged (the same steps everywhere);
        one process checks at every step, so an alert from a background log acts at once.
        """
        monitor = self.monitor
        if self.on_alert is None or monitor is None:
            return False
        distributed = ranks.world_size(monitor.process_group) > 1
        if distributed and monitor.n_logs == self._logs_checked:
            return False
        self._logs_checked = monitor.n_logs
        new = len(monitor.fired_alerts) > self._alerts_seen
        self._alerts_seen = len(monitor.fired_alerts)
        if new:
            last = monitor.fired_alerts[-1]
            log.warning(
                "%s: geometry alert %s in %s at step %d; on_alert=%r.",
                type(self).__name__, last["kind"], last["layer"], last["step"], self.on_alert,
            )
        if not distributed:
            return new
        return bool((sync or self._any_rank)(new))

    def _any_rank(self, flag: bool) -> bool:
        """``flag`` or-ed over the monitor's process group (one all-reduce of one number)."""
        import torch

        monitor = self.monitor
        assert monitor is not None
        dist = ranks.active_dist()
        group = monitor.process_group
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        return bool(value.item() > 0)

    def _record(self, phase: str, values: Mapping[str, float], step: int) -> None:
        self.last_metrics[phase] = dict(values)
        self.last_steps[phase] = int(step)

    def _load_state(self, state: Mapping[str, Any], *, drop_window: bool) -> None:
        """Restore a saved monitor state; ``drop_window``: take its counters and held-out fits
        (identical on every rank) but not its window in progress (rank zero's, which the sum
        over ranks at the next log would count once per rank)."""
        assert self.monitor is not None
        self.monitor.load_state_dict({**state, "stats": {}} if drop_window else state)

    def _close_monitor(self) -> None:
        """Close the monitor (idempotent, never raises)."""
        if self.monitor is not None:
            close_quietly(self.monitor, type(self).__name__)
