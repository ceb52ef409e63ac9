"""The metrics themselves: pure functions from eigenvalues or moments to numbers, in fp64.

GSAM (the benchmark report's metric) is log N + mean_i log p(x_i | mu, Sigma) for the Gaussian
fitted to the rows. With the maximum-likelihood fit (mu = mean, Sigma = S) the mean
log-likelihood has the closed form -(d/2)(1 + log 2 pi) - (1/2) log det S, so it needs only
(n, mean, covariance); on a rank-deficient covariance it is scored on the support, as
``scipy.stats.multivariate_normal(..., allow_singular=True)`` does.

References:
    Roy & Vetterli, "The effective rank", EUSIPCO 2007 (``effective_rank``).
    Chen, Wiesel, Eldar & Hero, "Shrinkage algorithms for MMSE covariance estimation",
        IEEE TSP 2010 (``oas_score``).
    Shenk et al., "Feature space saturation during training" (Delve), 2021 (``saturation``).
    Ethayarajh, "How contextual are contextualized word representations?", 2019 (``anisotropy``).
    Sun et al., "Massive activations in large language models", 2024 (``outlier_dims``).
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import torch

from gsam_monitor.metrics.fit import GaussianFit
from gsam_monitor.metrics.linalg import PRODUCT_ERROR_FACTOR, rank_tolerance, spectrum

if TYPE_CHECKING:
    from gsam_monitor.stats import LayerStats

__all__ = [
    "POWERLAW_RANGE",
    "SPECTRAL_METRICS",
    "anisotropy",
    "correlation_score",
    "gaussian_score",
    "heldout_loglik",
    "max_dim_rms",
    "oas_score",
    "oas_shrinkage",
    "outlier_dims",
    "outlier_ratios",
    "outlier_ratios_from_moments",
    "powerlaw_alpha",
    "spectral_metrics",
]

_LOG_2PI = math.log(2.0 * math.pi)

POWERLAW_RANGE: tuple[int, int] = (10, 150)
"""Ranks (1-based, inclusive) of the power-law fit of a spectrum, wherever it is fitted."""

SPECTRAL_METRICS: tuple[str, ...] = (
    "effective_rank",
    "participation_ratio",
    "condition_number",
    "powerlaw_alpha",
    "top1_variance_fraction",
    "saturation",
)
"""What ``spectral_metrics`` returns."""


def gaussian_score(evals: torch.Tensor, n: float, tol: float | torch.Tensor) -> tuple[float, int]:
    """GSAM from covariance eigenvalues: (log n + mean log-likelihood on the support, rank).

    ``tol`` is one threshold or one per eigenvalue (``eigenvalue_tolerance``).

    mean log p = -(r/2)(1 + log 2π) - (1/2) Σ_{λ>tol} log λ  (the MLE Gaussian's negative
    entropy on its r-dimensional support; the mean Mahalanobis term is tr(S⁺S) = r).
    """
    support = evals[evals > tol]
    r = int(support.numel())
    if r == 0:
        return math.nan, 0
    mean_loglik = -0.5 * r * (1.0 + _LOG_2PI) - 0.5 * float(torch.log(support).sum())
    return math.log(n) + mean_loglik, r


def oas_score(evals: torch.Tensor, n: float) -> tuple[float, float]:
    """GSAM under the OAS-shrunk covariance: (score, shrinkage).

    OAS as in scikit-learn's ``oas`` (Chen et al. 2010): mu = tr S / d, alpha = tr S² / d²,
    shrinkage = min((alpha + mu²) / ((n + 1)(alpha - mu²/d)), 1), Σ = (1 - s) S + s mu I.
    Σ shares S's eigenvectors, so log det Σ and the mean Mahalanobis term tr(Σ⁻¹S) come
    from the eigenvalues alone.
    """
    lam = evals.clamp_min(0.0)
    d = lam.numel()
    shrink, mu = oas_shrinkage(lam, n, d)
    if mu <= 0:
        return math.nan, math.nan
    shrunk = (1.0 - shrink) * lam + shrink * mu
    mean_loglik = -0.5 * (d * _LOG_2PI + float(torch.log(shrunk).sum()) + float((lam / shrunk).sum()))
    return math.log(n) + mean_loglik, shrink


def oas_shrinkage(lam: torch.Tensor, n: float, d: int) -> tuple[float, float]:
    """(shrinkage s, target scale μ = tr C / d) of OAS for a covariance C with eigenvalues
    ``lam`` from ``n`` rows in ``d`` dimensions (null eigenvalues may be left out: only tr C
    and tr C² enter). As scikit-learn's ``oas``: α = tr C² / d²,
    s = min((α + μ²) / ((n + 1)(α - μ²/d)), 1)."""
    lam = lam.clamp_min(0.0)
    mu = float(lam.sum()) / d
    alpha = float((lam * lam).sum()) / d**2
    den = (n + 1.0) * (alpha - mu * mu / d)
    return (1.0 if den == 0 else min((alpha + mu * mu) / den, 1.0)), mu


def powerlaw_alpha(
    evals: torch.Tensor, rank_range: tuple[int, int] = POWERLAW_RANGE, tol: float | torch.Tensor = 0.0
) -> float:
    """Power-law exponent α of the spectrum, λ_k ∝ k^-α: least-squares slope of log λ_k on
    log k over ranks ``rank_range`` (1-based, inclusive), clipped to the eigenvalues above
    ``tol`` (one threshold or one per eigenvalue; numerically null eigenvalues are rounding
    noise, not spectrum). NaN when fewer than 3 ranks remain.
    ``analysis.powerlaw_fit`` adds the confidence interval."""
    lam = evals[(evals > tol) & (evals > 0)].sort(descending=True).values
    lo, hi = max(1, int(rank_range[0])), min(int(rank_range[1]), lam.numel())
    if hi - lo + 1 < 3:
        return math.nan
    k = torch.arange(lo, hi + 1, dtype=torch.float64)
    x = torch.log(k)
    y = torch.log(lam[lo - 1 : hi])
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
    return -slope


def spectral_metrics(evals: torch.Tensor, tol: float | torch.Tensor, rank_range: tuple[int, int]) -> dict[str, float]:
    """The ``SPECTRAL_METRICS`` of covariance eigenvalues (descending) with tolerance ``tol``."""
    lam = evals.clamp_min(0.0)
    total = float(lam.sum())
    d = lam.numel()
    if total <= 0:
        return dict.fromkeys(SPECTRAL_METRICS, math.nan)
    p = lam[lam > 0] / total
    support = evals[evals > tol]
    cum = torch.cumsum(lam, 0) / total
    k99 = int(torch.searchsorted(cum, torch.tensor(0.99, dtype=cum.dtype))) + 1
    return {
        "effective_rank": math.exp(-float((p * torch.log(p)).sum())),
        "participation_ratio": total**2 / float((lam * lam).sum()),
        "condition_number": float(support.max() / support.min()) if support.numel() else math.nan,
        "powerlaw_alpha": powerlaw_alpha(evals, rank_range, tol),
        "top1_variance_fraction": float(lam.max()) / total,
        "saturation": min(k99, d) / d,
    }


def correlation_score(
    cov: torch.Tensor,
    n: float,
    product_dtype: torch.dtype | None,
    scale: torch.Tensor | None = None,
    *,
    evals: torch.Tensor | None = None,
    null: torch.Tensor | None = None,
) -> float:
    """GSAM of the correlation matrix: -(r/2)(1 + log 2π) - (1/2) log pdet R + log n,
    scale-invariant (dimensions without variance left out).

    ``evals``: ``cov``'s eigenvalues, when at hand. Where they prove R = D⁻¹CD⁻¹ of full
    rank, log det R = log det C - Σ log C_ii (a determinant is multiplicative) and no second
    eigendecomposition is needed. ``null``: an orthonormal basis N of C's null directions
    (fp64 products), when at hand: where the eigenvalues prove R's rank d - k, log pdet R =
    log pdet C + log det(NᵀDN) - Σ log C_ii (``_correlation_from_spectrum``)."""
    var = torch.diagonal(cov)
    # Dimensions with no variance have no distribution to standardise; leave them out. With
    # fp32 products a variance is zero when it is below its own rounding error, c·eps32·scale.
    if product_dtype == torch.float64 or scale is None:
        live = var > rank_tolerance(var, product_dtype)
    else:
        floor = rank_tolerance(var, torch.float64)
        live = var > torch.clamp(PRODUCT_ERROR_FACTOR * torch.finfo(torch.float32).eps * scale, min=floor)
    if not bool(live.any()):
        return math.nan
    everywhere = bool(live.all())
    c = cov if everywhere else cov[live][:, live]  # no d x d copy in the common case
    # The error model carries over: R = D⁻¹ C D⁻¹ scales entry (i, j)'s error by 1/(sd_i sd_j).
    r_scale = None if scale is None else scale[live] / torch.diagonal(c)
    if evals is not None and everywhere:
        fast = _correlation_from_spectrum(evals, var, n, product_dtype, r_scale, null)
        if fast is not None:
            return fast
    sd = torch.sqrt(torch.diagonal(c))
    corr = c / torch.outer(sd, sd)
    ev, _, tol = spectrum(0.5 * (corr + corr.T), r_scale, product_dtype, None)
    return gaussian_score(ev, n, tol)[0]


def _correlation_from_spectrum(
    evals: torch.Tensor,
    var: torch.Tensor,
    n: float,
    product_dtype: torch.dtype | None,
    r_scale: torch.Tensor | None,
    null: torch.Tensor | None = None,
) -> float | None:
    """The correlation GSAM from C's eigenvalues when they prove R's rank, d at full rank or
    d - k with ``null`` (an orthonormal basis N of C's k null directions, fp64 products);
    ``None`` when they do not.

    null(R) = D^½ null(C), and in a basis split into C's support and N the congruence gives
    pdet R = pdet C · det(NᵀDN) / det D (det R = det C / det D at full rank: a determinant is
    multiplicative). Rank (Ostrowski: λ_j(R) = θ_j λ_j(C) with θ_j between 1/max C_ii and
    1/min C_ii, i.e. Rayleigh quotients with y = D⁻¹x): R's kept eigenvalues are at least the
    smallest kept λ(C) / max C_ii, held over twice R's largest tolerance, its relative rule at
    λmax(R) <= min(d, λmax(C) / min C_ii), or c · eps32 · Σ r_scale_i (the per-eigenvector
    bound of ``eigenvalue_tolerance`` under Cauchy-Schwarz, Σ v_i² = 1) with fp32 products;
    R's k null ones are at most max |λ| of C's null ones / min C_ii, held under half of R's
    least tolerance (scipy's rule at λmax(R) >= 1)."""
    d = var.numel()
    k = 0 if null is None else null.shape[1]
    kept = evals if k == 0 else evals[:-k]
    lam_min, lam_max = float(kept.min()), float(evals.max())
    if lam_min <= 0:
        return None
    r_max = min(float(d), lam_max / float(var.min()))
    if product_dtype == torch.float64 or r_scale is None:
        bound = rank_tolerance(torch.tensor([r_max]), product_dtype)
    else:
        bound = max(
            rank_tolerance(torch.tensor([r_max]), torch.float64),
            PRODUCT_ERROR_FACTOR * torch.finfo(torch.float32).eps * float(r_scale.clamp_min(0).sum()),
        )
    # A factor 2 of margin for the rounding of the computed eigenvalues themselves.
    if lam_min / float(var.max()) <= 2.0 * bound:
        return None
    logdet = float(torch.log(kept).sum()) - float(torch.log(var).sum())
    if k:
        tiny = float(evals[-k:].abs().max())
        if tiny / float(var.min()) >= 0.5 * rank_tolerance(torch.tensor([1.0]), torch.float64):
            return None
        logdet += float(torch.logdet((null.T * var) @ null))
    return math.log(n) - 0.5 * (d - k) * (1.0 + _LOG_2PI) - 0.5 * logdet


def heldout_loglik(
    stats: LayerStats,
    reference: LayerStats | GaussianFit,
    *,
    rtol: float | None = None,
    cov: torch.Tensor | None = None,
    chol: torch.Tensor | None = None,
    cov_u: torch.Tensor | None = None,
) -> float:
    """Mean log-likelihood per dimension of ``stats``' rows under ``reference``'s MLE Gaussian.

    Closed form from moments: with the reference fit (m, Σ) on its support (rank r, the
    pseudo-inverse and pseudo-determinant as elsewhere), the mean over the rows of log p is
    -(1/2)[r log 2π + log pdet Σ + tr(Σ⁺ S) + (μ - m)ᵀ Σ⁺ (μ - m)], divided here by r.
    Components off the reference's support are ignored.

    This measures drift of the geometry between windows (how well the earlier fit predicts
    the new activations), not Gaussianity: it falls when the covariance rotates, shrinks or
    grows, or when the mean moves.

    Args:
        stats: The window to score.
        reference: The earlier window, or its ``GaussianFit`` (factorised once and reused).
        rtol: Override the relative eigenvalue tolerance (only when ``reference`` is a window).
        cov: ``stats``' MLE covariance (fp64, CPU), when the caller has it already.
        chol: Its lower Cholesky factor, when the caller has it already (its own fit's).
        cov_u: ``cov @ U`` with U the reference fit's support eigenvectors
            (``reference.eigenvectors()``), when the caller has it already (the drift
            metrics): then Σ⁺ = U Λ⁻¹ Uᵀ gives both terms in O(d²), with no factor of
            ``cov`` and no solve.
    """
    if isinstance(reference, GaussianFit):
        fit = reference
    elif float(reference.count) < 2:
        return math.nan
    else:
        fit = GaussianFit.from_stats(reference, rtol=rtol)
    if float(stats.count) < 1 or fit.rank == 0:
        return math.nan
    r = fit.rank
    cur_cov = stats.covariance().to("cpu", torch.float64) if cov is None else cov
    dm = stats.mean.cpu().double() - fit.mean
    if cov_u is not None and fit.evecs is not None:
        # tr(Σ⁺S) = Σ_j (UᵀSU)_jj / λ_j and (μ - m)ᵀΣ⁺(μ - m) = Σ_j (u_jᵀ(μ - m))² / λ_j.
        trace_term = float(((cov_u * fit.evecs).sum(0) / fit.evals).sum())
        c = fit.evecs.T @ dm
        mean_term = float((c * c / fit.evals).sum())
    elif fit.chol is None:
        # tr(Σ⁺S) as an elementwise sum (both symmetric): O(d²) against the kept pseudo-inverse.
        trace_term = float((fit.pinv * cur_cov).sum())
        mean_term = float(dm @ fit.pinv @ dm)
    else:
        trace_term = _trace_solve(fit.chol, cur_cov, chol)
        z = torch.linalg.solve_triangular(fit.chol, dm[:, None], upper=False)
        mean_term = float((z * z).sum())
    ll = -0.5 * (r * _LOG_2PI + float(torch.log(fit.evals).sum()) + trace_term + mean_term)
    return ll / r


def _trace_solve(ref_chol: torch.Tensor, cov: torch.Tensor, chol: torch.Tensor | None) -> float:
    """tr(Σ⁻¹S) with Σ = LLᵀ: ‖L⁻¹C‖²_F when S = CCᵀ has a Cholesky factor C (one
    triangular solve), else tr(L⁻¹SL⁻ᵀ) (two)."""
    if chol is None:
        chol, info = torch.linalg.cholesky_ex(cov)
        chol = chol if int(info) == 0 else None
    if chol is not None:
        return _lower_solve_sq_norm(ref_chol, chol)
    y = torch.linalg.solve_triangular(ref_chol, cov, upper=False)
    return float(torch.diagonal(torch.linalg.solve_triangular(ref_chol, y.T, upper=False)).sum())


_SOLVE_BLOCKS = 4
"""Column blocks of ``_lower_solve_sq_norm``: 0.47 of a dense solve's flops; measured at
d = 4096 on the project's 2-core CPU, 0.41 s against 0.80 s dense (8 blocks: 0.43 s; more
blocks lose to the per-call overhead and the copies of the trailing blocks)."""


def _lower_solve_sq_norm(ref_chol: torch.Tensor, chol: torch.Tensor) -> float:
    """‖L⁻¹C‖²_F for lower-triangular L and C, by column blocks.

    L⁻¹C is lower-triangular too, so the columns of block [c0, c1) are zero above row c0 and
    solve against the trailing block L[c0:, c0:] alone: a dense solve would spend two thirds
    of its flops on the zeros."""
    d = chol.shape[0]
    blocks = _SOLVE_BLOCKS if d >= 256 else 1
    edges = [d * i // blocks for i in range(blocks + 1)]
    total = chol.new_zeros(())
    for c0, c1 in itertools.pairwise(edges):
        w = torch.linalg.solve_triangular(ref_chol[c0:, c0:], chol[c0:, c0:c1], upper=False)
        total += (w * w).sum()
    return float(total)


def anisotropy(stats: LayerStats) -> float:
    """Mean pairwise cosine similarity of the (uncentred) rows, i ≠ j:
    (‖Σ u_i‖² - n) / (n(n - 1)) with u_i = x_i/‖x_i‖ (Ethayarajh 2019)."""
    n = float(stats.count)
    if n < 2:
        return math.nan
    u = stats.unit_sum.double()
    return (float(u @ u) - n) / (n * (n - 1.0))


OUTLIER_MARGIN_Z = 4.0
"""Standard errors taken off each dimension's mean square before it is compared (``outlier_ratios``)."""


def outlier_ratios(stats: LayerStats) -> torch.Tensor:
    """Per-dimension magnitude against the layer's typical magnitude, fp64 on the CPU: the
    root mean square of dimension j over the median root mean square of the dimensions,

        ratio_j = sqrt(max(m_j - z se_j, 0) / median_k m_k),   m_j = var_j + mean_j²,

    with m_j lowered by ``OUTLIER_MARGIN_Z`` = 4 standard errors of a mean square over n rows
    (se_j² = (2 var_j² + 4 mean_j² var_j) / n, Gaussian rows), so that a few rows cannot make a
    dimension look large. The median is ``torch.median``'s (the lower middle value when d is
    even); all zeros when it is 0, not finite, or the window is empty.

    A dimension is an outlier dimension (the "massive activations" of LLM residual streams,
    Sun et al. 2024, whose magnitudes reach about 1,000 times the median) when its ratio exceeds
    the factor (10 by default): ``outlier_dims`` counts them and the monitor tracks them by
    index, from this one rule. It compares a magnitude with the typical magnitude, never a noise
    with a noise: for rows of equal spread the ratios stay near 1 whatever the means are, and
    a dimension offset by a constant (a massive activation is nearly constant over tokens)
    counts by its magnitude.
    """
    return outlier_ratios_from_moments(*_cpu_moments(stats), float(stats.count))


def outlier_ratios_from_moments(mean: torch.Tensor, var: torch.Tensor, n: float) -> torch.Tensor:
    """``outlier_ratios`` from a window's per-dimension means and (MLE) variances over ``n`` rows."""
    var = var.to(torch.float64).clamp_min(0.0)
    mean = mean.to(torch.float64)
    if n <= 0:
        return torch.zeros_like(var)
    square = var + mean * mean
    med = float(square.median())
    if not (med > 0 and math.isfinite(med)):
        return torch.zeros_like(var)
    se = torch.sqrt((2.0 * var * var + 4.0 * mean * mean * var) / n)
    low = (square - OUTLIER_MARGIN_Z * se).clamp_min(0.0)
    return torch.nan_to_num(torch.sqrt(low / med), nan=0.0)


def max_dim_rms(stats: LayerStats) -> float:
    """The root mean square of the layer's largest dimension, max_j sqrt(var_j + mean_j²), in the
    activations' units (NaN for an empty window): the size of its most massive activation, whose
    growth precedes loss spikes in large transformers."""
    if float(stats.count) <= 0:
        return math.nan
    mean, var = _cpu_moments(stats)
    return float(torch.sqrt(var.clamp_min(0.0) + mean * mean).max())


def _cpu_moments(stats: LayerStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and MLE variance of a window, fp64 on the CPU."""
    return stats.mean.to("cpu", torch.float64), stats.variance().to("cpu", torch.float64)


def outlier_dims(stats: LayerStats, factor: float = 10.0) -> int:
    """Number of dimensions whose root mean square exceeds ``factor`` × the median root mean
    square of the dimensions, with a margin for sampling error (``outlier_ratios(stats) > factor``)."""
    return int((outlier_ratios(stats) > factor).sum())
