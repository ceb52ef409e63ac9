"""Geometry alerts: the engine's band against numpy/scipy, a synthetic collapse through the
monitor, a stationary stream, warm-up and cool-down, resume, the sinks, and bad rule specs."""

from __future__ import annotations

import itertools
import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from gsam_monitor import GSAMMonitor, JsonlSink, LoggingSink, TensorBoardSink, WandbSink
from gsam_monitor.monitor.alerts import DEFAULT_RULES, AlertEngine, AlertRule, parse_alert_rules
from tests.options import with_defaults
from tests.tiny_models import Stack

D = 16


def _monitor(model: torch.nn.Module, **kwargs) -> GSAMMonitor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # every_n_steps < 10 in tests
        kwargs = with_defaults(kwargs, collection={"steps": None, "max_tokens_per_layer": None})
        return GSAMMonitor(model, "auto", **kwargs)


def _effective_rank(x: np.ndarray) -> float:
    lam = np.clip(np.linalg.eigvalsh(np.cov(x.T, ddof=0)), 0, None)
    p = lam[lam > 0] / lam.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def _full_rank(rng: np.random.Generator, n: int = 200) -> np.ndarray:
    return rng.standard_normal((n, D)) @ np.diag(np.linspace(0.5, 2.0, D)) + 1.0


def _rank_one(rng: np.random.Generator, v: np.ndarray, n: int = 200) -> np.ndarray:
    return np.outer(rng.standard_normal(n) * 3, v) + 1.0  # (n, D) of rank 1 around the same mean


def test_band_is_numpy_median_and_scipy_scaled_mad(rng: np.random.Generator) -> None:
    rule = AlertRule("effective_rank", "both", "r", threshold=3.0, min_relative=0.0, window=8, cooldown=0)
    engine = AlertEngine([rule])
    values = rng.standard_normal(300) + 10.0
    values[[50, 120, 121, 200]] += [8.0, -9.0, 7.5, 12.0]
    raised = {}
    for step, v in enumerate(values):
        for alert in engine.observe(step, "L", "train", {"effective_rank": v}):
            raised[step] = alert
    expected = []
    for step in range(8, len(values)):
        past = values[step - 8 : step]
        med = np.median(past)
        half = 3.0 * scipy.stats.median_abs_deviation(past, scale="normal")
        if abs(values[step] - med) > half:
            expected.append(step)
            assert raised[step]["baseline"] == pytest.approx(med, rel=1e-12)
            assert raised[step]["band"] == pytest.approx([med - half, med + half], rel=1e-12)
    assert sorted(raised) == expected
    assert {50, 120, 200} <= set(expected)  # the injected jumps (121 follows 120 inside its window)


def test_synthetic_collapse_alerts_at_the_first_log_after_it(rng: np.random.Generator) -> None:
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, every_n_steps=5)
    v = rng.standard_normal(D)
    collapse = 78  # the covariance drops from rank D to rank 1 after this step; logs at 5, 10, ...
    windows, current = {}, []
    with monitor:
        for step in range(1, 101):
            x = _full_rank(rng) if step <= collapse else _rank_one(rng, v)
            current.append(x)
            model(torch.from_numpy(x))
            monitor.step()
            if step % 5 == 0:
                windows[step], current = np.concatenate(current), []
    first = [a for a in monitor.alerts if a["metric"] == "effective_rank"]
    assert first and first[0]["step"] == 80 and first[0]["kind"] == "rank_collapse"
    assert min(a["step"] for a in monitor.alerts) == 80  # nothing before the collapse
    ranks = {step: _effective_rank(x) for step, x in windows.items()}
    assert first[0]["value"] == pytest.approx(ranks[80], rel=1e-9)
    assert first[0]["baseline"] == pytest.approx(np.median([ranks[s] for s in range(30, 80, 5)]), rel=1e-9)
    kinds = {a["kind"] for a in monitor.alerts if a["step"] == 80}
    assert {"rank_collapse", "dominant_direction"} <= kinds
    assert monitor.last_metrics.get("alert/effective_rank/blocks.0") is None  # only at the alert's log
    # One alert per (layer, metric) in the cool-down: the collapse lasts, it is not repeated.
    assert len(first) == 1


