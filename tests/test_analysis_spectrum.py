"""Tests of gsam_monitor.analysis.spectrum against analytic values and fp64 numpy."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from scipy import stats

from gsam_monitor import LayerStats
from gsam_monitor.analysis import class_separation, group_cosine_contrast, powerlaw_fit

# --------------------------------------------------------------------------- power law


def test_powerlaw_recovers_an_exact_power_law():
    lam = np.arange(1, 385, dtype=float) ** -1.3
    rng = np.random.default_rng(0)
    out = powerlaw_fit(rng.permutation(lam))  # any order in
    assert out["alpha"] == pytest.approx(1.3, abs=1e-9)
    assert out["n_points"] == 141  # ranks 10..150 inclusive
    assert out["r2"] == pytest.approx(1.0, abs=1e-12)
    assert out["ci_low"] <= 1.3 <= out["ci_high"]


def test_powerlaw_with_noise_within_tolerance_and_ci_matches_numpy():
    # lambda_k = k^-1.3 with 10% multiplicative noise: alpha within 0.02, and the interval
    # equals the textbook OLS one (slope sd = sqrt(SSR / (n - 2) / Sxx), t quantile).
    rng = np.random.default_rng(1)
    k = np.arange(1, 769, dtype=float)
    lam = k**-1.3 * np.exp(rng.normal(0, 0.1, k.size))
    out = powerlaw_fit(torch.from_numpy(lam), rank_range=(5, 400))
    assert out["alpha"] == pytest.approx(1.3, abs=0.02)
    order = np.sort(lam)[::-1]
    xs, ys = np.log(np.arange(5, 401)), np.log(order[4:400])
    slope, intercept = np.polyfit(xs, ys, 1)
    resid = ys - (slope * xs + intercept)
    se = np.sqrt(resid @ resid / (xs.size - 2) / np.sum((xs - xs.mean()) ** 2))
    half = stats.t.ppf(0.975, xs.size - 2) * se
    assert out["alpha"] == pytest.approx(-slope, rel=1e-10)
    assert out["ci_low"] == pytest.approx(-slope - half, rel=1e-10)
    assert out["ci_high"] == pytest.approx(-slope + half, rel=1e-10)
    assert out["r2"] == pytest.approx(np.corrcoef(xs, ys)[0, 1] ** 2, rel=1e-10)
    assert out["ci_low"] <= 1.3 <= out["ci_high"]


def test_powerlaw_range_is_clipped_to_positive_eigenvalues():
    # A rank-deficient spectrum (e.g. post-LayerNorm, or N < d): zeros and negative
    # rounding noise are not ranks.
    lam = np.r_[np.arange(1, 61, dtype=float) ** -1.5, np.zeros(30), -1e-17 * np.ones(5)]
    out = powerlaw_fit(lam)
    assert out["n_points"] == 51 and out["alpha"] == pytest.approx(1.5)
    too_short = powerlaw_fit(np.arange(1, 12, dtype=float) ** -1.0)
    assert too_short["n_points"] == 2 and np.isnan(too_short["alpha"])
    json.dumps(too_short)


def test_powerlaw_errors():
    lam = np.arange(1, 50, dtype=float) ** -1.0
    for bad in [(0, 10), (10, 10), (10.0, 20), "10-150", (5,)]:
        with pytest.raises(ValueError, match=r"rank_range must be .*1 <= first < last"):
            powerlaw_fit(lam, rank_range=bad)
    with pytest.raises(ValueError, match="eigenvalues must be 1-d, got shape"):
        powerlaw_fit(np.eye(3))
    with pytest.raises(ValueError, match="eigenvalues contain NaN or inf"):
        powerlaw_fit(np.r_[lam, np.nan])


# --------------------------------------------------------------------------- LDA


class _Moments:
    """Stand-in for LayerStats: count, mean, covariance(ddof=0) of given rows."""

    def __init__(self, rows: np.ndarray):
        self.count = torch.tensor(float(rows.shape[0]), dtype=torch.float64)
        self.mean = torch.from_numpy(rows.mean(axis=0))
        self._cov = torch.from_numpy(np.cov(rows, rowvar=False, ddof=0))

    def covariance(self, ddof: int = 0) -> torch.Tensor:
        assert ddof == 0
        return self._cov


def _numpy_lda(rows_by_class: list[np.ndarray]) -> np.ndarray:
    """Generalized eigenvalues of (S_B, S_W) from the raw rows, descending (pinv on S_W)."""
    x = np.concatenate(rows_by_class)
    mu = x.mean(axis=0)
    n = x.shape[0]
    s_b = sum(r.shape[0] / n * np.outer(r.mean(0) - mu, r.mean(0) - mu) for r in rows_by_class)
    s_w = sum((r - r.mean(0)).T @ (r - r.mean(0)) for r in rows_by_class) / n
    return np.sort(np.linalg.eigvals(np.linalg.pinv(s_w, rcond=1e-10) @ s_b).real)[::-1]


def _two_gaussian_classes(rng, n_a=6000, n_b=14000):
    d = 6
    a = rng.normal(size=(d, d))
    sigma = a @ a.T / d + 0.5 * np.eye(d)
    delta = np.array([1.0, -0.5, 0.0, 0.3, 0.0, 0.8])
    chol = np.linalg.cholesky(sigma)
    rows_a = rng.normal(size=(n_a, d)) @ chol.T
    rows_b = rng.normal(size=(n_b, d)) @ chol.T + delta
    return rows_a, rows_b, sigma, delta


def test_fisher_ratio_of_two_gaussian_classes_matches_the_analytic_value():
    # Two classes N(0, Sigma), N(delta, Sigma) with fractions p, 1-p: S_B = p(1-p) delta
    # delta^T, S_W = Sigma, so the one eigenvalue is p(1-p) delta^T Sigma^-1 delta.
    rng = np.random.default_rng(2)
    rows_a, rows_b, sigma, delta = _two_gaussian_classes(rng)
    p = 6000 / 20000
    analytic = p * (1 - p) * delta @ np.linalg.solve(sigma, delta)
    out = class_separation({"a": _Moments(rows_a), "b": _Moments(rows_b)})
    assert out["fisher_ratio"] == pytest.approx(analytic, rel=0.05)
    assert out["fisher_ratio"] == pytest.approx(_numpy_lda([rows_a, rows_b])[0], rel=1e-9)
    assert len(out["eigenvalues"]) == 1 and out["directions"].shape == (6, 1)
    # The LDA direction is Sigma^-1 delta (up to scale and sampling error).
    expected = np.linalg.solve(sigma, delta)
    expected /= np.linalg.norm(expected)
    assert abs(out["directions"][:, 0] @ expected) == pytest.approx(1.0, abs=5e-3)
    assert np.linalg.norm(out["directions"][:, 0]) == pytest.approx(1.0)
    assert out["labels"] == ["a", "b"] and out["class_fractions"] == pytest.approx([p, 1 - p])
    assert out["rank"] == 6 and out["between_outside_support"] == pytest.approx(0, abs=1e-12)
    assert out["n"] == 20000 and out["d"] == 6


def test_multiclass_eigenvalues_and_directions_solve_the_eigenproblem():
    rng = np.random.default_rng(3)
    rows = [
        rng.normal(size=(n, 5)) * [1, 2, 1, 0.5, 1] + m
        for n, m in [
            (500, 0.0),
            (800, [1, 0, 0, 0, 0]),
            (300, [0, 2, 1, 0, 0]),
            (400, [0, 0, 0, 1, 1]),
        ]
    ]
    out = class_separation([_Moments(r) for r in rows])
    assert out["labels"] == [0, 1, 2, 3]
    np.testing.assert_allclose(out["eigenvalues"], _numpy_lda(rows)[:3], rtol=1e-9)
    x = np.concatenate(rows)
    n, mu = x.shape[0], x.mean(0)
    s_b = sum(r.shape[0] / n * np.outer(r.mean(0) - mu, r.mean(0) - mu) for r in rows)
    s_w = sum((r - r.mean(0)).T @ (r - r.mean(0)) for r in rows) / n
    for lam, v in zip(out["eigenvalues"], out["directions"].T, strict=True):
        np.testing.assert_allclose(s_b @ v, lam * s_w @ v, atol=1e-10)


def test_singular_within_covariance_is_solved_on_its_support():
    # LayerNorm-like rows: centred per row, so every row lies on the hyperplane sum = 0 and
    # S_W has rank d-1. Class means lie in the same hyperplane: nothing is lost.
    rng = np.random.default_rng(4)
    d = 8
    rows = [rng.normal(size=(700, d)) + m for m in (0.0, np.linspace(-1, 1, d))]
    rows = [r - r.mean(axis=1, keepdims=True) for r in rows]
    out = class_separation([_Moments(r) for r in rows])
    assert out["rank"] == d - 1
    assert out["between_outside_support"] == pytest.approx(0, abs=1e-9)
    assert np.isfinite(out["fisher_ratio"])
    assert out["fisher_ratio"] == pytest.approx(_numpy_lda(rows)[0], rel=1e-8)
    assert abs(out["directions"][:, 0].sum()) < 1e-8  # the direction stays in the plane


def test_between_variance_outside_the_support_is_reported_and_dropped(caplog):
    # The classes differ only along dim 0, where neither varies: infinite separation.
    rng = np.random.default_rng(5)
    rows = [np.c_[np.full(200, c), rng.normal(size=(200, 3))] for c in (0.0, 1.0)]
    with caplog.at_level(logging.WARNING, logger="gsam_monitor.analysis.spectrum"):
        out = class_separation([_Moments(r) for r in rows])
    # S_B is rank one along the mean difference; its share on dim 0 is outside.
    delta = rows[1].mean(axis=0) - rows[0].mean(axis=0)
    assert out["between_outside_support"] == pytest.approx(delta[0] ** 2 / (delta @ delta))
    assert out["rank"] == 3
    assert "outside the support" in caplog.text


def test_class_separation_with_real_layerstats():
    rng = np.random.default_rng(6)
    rows_a, rows_b, _, _ = _two_gaussian_classes(rng, 3000, 5000)
    by_class = {}
    for label, rows in (("a", rows_a), ("b", rows_b)):
        s = LayerStats(rows.shape[1])
        for chunk in np.array_split(rows, 7):
            s.update(torch.from_numpy(chunk))
        by_class[label] = s
    out = class_separation(by_class)
    assert out["fisher_ratio"] == pytest.approx(_numpy_lda([rows_a, rows_b])[0], rel=1e-8)


@pytest.mark.parametrize("product_dtype", [torch.float64, torch.float32])
def test_class_separation_of_layernorm_outputs_in_layerstats(product_dtype):
    # Real post-LayerNorm activations (fp32, rank d-1) through LayerStats with fp64 or fp32
    # Gram products: the null direction must fall below the rank tolerance of either.
    torch.manual_seed(0)
    d = 32
    norm = torch.nn.LayerNorm(d)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
        shift = torch.zeros(d)
        shift[:4] = 0.8
        rows = [norm(torch.randn(4000, d) + c * shift) for c in (0, 1, 2)]
    by_class = []
    for r in rows:
        s = LayerStats(d, product_dtype=product_dtype)
        s.update(r.reshape(8, 500, d))
        by_class.append(s)
    out = class_separation(by_class)
    assert out["rank"] == d - 1
    assert out["between_outside_support"] < 1e-6
    expected = _numpy_lda([r.double().numpy() for r in rows])[:2]
    np.testing.assert_allclose(out["eigenvalues"], expected, rtol=1e-4)


def test_empty_classes_are_ignored():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(100, 3)), rng.normal(size=(100, 3)) + 1
    empty = _Moments(np.zeros((1, 3)))
    empty.count = torch.tensor(0.0, dtype=torch.float64)
    out = class_separation({"a": _Moments(a), "none": empty, "b": _Moments(b)})
    assert out["labels"] == ["a", "b"]
    assert out["fisher_ratio"] == pytest.approx(_numpy_lda([a, b])[0], rel=1e-9)


def test_class_separation_errors():
    rng = np.random.default_rng(8)
    a = _Moments(rng.normal(size=(50, 3)))
    with pytest.raises(ValueError, match="at least 2 classes with count > 0, got 1 of 1"):
        class_separation({"a": a})
    with pytest.raises(ValueError, match=r"class 'b' has mean of size 4 .*expected \(3,\)"):
        class_separation({"a": a, "b": _Moments(rng.normal(size=(50, 4)))})
    bad = _Moments(rng.normal(size=(50, 3)))
    bad.mean = torch.tensor([np.nan, 0.0, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="class 1 has non-finite mean or covariance"):
        class_separation([a, bad])
    points = [_Moments(np.zeros((5, 3))), _Moments(np.ones((5, 3)))]
    with pytest.raises(ValueError, match="within-class covariance is zero"):
        class_separation(points)
    with pytest.raises(ValueError, match=r"rtol must be in \(0, 1\) or None, got 0"):
        class_separation([a, a], rtol=0)
    weird = _Moments(rng.normal(size=(50, 3)))
    weird.count = "many"
    with pytest.raises(ValueError, match="count must be a tensor or an array of numbers"):
        class_separation([a, weird])


# --------------------------------------------------------------------------- cosine


def _brute_contrast(x: np.ndarray, labels) -> tuple[float, float]:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = u @ u.T
    lab = np.asarray(labels)
    i, j = np.triu_indices(x.shape[0], k=1)
    same = lab[i] == lab[j]
    return sim[i, j][same].mean(), sim[i, j][~same].mean()


def test_group_cosine_contrast_matches_brute_force():
    rng = np.random.default_rng(9)
    subjects = np.repeat(np.arange(6), 10)
    attributes = np.tile(np.arange(5), 12)
    centres_s, centres_a = rng.normal(size=(6, 16)), rng.normal(size=(5, 16))
    x = 2.0 * centres_s[subjects] + 0.7 * centres_a[attributes] + rng.normal(size=(60, 16))
    out = group_cosine_contrast(x, subjects, [f"attr{a}" for a in attributes])
    for key, labels in (("a", subjects), ("b", attributes)):
        within, between = _brute_contrast(x, labels)
        assert out[key]["within"] == pytest.approx(within, rel=1e-10)
        assert out[key]["between"] == pytest.approx(between, rel=1e-10)
        assert out[key]["contrast"] == pytest.approx(within - between, rel=1e-10)
    assert out["a"]["n_within_pairs"] == 6 * 45 and out["a"]["n_groups"] == 6
    assert out["a"]["n_between_pairs"] == 60 * 59 // 2 - 270
    assert out["difference"] == pytest.approx(out["a"]["contrast"] - out["b"]["contrast"])
    assert out["difference"] > 0  # the subject signal was made stronger
    assert out["n"] == 60 and out["n_components"] == 16 and out["explained_variance"] == 1.0
    json.dumps(out)
    only_a = group_cosine_contrast(torch.from_numpy(x), subjects)
    assert "b" not in only_a and "difference" not in only_a
    assert only_a["a"] == out["a"]


def test_group_cosine_contrast_with_pca_matches_sklearn():
    decomposition = pytest.importorskip("sklearn.decomposition")
    rng = np.random.default_rng(10)
    labels = np.repeat(np.arange(4), 15)
    x = rng.normal(size=(4, 30))[labels] + rng.normal(size=(60, 30)) * np.linspace(0.1, 2, 30)
    out = group_cosine_contrast(x, labels, pca_variance=0.9)
    pca = decomposition.PCA(n_components=0.9, svd_solver="full").fit(x)
    scores = pca.transform(x)
    assert out["n_components"] == pca.n_components_
    assert out["explained_variance"] == pytest.approx(pca.explained_variance_ratio_.sum())
    within, between = _brute_contrast(scores, labels)
    assert out["a"]["within"] == pytest.approx(within, rel=1e-9)
    assert out["a"]["between"] == pytest.approx(between, rel=1e-9)


def test_group_cosine_contrast_errors():
    x = np.random.default_rng(11).normal(size=(10, 4))
    labels = [0] * 5 + [1] * 5
    with pytest.raises(ValueError, match=r"vectors must be \(n, d\) with n >= 3, got shape"):
        group_cosine_contrast(x[0], labels)
    with pytest.raises(ValueError, match="vectors contain NaN or inf"):
        group_cosine_contrast(np.r_[x[:-1], [[np.nan] * 4]], labels)
    with pytest.raises(ValueError, match=r"pca_variance must be a fraction in \(0, 1\]"):
        group_cosine_contrast(x, labels, pca_variance=90)
    with pytest.raises(ValueError, match=r"vectors \[3\] have zero norm"):
        group_cosine_contrast(np.r_[x[:3], [[0.0] * 4], x[4:]], labels)
    with pytest.raises(ValueError, match="labels_b has 9 labels but vectors has 10 rows"):
        group_cosine_contrast(x, labels, labels[:9])
    with pytest.raises(ValueError, match=r"labels_a must have a group with 2\+ members"):
        group_cosine_contrast(x, list(range(10)))
    with pytest.raises(ValueError, match=r"labels_a must have .*got 1 groups"):
        group_cosine_contrast(x, [0] * 10)
    with pytest.raises(ValueError, match="PCA has no variance to keep"):
        group_cosine_contrast(np.ones((10, 4)), labels, pca_variance=0.5)
