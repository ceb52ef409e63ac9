"""The rules that see slow growth: a band around the baseline frozen at the end of the warm-up
(``method="fixed"``) and a one-sided CUSUM of robust z-scores against it (``method="cusum"``),
each against a hand computation in numpy; both continue exactly across ``state_dict``."""

from __future__ import annotations

import numpy as np
import pytest

from gsam_monitor import AlertRule
from gsam_monitor.monitor.alerts import MAD_TO_SD, AlertEngine


def _series(rng: np.random.Generator, n: int = 120, slope: float = 0.02) -> np.ndarray:
    """Noise of sd 0.1 around 1.0 for 10 logs, then a slow rise of ``slope`` per log."""
    x = 1.0 + 0.1 * rng.standard_normal(n)
    x[10:] += slope * np.arange(1, n - 9)
    return x


def _run(engine: AlertEngine, values: np.ndarray, start: int = 0) -> list[int]:
    steps = []
    for i, v in enumerate(values[start:], start):
        steps += [a["step"] for a in engine.observe(i, "l", "train", {"anisotropy": v})]
    return steps


def test_a_fixed_band_alerts_on_slow_growth_where_the_rolling_band_follows(rng: np.random.Generator) -> None:
    x = _series(rng)
    median = np.median(x[:10])
    half = max(6 * MAD_TO_SD * np.median(np.abs(x[:10] - median)), 0.0, 0.05)
    expected = int(np.flatnonzero((x > median + half) & (np.arange(len(x)) >= 10))[0])
    fixed = AlertEngine([AlertRule("anisotropy", "up", method="fixed", min_relative=0.0, min_absolute=0.05)])
    assert _run(fixed, x)[0] == expected
    alert = fixed.alerts[0]
    assert alert["baseline"] == pytest.approx(median, rel=1e-12)
    assert alert["band"][1] == pytest.approx(median + half, rel=1e-12)
    rolling = AlertEngine([AlertRule("anisotropy", "up", method="band", min_relative=0.0, min_absolute=0.05)])
    late = _run(rolling, x)
    assert late == [] or late[0] >= expected + 20, (expected, late)


def _hand_cusum(x: np.ndarray, h: float, k: float, floor: float, window: int = 10, cooldown: int = 10) -> list[int]:
    """The CUSUM, by hand: baseline from the ``window`` values before the first check, and again
    from the cool-down's values after each alert."""
    s, quiet, out, base = 0.0, 0, [], None
    for i in range(window, len(x)):
        if quiet:
            quiet -= 1
            continue
        if base is None:
            median = np.median(x[i - window : i])
            base = (median, max(MAD_TO_SD * np.median(np.abs(x[i - window : i] - median)), floor))
        s = max(0.0, s + (x[i] - base[0]) / base[1] - k)
        if s > h:
            out.append(i)
            s, quiet, base = 0.0, cooldown, None
    return out


@pytest.mark.parametrize(("h", "k"), [(8.0, 0.5), (4.0, 1.0)])
def test_cusum_alerts_where_the_hand_computed_sum_crosses(rng: np.random.Generator, h: float, k: float) -> None:
    x = _series(rng, slope=0.005)
    engine = AlertEngine([AlertRule("anisotropy", "up", method="cusum", threshold=h, drift=k, min_relative=0.0,
                                    min_absolute=0.01)])
    got = _run(engine, x)
    assert got == _hand_cusum(x, h, k, 0.01) and len(got) >= 2  # re-baselined after each alert
    # The same excess never leaves a band of 6 MADs around the frozen baseline so early.
    fixed = AlertEngine([AlertRule("anisotropy", "up", method="fixed", min_relative=0.0, min_absolute=0.01)])
    assert _run(fixed, x)[0] > got[0]


def test_a_downward_cusum_sums_the_other_side(rng: np.random.Generator) -> None:
    x = 2.0 - (_series(rng, slope=0.005) - 1.0)
    engine = AlertEngine([AlertRule("anisotropy", "down", method="cusum", threshold=8.0, min_relative=0.0,
                                    min_absolute=0.01)])
    assert _run(engine, x) == _hand_cusum(2.0 - x, 8.0, 0.5, 0.01)


@pytest.mark.parametrize("method", ["fixed", "cusum"])
def test_frozen_baselines_and_sums_continue_across_state_dict(rng: np.random.Generator, method: str) -> None:
    x = _series(rng, slope=0.005)
    rule = AlertRule("anisotropy", "up", method=method, threshold=6.0, min_relative=0.0, min_absolute=0.01)
    whole = AlertEngine([rule])
    _run(whole, x)
    first = AlertEngine([rule])
    _run(first, x[:37])
    resumed = AlertEngine([rule])
    resumed.load_state_dict(first.state_dict())
    _run(resumed, x, start=37)
    assert resumed.alerts == whole.alerts and whole.alerts


def test_bad_cusum_settings_fail_naming_the_field() -> None:
    with pytest.raises(ValueError, match="threshold > 0"):
        AlertEngine([AlertRule("anisotropy", method="cusum", threshold=0.0)])
    with pytest.raises(ValueError, match="drift must be"):
        AlertEngine([AlertRule("anisotropy", method="cusum", drift=-1.0)])
    with pytest.raises(ValueError, match="warmup of at least 3"):
        AlertEngine([AlertRule("anisotropy", method="fixed", warmup=2)])


def test_an_attention_rule_without_attention_entropy_fails_at_setup_naming_the_option() -> None:
    from gsam_monitor import GSAMMonitor
    from tests.tiny_models import Stack

    with pytest.raises(ValueError, match=r"CollectOptions\(attention_entropy=True\)"):
        GSAMMonitor(Stack(dim=4, depth=1), "auto", sinks=[], alerts=["attn_entropy_min"])
    default = GSAMMonitor(Stack(dim=4, depth=1), "auto", sinks=[])  # the default rule is left out quietly
    assert "attn_entropy_min" not in {r.metric for r in default.config.alert_rules}


def test_warm_up_and_cool_down_counted_in_steps() -> None:
    """Logs every 100 steps: a 10-log warm-up would stay quiet until step 1,000; warmup_steps=300
    alerts at the first log from step 300 with a baseline of 3 logs, and cooldown_steps=500
    keeps the stream quiet until step 800."""
    values = [1.0, 1.02, 0.98, 5.0, 5.0, 1.0, 1.0, 1.0, 5.0, 1.0, 1.0, 5.0]  # logs at steps 0, 100, ...
    rule = AlertRule("anisotropy", "up", warmup_steps=300, cooldown_steps=500, min_relative=0.0, min_absolute=0.5)
    engine = AlertEngine([rule])
    fired = [a["step"] for i, v in enumerate(values) for a in engine.observe(100 * i, "l", "train", {"anisotropy": v})]
    # 300: the first alert (baseline 1.0 from three logs); 400 falls in the cool-down, which ends
    # at 800, where 5.0 alerts again; 1100 falls in the next one (until 1300).
    assert fired == [300, 800]
    by_logs = AlertEngine([AlertRule("anisotropy", "up", min_relative=0.0, min_absolute=0.5)])
    for i, v in enumerate(values):
        by_logs.observe(100 * i, "l", "train", {"anisotropy": v})
    assert [a["step"] for a in by_logs.alerts] == [1100]  # the 10-log warm-up hides 300 and 800
    with pytest.raises(ValueError, match=r"cooldown_steps must be an int >= 0 \(steps\)"):
        AlertEngine([AlertRule("anisotropy", cooldown_steps=-5)])