def test_a_stationary_stream_of_200_logs_raises_none(rng: np.random.Generator) -> None:
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, every_n_steps=2)
    with monitor:
        for _ in range(400):
            model(torch.from_numpy(_full_rank(rng, 100)))
            monitor.step()
    assert monitor.n_logs == 200
    assert monitor.alerts == []


def test_warmup_and_cooldown() -> None:
    rule = AlertRule("anisotropy", "up", "jump", threshold=6.0, min_absolute=0.05, window=5, cooldown=3)
    engine = AlertEngine([rule])
    flat = [0.10, 0.11, 0.10, 0.90, 0.10]  # a jump inside the warm-up: quiet
    jumps = [0.10, 0.10, 0.10, 0.10, 0.10, 0.80, 0.85, 0.90, 0.95, 0.99, 0.10, 0.10, 0.10, 0.10, 0.10, 0.90]
    steps = {}
    for i, v in enumerate(flat + jumps):
        steps[i] = engine.observe(i, "L", "train", {"anisotropy": v})
    fired = [i for i, a in steps.items() if a]
    # 10: first jump after the warm-up; 11-13 cool-down; 14 (0.99) is within the band the new
    # values built (median 0.85); 20: the next jump, after values fell back.
    assert fired == [10, 20]
    assert steps[10][0]["band"][0] == -math.inf and steps[10][0]["baseline"] == pytest.approx(0.10)
    # The non-finite rule has no baseline and no warm-up: it fires at once.
    nan_engine = AlertEngine(["nonfinite"])
    assert nan_engine.observe(1, "L", "train", {"nonfinite": 3})[0]["kind"] == "nonfinite_rows"
    assert nan_engine.observe(2, "L", "train", {"nonfinite": 3}) == []  # cool-down
    # Missing and non-finite values neither alert nor enter the baseline.
    assert engine.observe(99, "L", "train", {"anisotropy": float("nan")}) == []
    assert engine.observe(99, "L", "eval", {}) == []


def test_resume_alerts_as_the_uninterrupted_run(tmp_path: Path, rng: np.random.Generator) -> None:
    v = rng.standard_normal(D)
    data = [_full_rank(rng) if step <= 63 else _rank_one(rng, v) for step in range(1, 101)]

    def run(steps: range, monitor: GSAMMonitor, model: torch.nn.Module) -> None:
        with monitor:
            for step in steps:
                model(torch.from_numpy(data[step - 1]))
                monitor.step()

    model = Stack(dim=D, depth=1)
    whole = _monitor(model, every_n_steps=3)
    run(range(1, 101), whole, model)
    assert whole.alerts
    first = _monitor(model, every_n_steps=3)
    run(range(1, 51), first, model)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    second = _monitor(model, every_n_steps=3)
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    run(range(51, 101), second, model)
    key = [(a["step"], a["layer"], a["kind"], a.get("dims")) for a in whole.alerts]
    assert [(a["step"], a["layer"], a["kind"], a.get("dims")) for a in second.alerts] == key
    for resumed, straight in zip(second.alerts, whole.alerts, strict=True):
        assert resumed["value"] == pytest.approx(straight["value"], rel=1e-9)
        assert resumed["band"] == pytest.approx(straight["band"], rel=1e-9)
    assert second.outliers("blocks.0") == whole.outliers("blocks.0")


