"""Metrics of activation geometry, computed in fp64 from streaming moments.

Every function here is pure: it reads a ``LayerStats`` (or eigenvalues) and returns numbers.
``compute`` runs one eigendecomposition of the MLE covariance and derives every spectral
metric from it; the correlation-matrix variant of GSAM needs a second one.

GSAM (the benchmark report's metric) is log N + mean_i log p(x_i | mu, Sigma) for the Gaussian
fitted to the rows. With the maximum-likelihood fit (mu = mean, Sigma = S) the mean
log-likelihood has the closed form -(d/2)(1 + log 2 pi) - (1/2) log det S, so it needs only
(n, mean, covariance). It is the negative entropy of the fitted Gaussian plus log N: a
log-volume, changed by -d log c when activations are scaled by c, and blind to everything
beyond the first two moments. ``mean_kurtosis`` and ``mardia_kurtosis`` see what it cannot.

Rank deficiency is the common case, not an edge case: post-LayerNorm outputs lie in a
hyperplane (rank d - 1), and N <= d windows have rank < N. Then ``gsam`` is scored on the
support, exactly as ``scipy.stats.multivariate_normal(..., allow_singular=True)`` does: the
pseudo-determinant over the eigenvalues above ``rank_tolerance`` and r = rank dimensions
in place of d. ``rank`` is reported beside it, and ``gsam_oas`` (Oracle Approximating
Shrinkage, Chen et al. 2010) is always finite.

Which eigenvalues are numerically null depends on how the Gram products were computed
(``eigenvalue_tolerance``): with fp64 products scipy's rule (relative to λmax) applies and
the rank equals scipy's; with fp32 products the tolerance of each eigenvalue comes from the
product's per-entry error model, so that one huge dimension (the "massive activations" of
LLMs) does not hide every other direction.

References:
    Roy & Vetterli, "The effective rank", EUSIPCO 2007 (``effective_rank``).
    Chen, Wiesel, Eldar & Hero, "Shrinkage algorithms for MMSE covariance estimation",
        IEEE TSP 2010 (``gsam_oas``).
    Mardia, "Measures of multivariate skewness and kurtosis", Biometrika 1970.
    Shenk et al., "Feature space saturation during training" (Delve), 2021 (``saturation``).
    Sun et al., "Massive activations in large language models", 2024 (``outlier_dims``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gsam_monitor.stats import LayerStats, MardiaAccumulator

__all__ = [
    "DEFAULT_METRICS",
    "METRIC_NAMES",
    "compute",
    "compute_with_spectrum",
    "eigenvalue_tolerance",
    "eigenvalues",
    "gaussian_score",
    "oas_score",
    "powerlaw_alpha",
    "rank_tolerance",
]

_LOG_2PI = math.log(2.0 * math.pi)

METRIC_NAMES: tuple[str, ...] = (
    "n",
    "d",
    "rank",
    "nonfinite",
    "gsam",
    "gsam_correlation",
    "gsam_oas",
    "mean_kurtosis",
    "effective_rank",
    "participation_ratio",
    "condition_number",
    "powerlaw_alpha",
    "top1_variance_fraction",
    "saturation",
    "anisotropy",
    "outlier_dims",
    "heldout_loglik",
    "mardia_kurtosis",
)
"""Every key ``compute`` can return."""

DEFAULT_METRICS: tuple[str, ...] = tuple(m for m in METRIC_NAMES if m != "mardia_kurtosis")
"""What ``compute`` returns by default (``heldout_loglik`` only when given a reference;
``mardia_kurtosis`` needs a second pass over the rows and is returned when one is given)."""

_HIGHER = {"mean_kurtosis", "anisotropy"}


def validate_names(names: Iterable[str] | str | None) -> tuple[str, ...]:
    """Check a metric selection; ``None`` or ``"default"`` means ``DEFAULT_METRICS``.

    Raises:
        ValueError: naming the unknown metric and listing the valid ones.
    """
    if names is None or names == "default":
        return DEFAULT_METRICS
    if names == "all":
        return METRIC_NAMES
    if isinstance(names, str):
        names = [names]
    names = tuple(names)
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown:
        import difflib

        hints = {u: difflib.get_close_matches(u, METRIC_NAMES, n=1) for u in unknown}
        said = ", ".join(f"{u!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for u, h in hints.items())
        raise ValueError(
            f"metrics: unknown metric name(s) {said}. Valid names: {', '.join(METRIC_NAMES)}; or 'default' / 'all'."
        )
    if not names:
        raise ValueError("metrics: the selection is empty; pass 'default' or a list of names.")
    return names


def rank_tolerance(
    eigenvalues: torch.Tensor, product_dtype: torch.dtype | None = None, rtol: float | None = None
) -> float:
    """Absolute eigenvalue threshold below which a direction is numerically null.

    The rule is scipy's (``scipy.stats._multivariate._eigvalsh_to_eps``): ``rtol * max|λ|``
    with ``rtol = 1e6 · eps(float64) ≈ 2.2e-10`` when the Gram products were accumulated
    in fp64, and ``1e3 · eps(float32) ≈ 1.2e-4`` when they were fp32. With fp64 products it
    therefore finds the same rank as scipy on the same data. For fp32 products the metrics
    use ``eigenvalue_tolerance`` instead (per eigenvector, from the product's error model);
    this scalar rule is its fallback when no eigenvectors are at hand.

    Args:
        eigenvalues: The covariance eigenvalues (any order).
        product_dtype: The dtype the Gram products were computed in (``LayerStats.product_dtype``).
        rtol: Override the relative tolerance.
    """
    if eigenvalues.numel() == 0:
        return 0.0
    if rtol is None:
        if product_dtype == torch.float64:
            rtol = 1e6 * torch.finfo(torch.float64).eps
        else:
            rtol = 1e3 * torch.finfo(torch.float32).eps
    return float(rtol * eigenvalues.abs().max())


PRODUCT_ERROR_FACTOR = 1.0
"""c in the fp32-product rank tolerance c · eps32 · (Σ_i |v_i| · sqrt(scale_i))².

The bound is first order and worst case: it lets every entry's rounding error push the
eigenvalue the same way. Measured with this project's CPU GEMM (OpenBLAS, torch 2.13) on
MiniLM's layers, a massive-activation dimension, rank-deficient, LayerNorm'd, 1e4-offset and
ill-conditioned data, 512 rows to whole sets per update (``benchmarks/accuracy.py
--error-model``): entry errors reach 4.1 · eps32 · sqrt(scale_i · scale_j), but rounding
errors do not align, and the rounding noise in null directions stays below 0.03 of the
tolerance (so c = 1 leaves a 37x margin). Eigenvalue errors stay below 0.11 of the bound
but for the top eigenvalue of the massive dimension (1.5, far above its tolerance).
Directions below the bound (the smallest of an ill-conditioned set, at 0.05 of it) are
dropped: fp32 products resolve them only to a few percent."""


def eigenvalue_tolerance(
    evals: torch.Tensor,
    evecs: torch.Tensor | None,
    scale: torch.Tensor | None,
    product_dtype: torch.dtype | None,
    rtol: float | None = None,
) -> torch.Tensor:
    """Per-eigenvalue threshold below which a direction is numerically null.

    With fp64 products (or ``rtol`` given, or no eigenvectors) this is ``rank_tolerance``
    for every eigenvalue: scipy's rule. With fp32 products it is the error model of the
    product: an entry of the covariance is off by about eps32·sqrt(scale_i·scale_j)
    (``scale`` = ``LayerStats.product_scale()``, the mean square of the terms the products
    summed, per dimension), so to first order the eigenvalue of unit eigenvector v moves by
    at most

        |δλ| <= c · eps32 · (Σ_i |v_i| · sqrt(scale_i))²        (vᵀ δC v, term by term)

    and a direction is kept when its eigenvalue exceeds that bound with
    c = ``PRODUCT_ERROR_FACTOR`` (and scipy's fp64 rule, the floor set by the fp64
    eigendecomposition itself). A tolerance proportional to λmax
    would instead drop every direction below eps32·λmax: one dimension with a variance
    1e4 times the others' (massive activations) left rank 1 of 256.

    Args:
        evals: Eigenvalues of the covariance (any order).
        evecs: The matching unit eigenvectors as columns, or ``None``.
        scale: Per-dimension product scale, or ``None``.
        product_dtype: ``LayerStats.product_dtype`` (``None`` = "native": counted as fp32).
        rtol: Override: a relative tolerance ``rtol · max|λ|`` for every eigenvalue.

    Returns:
        A tensor like ``evals``: direction k is on the support when ``evals[k] > tol[k]``.
    """
    floor = rank_tolerance(evals, product_dtype if rtol is not None else torch.float64, rtol)
    tol = torch.full_like(evals, floor)
    if rtol is not None or product_dtype == torch.float64:
        return tol
    if evecs is None or scale is None:
        return torch.full_like(evals, rank_tolerance(evals, product_dtype))
    spread = evecs.abs().T @ scale.to(evecs).clamp_min(0).sqrt()
    bound = PRODUCT_ERROR_FACTOR * torch.finfo(torch.float32).eps * spread * spread
    return torch.maximum(tol, bound)


def eigenvalues(stats: LayerStats) -> torch.Tensor:
    """Eigenvalues of the MLE covariance, fp64 on the CPU, descending."""
    cov = stats.covariance(ddof=0).to("cpu", torch.float64)
    return torch.linalg.eigvalsh(cov).flip(0)


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
    mu = float(lam.sum()) / d
    if mu <= 0:
        return math.nan, math.nan
    alpha = float((lam * lam).sum()) / d**2
    num = alpha + mu * mu
    den = (n + 1.0) * (alpha - mu * mu / d)
    shrink = 1.0 if den == 0 else min(num / den, 1.0)
    shrunk = (1.0 - shrink) * lam + shrink * mu
    mean_loglik = -0.5 * (d * _LOG_2PI + float(torch.log(shrunk).sum()) + float((lam / shrunk).sum()))
    return math.log(n) + mean_loglik, shrink


def powerlaw_alpha(
    evals: torch.Tensor, rank_range: tuple[int, int] = (10, 150), tol: float | torch.Tensor = 0.0
) -> float:
    """Power-law exponent α of the spectrum, λ_k ∝ k^-α: least-squares slope of log λ_k on
    log k over ranks ``rank_range`` (1-based, inclusive), clipped to the eigenvalues above
    ``tol`` (one threshold or one per eigenvalue; numerically null eigenvalues are rounding
    noise, not spectrum). NaN when fewer than 3 ranks remain.
    ``analysis.spectrum.powerlaw_alpha`` adds the CI."""
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


def _spectral(evals: torch.Tensor, tol: float | torch.Tensor, rank_range: tuple[int, int]) -> dict[str, float]:
    lam = evals.clamp_min(0.0)
    total = float(lam.sum())
    d = lam.numel()
    if total <= 0:
        return dict.fromkeys(
            (
                "effective_rank",
                "participation_ratio",
                "condition_number",
                "powerlaw_alpha",
                "top1_variance_fraction",
                "saturation",
            ),
            math.nan,
        )
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


def _spectrum(
    cov: torch.Tensor, scale: torch.Tensor | None, product_dtype: torch.dtype | None, rtol: float | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(eigenvalues descending, eigenvectors or None, per-eigenvalue tolerance) of ``cov``.

    fp64 products need only the eigenvalues (scipy's rule); fp32 products need the vectors
    for their error model (``eigenvalue_tolerance``)."""
    if product_dtype == torch.float64 or rtol is not None or scale is None:
        evals = torch.linalg.eigvalsh(cov).flip(0)
        return evals, None, eigenvalue_tolerance(evals, None, None, product_dtype, rtol)
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0), evecs.flip(1)
    return evals, evecs, eigenvalue_tolerance(evals, evecs, scale, product_dtype, rtol)


