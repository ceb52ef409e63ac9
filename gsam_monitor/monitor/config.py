"""The monitor's settings, checked once at construction, and the memory budget they imply.

``MonitorConfig.build`` turns ``GSAMMonitor``'s arguments and option groups
(``gsam_monitor.monitor.options``, each checked where it is made) into one frozen, resolved
value (what depends on several settings fails here, naming the argument and the fix);
``check_budget`` refuses a selection of layers whose accumulation buffers would exceed the
device budget ``max_state_bytes`` (or whose host state would exceed ``max_host_bytes``).

Memory (``gsam_monitor.monitor.memory``): the device holds one accumulation buffer per
monitored layer, ``LayerStats.state_bytes(d)`` = ``itemsize·(d² + 6d)`` bytes (fp64: d = 768:
4.7 MB, d = 4096: 134 MB, d = 8192: 537 MB), and the update workspace; the host holds per
phase each layer's totals, its reference window when one is kept (``heldout_loglik`` or a drift
metric is selected), and one copy more where a log must copy a window (``log_copies``:
background logs, and cumulative/EMA windows kept as references or summed over ranks).
Interval windows are never copied: a background log takes the synced totals themselves.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gsam_monitor._validate import positive_int
from gsam_monitor.capture.layers import LayerTarget
from gsam_monitor.metrics.compute import DRIFT_METRICS, HIGHER_MOMENT_METRICS, REFERENCE_METRICS, validate_names
from gsam_monitor.monitor import ranks
from gsam_monitor.monitor.alerts import AlertRule, parse_alert_rules
from gsam_monitor.monitor.attention import ATTENTION_ALERT_METRICS
from gsam_monitor.monitor.logit_partition import LOGIT_ALERT_METRICS
from gsam_monitor.monitor.memory import gib, host_bytes_per_layer, plan_report
from gsam_monitor.monitor.options import (
    DEFAULT_MAX_STATE_BYTES,
    PHASES,
    REFERENCES,
    WINDOWS,
    CollectOptions,
    ComputeOptions,
    WindowOptions,
    as_options,
)
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



def state_bytes_per_layer(
    dim: int,
    *,
    state_dtype: torch.dtype = torch.float64,
    phases: Sequence[str] = PHASES,
    heldout: bool = True,
    log_copies: int = 0,
) -> int:
    """Host bytes the monitor keeps for one layer of feature size ``dim``, at most.

    ``LayerStats.state_bytes(dim)`` per phase, times one (the totals), plus one when the
    reference window is kept (``heldout_loglik``, the drift metrics), plus ``log_copies`` (the
    copies a log holds while it is computed: 1 for background logs and for cumulative/EMA
    windows that are kept as held-out fits or summed over ranks, else 0). The device holds one
    accumulation buffer per layer besides (``gsam_monitor.monitor.memory``).
    """
    return host_bytes_per_layer(
        dim, state_dtype=state_dtype, phases=len(phases), heldout=heldout, log_copies=log_copies
    )


def _rules_for(
    rules: tuple[AlertRule, ...], metric_names: Sequence[str], *, explicit: bool, attention: bool, logits: bool = False
) -> tuple[AlertRule, ...]:
    """The rules whose metric each log computes: ``"default"`` keeps those, a rule given
    explicitly on a metric that ``metrics=`` leaves out (or on attention entropy without
    ``CollectOptions(attention_entropy=True)``, or on the log-partition without ``logit_partition=``) is an error.

    Raises:
        ValueError: naming the rule's metric and both fixes.
    """
    computed = {*metric_names, "nonfinite", "new_outlier_dims"}  # counted always; tracked always
    # The probes' metrics, measured only with their collection option.
    probes = ((attention, ATTENTION_ALERT_METRICS, "attention_entropy=True"),
              (logits, LOGIT_ALERT_METRICS, "logit_partition=True"))
    for on, names, _ in probes:
        if on:
            computed |= set(names)
    missing = [r.metric for r in rules if r.metric not in computed]
    if missing and explicit:
        for _, names, option in probes:
            if missing[0] in names:
                raise ValueError(
                    f"alerts: a rule watches {missing[0]!r}, which is measured only with "
                    f"collection=CollectOptions({option}); turn it on or drop the rule."
                )
        raise ValueError(
            f"alerts: a rule watches {missing[0]!r}, which metrics= does not compute; add {missing[0]!r} to "
            f"metrics= or drop the rule."
        )
    return tuple(r for r in rules if r.metric in computed)


@dataclass(frozen=True)
class MonitorConfig:
    """``GSAMMonitor``'s settings, checked and resolved, flat (see the option groups for each).

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
    max_host_bytes: int | None
    spectrum_every_n_logs: int | None
    process_group: Any
    background: bool
    reservoir_size: int | None
    log_copies: int
    reference: str
    attention_entropy: bool
    logit_partition: bool | str
    alert_rules: tuple[AlertRule, ...]
    device: torch.device
    shard_layers: bool

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
    def build(
        cls,
        model: nn.Module,
        *,
        every_n_steps: int,
        metrics: str | Iterable[str],
        collection: CollectOptions | Mapping[str, Any] | None,
        windows: WindowOptions | Mapping[str, Any] | None,
        compute: ComputeOptions | Mapping[str, Any] | None,
        alerts: str | Iterable[Any] | None,
        process_group: Any,
    ) -> MonitorConfig:
        """Check what the option groups cannot check alone and resolve the automatic settings:
        ``collection.steps`` against ``every_n_steps``, the EMA half-life's default, the metrics
        a reference needs, the alert rules against the metrics, ``background=None`` against the
        model's device. No defaults here: ``GSAMMonitor`` and the option groups state them once.

        Raises:
            ValueError: a non-positive interval, a collection longer than the interval, an
                unknown metric, a bad alert rule.
        """
        every = positive_int(every_n_steps, "every_n_steps", " (e.g. every_n_steps=100)")
        collection = as_options(collection, CollectOptions, "collection")  # a group, a dict of its fields, or None
        windows = as_options(windows, WindowOptions, "windows")
        compute = as_options(compute, ComputeOptions, "compute")
        # "auto" parks the hooks only once training steps are counted: an inference script that
        # never calls step() sees every forward.
        auto_collect = collection.steps == "auto"
        steps = min(every, max(10, every // 10)) if auto_collect else collection.steps
        if steps is not None and steps > every:
            raise ValueError(
                f"CollectOptions(steps={steps}) exceeds every_n_steps={every}; it must be at most "
                f"the interval (or None to collect on every step)."
            )
        metric_names = _with_reference(validate_names(metrics), metrics, windows.reference)
        param = next(model.parameters(), None)
        device = torch.device("cpu") if param is None else param.device
        background = compute.background
        if background is None:
            background = device.type != "cpu"
        heldout = bool(REFERENCE_METRICS & set(metric_names))
        alert_rules = _rules_for(
            parse_alert_rules(alerts),
            metric_names,
            explicit=alerts != "default",
            attention=collection.attention_entropy,
            logits=collection.logit_partition is not False,
        )
        distributed = ranks.world_size(process_group) > 1
        return cls(
            every_n_steps=every,
            window=windows.kind,
            ema_half_life=float(every) if windows.ema_half_life is None else windows.ema_half_life,
            collect_steps=steps,
            auto_collect=auto_collect,
            max_tokens_per_layer=collection.max_tokens_per_layer,
            metric_names=metric_names,
            phases=tuple(collection.phases),
            state_dtype=compute.state_dtype,
            product_dtype=compute.product_dtype,
            seed=collection.seed,
            max_state_bytes=compute.max_state_bytes,
            max_host_bytes=compute.max_host_bytes,
            spectrum_every_n_logs=compute.spectrum_every_n_logs,
            process_group=process_group,
            background=background,
            reservoir_size=collection.reservoir_size,
            log_copies=1 if background or (windows.kind != "interval" and (heldout or distributed)) else 0,
            reference=windows.reference,
            attention_entropy=collection.attention_entropy,
            logit_partition=collection.logit_partition,
            alert_rules=alert_rules,
            device=device,
            shard_layers=compute.shard_layers,
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

    def _own_rank(self) -> int | None:
        """This process's group rank when the layers are sharded (the layers it plans for)."""
        return ranks.group_rank(self.process_group) if self.shard_layers else None

    def device_bytes(self, dims: Sequence[int]) -> tuple[int, int]:
        """``(device bytes, of which update workspace)`` of accumulation buffers of ``dims``,
        counted as the plan and ``check_budget`` count them (``memory.plan_report``): the
        buffers plus the workspace once."""
        report = plan_report(
            [(str(i), d) for i, d in enumerate(dims)], state_dtype=self.state_dtype,
            product_dtype=self.product_dtype, device=self.device, phases=self.phases, heldout=self.heldout,
            log_copies=self.log_copies,
        )  # fmt: skip
        return report["device_bytes"], report["workspace_bytes"]

    def layer_owners(self, targets: Sequence[LayerTarget]) -> dict[str, int] | None:
        """Under ``shard_layers`` the group rank collecting each layer in the world the monitor
        runs in; ``None`` otherwise (every rank collects every layer). A process alone in its
        group owns every layer, which is said once (``UserWarning``)."""
        if not self.shard_layers:
            return None
        world = ranks.world_size(self.process_group)
        if world == 1:
            warnings.warn(
                "GSAMMonitor: ComputeOptions(shard_layers=True) in a process without torch.distributed (or a process "
                "group of one rank): this process is the only rank and collects every layer.",
                UserWarning,
                stacklevel=3,  # the line that builds the GSAMMonitor
            )
        return self.owners(targets, world)

    def _layer_sizes(self, targets: Sequence[LayerTarget]) -> list[tuple[str, int]]:
        """Each layer's buffer bytes, what ownership balances (a layer of unknown width counts as
        the widest known one)."""
        widest = max((t.dim for t in targets if t.dim is not None), default=1)
        return [(t.name, LayerStats.state_bytes(t.dim or widest, self.state_dtype)) for t in targets]

    def owners(self, targets: Sequence[LayerTarget], world: int) -> dict[str, int]:
        """The group rank that collects each layer under ``shard_layers`` (``ranks.layer_owners``,
        by bytes)."""
        return ranks.layer_owners(self._layer_sizes(targets), world)

    def plan(
        self,
        targets: Sequence[LayerTarget],
        *,
        world_size: int = 1,
        ranks_per_node: int | None = None,
        rank: int | None = None,
    ) -> dict[str, Any]:
        """The memory plan per rank (``gsam_monitor.monitor.memory.plan_report``): of every layer,
        or under ``shard_layers`` of the layers group rank ``rank`` owns (default: the rank
        owning the most bytes, the planned peak), with ``"owners"`` and ``"rank"``."""
        owners: dict[str, int] | None = None
        if self.shard_layers:
            sizes = self._layer_sizes(targets)
            owners = ranks.layer_owners(sizes, world_size)
            if rank is None:  # the rank the balance left with the most bytes
                loads = [0] * world_size
                for name, size in sizes:
                    loads[owners[name]] += size
                rank = max(range(world_size), key=lambda r: (loads[r], -r))
            targets = [t for t in targets if owners[t.name] == rank]
        report = plan_report(
            [(t.name, t.dim) for t in targets],
            state_dtype=self.state_dtype,
            product_dtype=self.product_dtype,
            device=self.device,
            phases=self.phases,
            heldout=self.heldout,
            log_copies=self.log_copies,
            world_size=world_size,
            ranks_per_node=ranks_per_node,
        )
        if owners is not None:
            report["owners"], report["rank"] = owners, rank
        return report

    def check_budget(self, targets: Sequence[LayerTarget]) -> None:
        """Refuse a selection whose accumulation buffers would exceed the device budget
        (``max_state_bytes``) or whose host state would exceed ``max_host_bytes`` (layers whose
        size is unknown are checked when their first activation arrives).

        Raises:
            ValueError: with the total, what it is made of, and the ways to shrink it.
        """
        plan = self.plan(targets, world_size=ranks.world_size(self.process_group), rank=self._own_rank())
        dims = ", ".join(map(str, sorted({p["dim"] for p in plan["layers"].values()})))
        dtype = str(self.state_dtype).replace("torch.", "")
        n = len(plan["layers"])
        if self.max_state_bytes is not None and plan["device_bytes"] > self.max_state_bytes:
            raise ValueError(
                f"ComputeOptions(max_state_bytes=): the monitor's accumulation buffers would need "
                f"{gib(plan['device_bytes'])} on the device ({n} layers of d = {dims}: one {dtype} d^2 buffer each, "
                f"plus {gib(plan['workspace_bytes'])} of update workspace), over max_state_bytes = "
                f"{gib(self.max_state_bytes)}. Fix: monitor fewer layers (layers= / ignore=), use "
                f"compute=ComputeOptions(state_dtype=torch.float32) (halves it), shard the layers over the ranks "
                f"with ComputeOptions(shard_layers=True) under torch.distributed, or raise "
                f"ComputeOptions(max_state_bytes=)."
            )
        if self.max_host_bytes is not None and plan["host_bytes"] > self.max_host_bytes:
            parts = ["1"] + (["1 reference"] if self.heldout else []) + (["1 log copy"] if self.log_copies else [])
            copies = f"{len(parts)} ({' + '.join(parts)})" if len(parts) > 1 else "1"
            raise ValueError(
                f"ComputeOptions(max_host_bytes=): the monitor's host state would need {gib(plan['host_bytes'])} "
                f"({n} layers of d = {dims}; {len(self.phases)} phase(s) x {copies} x float64 d^2 state each), "
                f"over max_host_bytes = {gib(self.max_host_bytes)}. Fix: monitor fewer layers (layers= / "
                f"ignore=), drop 'heldout_loglik' and the drift metrics from metrics= or a phase from "
                f"CollectOptions(phases=), or raise ComputeOptions(max_host_bytes=)."
            )


def _with_reference(names: tuple[str, ...], metrics: str | Iterable[str], reference: str) -> tuple[str, ...]:
    """The metric selection for ``reference=``: the default selection gains the drift metrics
    when the reference is the first or a pinned window (a fixed base to drift from).

    Raises:
        ValueError: an unknown reference, or a fixed reference without a metric that uses it.
    """
    if reference == "previous":
        return names
    if metrics is None or metrics == "default":
        names = (*names, *DRIFT_METRICS)
    if not REFERENCE_METRICS & set(names):
        raise ValueError(
            f"WindowOptions(reference={reference!r}) keeps a reference window, but no selected metric compares "
            f"with it; add "
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
            f"training. Use every_n_steps >= 10 (or CollectOptions(steps=)) outside of tests.",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
