"""The paper protocol: the original benchmark code's recipe, and why its Table 1 ranks widths.

The reference here is the original recipe written out with numpy and scipy only (np.cov,
np.linalg.cholesky retries, ``scipy.stats.multivariate_normal(...).logpdf``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from gsam_monitor.eval.protocols import paper_fit, paper_score

# Table 1 of the GSAM benchmark report: model -> (hidden size d, reported score).
TABLE_1 = {
    "gpt-neo-125M": (768, 2441.50),
    "gpt-neo-1.3B": (2048, 9868.11),
    "gpt-neo-2.7B": (2560, 12886.67),
    "llama2-7B": (4096, 22019.19),
    "mpt-7B": (4096, 21952.11),
    "pythia-6.9B": (4096, 21983.34),
    "falcon-7B": (4544, 24625.55),
}
N = 300
# Measured (seed 0; other seeds move the scores by < 0.01 %): pure N(0, I) noise scores
# 2277.70 (d=768, -6.7 % of gpt-neo-125M), 9773.96 (-0.95 %), 12804.47 (-0.64 %),
# 21929.58 (-0.41 % llama, -0.10 % mpt, -0.24 % pythia) and 24596.46 (-0.12 % falcon).
REL_BOUND_ALL = 0.07  # every entry of Table 1, d=768 included
REL_BOUND_WIDE = 0.01  # d >= 2048


def reference_paper_score(vectors: np.ndarray, with_log_n: bool = False) -> tuple[float, int]:
    """The original recipe with numpy/scipy (independent of the code under test)."""
    x = np.asarray(vectors, dtype=np.float64)
    sd = x.std(axis=0)
    sd[sd == 0] = 1.0
    z = (x - x.mean(axis=0)) / sd
    cov = np.cov(z, rowvar=False)
    eps, retries = 1e-6, 0
    for _ in range(10):
        try:
            np.linalg.cholesky(cov)
            break
        except np.linalg.LinAlgError:
            cov = cov + eps * np.eye(cov.shape[0])
            eps *= 10
            retries += 1
    score = float(scipy.stats.multivariate_normal(z.mean(axis=0), cov).logpdf(z).mean())
    return score + (math.log(len(x)) if with_log_n else 0.0), retries


@pytest.fixture(scope="module")
def noise_scores() -> dict[int, float]:
    widths = sorted({d for d, _ in TABLE_1.values()})
    return {
        d: paper_score(np.random.default_rng(0).standard_normal((N, d))) for d in widths
    }


def test_pure_noise_reproduces_table_1(noise_scores):
    for model, (d, reported) in TABLE_1.items():
        rel = abs(noise_scores[d] - reported) / reported
        assert rel < REL_BOUND_ALL, (model, noise_scores[d], reported)
        if d >= 2048:
            assert rel < REL_BOUND_WIDE, (model, noise_scores[d], reported)


def test_pure_noise_ranks_models_like_table_1(noise_scores):
    # Table 1's ranking is the ranking of hidden sizes, Falcon's "best" included.
    by_width = sorted(TABLE_1.values())
    assert [noise_scores[d] for d, _ in by_width] == sorted(noise_scores[d] for d, _ in by_width)
    assert max(noise_scores, key=noise_scores.get) == TABLE_1["falcon-7B"][0]


def test_noise_score_is_the_ridge_term():
    # With rank N-1 < d the ridge eps=1e-6 fills d-N+1 directions: each adds -½ log 1e-6.
    d = 768
    fit = paper_fit(np.random.default_rng(1).standard_normal((N, d)))
    assert fit.retries == 1 and fit.ridge == pytest.approx(1e-6)
    ridge_term = 0.5 * (d - (N - 1)) * math.log(1e6)
    assert ridge_term > fit.score > 0.5 * ridge_term


@pytest.mark.parametrize("with_log_n", [False, True])
def test_paper_score_equals_numpy_scipy_recipe_when_n_below_d(with_log_n):
    x = np.random.default_rng(2).standard_normal((N, 768)) * 3.0 + 1.0
    ref, ref_retries = reference_paper_score(x, with_log_n)
    fit = paper_fit(x, with_log_n=with_log_n)
    assert fit.retries == ref_retries == 1
    assert fit.score == pytest.approx(ref, rel=1e-9)


def test_paper_score_equals_reference_when_n_above_d_no_ridge(rng):
    x = rng.standard_normal((200, 20)) @ rng.standard_normal((20, 20))
    ref, retries = reference_paper_score(x)
    fit = paper_fit(x)
    assert retries == fit.retries == 0 and fit.ridge == 0.0
    assert fit.score == pytest.approx(ref, rel=1e-10)


def test_with_log_n_adds_log_n(rng):
    x = rng.standard_normal((50, 8))
    assert paper_score(x, with_log_n=True) - paper_score(x) == pytest.approx(math.log(50))


def test_zero_variance_dimensions_are_left_unscaled(rng):
    x = rng.standard_normal((100, 6))
    x[:, 2] = 5.0  # constant: std 0, z-score would divide by zero
    ref, retries = reference_paper_score(x)
    fit = paper_fit(x)
    assert retries == fit.retries >= 1
    assert math.isfinite(fit.score) and fit.score == pytest.approx(ref, rel=1e-9)


def test_paper_fit_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"expected a 2-D array .* got shape \(5,\)"):
        paper_fit(np.zeros(5))
    with pytest.raises(ValueError, match=r"N >= 2, got shape \(1, 3\)"):
        paper_fit(np.zeros((1, 3)))


def test_paper_fit_rejects_non_finite(rng):
    x = rng.standard_normal((10, 3))
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="expected finite values, got NaN or Inf"):
        paper_fit(x)


def test_paper_fit_gives_up_after_ten_retries(rng, monkeypatch):
    def never_positive_definite(matrix):
        return torch.zeros_like(matrix), torch.tensor(1)

    # A covariance of z-scores always succeeds within 10 retries; force the failure path.
    monkeypatch.setattr(torch.linalg, "cholesky_ex", never_positive_definite)
    with pytest.raises(np.linalg.LinAlgError, match="not positive definite even after 10"):
        paper_fit(rng.standard_normal((10, 3)))
