"""The report of closed windows: their metrics as flat scalars, and what went wrong, as data.

``build_report`` is pure: it reads only its arguments, writes nothing and warns about
nothing, so it runs as well on the background thread as inline. What deserves a warning
(an empty window, layers that saw no activation, rows dropped for NaN/Inf) and the errors
of single layers come back in the ``LogResult``; the monitor issues them when it publishes
the result.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from gsam_monitor import metrics
from gsam_monitor.metrics.scores import outlier_ratios_from_moments
from gsam_monitor.monitor.attention import attention_report
from gsam_monitor.monitor.logit_partition import logit_partition_report
from gsam_monitor.monitor.reference import Reference
from gsam_monitor.sinks.keys import META_PREFIX, layer_key, metric_key
from gsam_monitor.stats import LayerStats

__all__ = ["DimStats", "LogResult", "build_report", "current_metrics"]

Key = tuple[str, str]


@dataclass(frozen=True)
class DimStats:
    """A window's per-dimension numbers for the outlier tracker and the quantization summary
    (fp64, CPU, length d): ``metrics.outlier_ratios``, mean, MLE variance and the abs-max
    (``None`` without higher moments)."""

    ratios: torch.Tensor
    mean: torch.Tensor
    variance: torch.Tensor
    absmax: torch.Tensor | None


@dataclass
class LogResult:
    """One log's output, computed inline or on the background thread.

    Attributes:
        step: The step the log belongs to.
        flat: ``{"gsam/encoder.layer.0": value, ...}``: finite values only.
        spectra: Covariance eigenvalues per layer key, when the log sends a spectrum.
        missing: Layer keys that saw no activation in the window.
        errors: ``(exception, kind, where)`` of what failed (``faults.KINDS``: a layer's
            ``"metrics"``, the whole ``"log"``).
        warnings: ``(warn-once key, message)`` pairs to warn about.
        fits: Each window's own ``GaussianFit`` (when the log asks for them): the next log's
            held-out reference, made from the spectrum this log computed.
        values: Every metric per (layer, phase), non-finite values included (for the alerts).
        dims: Per-dimension numbers per (layer, phase) (``DimStats``).
    """

    step: int
    flat: dict[str, float] = field(default_factory=dict)
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    errors: list[tuple[BaseException, str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    fits: dict[Key, metrics.GaussianFit] = field(default_factory=dict)
    values: dict[Key, dict[str, float]] = field(default_factory=dict)
    dims: dict[Key, DimStats] = field(default_factory=dict)


def build_report(
    windows: Mapping[Key, LayerStats],
    refs: Mapping[Key, Reference],
    *,
    layers: Sequence[str],
    phases: Sequence[str],
    metric_names: Sequence[str],
    disabled: Collection[str],
    step: int,
    want_spectrum: bool,
    probes: Mapping[str, Mapping[Key, torch.Tensor]] | None = None,
    want_fits: bool = False,
    owned: Collection[Key] | None = None,
    active: Collection[str] | None = None,
) -> LogResult:
    """Every metric of the windows (``metrics.compute``), keyed for the sinks.

    Args:
        windows: The synced windows by (layer, phase).
        refs: The held-out fit of each window (``None`` where there is none).
        layers: The monitored layers, in order.
        phases: The monitored phases, in order.
        metric_names: The selected metrics.
        disabled: Layers left out (over the memory budget): not reported.
        step: The step the log belongs to (in messages).
        want_spectrum: Return each layer's eigenvalues too.
        probes: The closed probe windows by kind (``WindowStore.close_probes``): ``"attention"``
            (``attention_entropy=True``) and ``"logit_partition"`` (``logit_partition=``).
        want_fits: Return each window's ``GaussianFit`` too (held-out references).
        owned: Compute the metrics of these windows only (default all): under
            torch.distributed each rank computes the windows it owns; the others need only
            their (summed) ``count`` and ``nonfinite`` here.
        active: The phases that saw data anywhere (default: those of ``windows``): with sharded
            layers a rank whose own layers saw nothing still reports them missing.
    """
    result = LogResult(step)
    attention_values: dict[Key, dict[str, float]] = {}
    attention, logits = (probes or {}).get("attention"), (probes or {}).get("logit_partition")
    if attention:
        flat, attention_values, warned = attention_report(attention)
        result.flat.update(flat)
        result.warnings.extend(warned)
    if logits:
        flat, logit_values = logit_partition_report(logits)
        result.flat.update(flat)
        attention_values.update(logit_values)
    counts = {key: float(stats.count) for key, stats in windows.items()}
    # Rows dropped for NaN/Inf, read here at log time (the hook path never syncs).
    nonfinite = {key: int(stats.nonfinite) for key, stats in windows.items()}
    if active is None:
        active = {ph for (_, ph), n in counts.items() if n > 0} | {ph for (_, ph), k in nonfinite.items() if k > 0}
    if not active:
        result.warnings.append(
            (
                "empty-window",
                f"GSAMMonitor: no activations were captured in the window ending at step {step} (none "
                f"reached the monitored layers, or every token was padding); is the model called between steps, "
                f"and is the monitor attached (attach() or `with monitor:`)?",
            )
        )
        return result
    for phase in phases:
        if phase not in active:
            continue
        n_missing = 0
        for layer in layers:
            key = (layer, phase)
            if layer in disabled:
                continue
            if counts.get(key, 0.0) <= 0 and nonfinite.get(key, 0) > 0:
                # The layer fired, but every row held NaN/Inf: report that, not "missing".
                result.flat[metric_key("n", layer, phase)] = 0.0
                result.flat[metric_key("nonfinite", layer, phase)] = float(nonfinite[key])
                result.values[key] = {"n": 0.0, "nonfinite": float(nonfinite[key])}
                continue
            if counts.get(key, 0.0) <= 0:
                n_missing += 1
                result.missing.append(layer_key(layer, phase))
                continue
            if owned is None or key in owned:
                _add_layer(result, windows[key], refs[key], layer, phase, metric_names, want_spectrum, want_fits)
        result.flat[metric_key(META_PREFIX, "missing_layers", phase)] = float(n_missing)
    if result.missing:
        result.warnings.append(
            (
                "missing:" + ",".join(result.missing),
                f"GSAMMonitor: no activations reached {', '.join(result.missing)} in the window ending at step "
                f"{step}; reported as missing ('{META_PREFIX}/missing_layers'), nothing logged for them.",
            )
        )
    dropped = [f"{layer_key(name, ph)}: {k}" for (name, ph), k in nonfinite.items() if k > 0 and name not in disabled]
    if dropped:
        result.warnings.append(
            (
                "nonfinite",
                f"GSAMMonitor: rows holding NaN/Inf activations were dropped in the window ending at step "
                f"{step} ({', '.join(dropped)}); they are left out of every metric and counted in "
                f"'nonfinite/{{layer}}'. Training goes on; later ones are only counted.",
            )
        )
    for key, values in attention_values.items():  # alertable like the layer's own metrics
        result.values.setdefault(key, {}).update(values)
    return result


def _add_layer(
    result: LogResult,
    stats: LayerStats,
    ref: Reference,
    layer: str,
    phase: str,
    metric_names: Sequence[str],
    want_spectrum: bool,
    want_fit: bool,
) -> None:
    """One layer's metrics into ``result`` (its error instead, when they fail)."""
    try:
        values = metrics.compute(stats, ref(), names=metric_names, with_spectrum=True, with_fit=want_fit)
    except Exception as err:
        result.errors.append((err, "metrics", repr(layer_key(layer, phase))))
        return
    for metric, value in values.items():
        value = float(value)
        if math.isfinite(value):  # NaN/inf never reach a sink
            result.flat[metric_key(metric, layer, phase)] = value
    result.values[(layer, phase)] = {k: float(v) for k, v in values.items()}
    if want_spectrum and values.spectrum is not None:
        result.spectra[layer_key(layer, phase)] = values.spectrum
    if values.fit is not None:
        result.fits[(layer, phase)] = values.fit
    if float(stats.count) >= 2:
        cpu = torch.device("cpu")
        mean, variance = stats.mean.to(cpu, torch.float64), stats.variance().to(cpu, torch.float64)
        result.dims[(layer, phase)] = DimStats(
            ratios=outlier_ratios_from_moments(mean, variance, float(stats.count)),
            mean=mean,
            variance=variance,
            absmax=stats.absmax.to(cpu, torch.float64) if stats.higher_moments else None,
        )


def current_metrics(
    windows: Mapping[Key, LayerStats],
    refs: Mapping[Key, Reference],
    metric_names: Sequence[str],
    *,
    plain: bool,
) -> dict[str, dict[str, float]]:
    """``{layer: {metric: value}}`` of the windows that saw data (NaN where undefined); eval
    layers keyed ``"{layer}/eval"`` unless ``plain`` (one phase: the plain layer names)."""
    return {
        name if plain else layer_key(name, ph): metrics.compute(
            stats, refs[(name, ph)](), names=metric_names
        )
        for (name, ph), stats in windows.items()
        if float(stats.count) > 0
    }

