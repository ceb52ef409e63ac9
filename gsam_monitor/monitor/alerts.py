"""Geometry alerts: a value that leaves the robust band of its own recent past.

``AlertEngine`` is pure: it sees one log's metrics of one layer and phase at a time
(``observe(step, layer, phase, metrics)``) and returns the alerts they raise, so it runs
inside ``GSAMMonitor`` (``alerts="default"``) and offline on logged series alike
(``examples/instability.py`` replays it). Per (layer, phase, metric) it keeps the last
``window`` finite values and, for each rule:

* ``method="band"``: the baseline is their median m and the spread the scaled MAD
  σ̂ = 1.4826 · median|x - m| (a consistent estimate of the sd for Gaussian noise; Rousseeuw &
  Croux 1993). The band is m ± h with h = max(threshold · σ̂, min_relative · |m|, min_absolute):
  the floors keep a nearly constant series (MAD ≈ 0) from alerting on rounding. A value
  outside the band on the rule's side (``direction``) alerts.
* ``method="above"``: no baseline; a value above ``threshold`` alerts (non-finite rows).
* ``method="fixed"``: the band of ``"band"``, but around the median and MAD of the first
  ``window`` values, frozen at the end of the warm-up: a slow drift that the rolling band would
  follow is measured against where the series started. After an alert the baseline is frozen
  again from the values of the cool-down, so that a lasting change alerts once.
* ``method="cusum"``: a one-sided CUSUM (Page 1954) of robust z-scores against that frozen
  baseline, z = (x - m) / s with s = max(1.4826 · MAD, min_relative · |m|, min_absolute):
  S = max(0, S + z - drift) (z of the rule's side; both sides kept for ``"both"``) alerts when
  S > ``threshold`` and restarts at 0 (re-baselined as ``"fixed"``). It accumulates a small,
  lasting excess that no single log shows.

Each (layer, phase, metric) is quiet during its first ``warmup`` observations (default
``window``: the baseline needs them) and for ``cooldown`` observations after an alert, so a
lasting change raises one alert, never a storm; every value, alerting or not, enters the
baseline, so after a lasting shift the band moves to the new level. ``state_dict`` holds the
baselines and counters (plain values only): a resumed run alerts as an uninterrupted one.

Why median/MAD over the last k logs and not a change-point test (CUSUM): on the tiny GPT's
logged series (``examples/instability.py``, docs/guides/diagnostics.md, benchmarks/RESULTS.md) the
band rules raised 3 alerts in 800 stable steps (3.75 per 1,000) against 13.75-27.5 for a
one-sided CUSUM on the same robust z-scores (h = 10, 5), whose accumulation of small
deviations fires on the slow, legitimate drift of training; on the diverging runs both alert
at the first log after the onset (CUSUM h = 10 earlier by 3-4 steps in 2 of 5 runs). The
band also needs no per-metric noise model. The band follows a slow rise, though (a quarter of the
rises of ``benchmarks/alert_rates.py`` never alert): ``"fixed"`` and ``"cusum"`` rules, which
compare with the frozen baseline, see them; their false-alert rates on stationary series are in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from statistics import NormalDist
from typing import Any

from gsam_monitor._validate import is_positive_int, with_suggestion

__all__ = ["ALERT_METRICS", "DEFAULT_RULES", "AlertEngine", "AlertRule", "parse_alert_rules"]

MAD_TO_SD = 1.0 / NormalDist().inv_cdf(0.75)
"""1 / Φ⁻¹(3/4) = 1.4826...: the scaled MAD estimates the standard deviation of Gaussian noise."""

ALERT_METRICS: tuple[str, ...] = (
    "effective_rank",
    "anisotropy",
    "top1_variance_fraction",
    "outlier_dims",
    "max_dim_rms",
    "mean_kurtosis",
    "nonfinite",
    "new_outlier_dims",
    "attn_entropy",
    "attn_entropy_min",
    "attn_logit_max",
    "logit_lse_mean",
    "logit_lse_max",
)
"""The metrics a rule can watch (``new_outlier_dims``: dimensions flagged for the first time
in the run, from the monitor's outlier tracker; ``attn_entropy`` and ``attn_entropy_min``: the
mean and the lowest head's attention entropy, ``attn_logit_max``: the largest attention logit
over heads, with ``CollectOptions(attention_entropy=True)``; ``logit_lse_mean`` and
``logit_lse_max``: the mean and the largest log-partition of the output logits' sampled tokens,
with ``CollectOptions(logit_partition=True)``)."""

DIRECTIONS = ("up", "down", "both")
METHODS = ("band", "above", "fixed", "cusum")
FROZEN = ("fixed", "cusum")
"""The methods that compare with the baseline frozen at the end of the warm-up."""


@dataclass(frozen=True)
class AlertRule:
    """One alert rule: which metric, which side, how wide a band, how long to stay quiet.

    Args:
        metric: One of ``ALERT_METRICS``.
        direction: ``"up"`` (alert above the band), ``"down"`` (below) or ``"both"``.
        kind: The alert's name (``"rank_collapse"``, ...); default ``"{metric}_{direction}"``.
        method: ``"band"`` (median ± h of the last ``window`` values), ``"above"``
            (value > ``threshold``, no baseline), ``"fixed"`` (the band of the first ``window``
            values, frozen) or ``"cusum"`` (a CUSUM of z-scores against that frozen baseline).
        threshold: Band and fixed: the half-width in scaled MADs; above: the limit; cusum: the
            decision interval h (in z units) the sum must exceed.
        min_relative: Band and fixed: the half-width is at least this fraction of |median|;
            cusum: the z unit s is at least this fraction of |median|.
        min_absolute: Band and fixed: the half-width is at least this much; cusum: s is at least this.
        window: Values in the baseline (k logs).
        drift: Cusum: the allowance k subtracted from each z-score (half the shift, in z units,
            it is tuned to detect).
        warmup: Observations before the first alert; default ``window`` (0 for ``"above"``), or
            3 (the least a baseline needs) when ``warmup_steps`` is given.
        cooldown: Observations after an alert during which this (layer, phase, metric) is quiet.
        warmup_steps: No alert at a log of a step below this (training steps, whatever the log
            interval: at ``every_n_steps=100`` the default 10-log warm-up lasts 1,000 steps).
        cooldown_steps: After an alert at step s, quiet until step s + ``cooldown_steps``; it
            replaces ``cooldown`` when given.
    """

    metric: str
    direction: str = "both"
    kind: str = ""
    method: str = "band"
    threshold: float = 6.0
    min_relative: float = 0.1
    min_absolute: float = 0.0
    window: int = 10
    warmup: int | None = None
    cooldown: int = 10
    drift: float = 0.5
    warmup_steps: int | None = None
    cooldown_steps: int | None = None

    @property
    def name(self) -> str:
        """The alert kind (``kind``, or one made from the metric and direction)."""
        return self.kind or f"{self.metric}_{self.direction}"

    @property
    def quiet_start(self) -> int:
        """Observations before this rule may alert."""
        if self.warmup is not None:
            return self.warmup
        if self.method == "above":
            return 0
        return 3 if self.warmup_steps is not None else self.window


DEFAULT_RULES: tuple[AlertRule, ...] = (
    AlertRule("effective_rank", "down", "rank_collapse", threshold=6.0, min_relative=0.25),
    AlertRule("anisotropy", "up", "anisotropy_jump", threshold=6.0, min_absolute=0.1),
    AlertRule("top1_variance_fraction", "up", "dominant_direction", threshold=6.0, min_absolute=0.1),
    AlertRule("outlier_dims", "up", "outlier_dims_jump", threshold=6.0, min_absolute=2.0),
    AlertRule("mean_kurtosis", "up", "kurtosis_jump", threshold=6.0, min_relative=0.5, min_absolute=1.0),
    AlertRule("nonfinite", "up", "nonfinite_rows", method="above", threshold=0.0),
    AlertRule("new_outlier_dims", "up", "new_outlier_dim", method="above", threshold=0.0, warmup=10, cooldown=0),
    AlertRule("attn_entropy_min", "down", "attention_collapse", method="fixed", threshold=6.0, min_relative=0.25),
    AlertRule(
        "attn_logit_max", "up", "attention_logit_growth", method="fixed", threshold=6.0, min_relative=1.0,
        min_absolute=0.5,
    ),
    AlertRule(
        "logit_lse_max", "up", "output_logit_growth", method="fixed", threshold=6.0, min_relative=1.0,
        min_absolute=5.0,
    ),
    AlertRule(
        "logit_lse_mean", "down", "output_logit_drift", method="fixed", threshold=6.0, min_relative=1.0,
        min_absolute=5.0,
    ),
)
"""``alerts="default"``: rank collapse, anisotropy jump, a dominant direction, more outlier
dimensions, heavier tails, non-finite rows, a dimension that becomes an outlier for the
first time (after the warm-up; no cool-down: an index is new only once, so each new one is
reported and the alerts of a layer are at most d) and, where attention entropy is measured, a
head whose entropy collapses (the lowest head's mean entropy a quarter below where it was at the
end of the warm-up: a fixed baseline, since a collapse is gradual and a rolling band follows it)
and attention logits that grow (the largest logit above twice where it was at the end of the
warm-up, and at least 0.5 above it: the margin is far outside a stationary run's spread, a few per
cent, so the rule is quiet on noise; ``tests/test_attention_logits.py`` pins 0 alerts) and, where
the output logits' log-partition is measured, a log-partition that grows (the largest log Z above
twice where it was at the end of the warm-up, and at least 5 nats above it: the output-logit
divergence that z-loss prevents; quiet on noise, ``tests/test_logit_partition.py`` pins 0 alerts)
or drifts down (the mean log Z below where it was at the end of the warm-up by its own size, and
by at least 5 nats: the logits going very negative, the divergence Wortsman et al. 2023 report)."""


def _rule(spec: Any, index: int) -> AlertRule:
    """One entry of ``alerts=`` as a checked ``AlertRule``."""
    where = f"alerts[{index}]"
    if isinstance(spec, AlertRule):
        rule = spec
    elif isinstance(spec, str):
        if spec not in ALERT_METRICS:
            raise ValueError(
                f"{where}: unknown metric {with_suggestion(spec, ALERT_METRICS)}. Alerts watch "
                f"{', '.join(ALERT_METRICS)}; pass a name, an AlertRule or a dict such as "
                f"{{'metric': 'effective_rank', 'direction': 'down', 'threshold': 6}}."
            )
        return next(r for r in DEFAULT_RULES if r.metric == spec)
    elif isinstance(spec, Mapping):
        known = {f.name for f in fields(AlertRule)}
        unknown = [k for k in spec if k not in known]
        if unknown:
            said = ", ".join(with_suggestion(str(k), known) for k in unknown)
            raise ValueError(f"{where}: unknown rule field(s) {said}; an alert rule takes {', '.join(sorted(known))}.")
        if "metric" not in spec:
            raise ValueError(f"{where}: the rule needs a 'metric' (one of {', '.join(ALERT_METRICS)}).")
        rule = AlertRule(**spec)
    else:
        raise TypeError(
            f"{where}: an alert rule must be a metric name, an AlertRule or a dict; got {type(spec).__name__}."
        )
    _check(rule, where)
    return rule


def _check(rule: AlertRule, where: str) -> None:
    """Raise on a rule that could never work, naming the field and the fix."""
    if rule.metric not in ALERT_METRICS:
        raise ValueError(
            f"{where}: unknown metric {with_suggestion(rule.metric, ALERT_METRICS)}; alerts watch "
            f"{', '.join(ALERT_METRICS)}."
        )
    if rule.direction not in DIRECTIONS:
        raise ValueError(f"{where}: direction must be one of {DIRECTIONS}; got {rule.direction!r}.")
    if rule.method not in METHODS:
        raise ValueError(f"{where}: method must be one of {METHODS}; got {rule.method!r}.")
    for name in ("threshold", "min_relative", "min_absolute", "drift"):
        value = getattr(rule, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{where}: {name} must be a finite number >= 0; got {value!r}.")
    if rule.method == "band" and rule.threshold == 0 and rule.min_relative == 0 and rule.min_absolute == 0:
        raise ValueError(
            f"{where}: a band of width 0 alerts on every change; give threshold > 0 (in scaled MADs), "
            f"min_relative or min_absolute."
        )
    if rule.method == "cusum" and rule.threshold == 0:
        raise ValueError(f"{where}: a cusum rule needs threshold > 0 (the decision interval, in z units).")
    least = 1 if rule.method == "above" else 3
    if not is_positive_int(rule.window) or rule.window < least:
        raise ValueError(
            f"{where}: window must be an int >= {least} for a method={rule.method!r} rule (logs in the baseline); "
            f"got {rule.window!r}."
        )
    for name in ("warmup", "cooldown", "warmup_steps", "cooldown_steps"):
        value = getattr(rule, name)
        if value is None and name != "cooldown":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            unit = "steps" if name.endswith("_steps") else "logs"
            raise ValueError(f"{where}: {name} must be an int >= 0 ({unit}); got {value!r}.")
    if rule.method != "above" and rule.quiet_start < 3:
        raise ValueError(
            f"{where}: a {rule.method} rule needs a warmup of at least 3 logs to have a baseline; got {rule.warmup!r}."
        )


def parse_alert_rules(alerts: str | Iterable[Any] | None) -> tuple[AlertRule, ...]:
    """The ``alerts=`` argument as checked rules: ``"default"``, ``None`` (none) or a list of
    metric names, ``AlertRule`` objects or dicts of ``AlertRule`` fields.

    Raises:
        ValueError: an unknown metric, field, direction or method, or a rule that cannot work
            (a band of width 0, a window under 3, a negative cool-down), naming the entry.
        TypeError: ``alerts`` of another type.
    """
    if alerts is None:
        return ()
    if isinstance(alerts, str):
        if alerts == "default":
            return DEFAULT_RULES
        raise ValueError(
            f"alerts must be 'default', None or a list of rules; got {alerts!r}. For one metric pass a list: "
            f"alerts=[{alerts!r}]."
        )
    if isinstance(alerts, (AlertRule, Mapping)) or not isinstance(alerts, Iterable):
        raise TypeError(
            f"alerts must be 'default', None or a list of rules (metric names, AlertRule objects or dicts); "
            f"got {type(alerts).__name__}."
        )
    rules = tuple(_rule(spec, i) for i, spec in enumerate(alerts))
    seen: set[tuple[str, str]] = set()
    for i, rule in enumerate(rules):
        if (rule.metric, rule.name) in seen:
            raise ValueError(
                f"alerts[{i}]: a second rule of kind {rule.name!r} on {rule.metric!r}; give it another kind=."
            )
        seen.add((rule.metric, rule.name))
    return rules


@dataclass
class _Stream:
    """What one (layer, phase, metric) remembers."""

    history: deque[float]
    seen: int = 0
    quiet: int = 0  # observations left in the cool-down
    quiet_until: int = 0  # the first step after a cool-down counted in steps
    frozen: dict[str, list[float]] = field(default_factory=dict)  # rule kind -> [median, MAD] at warm-up end
    sums: dict[str, list[float]] = field(default_factory=dict)  # rule kind -> CUSUM [up, down]


class AlertEngine:
    """Robust-band alerts over per-layer metric series (see the module docstring).

    Args:
        rules: ``"default"``, ``None`` or a list of rules (``parse_alert_rules``).

    Attributes:
        rules: The checked rules.
        alerts: Every alert raised so far, in order.

    Raises:
        ValueError, TypeError: a bad rule (``parse_alert_rules``).

    Example::

        engine = AlertEngine("default")
        for step, values in logged:              # values: {"effective_rank": 12.3, ...}
            for alert in engine.observe(step, "gpt_neox.layers.3", "train", values):
                print(alert["kind"], alert["step"], alert["value"], alert["band"])
    """

    def __init__(self, rules: str | Iterable[Any] | None = "default") -> None:
        self.rules: tuple[AlertRule, ...] = parse_alert_rules(rules)
        self.alerts: list[dict[str, Any]] = []
        self._streams: dict[tuple[str, str, str], _Stream] = {}
        self._by_metric: dict[str, list[AlertRule]] = {}
        for rule in self.rules:
            self._by_metric.setdefault(rule.metric, []).append(rule)

    def __repr__(self) -> str:
        return f"AlertEngine({len(self.rules)} rules, {len(self.alerts)} alerts)"

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics the rules watch."""
        return tuple(dict.fromkeys(r.metric for r in self.rules))

    def observe(self, step: int, layer: str, phase: str, metrics: Mapping[str, float]) -> list[dict[str, Any]]:
        """Feed one log of one layer and phase; returns the alerts it raises (also kept in ``alerts``).

        Args:
            step: The log's step.
            layer: The layer's name.
            phase: ``"train"`` or ``"eval"``.
            metrics: ``{metric: value}``; missing and non-finite values are skipped (they
                neither alert nor enter the baseline).

        Returns:
            Dicts ``{step, layer, phase, metric, value, baseline, band, kind}``: ``baseline``
            the median (``None`` for ``"above"`` rules), ``band`` ``[low, high]`` (±inf on the
            side that never alerts).
        """
        raised: list[dict[str, Any]] = []
        for metric, rules in self._by_metric.items():
            value = metrics.get(metric)
            if value is None:
                continue
            value = float(value)
            if not math.isfinite(value):
                continue
            width = max(r.window for r in rules)
            stream = self._streams.get((layer, phase, metric))
            if stream is None:
                stream = self._streams[(layer, phase, metric)] = _Stream(deque(maxlen=width))
            alert = self._check_stream(stream, rules, step, layer, phase, metric, value)
            stream.history.append(value)
            stream.seen += 1
            if alert is not None:
                raised.append(alert)
        self.alerts.extend(raised)
        return raised

    def _check_stream(
        self, stream: _Stream, rules: Sequence[AlertRule], step: int, layer: str, phase: str, metric: str, value: float
    ) -> dict[str, Any] | None:
        """The first rule on this metric that fires (one alert per metric and log), or None."""
        if stream.quiet > 0:
            stream.quiet -= 1
            return None
        if step < stream.quiet_until:
            return None
        for rule in rules:
            if stream.seen < rule.quiet_start or (rule.warmup_steps is not None and step < rule.warmup_steps):
                continue
            if rule.method in FROZEN and rule.name not in stream.frozen:
                stream.frozen[rule.name] = list(_median_mad(list(stream.history)[-rule.window :]))
            extra: dict[str, Any] = {}
            if rule.method == "cusum":
                baseline, low, high, total = _cusum(rule, stream, value)
                fires = total > rule.threshold
                extra["cusum"] = total
            else:
                baseline, low, high = _band(rule, stream)
                fires = (rule.direction in ("up", "both") and value > high) or (
                    rule.direction in ("down", "both") and value < low
                )
            if fires:
                if rule.cooldown_steps is None:
                    stream.quiet = rule.cooldown
                else:
                    stream.quiet_until = int(step) + rule.cooldown_steps
                if rule.method in FROZEN:  # a lasting change alerts once: re-baseline after the cool-down
                    stream.frozen.pop(rule.name, None)
                    stream.sums.pop(rule.name, None)
                return extra | {
                    "step": int(step),
                    "layer": layer,
                    "phase": phase,
                    "metric": metric,
                    "value": value,
                    "baseline": baseline,
                    "band": [low, high],
                    "kind": rule.name,
                }
        return None

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Baselines, counters and the alerts so far: plain values only (``weights_only`` loads it)."""
        return {
            "rules": [asdict(r) for r in self.rules],
            "streams": [
                {"layer": layer, "phase": phase, "metric": metric, "history": list(s.history), "seen": s.seen,
                 "quiet": s.quiet, "quiet_until": s.quiet_until, "frozen": {k: list(v) for k, v in s.frozen.items()},
                 "sums": {k: list(v) for k, v in s.sums.items()}}
                for (layer, phase, metric), s in self._streams.items()
            ],
            "alerts": [dict(a, band=list(a["band"])) for a in self.alerts],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state_dict()`` output (the rules are this engine's own).

        Raises:
            ValueError: if ``state`` is not an alert engine's state.
        """
        if not isinstance(state, Mapping) or "streams" not in state or "alerts" not in state:
            raise ValueError("AlertEngine.load_state_dict: not an AlertEngine.state_dict() (it lacks 'streams').")
        widths: dict[str, int] = {}
        for rule in self.rules:
            widths[rule.metric] = max(widths.get(rule.metric, 0), rule.window)
        self._streams = {}
        for entry in state["streams"]:
            width = widths.get(entry["metric"], len(entry["history"]) or 1)
            self._streams[(entry["layer"], entry["phase"], entry["metric"])] = _Stream(
                deque((float(v) for v in entry["history"]), maxlen=width),
                seen=int(entry["seen"]),
                quiet=int(entry["quiet"]),
                quiet_until=int(entry.get("quiet_until", 0)),
                frozen={k: [float(x) for x in v] for k, v in entry.get("frozen", {}).items()},
                sums={k: [float(x) for x in v] for k, v in entry.get("sums", {}).items()},
            )
        self.alerts = [dict(a) for a in state["alerts"]]


