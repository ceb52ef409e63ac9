"""GSAMMonitor: per-layer activation geometry of a model, logged while it trains or runs.

The monitor is a facade over one unit per concern, in the order the data flows:

* capture (``gsam_monitor.capture``): hooks on the chosen layers feed every forward's
  hidden states, padding dropped and tokens optionally subsampled, to the windows;
* accumulate (``windows``): one ``LayerStats`` per layer and phase, within the memory budget
  (``config``), collected on the steps the ``schedule`` says;
* compute (``report``): every ``every_n_steps`` optimizer steps the windows are synced over
  ranks and turned into metrics (``gsam_monitor.metrics.compute``), inline or on the
  ``background`` thread;
* write (``gsam_monitor.sinks``): the metrics go to the sinks, on the writing rank only.

Options come in three groups (``gsam_monitor.monitor.options``): ``CollectOptions`` (what the
hooks collect), ``WindowOptions`` (how windows run) and ``ComputeOptions`` (precision, budget,
thread). Windows: ``"interval"`` statistics restart after every log; ``"cumulative"`` ones never
do; ``"ema"`` ones decay by ``0.5 ** (1 / ema_half_life)`` at every ``step()``. Held-out scores
(``heldout_loglik``) and drift (``drift_*``) compare each window with a reference window: the
previous logged one, the first, or a pinned one (``gsam_monitor.monitor.reference``). Memory: see
``gsam_monitor.monitor.config`` (the budget ``ComputeOptions.max_state_bytes`` is checked at
construction).
``close()`` frees the statistics; ``detach()`` keeps them for a later ``attach()``.

torch.compile: the layer hooks are traced into the compiled graph as calls of an opaque
operator, without graph breaks, and stay registered once traced, switched by a flag
(``gsam_monitor.capture.activations``).

A monitor problem never stops training: exceptions inside hooks, metric computation or a
sink are counted (``errors``), warned about once per kind and place, and skipped; a failing
sink is disabled. ``strict=True`` raises them instead (``gsam_monitor.monitor.faults``).
"""

from __future__ import annotations

import inspect
import operator
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from gsam_monitor._validate import positive_int
from gsam_monitor.capture.activations import ActivationCapture
from gsam_monitor.capture.layers import LayerSpec, LayerTarget, resolve_layers
from gsam_monitor.monitor import ranks
from gsam_monitor.monitor.checkpoint import STATE_FORMAT, check_state
from gsam_monitor.monitor.config import MonitorConfig, warn_if_frequent
from gsam_monitor.monitor.faults import Faults
from gsam_monitor.monitor.logger import WindowLogger
from gsam_monitor.monitor.options import CollectOptions, ComputeOptions, WindowOptions, group_legacy
from gsam_monitor.monitor.report import current_metrics
from gsam_monitor.monitor.schedule import CollectHandle, HookSwitch, Schedule
from gsam_monitor.monitor.windows import WindowStore
from gsam_monitor.sinks import SinkFanout, TensorBoardSink, sink_list
from gsam_monitor.sinks.keys import layer_key
from gsam_monitor.stats import LayerStats, ReservoirSample

__all__ = ["MONITOR_KEYWORDS", "GSAMMonitor", "memory_report"]


def _view(part: str, name: str, doc: str) -> property:
    """A read-only attribute of the monitor: ``name`` of its part ``part`` (a dotted path)."""
    return property(operator.attrgetter(f"{part}.{name}"), doc=doc)


def _sink_entries(sinks: Iterable[Any] | Any | None, log_dir: str | os.PathLike[str] | None, writer: bool) -> list[Any]:
    """The ``sinks=`` entries with ``log_dir``'s TensorBoard sink; a warning when there are
    none and none were asked for (``sinks=None``), on the writing rank (``writer``) only."""
    entries = [] if sinks is None else sink_list(sinks)
    if log_dir is not None:
        if not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a directory path (str or os.PathLike); got {type(log_dir).__name__}.")
        entries.append(TensorBoardSink(log_dir))
    elif sinks is None and writer:
        warnings.warn(
            "GSAMMonitor: no sink, so the metrics it computes are written nowhere. Pass log_dir='runs/gsam' "
            "(TensorBoard), or sinks=['wandb'] / sinks=[JsonlSink('gsam.jsonl')] / a callable (metrics, step); "
            "pass sinks=[] if you read step(), log() or compute() yourself.",
            UserWarning,
            stacklevel=3,
        )
    return entries


