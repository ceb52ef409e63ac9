"""Drift from a reference window (Bures–Wasserstein, OAS KL) and RankMe, against independent
fp64 numpy/scipy/scikit-learn computations on the rows themselves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from gsam_monitor import LayerStats, metrics
from tests.reference import mle_cov, scipy_rank_tol
from tests.reference_drift import kl_oas, w2sq_eig, w2sq_sqrtm
from tests.test_metrics import _layernorm, _stats

DRIFT = list(metrics.DRIFT_METRICS)




def _drift(cur: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    return metrics.compute(_stats(cur), reference=_stats(ref), names=DRIFT)


def _pair(rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray]:
    d = 16
    mix = rng.standard_normal((d, d))
    if kind == "full":
        return rng.standard_normal((400, d)) @ mix + 1, rng.standard_normal((300, d)) @ (mix + 0.3) + 1.2
    if kind == "layernorm":  # both on the hyperplane sum(x) = 0: rank d - 1
        return (_layernorm(rng.standard_normal((400, d)) @ mix), _layernorm(rng.standard_normal((300, d)) @ mix + 0.5))
    if kind == "low_rank":  # rank 5 and rank 7, different subspaces
        return (rng.standard_normal((400, 5)) @ rng.standard_normal((5, d)),
                rng.standard_normal((300, 7)) @ rng.standard_normal((7, d)) + 0.2)
    if kind == "few_rows":  # N <= d on both sides
        return rng.standard_normal((12, d)) @ mix, rng.standard_normal((9, d)) @ mix
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["full", "layernorm", "low_rank", "few_rows"])
def test_w2_equals_the_sqrtm_formula_and_the_eigenvalue_formula(kind: str, rng: np.random.Generator) -> None:
    a, b = _pair(rng, kind)
    got = _drift(a, b)
    by_eig = w2sq_eig(a, b)
    assert got["drift_w2"] ** 2 == pytest.approx(by_eig, rel=1e-7)
    # sqrtm of a singular matrix is accurate to about sqrt(eps) only.
    assert got["drift_w2"] ** 2 == pytest.approx(w2sq_sqrtm(a, b), rel=1e-9 if kind == "full" else 1e-5)
    total = np.trace(mle_cov(a)) + np.trace(mle_cov(b))
    assert got["drift_w2_relative"] == pytest.approx(by_eig / total, rel=1e-7)
    assert math.isfinite(got["drift_kl_oas"]) and got["drift_kl_oas"] > 0


@pytest.mark.parametrize("kind", ["full", "layernorm", "low_rank", "few_rows"])
def test_kl_oas_equals_sklearn_oas_written_out(kind: str, rng: np.random.Generator) -> None:
    a, b = _pair(rng, kind)
    assert _drift(a, b)["drift_kl_oas"] == pytest.approx(kl_oas(a, b), rel=1e-8)
    assert _drift(b, a)["drift_kl_oas"] == pytest.approx(kl_oas(b, a), rel=1e-8)


@pytest.mark.parametrize("kind", ["full", "layernorm", "few_rows"])
def test_a_window_against_itself_is_zero(kind: str, rng: np.random.Generator) -> None:
    a, _ = _pair(rng, kind)
    stats = _stats(a)
    same = metrics.compute(stats, reference=stats, names=DRIFT)
    assert same["drift_w2"] == 0 and same["drift_w2_relative"] == 0
    assert abs(same["drift_kl_oas"]) < 1e-10
    # ... and the smallest change is not: a mean moved by 1e-3 sd, a covariance stretched 0.1 %.
    sd = a.std(0).mean()
    moved = metrics.compute(_stats(a + 1e-3 * sd), reference=stats, names=DRIFT)
    assert moved["drift_w2"] == pytest.approx(1e-3 * sd * math.sqrt(a.shape[1]), rel=1e-6)
    stretched = metrics.compute(_stats(a * 1.001), reference=stats, names=DRIFT)
    assert stretched["drift_w2_relative"] > 0 and stretched["drift_kl_oas"] > 0


def test_w2_is_symmetric_and_satisfies_the_triangle_inequality(rng: np.random.Generator) -> None:
    d = 12
    windows = [
        rng.standard_normal((200, d)) @ rng.standard_normal((d, d)) * s + m for s, m in ((1, 0), (2, 1), (0.5, -1))
    ]
    windows += [_layernorm(rng.standard_normal((200, d))), rng.standard_normal((8, d))]  # rank d-1, N < d
    stats = [_stats(w) for w in windows]
    w2 = np.array([[metrics.compute(a, reference=b, names=["drift_w2"])["drift_w2"] for b in stats] for a in stats])
    assert np.allclose(w2, w2.T, rtol=1e-9)  # computed one way (b factorised), symmetric all the same
    k = len(stats)
    for i in range(k):
        for j in range(k):
            for m in range(k):
                assert w2[i, m] <= w2[i, j] + w2[j, m] + 1e-9


def test_relative_w2_is_scale_free_and_one_for_orthogonal_supports(rng: np.random.Generator) -> None:
    a, b = _pair(rng, "full")
    base = _drift(a, b)
    scaled = _drift(1e3 * a, 1e3 * b)
    assert scaled["drift_w2_relative"] == pytest.approx(base["drift_w2_relative"], rel=1e-9)
    assert scaled["drift_w2"] == pytest.approx(1e3 * base["drift_w2"], rel=1e-9)
    # Equal means, covariances on orthogonal coordinates: the trace term vanishes, relative W2 = 1.
    x = np.zeros((300, 8))
    y = np.zeros((300, 8))
    x[:, :4] = rng.standard_normal((300, 4))
    y[:, 4:] = rng.standard_normal((300, 4))
    x -= x.mean(0)
    y -= y.mean(0)
    assert _drift(x, y)["drift_w2_relative"] == pytest.approx(1.0, rel=1e-12)


def test_the_reference_as_a_fit_or_a_window_gives_the_same_numbers(rng: np.random.Generator) -> None:
    a, b = _pair(rng, "layernorm")
    names = [*DRIFT, "heldout_loglik"]
    by_window = metrics.compute(_stats(a), reference=_stats(b), names=names)
    by_fit = metrics.compute(_stats(a), reference=metrics.GaussianFit.from_stats(_stats(b)), names=names)
    for name in names:
        assert by_fit[name] == pytest.approx(by_window[name], rel=1e-12)
    one_row = LayerStats(16)
    one_row.update(torch.from_numpy(a[:1]))
    assert all(math.isnan(v) for k, v in metrics.compute(_stats(a), one_row, names=names).items() if k in names)


@pytest.mark.parametrize("kind", ["full", "layernorm", "low_rank", "few_rows"])
def test_heldout_loglik_beside_the_drift_metrics_uses_their_product_and_no_factor(
    kind: str, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = _pair(rng, kind)
    fit = metrics.GaussianFit.from_stats(_stats(b))
    alone = metrics.compute(_stats(a), fit, names=["heldout_loglik"])["heldout_loglik"]
    factors = []
    for name in ("cholesky_ex", "solve_triangular"):
        real = getattr(torch.linalg, name)
        monkeypatch.setattr(torch.linalg, name, lambda *x, _real=real, **k: factors.append(1) or _real(*x, **k))
    both = metrics.compute(_stats(a), fit, names=[*DRIFT, "heldout_loglik"])["heldout_loglik"]
    assert not factors  # Σ⁺ = U Λ⁻¹ Uᵀ on S U, the drift metrics' product: no factor of S, no solve
    # The Gaussian on R's support (numpy's eigh, scipy's rank rule): its pseudo-determinant
    # and pseudo-inverse; rows off the support are scored by their projection on it.
    lam, vecs = np.linalg.eigh(mle_cov(b))
    keep = lam > scipy_rank_tol(lam)
    lam, vecs = lam[keep], vecs[:, keep]
    assert fit.rank == keep.sum()
    z = (a - b.mean(0)) @ vecs / np.sqrt(lam)
    expected = -0.5 * (np.log(2 * np.pi) * len(lam) + np.log(lam).sum() + (z * z).sum(1).mean()) / len(lam)
    if kind == "full":
        gauss = scipy.stats.multivariate_normal(b.mean(0), mle_cov(b))
        assert expected == pytest.approx(float(gauss.logpdf(a).mean()) / 16, rel=1e-12)
    assert both == pytest.approx(expected, rel=1e-9)
    assert alone == pytest.approx(expected, rel=1e-9)


def test_drift_is_opt_in_and_needs_a_reference(rng: np.random.Generator) -> None:
    a, b = _pair(rng, "full")
    assert not set(DRIFT) & set(metrics.DEFAULT_METRICS)
    assert "rankme" in metrics.DEFAULT_METRICS
    assert not set(DRIFT) & set(metrics.compute(_stats(a), names=DRIFT))  # no reference, no drift
    assert set(DRIFT) <= set(metrics.compute(_stats(a), reference=_stats(b), names="all"))


def _rankme_svd(x: np.ndarray, eps: float = 1e-7) -> float:
    """The paper's Eq. 1 on the singular values of the stored, centred rows."""
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)  # min(N, d) values
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("kind", ["full", "layernorm", "low_rank", "few_rows"])
def test_rankme_equals_the_svd_of_the_stored_rows(kind: str, rng: np.random.Generator) -> None:
    x, _ = _pair(rng, kind)
    got = metrics.compute(_stats(x), names=["rankme", "effective_rank"])
    assert got["rankme"] == pytest.approx(_rankme_svd(x), rel=1e-9)
    # Not the effective rank, which weights by sigma^2: RankMe is the larger unless the spectrum is flat.
    lam = np.linalg.eigvalsh(mle_cov(x))
    lam = lam[lam > scipy_rank_tol(lam)]
    p = lam / lam.sum()
    assert got["effective_rank"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)
    assert got["rankme"] > got["effective_rank"] * 1.001


def test_rankme_epsilon_convention(rng: np.random.Generator) -> None:
    # eps = 1e-7 enters each of the min(N, d) terms; a rank-3 window in d = 40 with N = 1000 rows has
    # 37 null singular values, each adding -eps log eps to the entropy.
    x = rng.standard_normal((1000, 3)) @ rng.standard_normal((3, 40))
    got = metrics.compute(_stats(x), names=["rankme"])["rankme"]
    assert got == pytest.approx(_rankme_svd(x), rel=1e-9)
    assert got != pytest.approx(_rankme_svd(x, eps=0.0), rel=1e-7)
    assert metrics.rankme(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64), n=10, eps=0.0) == pytest.approx(
        math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))), rel=1e-12
    )