def _median_mad(history: Sequence[float]) -> tuple[float, float]:
    ordered = sorted(history)
    median = _median(ordered)
    return median, _median(sorted(abs(v - median) for v in ordered))


def _cusum(rule: AlertRule, stream: _Stream, value: float) -> tuple[float, float, float, float]:
    """Advance ``rule``'s CUSUM on ``stream`` by ``value``: (baseline, low, high, the sum on the
    rule's side), ``low``/``high`` the levels beyond which a value adds to the sum."""
    median, mad = stream.frozen[rule.name]
    unit = max(MAD_TO_SD * mad, rule.min_relative * abs(median), rule.min_absolute)
    if not unit > 0:
        unit = math.ulp(max(abs(median), 1.0))  # a constant baseline: any change is many z units
    z = (value - median) / unit
    up, down = stream.sums.get(rule.name, [0.0, 0.0])
    up, down = max(0.0, up + z - rule.drift), max(0.0, down - z - rule.drift)
    stream.sums[rule.name] = [up, down]
    total = {"up": up, "down": down, "both": max(up, down)}[rule.direction]
    return (median, *_sides(rule, median, rule.drift * unit), total)


def _band(rule: AlertRule, stream: _Stream) -> tuple[float | None, float, float]:
    """(baseline, low, high) of ``rule`` on ``stream``: around the median and MAD of the last
    ``window`` values, or of the frozen ones of a ``"fixed"`` rule."""
    if rule.method == "above":
        return None, -math.inf, float(rule.threshold)
    if rule.method == "fixed":
        median, mad = stream.frozen[rule.name]
    else:
        median, mad = _median_mad(list(stream.history)[-rule.window :])
    half = max(rule.threshold * MAD_TO_SD * mad, rule.min_relative * abs(median), rule.min_absolute)
    return (median, *_sides(rule, median, half))


def _sides(rule: AlertRule, median: float, half: float) -> tuple[float, float]:
    """(low, high) = median ∓ half on the rule's side(s); ±inf on the side that never alerts."""
    low = median - half if rule.direction in ("down", "both") else -math.inf
    high = median + half if rule.direction in ("up", "both") else math.inf
    return low, high


def _median(ordered: Sequence[float]) -> float:
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