def _correlation_score(
    cov: torch.Tensor, n: float, product_dtype: torch.dtype | None, scale: torch.Tensor | None = None
) -> float:
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
    c = cov[live][:, live]
    sd = torch.sqrt(torch.diagonal(c))
    corr = c / torch.outer(sd, sd)
    # The error model carries over: R = D⁻¹ C D⁻¹ scales entry (i, j)'s error by 1/(sd_i sd_j).
    r_scale = None if scale is None else scale[live] / torch.diagonal(c)
    ev, _, tol = _spectrum(0.5 * (corr + corr.T), r_scale, product_dtype, None)
    return gaussian_score(ev, n, tol)[0]


def heldout_loglik(stats: LayerStats, reference: LayerStats, *, rtol: float | None = None) -> float:
    """Mean log-likelihood per dimension of ``stats``' rows under ``reference``'s MLE Gaussian.

    Closed form from moments: with the reference fit (m, Σ) on its support (rank r, the
    pseudo-inverse and pseudo-determinant as elsewhere), the mean over the rows of log p is
    -(1/2)[r log 2π + log pdet Σ + tr(Σ⁺ S) + (μ - m)ᵀ Σ⁺ (μ - m)], divided here by r.
    Components off the reference's support are ignored.

    This measures drift of the geometry between windows (how well the earlier fit predicts
    the new activations), not Gaussianity: it falls when the covariance rotates, shrinks or
    grows, or when the mean moves.
    """
    if float(reference.count) < 2 or float(stats.count) < 1:
        return math.nan
    ref_cov = reference.covariance().to("cpu", torch.float64)
    evals, vecs = torch.linalg.eigh(ref_cov)
    scale = reference.product_scale().to("cpu", torch.float64)
    keep = evals > eigenvalue_tolerance(evals, vecs, scale, reference.product_dtype, rtol)
    lam, v = evals[keep], vecs[:, keep]
    r = lam.numel()
    if r == 0:
        return math.nan
    cur_cov = stats.covariance().to("cpu", torch.float64)
    dm = (stats.mean.cpu() - reference.mean.cpu()) @ v
    trace_term = float((torch.diagonal(v.T @ cur_cov @ v) / lam).sum())
    mean_term = float((dm * dm / lam).sum())
    ll = -0.5 * (r * _LOG_2PI + float(torch.log(lam).sum()) + trace_term + mean_term)
    return ll / r