def _setting(name: str) -> property:
    """A read-only view of one ``MonitorConfig`` field on the monitor."""
    return _view("config", name, f"``config.{name}`` (read-only).")


class GSAMMonitor:
    """Watch the activation geometry of chosen layers and log GSAM and related metrics.

    Args:
        model: The model (DDP-, FSDP- or ``torch.compile``-wrapped models are fine).
        layers: What to watch: ``"auto"`` (every block of the repeated stack), module names,
            globs (``"encoder.layer.*"``), compiled regexes, module types or module objects,
            plus ``"embeddings"`` (embedding output) and ``"final_norm"``; one or a list.
        ignore: Specs of the same kinds to leave out.
        every_n_steps: Log every this many optimizer steps (``step()`` calls).
        metrics: ``"default"``, ``"all"`` or a list of ``metrics.METRIC_NAMES``.
        sinks: Sink objects, callables ``(metrics, step)`` or names (``"tensorboard"``,
            ``"wandb"``, ``"jsonl"``, ``"logging"``). None of them and no ``log_dir`` warns on
            the writing rank, unless ``sinks=[]`` says you read ``step()``/``compute()`` yourself.
        log_dir: A TensorBoard run directory: adds ``TensorBoardSink(log_dir)`` to ``sinks``.
        collection: What the hooks collect (``CollectOptions``: the steps collected before each
            log, the token cap, the phases, the sampling seed, a reservoir sample, attention
            entropy), or a dict of its fields; ``None``: its defaults.
        windows: How the statistics are windowed (``WindowOptions``: interval, cumulative or
            EMA, and the reference ``heldout_loglik`` and drift compare with), or a dict.
        compute: How statistics are kept and metrics computed (``ComputeOptions``: background
            thread, state and product dtypes, the memory budget, spectrum histograms), or a dict.
        alerts: ``"default"`` (rank collapse, anisotropy jump, ...: ``monitor.alerts.DEFAULT_RULES``),
            ``None`` or a list of rules (metric names, ``gsam_monitor.AlertRule`` objects, dicts). The
            alerts fired are in ``fired_alerts``; the sinks get ``alert/{metric}/{layer}`` = 1.
        process_group: The ``torch.distributed`` group to sync over (default: the world). Its
            ranks compute the metrics of the windows they own (round robin); its rank zero
            writes them.
        strict: Raise ``gsam_monitor.MonitorError`` at a monitor error (a hook, metric, log or
            sink that raised) instead of counting it and going on: for tests and CI runs.
        **deprecated: The previous release's flat names (``window=``, ``phases=``,
            ``state_dtype=``, ...: ``monitor.options.LEGACY_NAMES``), moved into their group
            with a ``DeprecationWarning``; removed in the next release.

    Raises:
        ValueError: an unknown layer or metric name, an empty/duplicate/nested selection, a
            non-positive interval, an unknown sink, or a configuration whose state exceeds
            ``ComputeOptions.max_state_bytes`` (the option groups check their own fields).
        TypeError: an argument of the wrong type, or an unknown keyword.

    Example::

        monitor = GSAMMonitor(model, every_n_steps=100, log_dir="runs/gsam",
                              collection=CollectOptions(phases="train"))
        with monitor:
            for batch in loader:
                loss = model(**batch).loss
                loss.backward(); optimizer.step(); optimizer.zero_grad()
                monitor.step()          # logs "gsam/encoder.layer.0", ... every 100 steps
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec | Iterable[LayerSpec] = "auto",
        *,
        ignore: LayerSpec | Iterable[LayerSpec] | None = None,
        every_n_steps: int = 100,
        metrics: str | Iterable[str] = "default",
        sinks: Iterable[Any] | Any | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        collection: CollectOptions | Mapping[str, Any] | None = None,
        windows: WindowOptions | Mapping[str, Any] | None = None,
        compute: ComputeOptions | Mapping[str, Any] | None = None,
        alerts: str | Iterable[Any] | None = "default",
        process_group: Any = None,
        strict: bool = False,
        **deprecated: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        if deprecated:
            grouped = group_legacy(
                {**deprecated, "collection": collection, "windows": windows, "compute": compute},
                "GSAMMonitor", valid=MONITOR_KEYWORDS, stacklevel=2,
            )
            collection, windows, compute = grouped["collection"], grouped["windows"], grouped["compute"]
        self.config = config = MonitorConfig.build(
            model, every_n_steps=every_n_steps, metrics=metrics, collection=collection, windows=windows,
            compute=compute, alerts=alerts, process_group=process_group,
        )
        self.model = model
        self.targets: list[LayerTarget] = resolve_layers(model, layers, ignore)
        config.check_budget(self.targets)
        self._faults = Faults(strict)
        self._fanout = SinkFanout(
            _sink_entries(sinks, log_dir, ranks.is_writer(config.process_group)),
            lambda: ranks.is_writer(config.process_group),
            lambda sink, err: self._faults.error("sink", sink, err, outcome="it is disabled"),
        )
        warn_if_frequent(config.every_n_steps, stacklevel=2)
        self.schedule = Schedule(config.every_n_steps, config.collect_steps, config.auto_collect)
        self._windows = WindowStore(
            config, self.targets, self._faults.warn_once,
            lambda key, err: self._faults.error(
                "flush", repr(layer_key(*key)), err, outcome="its rows stay in its buffer for the next flush"
            ),
        )
        self.owners = config.layer_owners(self.targets)
        mine = ranks.group_rank(config.process_group)
        collected = [t for t in self.targets if self.owners is None or self.owners[t.name] == mine]
        self._capture = ActivationCapture(
            model, collected, config.phases, self._windows, seed=config.seed + ranks.global_rank(),
            max_tokens=config.max_tokens_per_layer, on_error=self._faults.hook_error,
            warn_once=self._faults.warn_once, attention=self._windows.probes.attention, selection=self.targets,
            logits=self._windows.probes.logits, logit_head=config.logit_partition,
        )
        self._logs = WindowLogger(
            config, self.layer_names, self._windows, self._fanout, self._faults, own=[t.name for t in collected]
        )
        self._hooks = HookSwitch(self.schedule, self._capture.switch)
        self.step_count = 0

    every_n_steps = _setting("every_n_steps")
    window = _setting("window")
    ema_half_life = _setting("ema_half_life")
    collect_steps = _setting("collect_steps")
    max_tokens_per_layer = _setting("max_tokens_per_layer")
    metric_names = _setting("metric_names")
    phases = _setting("phases")
    state_dtype = _setting("state_dtype")
    product_dtype = _setting("product_dtype")
    seed = _setting("seed")
    max_state_bytes = _setting("max_state_bytes")
    spectrum_every_n_logs = _setting("spectrum_every_n_logs")
    process_group = _setting("process_group")
    background = _setting("background")
    reservoir_size = _setting("reservoir_size")
    heldout = _setting("heldout")
    reference = _setting("reference")

    errors = _view("_faults", "errors", "Monitor problems caught so far (hooks, metrics, sinks); training went on.")
    n_logs = _view("_logs", "n_logs", "Logs made so far.")
    last_metrics = _view("_logs", "last_metrics", "What the last log wrote (kept after ``close()``).")
    missing_layers = _view("_logs", "missing_layers", "The layers the last log found without activations.")
    fired_alerts = _view("_logs.diagnostics", "alerts", "Every alert fired so far (dicts, in step order).")
    alerts = _view("_logs.diagnostics", "alerts", "``fired_alerts`` (an alias kept for existing code).")
    sinks = _view("_fanout", "sinks", "The sinks, built from ``sinks=``.")
    hooks_registered = _view(
        "_capture", "registered", "Whether hooks are on the model right now (once a compiled graph has traced them, "
        "they stay registered while attached; ``collect_steps`` then switches a flag)."
    )

    @property
    def layer_names(self) -> list[str]:
        """The monitored layers' keys, in selection order."""
        return [t.name for t in self.targets]

    @property
    def attached(self) -> bool:
        """Whether the monitor is attached (its hooks may still be parked by ``collect_steps``)."""
        return self._hooks.attached

    def attach(self) -> GSAMMonitor:
        """Start monitoring: register the hooks (now, or when ``collect_steps`` says so).

        Returns the monitor, a context manager: ``with monitor.attach():`` closes it at the end.
        A model already run under ``torch.compile`` (a warm-up, a resumed run) has compiled
        code that does not call hooks added later: Dynamo's compiled code is then dropped once,
        so that the next call recompiles with the hooks.
        """
        if not self._hooks.attached:
            self._capture.attach_pending = True
        self._hooks.attached = True
        self._hooks.update(self.step_count)
        return self

    def detach(self) -> None:
        """Stop monitoring and remove every hook (idempotent). The statistics are kept, so
        that a later ``attach()`` continues the windows; ``close()`` frees them."""
        self._hooks.attached = False
        self._capture.remove()

    def close(self, *, free: bool = True) -> None:
        """Detach, write a log still being computed, close the sinks (flushing TensorBoard
        files) and free the statistics (idempotent).

        Args:
            free: Free the statistics, held-out fits and reservoir samples (default). Leaving
                ``with monitor:`` closes with ``free=False``, so that ``compute()``, ``stats()``
                and ``sample()`` still read the run's windows after the block; the memory goes
                with the monitor object, or at ``close()``. ``last_metrics`` is always kept.
        """
        self.detach()
        self.flush()
        self._logs.write_quantization()
        self._logs.shutdown()
        self._fanout.close()
        if free:
            self._windows.clear()

    def __enter__(self) -> GSAMMonitor:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.close(free=False)

    def collect(self) -> CollectHandle:
        """Keep the hooks collecting training forwards too, whatever ``collect_steps`` says (e.g.
        a probe between two logs; evaluation forwards are always collected), until the returned
        handle is closed: ``with monitor.collect():`` or ``handle = monitor.collect()`` ... ``handle.close()``."""
        return CollectHandle(self, self._hooks.hold(lambda: self.step_count))

    # ------------------------------------------------------------------ logs
    @torch.inference_mode(False)  # windows cloned or created here must stay ordinary tensors
    def step(self, global_step: int | None = None) -> dict[str, float] | None:
        """Count one optimizer step; on schedule compute, sync, log and start a new window.

        Args:
            global_step: The trainer's step count, when it keeps one (resumed runs, gradient
                accumulation); ``None`` adds one to the monitor's own count.

        Returns:
            The metrics written to the sinks during this call (``{"gsam/encoder.layer.0": ...}``):
            on a logging step, or with ``background=True`` when an earlier log's computation
            finished; else None. Under ``torch.distributed`` the metrics are written on the
            process group's rank zero only; the other ranks compute the windows they own and
            get ``{}`` on a logging step.

        Raises:
            ValueError: if ``global_step`` is not a non-negative int.
        """
        self._hooks.started = True
        self._capture.report_unreadable()  # seen by compiled graphs, which cannot warn
        if global_step is None:
            self.step_count += 1
        else:
            if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
                raise ValueError(f"global_step must be a non-negative int or None; got {global_step!r}.")
            self.step_count = int(global_step)
        result = self._logs.on_step(self.step_count, self.schedule)
        if self.window == "ema":  # after the log: the newest step's data enters the next log with weight 1
            self._windows.decay(self.config.ema_factor)
        self._hooks.update(self.step_count)
        return result

    @torch.inference_mode(False)
    def log(self, global_step: int | None = None, *, phases: Sequence[str] | None = None) -> dict[str, float]:
        """Compute, sync, write to the sinks and advance the window now, off schedule.

        Args:
            global_step: The step to log at (default: the monitor's step count).
            phases: Only these phases (default: all monitored phases).

        Returns:
            The flat metrics written (finite values only), ``{}`` when nothing was collected
            or on a rank that does not write (see ``step``).

        Raises:
            ValueError: a phase that is not monitored.
        """
        step = self.step_count if global_step is None else int(global_step)
        phases = self.config.check_phases(phases)
        return self._logs.log(phases, step, self.step_count)

    def flush(self) -> dict[str, float]:
        """Wait for a log being computed in the background and write it; ``{}`` if none."""
        return self._logs.flush()

    @torch.inference_mode(False)
    def compute(self, phase: str | None = None) -> dict[str, dict[str, float]]:
        """The current window's metrics per layer, without logging or resetting.

        Args:
            phase: ``"train"`` or ``"eval"`` for that phase's layers under their plain names;
                ``None`` for every phase with data, eval layers keyed ``"{layer}/eval"``.

        Returns:
            ``{layer: {metric: value}}`` for the layers that saw data (NaN where undefined).

        Raises:
            ValueError: a phase that is not monitored.
        """
        phases = self.config.check_phases(None if phase is None else [phase])
        windows = self._windows.synced(phases, in_place=False)
        refs = self._windows.references_for(windows)
        return current_metrics(windows, refs, self.metric_names, plain=phase is not None)

    @torch.inference_mode(False)
    def pin_reference(self, phases: str | Sequence[str] | None = None) -> list[str]:
        """Pin each layer's current window (summed over ranks: call it on every rank) as the
        reference of ``heldout_loglik`` and the drift metrics until the next pin; it restarts
        empty, unlogged. Returns the layer keys pinned (windows of at least 2 rows).

        Raises:
            ValueError: with ``reference="previous"``, an unmonitored phase, or no window of 2 rows.
        """
        return [layer_key(*key) for key in self._windows.pin(self.config.check_phases(phases))]

    def outliers(self, layer: str, phase: str = "train") -> list[dict[str, Any]]:
        """The outlier dimensions of ``layer`` by index (``metrics.outlier_ratios`` > 10, the rule
        of ``outlier_dims``), over the logs so far: ``{dim, first_step, peak_ratio, peak_step,
        last_step, active}`` per index ever flagged."""
        return self._logs.diagnostics.outliers(layer, phase)

    def quantization_summary(self, phase: str = "train") -> dict[str, dict[str, Any]]:
        """Per layer, the int8 absmax round-off of its last logged window
        (``metrics.int8_absmax_error``: scale, expected squared error, SQNR, also without the
        outlier dimensions) and those dimensions. ``close()`` writes it as ``int8_*`` scalars.

        Raises:
            ValueError: a phase that is not monitored.
        """
        return self._logs.diagnostics.quantization_summary(self.config.check_phases([phase]))

    def memory_report(self, world_size: int | None = None, *, ranks_per_node: int | None = None) -> dict[str, Any]:
        """The memory plan per rank (``gsam_monitor.memory_report``) for this monitor's layers
        (with the widths seen so far where the model did not tell them), and what it holds now.

        Args:
            world_size: The ranks to plan for (default: the process group's size).
            ranks_per_node: Ranks sharing a host, for ``host_bytes_per_node`` (default: all).

        Returns:
            The plan (``device_bytes``, ``host_bytes``, ``host_bytes_per_node``, ``layers``, ...)
            and ``"held": {"device_bytes", "host_bytes"}``: the bytes of the buffers and of
            the host state (totals, references, samples) right now.
        """
        seen = self._windows.widths()
        targets = [t if t.dim is not None or t.name not in seen else replace(t, dim=seen[t.name]) for t in self.targets]
        world = ranks.world_size(self.process_group) if world_size is None else world_size
        mine = ranks.group_rank(self.process_group) if world_size is None and self.config.shard_layers else None
        plan = self.config.plan(targets, world_size=world, ranks_per_node=ranks_per_node, rank=mine)
        plan["held"] = self._windows.held_bytes()
        return plan

    # ------------------------------------------------------------------ state
    def stats(self, layer: str, phase: str = "train") -> LayerStats | None:
        """The live statistics of ``layer`` in ``phase`` (``None`` before its first activation)."""
        return self._windows.window((layer, phase))

    def sample(self, layer: str, phase: str = "train") -> ReservoirSample | None:
        """The ``ReservoirSample`` of ``layer`` in ``phase`` (``reservoir_size=`` must be set);
        ``None`` before its first activation. ``.values()`` gives the values as numpy fp64.

        Raises:
            ValueError: if the monitor was built without ``reservoir_size``.
        """
        if self.reservoir_size is None:
            raise ValueError(
                "sample: this monitor collects no reservoir sample; construct it with "
                "GSAMMonitor(..., collection=CollectOptions(reservoir_size=200_000))."
            )
        return self._windows.sample((layer, phase))

    @torch.inference_mode(False)
    def reset(self) -> None:
        """Drop the statistics of every window and the held-out fits (the step count stays)."""
        self._windows.reset()

    @torch.inference_mode(False)
    def state_dict(self) -> dict[str, Any]:
        """The monitor's state: tensors and plain values only, so that
        ``torch.load(path, weights_only=True)`` can read it back. A log still being computed
        in the background is waited for and written first."""
        self._logs.settle()  # a log still being computed reaches the sinks (or, sharded, waits) first
        return {
            "format": STATE_FORMAT,
            "version": 1,
            "layers": self.layer_names,
            "window": self.window,
            "step_count": self.step_count,
            **self._logs.state_dict(),
            "errors": self.errors,
            **self._windows.state_dict(),  # stats, reference, samples
            "sampler": self._capture.sampler.state_dict(),
        }

    @torch.inference_mode(False)
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` output (e.g. from a checkpoint) to continue the windows.

        A state saved with the higher moments (``anisotropy``, ``mean_kurtosis`` selected) loads
        into a monitor whose ``metrics=`` needs none: they are dropped.

        Raises:
            ValueError: if it is not a monitor state, or was saved for other layers, another
                ``reservoir_size``, or without the higher moments that ``metrics=`` needs.
        """
        check_state(state_dict, self.layer_names, self.metric_names)
        self._windows.load_windows(state_dict)
        self.step_count = int(state_dict["step_count"])
        self._logs.load_state_dict(state_dict)
        self._faults.errors = int(state_dict["errors"])
        self._capture.sampler.load_state_dict(state_dict["sampler"])
        self._windows.load_samples(state_dict.get("samples", {}))
        self._hooks.update(self.step_count)

    def __repr__(self) -> str:
        return (
            f"GSAMMonitor(layers={len(self.targets)}, every_n_steps={self.every_n_steps}, window={self.window!r}, "
            f"phases={self.phases}, step={self.step_count}, attached={self.attached})"
        )


def memory_report(
    model: nn.Module,
    world_size: int = 1,
    *,
    ranks_per_node: int | None = None,
    layers: LayerSpec | Iterable[LayerSpec] = "auto",
    ignore: LayerSpec | Iterable[LayerSpec] | None = None,
    every_n_steps: int = 100,
    metrics: str | Iterable[str] = "default",
    collection: CollectOptions | Mapping[str, Any] | None = None,
    windows: WindowOptions | Mapping[str, Any] | None = None,
    compute: ComputeOptions | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The memory a ``GSAMMonitor`` of ``model`` with these options would plan, per rank, without
    building one and without the budget check ("will it fit on 64 ranks?" asked from one process;
    a model built on the meta device is fine, and is planned as on a data-centre GPU).

    Returns:
        ``{"device_bytes": planned device peak (buffers + workspace), "host_bytes": host state,
        "host_bytes_per_node": for ``ranks_per_node`` ranks (default: all on one node),
        "world_size", "ranks_per_node", "workspace_bytes", "layers": {name: {"dim",
        "device_bytes", "host_bytes"}}, "unknown_layers": [names whose width the model does not
        tell]}``.

    Raises:
        ValueError, TypeError: what ``GSAMMonitor`` would raise for these arguments.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    world = positive_int(world_size, "world_size", " (the number of ranks to plan for)")
    config = MonitorConfig.build(
        model, every_n_steps=every_n_steps, metrics=metrics, collection=collection, windows=windows,
        compute=compute, alerts=None, process_group=None,
    )
    return config.plan(resolve_layers(model, layers, ignore), world_size=world, ranks_per_node=ranks_per_node)


MONITOR_KEYWORDS = tuple(
    name
    for name, p in inspect.signature(GSAMMonitor.__init__).parameters.items()
    if name not in ("self", "model") and p.kind is not inspect.Parameter.VAR_KEYWORD
)
"""``GSAMMonitor``'s arguments after ``model`` by name (``layers`` and the keyword-only ones)."""
