"""Tests of gsam_monitor.analysis.distributions on synthetic data with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from gsam_monitor.analysis import (
    DEFAULT_FAMILIES,
    ReservoirSample,
    analyze_layer,
    find_modes,
    fit_families,
    plot_distribution,
    tail_fractions,
)

# --------------------------------------------------------------------------- reservoir


def _stream_batches(n: int, sizes: list[int]) -> list[torch.Tensor]:
    """0..n-1 as float64 (n_i, 1) batches of cycling sizes (uneven on purpose)."""
    out, start, i = [], 0, 0
    while start < n:
        size = min(sizes[i % len(sizes)], n - start)
        out.append(torch.arange(start, start + size, dtype=torch.float64).reshape(-1, 1))
        start += size
        i += 1
    return out


def test_reservoir_keeps_everything_in_order_below_capacity():
    x = torch.randn(3, 7, 5, dtype=torch.float64)
    sample = ReservoirSample(200, dims=[4, 1], dim_capacity=50, dtype=torch.float64)
    sample.update(x[:2])
    sample.update(x[2:])
    np.testing.assert_array_equal(sample.values(), x.reshape(-1).numpy())
    np.testing.assert_array_equal(sample.values(dim=4), x[..., 4].reshape(-1).numpy())
    np.testing.assert_array_equal(sample.values(dim=1), x[..., 1].reshape(-1).numpy())
    assert sample.count == 105 and sample.dim_count(4) == 21
    assert sample.values().dtype == np.float64


def test_reservoir_is_bounded_and_without_replacement():
    sample = ReservoirSample(300, dims=[2], dim_capacity=40, dtype=torch.float64)
    d = 4
    for start in range(0, 4000, 250):  # 4000 rows x 4 dims, value = row * d + col
        rows = torch.arange(start, start + 250, dtype=torch.float64)
        sample.update(rows[:, None] * d + torch.arange(d))
    pooled = sample.values()
    assert pooled.size == 300 and sample.count == 16_000
    assert np.unique(pooled).size == 300
    assert np.all((pooled >= 0) & (pooled < 16_000) & (pooled == np.round(pooled)))
    dim2 = sample.values(dim=2)
    assert dim2.size == 40 and np.unique(dim2).size == 40
    assert np.all(dim2 % d == 2)  # every value comes from dimension 2
    assert sample._pooled.shape == (1, 301)  # memory is the capacity, not the stream


def test_reservoir_inclusion_is_uniform():
    # Every element of a stream of n must be kept with probability capacity / n. Pool the
    # inclusion counts of 200 seeded runs into 20 bins of 100 consecutive indices (2000
    # expected per bin) and chi-square them; with uneven batch sizes the fill phase, the
    # batch boundaries and the replacement phase all have to be right.
    n, capacity, runs = 2000, 200, 200
    batches = _stream_batches(n, [1, 7, 300, 64, 513])
    hits = np.zeros(n)
    for seed in range(runs):
        sample = ReservoirSample(capacity, seed=seed, dtype=torch.float64)
        for b in batches:
            sample.update(b)
        kept = sample.values().astype(int)
        assert np.unique(kept).size == capacity
        hits[kept] += 1
    binned = hits.reshape(20, 100).sum(axis=1)
    assert binned.sum() == runs * capacity
    p_value = stats.chisquare(binned).pvalue
    assert p_value > 1e-3, (p_value, binned)
    # And one run's sample is uniform over the stream (KS on positions).
    assert stats.kstest((kept + 0.5) / n, "uniform").pvalue > 1e-3


def test_reservoir_per_dim_streams_are_uniform():
    # Two tracked dims share the vectorised update; each must see only its own stream.
    n_rows, cap = 5000, 500
    x = torch.arange(n_rows, dtype=torch.float64)[:, None] * 10 + torch.arange(3)
    sample = ReservoirSample(10, dims=[0, 2], dim_capacity=cap, seed=3, dtype=torch.float64)
    for start in range(0, n_rows, 700):
        sample.update(x[start : start + 700])
    for dim in (0, 2):
        vals = sample.values(dim=dim)
        assert vals.size == cap and np.all(vals % 10 == dim)
        rows = (vals - dim) / 10
        assert np.unique(rows).size == cap
        assert stats.kstest((rows + 0.5) / n_rows, "uniform").pvalue > 1e-3


def test_reservoir_matches_sequential_algorithm_r():
    # Algorithm R consuming the same uniform draws (one per value, in stream order, one
    # torch.rand call per batch as the sampler makes them): the vectorised update with its
    # last-write-wins scatter must give exactly the sequential reservoir.
    capacity, seed = 50, 11
    batches = _stream_batches(700, [30, 1, 120, 64])
    sample = ReservoirSample(capacity, seed=seed, dtype=torch.float64)
    for b in batches:
        sample.update(b)
    gen = torch.Generator().manual_seed(seed)
    reservoir, t = [], 0
    for b in batches:
        draws = torch.rand((b.shape[0], 1), generator=gen, dtype=torch.float64)[:, 0]
        for value, u in zip(b[:, 0].tolist(), draws.tolist(), strict=True):
            t += 1
            if t <= capacity:
                reservoir.append(value)
            else:
                j = min(math.floor(u * t), t - 1)
                if j < capacity:
                    reservoir[j] = value
    np.testing.assert_array_equal(sample.values(), np.array(reservoir))


def test_reservoir_drops_nonfinite_and_masked():
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    x[0, 0, 1] = float("nan")
    x[1, 2, 3] = float("inf")  # in a masked row: not counted as non-finite
    x[1, 0, 0] = -float("inf")
    mask = torch.tensor([[True, True, False], [True, True, False]])
    sample = ReservoirSample(100, dims=[0, 1])
    sample.update(x, mask=mask)
    expected = x[mask].reshape(-1)
    expected = expected[torch.isfinite(expected)].double().numpy()
    np.testing.assert_array_equal(sample.values(), expected)
    assert sample.nonfinite == 2
    np.testing.assert_array_equal(sample.values(dim=0), [0.0, 4.0, 16.0])
    np.testing.assert_array_equal(sample.values(dim=1), [5.0, 13.0, 17.0])


def test_reservoir_state_dict_resumes_the_same_random_stream():
    batches = [torch.randn(40, 6) for _ in range(6)]
    full = ReservoirSample(64, dims=[3], dim_capacity=16, seed=5)
    for b in batches:
        full.update(b)
    first = ReservoirSample(64, dims=[3], dim_capacity=16, seed=5)
    for b in batches[:3]:
        first.update(b)
    state = first.state_dict()
    assert all(isinstance(v, (torch.Tensor, int)) for v in state.values())
    resumed = ReservoirSample(64, dims=[3], dim_capacity=16, seed=99)
    resumed.load_state_dict(state)
    for b in batches[3:]:
        resumed.update(b)
    np.testing.assert_array_equal(resumed.values(), full.values())
    np.testing.assert_array_equal(resumed.values(dim=3), full.values(dim=3))
    assert resumed.count == full.count == 6 * 40 * 6


def test_reservoir_reset_and_to():
    sample = ReservoirSample(10)
    sample.update(torch.randn(5, 3))
    assert sample.to("cpu") is sample
    sample.reset()
    assert sample.count == 0 and sample.values().size == 0
    sample.update(torch.randn(2, 7))  # reset forgets d too
    assert sample.count == 14 and sample.values().size == 10


def test_reservoir_errors():
    with pytest.raises(ValueError, match="capacity must be a positive int, got 0"):
        ReservoirSample(0)
    with pytest.raises(ValueError, match="dim_capacity must be a positive int"):
        ReservoirSample(10, dim_capacity=1.5)
    with pytest.raises(ValueError, match="dims must be non-negative ints"):
        ReservoirSample(10, dims=[-1])
    with pytest.raises(ValueError, match="dims must not repeat"):
        ReservoirSample(10, dims=[2, 2])
    with pytest.raises(ValueError, match="dtype must be a floating dtype"):
        ReservoirSample(10, dtype=torch.int64)
    sample = ReservoirSample(10, dims=[3])
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., d\)"):
        sample.update(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"dims \(3,\) must be < d = 3"):
        sample.update(torch.randn(4, 3))
    sample.update(torch.randn(4, 5))
    with pytest.raises(ValueError, match="x has d = 6 values per row but earlier updates had 5"):
        sample.update(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"mask must have shape x.shape\[:-1\] = \(4,\)"):
        sample.update(torch.randn(4, 5), mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"dim=1 is not sampled separately; tracked dims are \[3\]"):
        sample.values(dim=1)
    with pytest.raises(ValueError, match="state is missing keys"):
        sample.load_state_dict({"capacity": 10})
    other = ReservoirSample(20, dims=[3])
    with pytest.raises(ValueError, match="construct the sample with the saved configuration"):
        other.load_state_dict(sample.state_dict())


# --------------------------------------------------------------------------- fits

_LOGISTIC_FAMILY = {"logistic", "genlogistic", "hypsecant"}


def test_fit_logistic_samples_pick_a_logistic_family_by_bic():
    x = np.random.default_rng(0).logistic(loc=2.0, scale=0.5, size=5000)
    fits = fit_families(x)
    assert {f["family"] for f in fits} == set(DEFAULT_FAMILIES)
    assert fits[0]["family"] in _LOGISTIC_FAMILY, [f["family"] for f in fits]
    bic = [f["bic"] for f in fits]
    assert bic == sorted(bic)
    logistic = next(f for f in fits if f["family"] == "logistic")
    assert logistic["params"]["loc"] == pytest.approx(2.0, abs=0.05)
    assert logistic["params"]["scale"] == pytest.approx(0.5, rel=0.05)


def test_fit_t_samples_pick_t_by_bic():
    x = 3.0 + 0.1 * np.random.default_rng(1).standard_t(2.5, size=5000)
    fits = fit_families(x)
    assert fits[0]["family"] == "t", [(f["family"], f["bic"]) for f in fits[:3]]
    assert fits[0]["params"]["df"] == pytest.approx(2.5, rel=0.2)
    assert fits[0]["params"]["scale"] == pytest.approx(0.1, rel=0.1)


def test_fit_scores_match_an_independent_computation():
    # The normal MLE is closed form (mean, sd ddof 0): recompute every score in numpy.
    x = np.random.default_rng(2).normal(-1.0, 3.0, size=5000)
    fits = fit_families(x, families=["laplace", "norm"], criterion="bic")
    assert fits[0]["family"] == "norm"
    norm = fits[0]
    mu, sd = x.mean(), x.std()
    np.testing.assert_allclose([norm["params"]["loc"], norm["params"]["scale"]], [mu, sd], rtol=1e-6)
    mu, sd = norm["params"]["loc"], norm["params"]["scale"]
    logpdf = -0.5 * np.log(2 * np.pi * sd**2) - (x - mu) ** 2 / (2 * sd**2)
    loglik = logpdf.sum()
    density, edges = np.histogram(x, bins=150, density=True)
    centres = (edges[:-1] + edges[1:]) / 2
    pdf = np.exp(-((centres - mu) ** 2) / (2 * sd**2)) / np.sqrt(2 * np.pi * sd**2)
    xs = np.sort(x)
    cdf = np.array([0.5 * math.erfc(-(v - mu) / (sd * math.sqrt(2))) for v in xs])
    n = x.size
    ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert norm["loglik"] == pytest.approx(loglik, rel=1e-9)
    assert norm["aic"] == pytest.approx(4 - 2 * loglik, rel=1e-9)
    assert norm["bic"] == pytest.approx(2 * np.log(n) - 2 * loglik, rel=1e-9)
    assert norm["sse"] == pytest.approx(np.sum((density - pdf) ** 2), rel=1e-9)
    assert norm["ks"] == pytest.approx(ks, rel=1e-9)
    assert norm["n_params"] == 2 and norm["n"] == n


@pytest.mark.parametrize("criterion", ["aic", "sse", "ks"])
def test_fit_sorts_by_criterion(criterion):
    x = np.random.default_rng(3).laplace(size=2000)
    fits = fit_families(x, families=["norm", "laplace", "logistic", "cauchy"], criterion=criterion)
    scores = [f[criterion] for f in fits]
    assert scores == sorted(scores)
    json.dumps(fits)


def test_fit_subsamples_to_max_values_with_a_seed():
    x = np.random.default_rng(4).normal(size=3000)
    a = fit_families(x, families=["norm"], max_values=1000, seed=1)[0]
    b = fit_families(x, families=["norm"], max_values=1000, seed=1)[0]
    c = fit_families(x, families=["norm"], max_values=1000, seed=2)[0]
    assert a["n"] == 1000 and a["params"] == b["params"] and a["params"] != c["params"]
    assert fit_families(torch.from_numpy(x), families="norm", max_values=None)[0]["n"] == 3000


def test_fit_failure_is_warned_and_skipped(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("optimizer exploded")

    monkeypatch.setattr(stats.logistic, "fit", broken)
    x = np.random.default_rng(5).normal(size=500)
    with pytest.warns(RuntimeWarning, match="fitting 'logistic' failed .*optimizer exploded"):
        fits = fit_families(x, families=["norm", "logistic"])
    assert [f["family"] for f in fits] == ["norm"]
    monkeypatch.setattr(stats.logistic, "fit", lambda *a, **k: (np.nan, 1.0))
    with pytest.warns(RuntimeWarning, match="non-finite or non-positive parameters"):
        assert [f["family"] for f in fit_families(x, families=["logistic", "norm"])] == ["norm"]
    monkeypatch.setattr(stats.logistic, "fit", broken)
    with (
        pytest.warns(RuntimeWarning, match="fitting 'logistic' failed"),
        pytest.raises(RuntimeError, match="every family's fit failed"),
    ):
        fit_families(x, families=["logistic"])


def test_fit_errors():
    x = np.random.default_rng(6).normal(size=200)
    with pytest.raises(ValueError, match=r"criterion must be one of .*got 'mse'"):
        fit_families(x, criterion="mse")
    with pytest.raises(ValueError, match=r"unknown families \['gauss'\]"):
        fit_families(x, families=["norm", "gauss"])
    with pytest.raises(ValueError, match=r"unknown families \['poisson'\]"):
        fit_families(x, families=["poisson"])  # discrete, not fittable
    with pytest.raises(ValueError, match="families must name at least one family"):
        fit_families(x, families=[])
    with pytest.raises(ValueError, match="values has 1 non-finite entries of 200"):
        fit_families(np.r_[x[:-1], np.nan])
    with pytest.raises(ValueError, match="values has 10 values, at least 50 are needed"):
        fit_families(x[:10])
    with pytest.raises(ValueError, match=r"values are constant \(1.0 for all 100\)"):
        fit_families(np.ones(100))
    with pytest.raises(ValueError, match="max_values must be a positive int, got 0"):
        fit_families(x, max_values=0)


# --------------------------------------------------------------------------- modes


def _smoothed_mixture_mode(weights, means, sds, h, around, half_width=2.0):
    """Mode of the mixture convolved with the KDE kernel N(0, h^2), near ``around``."""
    grid = np.linspace(around - half_width, around + half_width, 40_001)
    dens = sum(w * stats.norm.pdf(grid, m, np.sqrt(s**2 + h**2)) for w, m, s in zip(weights, means, sds, strict=True))
    return grid[np.argmax(dens)]


def test_modes_of_a_three_component_mixture():
    # 70% N(0, 1), 15% N(-6, 0.5), 15% N(5, 0.5). The KDE estimates the mixture convolved
    # with its kernel N(0, h^2) (Scott: h = sd * n^-1/5), whose modes sit within 1e-3 of
    # the component means here; the estimate's own scatter is about the smoothed bump's sd
    # over sqrt(count) times a constant of order 1-2: 0.64 / sqrt(750) ~ 0.03 (measured
    # over 30 seeds: sd 0.016-0.035, worst deviation 0.072). 0.15 is over 4 such sds and
    # still < a third of a secondary bump's sd (grid step 0.008).
    rng = np.random.default_rng(7)
    weights, means, sds = (0.7, 0.15, 0.15), (0.0, -6.0, 5.0), (1.0, 0.5, 0.5)
    x = np.concatenate([rng.normal(m, s, int(5000 * w)) for w, m, s in zip(weights, means, sds, strict=True)])
    modes = find_modes(x)
    h = x.std(ddof=1) * x.size ** (-1 / 5)
    assert modes["bandwidth"] == pytest.approx(h, rel=1e-9)
    assert len(modes["left"]) == 1 and len(modes["right"]) == 1
    expected = {
        key: _smoothed_mixture_mode(weights, means, sds, h, around)
        for key, around in (("primary", 0.0), ("left", -6.0), ("right", 5.0))
    }
    primary, left, right = modes["primary"], modes["left"][0], modes["right"][0]
    assert primary["location"] == pytest.approx(expected["primary"], abs=0.15)
    assert left["location"] == pytest.approx(expected["left"], abs=0.15)
    assert right["location"] == pytest.approx(expected["right"], abs=0.15)
    sd = x.std()
    assert left["offset_sd"] == pytest.approx((left["location"] - primary["location"]) / sd)
    assert primary["offset_sd"] == 0.0
    for mode in (primary, left, right):
        assert mode["volume"] == pytest.approx(mode["height"] * mode["width"])
    # Height x FWHM of a Gaussian bump is 0.94 x its mass: the volumes keep the weights'
    # ratio 0.15 / 0.7 to within sampling and smoothing error.
    assert left["volume"] / primary["volume"] == pytest.approx(0.15 / 0.7, rel=0.15)
    # Secondary bumps: FWHM of N(0, 0.5^2 + h^2).
    fwhm = 2 * np.sqrt(2 * np.log(2)) * np.sqrt(0.25 + h**2)
    assert right["width"] == pytest.approx(fwhm, rel=0.15)


def test_modes_orders_nearest_first_and_respects_prominence():
    rng = np.random.default_rng(8)
    x = np.concatenate(
        [
            rng.normal(0, 1, 6000),
            rng.normal(4, 0.3, 600),
            rng.normal(8, 0.3, 600),
            rng.normal(-5, 0.3, 600),
        ]
    )
    modes = find_modes(x)
    right = [m["location"] for m in modes["right"]]
    assert len(right) == 2 and right[0] < right[1]
    assert right[0] == pytest.approx(4, abs=0.15) and right[1] == pytest.approx(8, abs=0.15)
    assert [round(m["location"]) for m in modes["left"]] == [-5]
    # A threshold above the secondary peaks' relative prominence keeps only the primary.
    only = find_modes(x, prominence=0.9)
    assert only["left"] == [] and only["right"] == []
    unimodal = find_modes(rng.normal(size=3000))
    assert unimodal["left"] == [] and unimodal["right"] == []
    json.dumps(modes)


def test_modes_errors():
    x = np.random.default_rng(9).normal(size=500)
    with pytest.raises(ValueError, match=r"prominence must be a fraction .* in \[0, 1\), got 2"):
        find_modes(x, prominence=2)
    with pytest.raises(ValueError, match="distance must be >= 0"):
        find_modes(x, distance=-1)
    with pytest.raises(ValueError, match="grid_size must be >= 16, got 8"):
        find_modes(x, grid_size=8)
    with pytest.raises(ValueError, match=r"grid_range must be finite \(low, high\)"):
        find_modes(x, grid_range=(1.0, -1.0))
    with pytest.raises(ValueError, match="values are constant"):
        find_modes(np.zeros(100))
    with pytest.raises(ValueError, match="at least 50 are needed"):
        find_modes(x[:5])


# --------------------------------------------------------------------------- tails


def test_tail_fractions_count_exactly():
    x = np.concatenate([np.zeros(996), [10.0, -10.0, 4.0, -4.0]])
    z = np.abs(x - x.mean()) / x.std()
    tails = tail_fractions(x, ks=(3, 5, 10))
    for k in (3, 5, 10):
        assert tails[k]["count"] == int(np.sum(z > k))
        assert tails[k]["fraction"] == np.sum(z > k) / 1000
        assert tails[k]["gaussian"] == pytest.approx(math.erfc(k / math.sqrt(2)), rel=1e-12)
        assert tails[k]["ratio"] == pytest.approx(tails[k]["fraction"] / tails[k]["gaussian"])


def test_tail_fractions_of_gaussian_data_match_the_gaussian():
    # A perfectly Gaussian sample (normal quantiles) has tail fractions 2 sf(k) up to the
    # 1/n granularity and the small sd correction of the truncated grid.
    n = 200_000
    x = stats.norm.ppf((np.arange(n) + 0.5) / n)
    tails = tail_fractions(x, ks=(1, 2, 3))
    for k in (1, 2, 3):
        assert tails[k]["fraction"] == pytest.approx(2 * stats.norm.sf(k), rel=0.01, abs=2 / n)
    heavy = tail_fractions(np.random.default_rng(10).standard_t(3, size=50_000), ks=(5,))
    assert heavy[5]["ratio"] > 10  # t_3 tails beyond 5 sd are far above the Gaussian's


def test_tail_fraction_errors():
    with pytest.raises(ValueError, match=r"ks must be positive finite numbers, got \(0, 3\)"):
        tail_fractions(np.arange(10.0), ks=(0, 3))
    with pytest.raises(ValueError, match="ks must be positive finite numbers"):
        tail_fractions(np.arange(10.0), ks=())
    with pytest.raises(ValueError, match="values are constant"):
        tail_fractions(np.ones(10))
    with pytest.raises(ValueError, match="at least 2 are needed"):
        tail_fractions([1.0])


# --------------------------------------------------------------------------- summary, plot


class _Moments:
    """Stand-in for LayerStats: count, mean, covariance(ddof=0) of given rows."""

    def __init__(self, rows: np.ndarray):
        self.count = torch.tensor(float(rows.shape[0]), dtype=torch.float64)
        self.mean = torch.from_numpy(rows.mean(axis=0))
        self._cov = torch.from_numpy(np.cov(rows, rowvar=False, ddof=0))

    def covariance(self, ddof: int = 0) -> torch.Tensor:
        assert ddof == 0
        return self._cov


def test_analyze_layer_is_json_serialisable_and_complete():
    rng = np.random.default_rng(11)
    hidden = torch.from_numpy(rng.logistic(size=(400, 8)))
    sample = ReservoirSample(2000, dims=[0, 5], dim_capacity=300, seed=0)
    sample.update(hidden)
    eig = np.arange(1, 201) ** -1.2
    classes = {
        "neg": _Moments(rng.normal(size=(300, 4))),
        "pos": _Moments(rng.normal(size=(300, 4)) + 1),
    }
    out = analyze_layer(sample, eig, classes, families=["norm", "logistic", "t"])
    text = json.dumps(out)
    assert json.loads(text)["distribution"]["best_family"] == out["distribution"]["best_family"]
    assert out["distribution"]["n"] == 2000 and out["distribution"]["best_family"] == "logistic"
    assert set(out["dims"]) == {"0", "5"}
    assert sum(out["best_family_counts"].values()) == 2
    assert out["powerlaw"]["alpha"] == pytest.approx(1.2)
    assert out["class_separation"]["labels"] == ["neg", "pos"]
    assert "directions" not in out["class_separation"]
    assert set(out["distribution"]["tails"]) == {"3", "5", "10"}
    empty = analyze_layer(None)
    assert empty["distribution"] is None and empty["powerlaw"] is None
    small = ReservoirSample(10)
    small.update(torch.randn(2, 3))
    with pytest.warns(RuntimeWarning, match="the sample has 6 values"):
        assert analyze_layer(small)["distribution"] is None


def test_plot_distribution_draws_fit_gaussian_and_modes():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(12)
    x = np.concatenate([rng.logistic(size=2000), rng.normal(6, 0.3, 200)])
    fits = fit_families(x, families=["norm", "logistic"])
    modes = find_modes(x)
    fig, ax = plt.subplots()
    try:
        assert plot_distribution(ax, x, fits, modes, title="layer 3") is ax
        labels = [line.get_label() for line in ax.get_lines()]
        assert f"best: {fits[0]['family']}" in labels
        assert "Gaussian" in labels and "secondary modes" in labels
        assert ax.get_title() == "layer 3"
    finally:
        plt.close(fig)
