"""The outlier-dimension rule compares a dimension's magnitude with the layer's typical magnitude
(root mean square against the median root mean square, less a sampling margin), never a noise
with a noise: it is quiet on stationary streams, zero-mean or off-centre, at any width, and
names a dimension that becomes massive at the first log after."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from gsam_monitor import CollectOptions, GSAMMonitor
from gsam_monitor.metrics import outlier_ratios
from gsam_monitor.metrics.scores import outlier_ratios_from_moments
from gsam_monitor.stats import LayerStats
from tests.tiny_models import Stack

FACTOR = 10.0


def _numpy_ratios(x: np.ndarray) -> np.ndarray:
    var, mean = x.var(0), x.mean(0)
    square = var + mean**2
    se = np.sqrt((2 * var**2 + 4 * mean**2 * var) / len(x))
    median = np.sort(square)[(square.size - 1) // 2]
    return np.sqrt(np.clip(square - 4 * se, 0, None) / median)


def test_the_rule_equals_numpy_on_stored_rows(rng: np.random.Generator) -> None:
    x = rng.standard_normal((500, 48)) * rng.uniform(0.5, 2.0, 48) + rng.normal(0, 3, 48)
    x[:, 5] = 400.0 + 0.1 * rng.standard_normal(500)  # a nearly constant massive dimension
    x[:, 9] *= 50.0
    stats = LayerStats(48)
    stats.update(torch.from_numpy(x))
    got = outlier_ratios(stats).numpy()
    np.testing.assert_allclose(got, _numpy_ratios(x), rtol=1e-9, atol=1e-12)
    assert set(np.flatnonzero(got > FACTOR)) == {5, 9}


@pytest.mark.parametrize("d", [16, 384, 4096])
@pytest.mark.parametrize("centre", ["zero", "scattered", "offset"])
@pytest.mark.parametrize("n", [32, 256])
def test_simulated_stationary_windows_flag_nothing(d: int, centre: str, n: int) -> None:
    """200 windows of n Gaussian rows per width, drawn from the exact sampling distributions of
    the window's means and variances; the spreads differ by up to 4x between dimensions."""
    rng = np.random.default_rng(d + n)
    sigma = rng.uniform(0.5, 2.0, d)
    mu = {"zero": np.zeros(d), "scattered": rng.normal(0.0, 3.0, d), "offset": np.full(d, 100.0)}[centre]
    worst = 0.0
    for _ in range(200):
        mean = mu + sigma / np.sqrt(n) * rng.standard_normal(d)
        var = sigma**2 * rng.chisquare(n - 1, d) / n
        ratios = outlier_ratios_from_moments(torch.from_numpy(mean), torch.from_numpy(var), n)
        worst = max(worst, float(ratios.max()))
    assert worst < FACTOR / 2  # far from the threshold, not just under it


def _monitor(model: torch.nn.Module) -> GSAMMonitor:
    """A log at every step (the rules see one log per window whatever its length)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", r"GSAMMonitor\(every_n_steps=1\)", UserWarning)
        return GSAMMonitor(
            model,
            "auto",
            every_n_steps=1,
            sinks=[],
            collection=CollectOptions(max_tokens_per_layer=None, phases="train"),
        )


@pytest.mark.parametrize("d", [16, 384])
@pytest.mark.parametrize("centre", ["zero", "offset"])
def test_default_alerts_stay_quiet_on_200_logs_of_stationary_rows(d: int, centre: str) -> None:
    rng = np.random.default_rng(d)
    mu = np.zeros(d) if centre == "zero" else rng.normal(5.0, 3.0, d)
    model = Stack(dim=d, depth=1)
    monitor = _monitor(model)
    with monitor:
        for _ in range(200):
            model(torch.from_numpy(rng.standard_normal((256, d)) + mu))
            monitor.step()
    assert monitor.step_count == 200
    assert monitor.fired_alerts == []


def test_a_dimension_that_becomes_massive_is_named_at_the_first_log_after() -> None:
    rng = np.random.default_rng(3)
    d = 64
    model = Stack(dim=d, depth=1)
    monitor = _monitor(model)
    with monitor:
        for step in range(1, 41):
            x = rng.standard_normal((256, d))
            if step > 25:
                x[:, 17] += 40.0
            model(torch.from_numpy(x))
            monitor.step()
    new = [(a["step"], a["dims"]) for a in monitor.fired_alerts if a["kind"] == "new_outlier_dim"]
    assert new == [(26, [17])]
    assert min(a["step"] for a in monitor.fired_alerts) == 26  # nothing before it


def test_max_dim_rms_is_the_largest_dimensions_root_mean_square(rng: np.random.Generator) -> None:
    from gsam_monitor import metrics

    x = rng.standard_normal((300, 24)) + rng.normal(0, 2, 24)
    x[:, 11] = 250.0 + 3.0 * rng.standard_normal(300)
    stats = LayerStats(24)
    stats.update(torch.from_numpy(x))
    expected = float(np.sqrt((x**2).mean(0)).max())  # mean square = var + mean², per dimension
    assert metrics.compute(stats, names=["max_dim_rms"])["max_dim_rms"] == pytest.approx(expected, rel=1e-10)
    assert "max_dim_rms" not in metrics.DEFAULT_METRICS  # asked for by name (metrics=[..., "max_dim_rms"])