def anisotropy(stats: LayerStats) -> float:
    """Mean pairwise cosine similarity of the (uncentred) rows, i ≠ j:
    (‖Σ u_i‖² - n) / (n(n - 1)) with u_i = x_i/‖x_i‖ (Ethayarajh 2019)."""
    n = float(stats.count)
    if n < 2:
        return math.nan
    u = stats.unit_sum.double()
    return (float(u @ u) - n) / (n * (n - 1.0))


def outlier_dims(stats: LayerStats, factor: float = 10.0) -> int:
    """Number of dimensions whose variance, or |mean|, exceeds ``factor`` × its median over
    dimensions (the "massive activations" of LLM residual streams)."""
    var = stats.variance().cpu()
    absmean = stats.mean.abs().cpu()
    flagged = torch.zeros_like(var, dtype=torch.bool)
    for v in (var, absmean):
        med = float(v.median())
        if med > 0 and math.isfinite(med):
            flagged |= v > factor * med
    return int(flagged.sum())


def compute_with_spectrum(
    stats: LayerStats,
    reference: LayerStats | None = None,
    *,
    names: Iterable[str] | str | None = None,
    mardia: MardiaAccumulator | None = None,
    powerlaw_range: tuple[int, int] = (10, 150),
    outlier_factor: float = 10.0,
    rank_rtol: float | None = None,
) -> tuple[dict[str, float], torch.Tensor | None]:
    """``compute``, also returning the covariance eigenvalues it used (or ``None``)."""
    wanted = set(validate_names(names))
    n = float(stats.count)
    out: dict[str, float] = {"n": n, "d": stats.dim, "nonfinite": int(stats.nonfinite)}
    if mardia is not None:
        wanted.add("mardia_kurtosis")
    if reference is None:
        wanted.discard("heldout_loglik")
    if not stats.higher_moments:
        wanted -= _HIGHER
    if n < 2:
        out.update({k: math.nan for k in wanted if k not in out})
        if "rank" in wanted:
            out["rank"] = 0
        return {k: v for k, v in out.items() if k in wanted or k in ("n", "d", "nonfinite")}, None

    cov = stats.covariance(ddof=0).to("cpu", torch.float64)
    scale = stats.product_scale().to("cpu", torch.float64)
    evals, _, tol = _spectrum(cov, scale, stats.product_dtype, rank_rtol)
    gsam, rank = gaussian_score(evals, n, tol)
    out["gsam"], out["rank"] = gsam, rank
    if "gsam_oas" in wanted:
        out["gsam_oas"] = oas_score(evals, n)[0]
    if "gsam_correlation" in wanted:
        out["gsam_correlation"] = _correlation_score(cov, n, stats.product_dtype, scale)
    out.update(_spectral(evals, tol, powerlaw_range))
    if "mean_kurtosis" in wanted:
        k = stats.excess_kurtosis()
        k = k[torch.isfinite(k)]
        out["mean_kurtosis"] = float(k.mean()) if k.numel() else math.nan
    if "anisotropy" in wanted:
        out["anisotropy"] = anisotropy(stats)
    if "outlier_dims" in wanted:
        out["outlier_dims"] = outlier_dims(stats, outlier_factor)
    if "heldout_loglik" in wanted and reference is not None:
        out["heldout_loglik"] = heldout_loglik(stats, reference, rtol=rank_rtol)
    if mardia is not None:
        out["mardia_kurtosis"] = mardia.value()
    return {k: v for k, v in out.items() if k in wanted or k in ("n", "d", "nonfinite")}, evals


