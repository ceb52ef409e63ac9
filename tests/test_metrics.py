"""Every metric of ``metrics.compute`` against an independent fp64 numpy/scipy/sklearn value."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.covariance import OAS

from gsam_monitor import LayerStats, metrics
from gsam_monitor.metrics import MardiaAccumulator
from tests.reference import gsam_pdet, gsam_scipy, mle_cov, scipy_rank_tol


def _stats(x: np.ndarray, chunks: int = 5) -> LayerStats:
    s = LayerStats(x.shape[1])
    for p in np.array_split(x, chunks):
        s.update(torch.from_numpy(np.ascontiguousarray(p)))
    return s


def _layernorm(x: np.ndarray) -> np.ndarray:
    # What torch.nn.LayerNorm (no affine) does, in fp64: every row sums to 0 (rank d - 1).
    z = x - x.mean(1, keepdims=True)
    return z / np.sqrt(z.var(1, keepdims=True) + 1e-5)


def _relerr(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


FULL_RANK = {
    "gaussian": lambda r: r.standard_normal((800, 30)) @ r.standard_normal((30, 30)) + 3,
    "student_t": lambda r: r.standard_t(2.5, size=(800, 30)),
    "logistic": lambda r: r.logistic(size=(800, 30)),
    "lowrank_noise": lambda r: (
        r.standard_normal((800, 4)) @ r.standard_normal((4, 30)) * 5 + 0.01 * r.standard_normal((800, 30))
    ),
    "badly_centred": lambda r: 1e4 + r.standard_normal((800, 30)),
}


@pytest.mark.parametrize("name", sorted(FULL_RANK))
def test_gsam_equals_scipy_logpdf(name: str, rng: np.random.Generator) -> None:
    x = FULL_RANK[name](rng)
    m = metrics.compute(_stats(x))
    ref, rank = gsam_scipy(x)
    assert m["rank"] == rank == 30
    assert _relerr(m["gsam"], ref) < 1e-9
    assert m["n"] == 800 and m["d"] == 30 and m["nonfinite"] == 0


def test_gsam_on_layernormed_rows_uses_the_support(rng: np.random.Generator) -> None:
    x = _layernorm(rng.standard_normal((600, 24)) @ rng.standard_normal((24, 24)))
    m = metrics.compute(_stats(x))
    ref, rank = gsam_pdet(x)
    assert rank == 23
    assert m["rank"] == 23
    assert _relerr(m["gsam"], ref) < 1e-9
    assert math.isfinite(m["gsam_oas"])


def test_fp32_layernorm_output_is_rank_d_minus_1(rng: np.random.Generator) -> None:
    # The common path: a real LayerNorm in fp32, the statistics from its fp32 output.
    ln = torch.nn.LayerNorm(48)
    with torch.no_grad():
        ln.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2, 48)))
        ln.bias.copy_(torch.from_numpy(rng.standard_normal(48)))
        h = ln(torch.from_numpy(rng.standard_normal((400, 48))).float() @ torch.randn(48, 48))
    x = h.double().numpy()
    m = metrics.compute(_stats(x))
    ref, rank = gsam_pdet(x)
    assert m["rank"] == rank == 47
    assert _relerr(m["gsam"], ref) < 1e-9


def test_n_below_d_is_rank_deficient_and_oas_is_finite(rng: np.random.Generator) -> None:
    x = rng.standard_normal((20, 50))
    m = metrics.compute(_stats(x, chunks=3))
    ref, rank = gsam_pdet(x)
    assert m["rank"] == rank == 19
    assert _relerr(m["gsam"], ref) < 1e-9
    oas = OAS(store_precision=False, assume_centered=False).fit(x)
    ref_oas = math.log(20) + scipy.stats.multivariate_normal(x.mean(0), oas.covariance_).logpdf(x).mean()
    assert _relerr(m["gsam_oas"], ref_oas) < 1e-9


@pytest.mark.parametrize("name", ["gaussian", "student_t", "badly_centred"])
def test_oas_and_correlation_variants(name: str, rng: np.random.Generator) -> None:
    x = FULL_RANK[name](rng)
    m = metrics.compute(_stats(x))
    oas = OAS(assume_centered=False).fit(x)
    ref_oas = math.log(len(x)) + scipy.stats.multivariate_normal(x.mean(0), oas.covariance_).logpdf(x).mean()
    assert _relerr(m["gsam_oas"], ref_oas) < 1e-9
    z = (x - x.mean(0)) / x.std(0)
    ref_corr, _ = gsam_scipy(z)
    assert _relerr(m["gsam_correlation"], ref_corr) < 1e-9


def test_scale_changes_gsam_by_d_log_c_but_not_the_correlation_variant(rng: np.random.Generator) -> None:
    x = rng.standard_normal((300, 10)) @ rng.standard_normal((10, 10))
    a, b = metrics.compute(_stats(x)), metrics.compute(_stats(7.0 * x))
    assert b["gsam"] - a["gsam"] == pytest.approx(-10 * math.log(7.0), rel=1e-9)
    assert b["gsam_correlation"] == pytest.approx(a["gsam_correlation"], rel=1e-9)
    assert b["effective_rank"] == pytest.approx(a["effective_rank"], rel=1e-9)


def test_spectral_metrics_match_numpy(rng: np.random.Generator) -> None:
    d = 200
    x = rng.standard_normal((2000, d)) * np.arange(1, d + 1) ** -0.65
    m = metrics.compute(_stats(x), powerlaw_range=(10, 150))
    lam = np.sort(np.linalg.eigvalsh(mle_cov(x)))[::-1]
    p = lam / lam.sum()
    assert _relerr(m["effective_rank"], float(np.exp(-(p * np.log(p)).sum()))) < 1e-9
    assert _relerr(m["participation_ratio"], lam.sum() ** 2 / (lam**2).sum()) < 1e-9
    assert _relerr(m["condition_number"], lam[0] / lam[-1]) < 1e-8
    assert _relerr(m["top1_variance_fraction"], lam[0] / lam.sum()) < 1e-9
    k99 = int(np.argmax(np.cumsum(lam) / lam.sum() >= 0.99)) + 1
    assert m["saturation"] == k99 / d
    k = np.arange(10, 151)
    fit = scipy.stats.linregress(np.log(k), np.log(lam[k - 1]))
    assert _relerr(m["powerlaw_alpha"], -fit.slope) < 1e-9


def test_anisotropy_outliers_and_kurtosis(rng: np.random.Generator) -> None:
    x = rng.standard_t(4, size=(400, 20)) + 0.5
    x[:, 3] *= 30.0  # a variance outlier
    x[:, 7] += 200.0  # a mean outlier
    m = metrics.compute(_stats(x))
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = u @ u.T
    n = len(x)
    assert _relerr(m["anisotropy"], (cos.sum() - np.trace(cos)) / (n * (n - 1))) < 1e-9
    var, am = x.var(0), np.abs(x.mean(0))
    assert m["outlier_dims"] == int(((var > 10 * np.median(var)) | (am > 10 * np.median(am))).sum()) == 2
    assert _relerr(m["mean_kurtosis"], float(np.mean(scipy.stats.kurtosis(x, axis=0, bias=True)))) < 1e-8


def test_gaussianity_checks_see_what_gsam_cannot(rng: np.random.Generator) -> None:
    # Same covariance (identity), very different shapes: GSAM is blind, the kurtoses are not.
    n, d = 20000, 8
    gauss = rng.standard_normal((n, d))
    laplace = rng.laplace(scale=1 / math.sqrt(2), size=(n, d))  # variance 1, excess kurtosis 3
    mg, ml = metrics.compute(_stats(gauss)), metrics.compute(_stats(laplace))
    assert abs(mg["gsam"] - ml["gsam"]) < 0.1
    assert abs(mg["mean_kurtosis"]) < 0.15
    assert ml["mean_kurtosis"] == pytest.approx(3.0, abs=0.3)


def test_mardia_second_pass_matches_numpy(rng: np.random.Generator) -> None:
    x = rng.standard_t(5, size=(3000, 6)) @ rng.standard_normal((6, 6))
    s = _stats(x)
    acc = MardiaAccumulator(s)
    for p in np.array_split(x, 4):
        acc.update(torch.from_numpy(p))
    z = x - x.mean(0)
    maha = np.einsum("ij,jk,ik->i", z, np.linalg.inv(mle_cov(x)), z)
    b2 = float(np.mean(maha**2))
    assert acc.b2() == pytest.approx(b2, rel=1e-9)
    m = metrics.compute(s, mardia=acc)
    assert m["mardia_kurtosis"] == pytest.approx((b2 - 6 * 8) / 6, rel=1e-9)
    gauss = rng.standard_normal((20000, 6))
    g = _stats(gauss)
    acc_g = MardiaAccumulator(g)
    acc_g.update(torch.from_numpy(gauss))
    assert abs(acc_g.value()) < 0.2  # sd of b2 is sqrt(8 d (d+2) / n) = 0.14, / d = 0.02


def test_heldout_loglik_matches_scipy(rng: np.random.Generator) -> None:
    a = rng.standard_normal((500, 12)) @ rng.standard_normal((12, 12))
    b = rng.standard_normal((300, 12)) @ rng.standard_normal((12, 12)) + 0.3
    ref_fit = scipy.stats.multivariate_normal(a.mean(0), mle_cov(a))
    m = metrics.compute(_stats(b), reference=_stats(a))
    assert _relerr(m["heldout_loglik"], float(ref_fit.logpdf(b).mean()) / 12) < 1e-9
    same = metrics.compute(_stats(a), reference=_stats(a))
    # Scored under its own fit, it is the in-sample mean log-likelihood per dimension.
    assert same["heldout_loglik"] == pytest.approx((same["gsam"] - math.log(500)) / 12, rel=1e-9)
    assert "heldout_loglik" not in metrics.compute(_stats(a))


@pytest.mark.parametrize("d", [256, 301])
def test_heldout_loglik_from_two_cholesky_factors_matches_scipy_at_blocked_sizes(
    d: int, rng: np.random.Generator
) -> None:
    # From d = 256 the trace term ‖L_ref⁻¹ L‖² is solved by column blocks; 301 leaves uneven ones.
    mix = np.eye(d) + 0.3 * rng.standard_normal((d, d)) / math.sqrt(d)  # well conditioned, correlated
    a = rng.standard_normal((2 * d, d)) @ mix
    b = rng.standard_normal((3 * d, d)) * np.linspace(0.5, 2.0, d) + 0.1
    fit = metrics.compute(_stats(a), names=["n"], with_fit=True).fit
    assert fit.chol is not None  # the path under test: both windows at full rank
    m = metrics.compute(_stats(b), fit, names=["heldout_loglik"], with_fit=True)
    own = m.fit
    assert own.chol is not None
    expected = float(scipy.stats.multivariate_normal(a.mean(0), mle_cov(a)).logpdf(b).mean()) / d
    assert _relerr(m["heldout_loglik"], expected) < 1e-9


def test_gaussian_fit_is_the_support_of_the_mle_covariance_and_scores_like_its_window(
    rng: np.random.Generator,
) -> None:
    # A rank-9 reference in R^12 (a hyperplane-like deficiency, as post-LayerNorm outputs).
    w = rng.standard_normal((9, 12))
    a = rng.standard_normal((400, 9)) @ w + 2.0
    b = (1.3 * rng.standard_normal((250, 9)) + 0.2) @ w + 2.0  # another Gaussian on a's support
    fit = metrics.GaussianFit.from_stats(_stats(a))
    lam, vecs = np.linalg.eigh(mle_cov(a))
    support = lam > scipy_rank_tol(lam)
    assert fit.rank == int(support.sum()) == 9 and fit.dim == 12 and fit.n == 400
    np.testing.assert_allclose(fit.evals.numpy(), lam[support][::-1], rtol=1e-9)
    np.testing.assert_allclose(fit.mean.numpy(), a.mean(0), rtol=1e-12)
    # The pseudo-inverse on the support equals numpy's.
    pinv = (vecs[:, support] / lam[support]) @ vecs[:, support].T
    np.testing.assert_allclose(fit.precision.numpy(), pinv, rtol=1e-7, atol=1e-9 * np.abs(pinv).max())
    # heldout_loglik under the fit equals scipy's pseudo-inverse Gaussian on the support.
    ref = scipy.stats.multivariate_normal(a.mean(0), mle_cov(a), allow_singular=True)
    expected = float(ref.logpdf(b).mean()) / 9
    by_fit = metrics.compute(_stats(b), reference=fit, names=["heldout_loglik"])["heldout_loglik"]
    by_window = metrics.compute(_stats(b), reference=_stats(a), names=["heldout_loglik"])["heldout_loglik"]
    assert _relerr(by_fit, by_window) < 1e-12
    assert _relerr(by_fit, expected) < 1e-9
    with pytest.raises(ValueError, match="at least 2 rows"):
        metrics.GaussianFit.from_stats(LayerStats(3))


def test_rank_deficient_fits_find_the_null_space_without_an_eigh(rng: np.random.Generator, eig_calls) -> None:
    # Post-LayerNorm with a learned gain: one null direction, along 1/γ rather than 1. The
    # fit finds it by inverse iteration (no eigh); its pseudo-inverse, scores and support
    # eigenvectors equal numpy's.
    d = 64
    gain = rng.uniform(0.5, 2.0, d)
    a = _layernorm(rng.standard_normal((900, d)) @ rng.standard_normal((d, d))) * gain + 0.1
    b = _layernorm(rng.standard_normal((500, d)) * np.linspace(0.5, 2, d)) * gain + 0.1
    eig_calls.update(eigvalsh=0, eigh=0)
    fit = metrics.compute(_stats(a), names=["gsam"], with_fit=True).fit
    assert eig_calls == {"eigvalsh": 1, "eigh": 0} and fit.rank == d - 1 and fit.chol is None
    lam, vecs = np.linalg.eigh(mle_cov(a))
    support = lam > scipy_rank_tol(lam)
    pinv = (vecs[:, support] / lam[support]) @ vecs[:, support].T
    np.testing.assert_allclose(fit.precision.numpy(), pinv, rtol=1e-7, atol=1e-10 * np.abs(pinv).max())
    ref = scipy.stats.multivariate_normal(a.mean(0), mle_cov(a), allow_singular=True)
    held = metrics.compute(_stats(b), fit, names=["heldout_loglik"])["heldout_loglik"]
    assert _relerr(held, float(ref.logpdf(b).mean()) / (d - 1)) < 1e-9
    # The support eigenvectors (for the drift metrics), made once from the pseudo-inverse.
    u = fit.eigenvectors().numpy()
    assert u.shape == (d, d - 1)
    np.testing.assert_allclose(u @ u.T, vecs[:, support] @ vecs[:, support].T, atol=1e-9)
    np.testing.assert_allclose(np.abs(u[:, 0]), np.abs(vecs[:, -1]), atol=1e-9)  # λmax first, as evals
    # A log of the default metrics on the next post-LayerNorm window: one eigvalsh in all (R's
    # pseudo-determinant from C's spectrum and null basis, the window's fit from its null space).
    eig_calls.update(eigvalsh=0, eigh=0)
    m = metrics.compute(_stats(b), fit, with_fit=True)
    fit_b = m.fit
    assert eig_calls == {"eigvalsh": 1, "eigh": 0} and fit_b.null is not None
    z = (b - b.mean(0)) / b.std(0)
    assert _relerr(m["gsam_correlation"], gsam_pdet(z)[0]) < 1e-9
    assert _relerr(m["heldout_loglik"], float(ref.logpdf(b).mean()) / (d - 1)) < 1e-9
    assert _relerr(m["gsam"], gsam_pdet(b)[0]) < 1e-9
    # More null directions than inverse iteration takes on: the eigh fallback, same answers.
    w = rng.standard_normal((20, d))
    low = rng.standard_normal((400, 20)) @ w
    eig_calls.update(eigvalsh=0, eigh=0)
    fit_low = metrics.compute(_stats(low), names=["gsam"], with_fit=True).fit
    assert eig_calls == {"eigvalsh": 1, "eigh": 1} and fit_low.rank == 20
    ref_low = scipy.stats.multivariate_normal(low.mean(0), mle_cov(low), allow_singular=True)
    more = rng.standard_normal((100, 20)) @ w
    held = metrics.compute(_stats(more), fit_low, names=["heldout_loglik"])["heldout_loglik"]
    assert _relerr(held, float(ref_low.logpdf(more).mean()) / 20) < 1e-9
    corr = metrics.compute(_stats(low), names=["gsam", "gsam_correlation"])["gsam_correlation"]
    z = (low - low.mean(0)) / low.std(0)
    assert _relerr(corr, gsam_pdet(z)[0]) < 1e-9


def test_too_few_rows_give_nan_not_errors() -> None:
    s = LayerStats(5)
    m = metrics.compute(s)
    assert m["n"] == 0 and m["rank"] == 0
    assert all(math.isnan(v) for k, v in m.items() if k not in ("n", "d", "rank", "nonfinite"))
    s.update(torch.ones(1, 5))
    assert math.isnan(metrics.compute(s)["gsam"])


def test_selection_and_unknown_names() -> None:
    s = _stats(np.random.default_rng(0).standard_normal((50, 4)))
    m = metrics.compute(s, names=["gsam", "rank"])
    assert set(m) == {"gsam", "rank", "n", "d", "nonfinite"}
    with pytest.raises(ValueError, match=r"unknown metric name\(s\) 'gsma' \(did you mean 'gsam'\?\)"):
        metrics.compute(s, names=["gsma"])
    with pytest.raises(ValueError, match="selection is empty"):
        metrics.validate_names([])


def test_rank_tolerance_matches_scipy_rule() -> None:
    lam = torch.tensor([4.0, 1.0, 1e-12], dtype=torch.float64)
    assert metrics.rank_tolerance(lam, torch.float64) == pytest.approx(scipy_rank_tol(lam.numpy()))
    assert metrics.rank_tolerance(lam, torch.float32) == pytest.approx(4.0 * 1e3 * np.finfo(np.float32).eps)


def test_compute_returns_the_spectrum_it_used_on_request() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((60, 6)) @ rng.standard_normal((6, 6))
    s = LayerStats(6)
    s.update(torch.from_numpy(x))
    values = metrics.compute(s, with_spectrum=True)
    evals = values.spectrum
    plain = metrics.compute(s)
    assert values == plain and isinstance(plain, dict) and plain.spectrum is None and plain.fit is None
    assert json.loads(json.dumps(plain, allow_nan=True)) == pytest.approx(dict(plain), nan_ok=True)
    again = pickle.loads(pickle.dumps(values))  # gathered to the writer under torch.distributed
    assert dict(again) == pytest.approx(dict(values), nan_ok=True) and torch.equal(again.spectrum, evals)
    expected = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False, ddof=0)))[::-1]
    np.testing.assert_allclose(evals.numpy(), expected, rtol=1e-10, atol=1e-12 * expected[0])
    one = LayerStats(6)
    one.update(torch.from_numpy(x[:1]))
    assert metrics.compute(one, with_spectrum=True).spectrum is None  # fewer than 2 rows: no spectrum



# ---------------------------------------------------------------- cost: eigendecompositions per call
def test_metrics_without_a_spectrum_run_no_eigendecomposition(rng: np.random.Generator, eig_calls) -> None:
    x = rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16))
    stats = LayerStats(16, higher_moments=True)
    stats.update(torch.from_numpy(x))
    fit = metrics.compute(_stats(x + 0.1), names=["n"], with_fit=True).fit
    eig_calls.update(eigvalsh=0, eigh=0)
    m = metrics.compute(stats, fit, names=["mean_kurtosis", "anisotropy", "outlier_dims", "heldout_loglik"])
    assert eig_calls == {"eigvalsh": 0, "eigh": 0}
    kurt = scipy.stats.kurtosis(x, axis=0, fisher=True, bias=True)
    assert _relerr(m["mean_kurtosis"], float(kurt.mean())) < 1e-9
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = u @ u.T
    assert _relerr(m["anisotropy"], float((cos.sum() - np.trace(cos)) / (300 * 299))) < 1e-9
    ref = scipy.stats.multivariate_normal(x.mean(0) + 0.1, mle_cov(x))
    assert _relerr(m["heldout_loglik"], float(ref.logpdf(x).mean()) / 16) < 1e-9


def test_default_metrics_with_a_cached_reference_cost_one_eigvalsh(rng: np.random.Generator, eig_calls) -> None:
    # Full rank: one eigvalsh gives every spectral metric, gsam_correlation (log det R =
    # log det S - sum log S_ii) and the window's own fit (a Cholesky factorisation).
    a = rng.standard_normal((600, 24)) @ rng.standard_normal((24, 24)) + 1.0
    b = rng.standard_normal((400, 24)) @ rng.standard_normal((24, 24)) - 0.5
    fit_a = metrics.compute(_stats(a), with_fit=True).fit
    eig_calls.update(eigvalsh=0, eigh=0)
    m = metrics.compute(_stats(b), fit_a, with_fit=True)
    fit_b = m.fit
    assert eig_calls == {"eigvalsh": 1, "eigh": 0}
    assert _relerr(m["gsam"], gsam_scipy(b)[0]) < 1e-9
    z = (b - b.mean(0)) / b.std(0)
    assert _relerr(m["gsam_correlation"], gsam_scipy(z)[0]) < 1e-9
    # The cached fit scores like a fresh numpy/scipy fit of the reference window.
    expected = float(scipy.stats.multivariate_normal(a.mean(0), mle_cov(a)).logpdf(b).mean()) / 24
    assert _relerr(m["heldout_loglik"], expected) < 1e-9
    np.testing.assert_allclose(fit_b.precision.numpy(), np.linalg.inv(mle_cov(b)), rtol=1e-8, atol=0)
    np.testing.assert_allclose(fit_b.evals.numpy(), np.linalg.eigvalsh(mle_cov(b))[::-1], rtol=1e-9)
    # ... and the next log, scored against fit_b, again needs no factorisation of b.
    c = rng.standard_normal((300, 24)) @ rng.standard_normal((24, 24))
    eig_calls.update(eigvalsh=0, eigh=0)
    held = metrics.compute(_stats(c), fit_b, names=["heldout_loglik"])["heldout_loglik"]
    assert eig_calls == {"eigvalsh": 0, "eigh": 0}
    ref_b = scipy.stats.multivariate_normal(b.mean(0), mle_cov(b))
    assert _relerr(held, float(ref_b.logpdf(c).mean()) / 24) < 1e-9
    # A rank-deficient window (no Cholesky factor of its own) against the full-rank fit.
    low = rng.standard_normal((300, 5)) @ rng.standard_normal((5, 24))
    held = metrics.compute(_stats(low), fit_b, names=["heldout_loglik"])["heldout_loglik"]
    assert _relerr(held, float(ref_b.logpdf(low).mean()) / 24) < 1e-9


def test_a_rank_deficient_fit_and_correlation_still_match_scipy(rng: np.random.Generator, eig_calls) -> None:
    # Post-LayerNorm rank d - 1: neither shortcut applies (the fit needs the support's
    # eigenvectors, R its own spectrum), and both fall back to the exact decompositions.
    a, b = _layernorm(rng.standard_normal((500, 20)) * 3), _layernorm(rng.standard_normal((300, 20)) + 0.2)
    fit_a = metrics.compute(_stats(a), with_fit=True).fit
    assert fit_a.rank == 19
    m = metrics.compute(_stats(b), fit_a)
    ref = scipy.stats.multivariate_normal(a.mean(0), mle_cov(a), allow_singular=True)
    assert _relerr(m["heldout_loglik"], float(ref.logpdf(b).mean()) / 19) < 1e-9
    z = (b - b.mean(0)) / b.std(0)
    assert _relerr(m["gsam_correlation"], gsam_pdet(z)[0]) < 1e-9
    # Asked for alone, gsam_correlation decomposes R only.
    eig_calls.update(eigvalsh=0, eigh=0)
    alone = metrics.compute(_stats(b), names=["gsam_correlation"])["gsam_correlation"]
    assert eig_calls == {"eigvalsh": 1, "eigh": 0}
    assert _relerr(alone, m["gsam_correlation"]) < 1e-12


def test_the_registry_says_which_metrics_need_the_spectrum_and_a_reference(
    eig_calls: dict[str, int], rng: np.random.Generator
) -> None:
    """Each metric alone on a full-rank window: one eigendecomposition exactly when the registry
    says it needs the spectrum (gsam_correlation and drift_w2 decompose matrices of their own:
    the correlation matrix; the reference's support, once, and the product's), and a value
    only with a reference when it needs one."""
    x = rng.standard_normal((300, 12)) @ rng.standard_normal((12, 12))
    ref = metrics.compute(_stats(x[:150] + 0.1), names=["n"], with_fit=True).fit
    stats = _stats(x)
    assert set(metrics.METRICS) == set(metrics.METRIC_NAMES)
    for name, spec in metrics.METRICS.items():
        if spec.second_pass:
            continue
        eig_calls.update(eigvalsh=0, eigh=0)
        values = metrics.compute(stats, ref, names=[name])
        calls = eig_calls["eigvalsh"] + eig_calls["eigh"]
        if name in ("drift_w2", "drift_w2_relative", "gsam_correlation"):
            assert calls <= 2, name
        else:
            assert calls == (1 if spec.spectrum else 0), name
        assert math.isfinite(float(values[name])), name
        if spec.reference:
            assert name not in metrics.compute(stats, names=[name]), name
    lean = LayerStats(12, higher_moments=False)  # no 3rd/4th powers, unit sums or abs-max
    lean.update(torch.from_numpy(x))
    for name, spec in metrics.METRICS.items():
        if not spec.second_pass:
            assert (name in metrics.compute(lean, ref, names=[name])) != spec.higher_moments, name
