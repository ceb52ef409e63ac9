"""The monitor's settings, checked once at construction, and the memory budget they imply.

``MonitorConfig.from_arguments`` turns ``GSAMMonitor``'s keyword arguments into a frozen,
validated value (every bad argument fails here, naming the argument and the fix);
``check_budget`` refuses a selection of layers whose statistics would exceed
``max_state_bytes``.

Memory: a monitored layer holds ``LayerStats.state_bytes(d)`` = ``itemsize·(d² + 6d)`` bytes
per phase (fp64: 8·d², so d = 768: 4.7 MB, d = 4096: 134 MB, d = 8192: 537 MB), twice that
when a reference window is kept (``heldout_loglik`` or a drift metric is selected), plus one copy more
where a log must copy a window (``log_copies``: background logs, and cumulative/EMA windows
kept as held-out fits or summed over ranks). Interval windows are never copied: a
background log takes the synced window itself and a fresh one starts.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from gsam_monitor._validate import positive_int
from gsam_monitor.capture.layers import LayerTarget
from gsam_monitor.metrics.compute import DRIFT_METRICS, HIGHER_MOMENT_METRICS, REFERENCE_METRICS, validate_names
from gsam_monitor.monitor import ranks
from gsam_monitor.monitor.alerts import AlertRule, parse_alert_rules
from gsam_monitor.stats import LayerStats

__all__ = [
    "DEFAULT_MAX_STATE_BYTES",
    "PHASES",
    "REFERENCES",
    "WINDOWS",
    "MonitorConfig",
    "gib",
    "state_bytes_per_layer",
    "warn_if_frequent",
]

DEFAULT_MAX_STATE_BYTES = 8 * 2**30
"""8 GiB: e.g. three d = 8192 layers in fp64, train and eval phases, with held-out fits, logged
inline (a background log's copy makes that two such layers)."""

PHASES = ("train", "eval")
WINDOWS = ("interval", "cumulative", "ema")
REFERENCES = ("previous", "first", "pinned")
"""What each window is compared with (``heldout_loglik``, the drift metrics): the previous
logged window, the first one, or the one ``pin_reference()`` pinned."""


def state_bytes_per_layer(
    dim: int,
    *,
    state_dtype: torch.dtype = torch.float64,
    phases: Sequence[str] = PHASES,
    heldout: bool = True,
    log_copies: int = 0,
) -> int:
    """Bytes of statistics the monitor keeps for one layer of feature size ``dim``, at most.

    ``LayerStats.state_bytes(dim)`` per phase, times one (the live window), plus one when the
    reference window is kept (``heldout_loglik``, the drift metrics), plus ``log_copies`` (the copies a
    log holds while it is computed: 1 for background logs and for cumulative/EMA windows
    that are kept as held-out fits or summed over ranks, else 0).
    """
    copies = 1 + (1 if heldout else 0) + log_copies
    return LayerStats.state_bytes(dim, state_dtype) * len(phases) * copies


def _rules_for(rules: tuple[AlertRule, ...], metric_names: Sequence[str], *, explicit: bool) -> tuple[AlertRule, ...]:
    """The rules whose metric each log computes: ``"default"`` keeps those, a rule given
    explicitly on a metric that ``metrics=`` leaves out is an error.

    Raises:
        ValueError: naming the rule's metric and both fixes.
    """
    computed = {*metric_names, "nonfinite", "new_outlier_dims"}  # counted always; tracked always
    missing = [r.metric for r in rules if r.metric not in computed]
    if missing and explicit:
        raise ValueError(
            f"alerts: a rule watches {missing[0]!r}, which metrics= does not compute; add {missing[0]!r} to "
            f"metrics= or drop the rule."
        )
    return tuple(r for r in rules if r.metric in computed)


def gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


@dataclass(frozen=True)
class MonitorConfig:
    """``GSAMMonitor``'s settings, checked and resolved (see ``GSAMMonitor`` for each).

    ``collect_steps`` is resolved (``"auto"`` becomes its number, ``auto_collect`` remembers
    it); ``log_copies`` is the number of window copies a log holds (the budget counts them).
    """

    every_n_steps: int
    window: str
    ema_half_life: float
    collect_steps: int | None
    auto_collect: bool
    max_tokens_per_layer: int | None
    metric_names: tuple[str, ...]
    phases: tuple[str, ...]
    state_dtype: torch.dtype
    product_dtype: torch.dtype | str | None
    seed: int
    max_state_bytes: int | None
    spectrum_every_n_logs: int | None
    process_group: Any
    background: bool
    reservoir_size: int | None
    log_copies: int
    reference: str = "previous"
    attention_entropy: bool = False
    alert_rules: tuple[AlertRule, ...] = ()

    @property
    def heldout(self) -> bool:
        """Whether a reference window is kept (``heldout_loglik`` or a drift metric is selected)."""
        return bool(REFERENCE_METRICS & set(self.metric_names))

    @property
    def fits_windows(self) -> bool:
        """Whether a log fits each window it logs: only under ``reference="previous"``, where
        that window is the next log's reference (a fixed reference is factorised once)."""
        return self.heldout and self.reference == "previous"

    @property
    def higher_moments(self) -> bool:
        """Whether the statistics keep the 3rd/4th moments (a selected metric needs them)."""
        return bool(HIGHER_MOMENT_METRICS & set(self.metric_names))

    @property
    def ema_factor(self) -> float:
        """What an EMA window's sums are multiplied by at each step."""
        return 0.5 ** (1.0 / self.ema_half_life)

    @classmethod
    def from_arguments(
        cls,
        model: nn.Module,
        *,
        every_n_steps: int,
        window: Literal["interval", "cumulative", "ema"],
        ema_half_life: float | None,
        collect_steps: int | Literal["auto"] | None,
        max_tokens_per_layer: int | None,
        metrics: str | Iterable[str],
        state_dtype: torch.dtype,
        product_dtype: torch.dtype | str | None,
        phases: str | Sequence[str],
        seed: int,
        max_state_bytes: int | None,
        spectrum_every_n_logs: int | None,
        process_group: Any,
        background: bool | None,
        reservoir_size: int | None,
        reference: str,
        attention_entropy: bool,
        alerts: str | Iterable[Any] | None,
    ) -> MonitorConfig:
        """Check every argument (in the order of ``GSAMMonitor``'s signature) and resolve the
        automatic ones. No defaults here: ``GSAMMonitor``'s signature states each one once.

        Raises:
            ValueError: a non-positive interval or size, an unknown window, metric or phase, a
                bad alert rule.
            TypeError: an argument of the wrong type.
        """
        every = positive_int(every_n_steps, "every_n_steps", " (e.g. every_n_steps=100)")
        if window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS}; got {window!r}.")
        if ema_half_life is not None and window != "ema":
            raise ValueError(f"ema_half_life only applies to window='ema'; got window={window!r}. Drop ema_half_life.")
        if ema_half_life is None:
            ema_half_life = float(every)
        if isinstance(ema_half_life, bool) or not isinstance(ema_half_life, (int, float)) or not ema_half_life > 0:
            raise ValueError(f"ema_half_life must be a positive number of steps; got {ema_half_life!r}.")
        # "auto" parks the hooks only once training steps are counted: an inference script that
        # never calls step() sees every forward.
        auto_collect = collect_steps == "auto"
        if collect_steps == "auto":
            collect_steps = min(every, max(10, every // 10))
        if collect_steps is not None:
            collect_steps = positive_int(collect_steps, "collect_steps", " (or None to collect on every step)")
            if collect_steps > every:
                raise ValueError(
                    f"collect_steps={collect_steps} exceeds every_n_steps={every}; it must be at most "
                    f"the interval (or None to collect on every step)."
                )
        if max_tokens_per_layer is not None:
            max_tokens_per_layer = positive_int(
                max_tokens_per_layer, "max_tokens_per_layer", " (or None for every token)"
            )
        metric_names = _with_reference(validate_names(metrics), metrics, reference)
        if not isinstance(attention_entropy, bool):
            raise TypeError(f"attention_entropy must be True or False; got {attention_entropy!r}.")
        phases = (phases,) if isinstance(phases, str) else tuple(phases)
        if any(p not in PHASES for p in phases) or not phases or len(set(phases)) != len(phases):
            raise ValueError(f"phases must be a non-empty selection of {PHASES} without repeats; got {phases!r}.")
        if not isinstance(state_dtype, torch.dtype) or not state_dtype.is_floating_point:
            raise TypeError(
                f"state_dtype must be a floating torch dtype (torch.float64 or float32); got {state_dtype!r}."
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int; got {type(seed).__name__}.")
        if max_state_bytes is not None:
            max_state_bytes = positive_int(max_state_bytes, "max_state_bytes", " (or None for no limit)")
        if spectrum_every_n_logs is not None and spectrum_every_n_logs != 0:
            spectrum_every_n_logs = positive_int(
                spectrum_every_n_logs, "spectrum_every_n_logs", " (or None to disable)"
            )
        if background is not None and not isinstance(background, bool):
            raise TypeError(f"background must be True, False or None (automatic); got {background!r}.")
        if background is None:
            param = next(model.parameters(), None)
            background = param is not None and param.device.type != "cpu"
        if reservoir_size is not None:
            reservoir_size = positive_int(reservoir_size, "reservoir_size", " (or None for no sample)")
        heldout = bool(REFERENCE_METRICS & set(metric_names))
        alert_rules = _rules_for(parse_alert_rules(alerts), metric_names, explicit=alerts != "default")
        distributed = ranks.world_size(process_group) > 1
        return cls(
            every_n_steps=every,
            window=window,
            ema_half_life=float(ema_half_life),
            collect_steps=collect_steps,
            auto_collect=auto_collect,
            max_tokens_per_layer=max_tokens_per_layer,
            metric_names=metric_names,
            phases=phases,
            state_dtype=state_dtype,
            product_dtype=product_dtype,
            seed=seed,
            max_state_bytes=max_state_bytes,
            spectrum_every_n_logs=spectrum_every_n_logs or None,
            process_group=process_group,
            background=background,
            reservoir_size=reservoir_size,
            log_copies=1 if background or (window != "interval" and (heldout or distributed)) else 0,
            reference=reference,
            attention_entropy=attention_entropy,
            alert_rules=alert_rules,
        )

    def check_phases(self, phases: str | Sequence[str] | None) -> tuple[str, ...]:
        """``phases`` as a tuple of monitored phases (``None``: all of them).

        Raises:
            ValueError: a phase that is not monitored.
        """
        if phases is None:
            return self.phases
        if isinstance(phases, str):
            phases = (phases,)
        bad = [p for p in phases if p not in self.phases]
        if bad:
            raise ValueError(f"phase must be one of the monitored phases {self.phases}; got {bad[0]!r}.")
        return tuple(phases)

    def window_bytes(self, dim: int, copies: int) -> int:
        """Bytes of ``copies`` windows of feature size ``dim``."""
        return LayerStats.state_bytes(dim, self.state_dtype) * copies

    def check_budget(self, targets: Sequence[LayerTarget]) -> None:
        """Refuse a selection whose statistics would exceed ``max_state_bytes`` (layers whose
        size is unknown are checked when their first activation arrives).

        Raises:
            ValueError: with the total, what it is made of, and the ways to shrink it.
        """
        if self.max_state_bytes is None:
            return
        per_layer = [
            (
                t.dim,
                state_bytes_per_layer(
                    t.dim, state_dtype=self.state_dtype, phases=self.phases, heldout=self.heldout,
                    log_copies=self.log_copies,
                ),
            )
            for t in targets
            if t.dim is not None
        ]
        total = sum(b for _, b in per_layer)
        if total <= self.max_state_bytes:
            return
        dims = sorted({d for d, _ in per_layer})
        parts = ["1"] + (["1 held-out fit"] if self.heldout else []) + (["1 log copy"] if self.log_copies else [])
        copies = f"{len(parts)} ({' + '.join(parts)})" if len(parts) > 1 else "1"
        raise ValueError(
            f"max_state_bytes: the monitor's statistics would need {gib(total)} ({len(per_layer)} layers of "
            f"d = {', '.join(map(str, dims))}; {len(self.phases)} phase(s) x {copies} "
            f"x {str(self.state_dtype).replace('torch.', '')} d^2 state each), over max_state_bytes = "
            f"{gib(self.max_state_bytes)}. Fix: monitor fewer layers (layers= / ignore=), use "
            f"state_dtype=torch.float32 (halves it), drop 'heldout_loglik' and the drift metrics from metrics= or a "
            f"phase from phases=, or raise max_state_bytes."
        )


def _with_reference(names: tuple[str, ...], metrics: str | Iterable[str], reference: str) -> tuple[str, ...]:
    """The metric selection for ``reference=``: the default selection gains the drift metrics
    when the reference is the first or a pinned window (a fixed base to drift from).

    Raises:
        ValueError: an unknown reference, or a fixed reference without a metric that uses it.
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}; got {reference!r}.")
    if reference == "previous":
        return names
    if metrics is None or metrics == "default":
        names = (*names, *DRIFT_METRICS)
    if not REFERENCE_METRICS & set(names):
        raise ValueError(
            f"reference={reference!r} keeps a reference window, but no selected metric compares with it; add "
            f"{', '.join(repr(m) for m in (*DRIFT_METRICS, 'heldout_loglik'))} to metrics= (or use metrics='default')."
        )
    return names


def warn_if_frequent(every_n_steps: int, *, stacklevel: int) -> None:
    """Warn that logging more often than every 10 steps slows training (``stacklevel`` as the
    caller's, so that the warning points at the user's code)."""
    if every_n_steps < 10:
        warnings.warn(
            f"GSAMMonitor(every_n_steps={every_n_steps}): each log runs one eigendecomposition per "
            f"layer and reads the statistics back to the host; logging more often than every 10 steps slows "
            f"training. Use every_n_steps >= 10 (or collect_steps=) outside of tests.",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