def test_engine_state_dict_round_trip() -> None:
    engine = AlertEngine("default")
    for i in range(12):
        engine.observe(i, "L", "train", {"effective_rank": 10.0 + 0.1 * (i % 3)})
    clone = AlertEngine("default")
    clone.load_state_dict(json.loads(json.dumps(engine.state_dict())))
    for i in range(12, 20):
        values = {"effective_rank": 2.0 if i == 15 else 10.0}
        assert clone.observe(i, "L", "train", values) == engine.observe(i, "L", "train", values)
    with pytest.raises(ValueError, match=r"not an AlertEngine\.state_dict"):
        clone.load_state_dict({"rules": []})


def test_sinks_get_alert_flags_warnings_jsonl_tensorboard_and_wandb(
    tmp_path: Path, rng: np.random.Generator, caplog: pytest.LogCaptureFixture
) -> None:
    class FakeRun:
        step = None

        def __init__(self) -> None:
            self.logged, self.alerts, self.summary = [], [], {}

        def define_metric(self, *args, **kwargs) -> None:
            return None

        def log(self, data, commit=None) -> None:
            self.logged.append(data)

        def alert(self, title, text, level) -> None:
            self.alerts.append((title, text, level))

    clock = itertools.count(0.0, 200.0)  # each W&B alert call 200 s after the last
    run = FakeRun()
    written = []
    sinks = [
        LoggingSink(),
        JsonlSink(tmp_path / "m.jsonl"),
        TensorBoardSink(tmp_path / "tb"),
        WandbSink(run, alert_every_s=300, clock=lambda: next(clock)),
        lambda m, s: written.append((s, dict(m))),
    ]
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, every_n_steps=5, sinks=sinks)
    v = rng.standard_normal(D)
    caplog.set_level(logging.WARNING, logger="gsam_monitor.sinks")
    with monitor:
        for step in range(1, 171):
            collapsed = 78 < step <= 120 or step > 150
            model(torch.from_numpy(_rank_one(rng, v) if collapsed else _full_rank(rng)))
            monitor.step()
    steps = sorted({a["step"] for a in monitor.alerts})
    assert steps[0] == 80 and len(steps) >= 3  # the collapse, the recovery, the second collapse
    for s, m in written:
        flags = {k for k in m if k.startswith("alert/")}
        assert flags == {f"alert/{a['metric']}/blocks.0" for a in monitor.alerts if a["step"] == s}
        assert all(m[k] == 1.0 for k in flags)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == len(monitor.alerts) and "rank_collapse: effective_rank of blocks.0" in warned[0]
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    jsonl_alerts = [a for line in lines if "alerts" in line for a in line["alerts"]]
    assert [a["kind"] for a in jsonl_alerts] == [a["kind"] for a in monitor.alerts]
    assert jsonl_alerts[0]["band"][1] is None  # +inf as null: strict JSON
    listed = [line["outliers"]["blocks.0"] for line in lines if "outliers" in line]
    assert all(a != b for a, b in itertools.pairwise([[], *listed]))  # a line only when the list changes
    # W&B: one notification per log with alerts, at most one per 300 s; the held-back are counted.
    assert len(run.alerts) == (len(steps) + 1) // 2 and run.alerts[0][2] == "WARN" and "step 80" in run.alerts[0][0]
    assert "held back" in run.alerts[1][1]
    assert run.summary["outliers/blocks.0"] == [r["dim"] for r in monitor.outliers("blocks.0") if r["active"]]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = acc.Tensors("alerts/text_summary")
    assert [t.step for t in texts] == steps
    assert b"rank_collapse" in texts[0].tensor_proto.string_val[0]


def test_wandb_alert_limit_must_be_non_negative() -> None:
    with pytest.raises(ValueError, match=r"alert_every_s=\) must be seconds >= 0 or None"):
        WandbSink(object(), alert_every_s=-1)


def test_default_rules_follow_the_metric_selection() -> None:
    model = Stack(dim=4, depth=1)
    monitor = _monitor(model, metrics=["gsam", "effective_rank"])
    assert {r.metric for r in monitor.config.alert_rules} == {"effective_rank", "nonfinite", "new_outlier_dims"}
    assert _monitor(model, alerts=None).config.alert_rules == ()


