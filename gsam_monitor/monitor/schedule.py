"""The collection schedule: which steps log, and which steps' forwards are collected.

A value object, checked once (by ``MonitorConfig``): logs fall every ``every_n_steps``
optimizer steps; with ``collect_steps = k`` the hooks are on only for the last ``k`` steps
before each log, so the other steps cost nothing and each window describes the model as it
is at its log. The schedule governs training forwards: evaluation forwards are collected
whenever they happen (``gsam_monitor.capture.activations``). ``HookSwitch`` applies the
schedule, the open ``collect()`` handles and the monitor's attachment to the hooks;
``CollectHandle`` is what ``GSAMMonitor.collect()`` returns: the hooks stay on until it is
closed, whatever the schedule says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["CollectHandle", "HookSwitch", "Schedule"]


@dataclass(frozen=True)
class Schedule:
    """Logs every ``every_n_steps`` steps; collects the last ``collect_steps`` before each
    (``None``: every step). ``auto``: ``collect_steps`` was chosen automatically, and then
    every forward before the first training step is collected (inference scripts never step).
    """

    every_n_steps: int
    collect_steps: int | None
    auto: bool = False

    def want_hooks(self, step: int, *, started: bool) -> bool:
        """Whether the forwards after step ``step`` (those of step ``step + 1``) are collected.

        Args:
            step: The step count so far.
            started: Whether training steps have begun (a ``step()`` call or a restored count).
        """
        if self.collect_steps is None or (self.auto and not started):
            return True
        return step % self.every_n_steps >= self.every_n_steps - self.collect_steps

    def is_log_step(self, step: int, last_logged: int) -> bool:
        """Whether reaching ``step`` crosses a log boundary since step ``last_logged`` (a jump of
        the trainer's global step over a boundary logs too)."""
        return step // self.every_n_steps > last_logged // self.every_n_steps


class HookSwitch:
    """Whether the hooks collect training forwards now, told to the capture at each change.

    Args:
        schedule: The collection schedule.
        switch: Called with ``(want, attached)`` (``ActivationCapture.switch``).

    Attributes:
        attached: Whether the monitor is attached.
        started: Whether a training step was counted (``step()``); a restored count counts too.
    """

    def __init__(self, schedule: Schedule, switch: Callable[[bool, bool], None]) -> None:
        self.schedule = schedule
        self.attached = False
        self.started = False
        self._switch = switch
        self._forced = 0  # open collect() handles

    def update(self, step: int) -> None:
        """Apply the state at step count ``step``."""
        started = self.started or step > 0
        want = self._forced > 0 or (self.attached and self.schedule.want_hooks(step, started=started))
        self._switch(want, self.attached)

    def hold(self, step: Callable[[], int]) -> Callable[[], None]:
        """Keep the hooks on until the returned release is called (``step``: the step count)."""
        self._forced += 1
        self.update(step())

        def release() -> None:
            self._forced -= 1
            self.update(step())

        return release


class CollectHandle:
    """Hooks kept on until ``close()`` (idempotent) or the end of a ``with`` block.

    Args:
        monitor: What ``with handle as m:`` binds.
        release: Called once, at the first ``close()``.
    """

    def __init__(self, monitor: Any, release: Callable[[], None]) -> None:
        self._monitor = monitor
        self._release: Callable[[], None] | None = release

    @property
    def closed(self) -> bool:
        return self._release is None

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> Any:
        return self._monitor

    def __exit__(self, *exc: object) -> None:
        self.close()
