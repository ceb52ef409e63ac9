"""Metrics of activation geometry, computed in fp64 from streaming moments.

Every function here is pure: it reads a ``LayerStats`` (or eigenvalues) and returns numbers.
``compute`` is the one entry point: it runs one eigendecomposition of the MLE covariance and
derives every spectral metric from it (the correlation-matrix variant of GSAM needs a second
one); ``compute`` returns a ``MetricValues`` dict, with the eigenvalues it used (``spectrum``)
and the window's fit (``fit``) when asked (``with_spectrum=True``, ``with_fit=True``).

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

Modules: ``linalg`` (the tolerances and the eigensolve: a leaf), ``fit`` (a window's Gaussian
factorised once, for the scores that compare windows), ``scores`` (the metrics), ``rankme``
(RankMe), ``drift`` (distances to a reference window: Bures–Wasserstein, OAS KL),
``compute`` (the entry point and the metric names), ``mardia`` (the second pass),
``quantization`` (the int8 absmax round-off expected from the moments and the abs-max).

References:
    Roy & Vetterli, "The effective rank", EUSIPCO 2007 (``effective_rank``).
    Chen, Wiesel, Eldar & Hero, "Shrinkage algorithms for MMSE covariance estimation",
        IEEE TSP 2010 (``gsam_oas``).
    Mardia, "Measures of multivariate skewness and kurtosis", Biometrika 1970.
    Garrido, Balestriero, Najman & LeCun, "RankMe", ICML 2023 (``rankme``).
    Dowson & Landau, "The Fréchet distance between multivariate normal distributions",
        J. Multivariate Anal. 1982 (``drift_w2``).
    Shenk et al., "Feature space saturation during training" (Delve), 2021 (``saturation``).
    Sun et al., "Massive activations in large language models", 2024 (``outlier_dims``).
"""

from gsam_monitor.metrics.compute import (
    DEFAULT_METRICS,
    DRIFT_METRICS,
    HIGHER_MOMENT_METRICS,
    METRIC_NAMES,
    METRICS,
    REFERENCE_METRICS,
    MetricSpec,
    MetricValues,
    compute,
    validate_names,
)
from gsam_monitor.metrics.drift import bures_wasserstein, kl_oas
from gsam_monitor.metrics.fit import GaussianFit
from gsam_monitor.metrics.linalg import PRODUCT_ERROR_FACTOR, eigenvalue_tolerance, eigenvalues, rank_tolerance
from gsam_monitor.metrics.mardia import MardiaAccumulator
from gsam_monitor.metrics.quantization import int8_absmax_error
from gsam_monitor.metrics.rankme import RANKME_EPS, rankme
from gsam_monitor.metrics.scores import (
    POWERLAW_RANGE,
    anisotropy,
    gaussian_score,
    heldout_loglik,
    max_dim_rms,
    oas_score,
    outlier_dims,
    outlier_ratios,
    powerlaw_alpha,
)

__all__ = [
    "DEFAULT_METRICS",
    "DRIFT_METRICS",
    "HIGHER_MOMENT_METRICS",
    "METRICS",
    "METRIC_NAMES",
    "POWERLAW_RANGE",
    "PRODUCT_ERROR_FACTOR",
    "RANKME_EPS",
    "REFERENCE_METRICS",
    "GaussianFit",
    "MardiaAccumulator",
    "MetricSpec",
    "MetricValues",
    "anisotropy",
    "bures_wasserstein",
    "compute",
    "eigenvalue_tolerance",
    "eigenvalues",
    "gaussian_score",
    "heldout_loglik",
    "int8_absmax_error",
    "kl_oas",
    "max_dim_rms",
    "oas_score",
    "outlier_dims",
    "outlier_ratios",
    "powerlaw_alpha",
    "rank_tolerance",
    "rankme",
    "validate_names",
]