@pytest.mark.parametrize(
    ("alerts", "error", "match"),
    [
        ("loud", ValueError, r"alerts must be 'default', None or a list of rules; got 'loud'"),
        ({"metric": "anisotropy"}, TypeError, r"alerts must be 'default', None or a list of rules"),
        (3, TypeError, r"alerts must be 'default', None or a list of rules"),
        (
            ["effective_rnak"], ValueError,
            r"alerts\[0\]: unknown metric 'effective_rnak' \(did you mean 'effective_rank'",
        ),
        ([{"metric": "anisotropy", "treshold": 3}], ValueError, r"unknown rule field\(s\) 'treshold' \(did you mean"),
        ([{"direction": "up"}], ValueError, r"alerts\[0\]: the rule needs a 'metric'"),
        ([1.5], TypeError, r"alerts\[0\]: an alert rule must be a metric name, an AlertRule or a dict; got float"),
        ([AlertRule("gsam")], ValueError, r"alerts\[0\]: unknown metric 'gsam'"),
        ([AlertRule("anisotropy", "sideways")], ValueError, r"direction must be one of"),
        ([AlertRule("anisotropy", method="zscore")], ValueError, r"method must be one of"),
        ([AlertRule("anisotropy", threshold=-1)], ValueError, r"threshold must be a finite number >= 0"),
        ([AlertRule("anisotropy", threshold=0, min_relative=0)], ValueError, r"a band of width 0 alerts on every"),
        ([AlertRule("anisotropy", window=2)], ValueError, r"window must be an int >= 3 for a method='band' rule"),
        (
            [AlertRule("nonfinite", method="above", window=0)], ValueError,
            r"alerts\[0\]: window must be an int >= 1 for a method='above' rule \(logs in the baseline\); got 0\.",
        ),
        ([AlertRule("anisotropy", cooldown=-1)], ValueError, r"cooldown must be an int >= 0"),
        ([AlertRule("anisotropy", warmup=1)], ValueError, r"needs a warmup of at least 3 logs"),
        (["anisotropy", {"metric": "anisotropy", "direction": "up", "kind": "anisotropy_jump"}], ValueError,
         r"alerts\[1\]: a second rule of kind 'anisotropy_jump'"),
    ],
)
def test_bad_rule_specs_fail_at_setup_naming_the_argument(alerts, error, match) -> None:
    with pytest.raises(error, match=match):
        _monitor(Stack(dim=4, depth=1), alerts=alerts)


def test_a_rule_on_a_metric_not_computed_fails_at_setup() -> None:
    with pytest.raises(ValueError, match=r"alerts: a rule watches 'anisotropy', which metrics= does not compute"):
        _monitor(Stack(dim=4, depth=1), metrics=["gsam"], alerts=["anisotropy"])


@pytest.mark.parametrize(
    ("metric", "option"),
    [("attn_entropy_min", "attention_entropy=True"), ("attn_logit_max", "attention_entropy=True"),
     ("logit_lse_mean", "logit_partition=True"), ("logit_lse_max", "logit_partition=True")],
)
def test_a_rule_on_a_probe_metric_without_its_option_names_the_option(metric, option) -> None:
    with pytest.raises(ValueError, match=rf"alerts: a rule watches '{metric}', which is measured only with "
                                         rf"collection=CollectOptions\({option}\); turn it on or drop the rule"):
        _monitor(Stack(dim=4, depth=1), alerts=[metric])


def test_parse_rules_default_and_none() -> None:
    assert parse_alert_rules("default") == DEFAULT_RULES
    assert parse_alert_rules(None) == ()
    assert parse_alert_rules(["effective_rank"])[0].name == "rank_collapse"
    assert AlertRule("anisotropy", "up").name == "anisotropy_up"
    assert repr(AlertEngine()) == "AlertEngine(11 rules, 0 alerts)"