def compute(
    stats: LayerStats,
    reference: LayerStats | None = None,
    *,
    names: Iterable[str] | str | None = None,
    mardia: MardiaAccumulator | None = None,
    powerlaw_range: tuple[int, int] = (10, 150),
    outlier_factor: float = 10.0,
    rank_rtol: float | None = None,
) -> dict[str, float]:
    """Every metric of ``stats`` as a dict of floats (ints for ``n``-like counts).

    Args:
        stats: The window's statistics.
        reference: An earlier window's statistics; adds ``heldout_loglik``.
        names: A selection of ``METRIC_NAMES``; default ``DEFAULT_METRICS``.
        mardia: A finished ``MardiaAccumulator`` second pass; adds ``mardia_kurtosis``.
        powerlaw_range: Ranks (1-based, inclusive) for ``powerlaw_alpha``.
        outlier_factor: Multiple of the median for ``outlier_dims``.
        rank_rtol: Override the relative eigenvalue tolerance of ``rank_tolerance``.

    Returns:
        ``{"n", "d", "nonfinite", ...}``; with fewer than 2 rows every other metric is NaN.

    Raises:
        ValueError: for an unknown metric name.
    """
    return compute_with_spectrum(
        stats,
        reference,
        names=names,
        mardia=mardia,
        powerlaw_range=powerlaw_range,
        outlier_factor=outlier_factor,
        rank_rtol=rank_rtol,
    )[0]
