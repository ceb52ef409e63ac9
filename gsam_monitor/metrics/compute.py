"""``compute``: every metric of one window's statistics, from one eigendecomposition.

``compute`` runs at most one eigendecomposition of the MLE covariance per call and derives
every spectral metric from it; metrics that need no spectrum (``mean_kurtosis``,
``anisotropy``, ``outlier_dims``, ``heldout_loglik`` against a ``GaussianFit``) run none. The
correlation-matrix variant of GSAM reuses it too when the correlation matrix has full rank
(log det R = log det S - Σ log S_ii); only a rank-deficient one needs a second. The window's
own ``GaussianFit`` (``with_fit=True``), the next log's reference, is made from the same
spectrum: at full rank one Cholesky factorisation more, which the held-out score against
the previous fit shares (one triangular solve).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gsam_monitor._validate import with_suggestion
from gsam_monitor.metrics.drift import DRIFT_METRICS, drift_metrics, support_product
from gsam_monitor.metrics.fit import GaussianFit
from gsam_monitor.metrics.linalg import null_space, spectrum
from gsam_monitor.metrics.rankme import rankme
from gsam_monitor.metrics.scores import (
    POWERLAW_RANGE,
    SPECTRAL_METRICS,
    anisotropy,
    correlation_score,
    gaussian_score,
    heldout_loglik,
    max_dim_rms,
    oas_score,
    outlier_dims,
    spectral_metrics,
)

if TYPE_CHECKING:
    from gsam_monitor.metrics.mardia import MardiaAccumulator
    from gsam_monitor.stats import LayerStats

__all__ = [
    "DEFAULT_METRICS",
    "DRIFT_METRICS",
    "HIGHER_MOMENT_METRICS",
    "METRICS",
    "METRIC_NAMES",
    "REFERENCE_METRICS",
    "MetricSpec",
    "MetricValues",
    "compute",
    "validate_names",
]

@dataclass(frozen=True)
class MetricSpec:
    """What one metric needs, besides the window's moments.

    Attributes:
        spectrum: The covariance eigenvalues (one eigendecomposition per window, shared).
        reference: A reference window or its fit (computed only when one is given).
        higher_moments: ``LayerStats(higher_moments=True)``.
        second_pass: A second pass over the rows (a finished ``MardiaAccumulator``).
        default: Returned by default.
    """

    spectrum: bool = False
    reference: bool = False
    higher_moments: bool = False
    second_pass: bool = False
    default: bool = True


METRICS: dict[str, MetricSpec] = {
    "n": MetricSpec(),
    "d": MetricSpec(),
    "rank": MetricSpec(spectrum=True),
    "nonfinite": MetricSpec(),
    "gsam": MetricSpec(spectrum=True),
    # Reuses the covariance spectrum when there is one; else decomposes the correlation matrix alone.
    "gsam_correlation": MetricSpec(),
    "gsam_oas": MetricSpec(spectrum=True),
    "mean_kurtosis": MetricSpec(higher_moments=True),
    **dict.fromkeys(SPECTRAL_METRICS, MetricSpec(spectrum=True)),
    "rankme": MetricSpec(spectrum=True),
    "anisotropy": MetricSpec(higher_moments=True),
    "outlier_dims": MetricSpec(),
    # The residual stream's largest dimension: massive activations grow there before training fails.
    "max_dim_rms": MetricSpec(default=False),
    "heldout_loglik": MetricSpec(reference=True),
    # drift_w2 costs a second eigendecomposition per layer, and against the previous window the
    # drift metrics mostly measure sampling noise: WindowOptions(reference="first") selects them.
    **{m: MetricSpec(spectrum=m == "drift_kl_oas", reference=True, default=False) for m in DRIFT_METRICS},
    "mardia_kurtosis": MetricSpec(second_pass=True, default=False),
}
"""Every metric ``compute`` can return, and what it needs: the one registry the name sets
below are read from."""

METRIC_NAMES: tuple[str, ...] = tuple(METRICS)
"""Every key ``compute`` can return."""

DEFAULT_METRICS: tuple[str, ...] = tuple(m for m, spec in METRICS.items() if spec.default)
"""What ``compute`` returns by default (``heldout_loglik`` only when given a reference;
``mardia_kurtosis`` needs a second pass over the rows and is returned when one is given)."""

REFERENCE_METRICS = frozenset(m for m, spec in METRICS.items() if spec.reference)
"""The metrics that compare a window with a reference window (computed when one is given)."""

HIGHER_MOMENT_METRICS = frozenset(m for m, spec in METRICS.items() if spec.higher_moments)
"""The metrics that need ``LayerStats(higher_moments=True)``."""

_ALWAYS = ("n", "d", "nonfinite")

_NEEDS_SPECTRUM = frozenset(m for m, spec in METRICS.items() if spec.spectrum)
"""The metrics read from the covariance eigenvalues."""


class MetricValues(dict):
    """What ``compute`` returns: the metric values as a dict (``{"n": ..., "gsam": ...}``), and
    what was asked for beside them.

    Attributes:
        spectrum: The covariance eigenvalues the metrics were computed from (fp64, CPU,
            descending), with ``with_spectrum=True``; else, or with fewer than 2 rows, ``None``.
        fit: The window's own ``GaussianFit``, with ``with_fit=True``; else, or with fewer than
            2 rows, ``None``.
    """

    def __init__(
        self, values: dict[str, float], spectrum: torch.Tensor | None = None, fit: GaussianFit | None = None
    ) -> None:
        super().__init__(values)
        self.spectrum = spectrum
        self.fit = fit


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
        said = ", ".join(with_suggestion(u, METRIC_NAMES) for u in dict.fromkeys(unknown))
        raise ValueError(
            f"metrics: unknown metric name(s) {said}. Valid names: {', '.join(METRIC_NAMES)}; or 'default' / 'all'."
        )
    if not names:
        raise ValueError("metrics: the selection is empty; pass 'default' or a list of names.")
    return names


def compute(
    stats: LayerStats,
    reference: LayerStats | GaussianFit | None = None,
    *,
    names: Iterable[str] | str | None = None,
    mardia: MardiaAccumulator | None = None,
    powerlaw_range: tuple[int, int] = POWERLAW_RANGE,
    outlier_factor: float = 10.0,
    rank_rtol: float | None = None,
    with_spectrum: bool = False,
    with_fit: bool = False,
) -> MetricValues:
    """Every metric of ``stats`` as a dict of floats (ints for ``n``-like counts).

    Args:
        stats: The window's statistics.
        reference: An earlier window's statistics, or its ``GaussianFit`` (factorised once,
            reused across logs); adds ``heldout_loglik`` and the selected ``DRIFT_METRICS``.
        names: A selection of ``METRIC_NAMES``; default ``DEFAULT_METRICS``.
        mardia: A finished ``MardiaAccumulator`` second pass; adds ``mardia_kurtosis``.
        powerlaw_range: Ranks (1-based, inclusive) for ``powerlaw_alpha``.
        outlier_factor: Multiple of the median for ``outlier_dims``.
        rank_rtol: Override the relative eigenvalue tolerance of ``rank_tolerance``.
        with_spectrum: Keep the covariance eigenvalues the metrics were computed from in the
            result's ``spectrum`` (e.g. for a spectrum histogram, without a second
            eigendecomposition).
        with_fit: Make the window's own ``GaussianFit`` from the same spectrum, in the result's
            ``fit``: keep it as the next log's ``reference``.

    Returns:
        A ``MetricValues``: ``{"n", "d", "nonfinite", ...}`` (with fewer than 2 rows every other
        metric is NaN), with ``spectrum`` and ``fit`` when asked.

    Raises:
        ValueError: for an unknown metric name.
    """
    wanted = set(validate_names(names))
    n = float(stats.count)
    out: dict[str, float] = {"n": n, "d": stats.dim, "nonfinite": int(stats.nonfinite)}
    if mardia is not None:
        wanted.add("mardia_kurtosis")
    if reference is None:
        wanted -= REFERENCE_METRICS
    if not stats.higher_moments:
        wanted -= HIGHER_MOMENT_METRICS
    evals, fit = None, None
    if n < 2:
        out.update({k: math.nan for k in wanted if k not in out})
        if "rank" in wanted:
            out["rank"] = 0
    else:
        evals, fit = _fill(
            out, wanted, stats, reference, mardia, powerlaw_range, outlier_factor, rank_rtol,
            want_spectrum=with_spectrum, want_fit=with_fit,
        )  # fmt: skip
    values = {k: v for k, v in out.items() if k in wanted or k in _ALWAYS}
    return MetricValues(values, evals if with_spectrum else None, fit if with_fit else None)


def _fill(
    out: dict[str, float],
    wanted: set[str],
    stats: LayerStats,
    reference: LayerStats | GaussianFit | None,
    mardia: MardiaAccumulator | None,
    powerlaw_range: tuple[int, int],
    outlier_factor: float,
    rank_rtol: float | None,
    *,
    want_spectrum: bool,
    want_fit: bool,
) -> tuple[torch.Tensor | None, GaussianFit | None]:
    """Add the metrics of a window of at least 2 rows to ``out``; returns (eigenvalues, fit),
    each ``None`` when nothing asked for it."""
    n = float(stats.count)
    evals = fit = None
    needs_spectrum = wanted & _NEEDS_SPECTRUM or want_spectrum or want_fit
    if needs_spectrum or wanted & ({"gsam_correlation"} | REFERENCE_METRICS):
        cov = stats.covariance(ddof=0).to("cpu", torch.float64)
        scale = stats.product_scale().to("cpu", torch.float64)
    if needs_spectrum:
        evals, evecs, tol = spectrum(cov, scale, stats.product_dtype, rank_rtol)
        gsam, rank = gaussian_score(evals, n, tol)
        out.update({"gsam": gsam, "rank": rank, **spectral_metrics(evals, tol, powerlaw_range)})
        if "gsam_oas" in wanted:
            out["gsam_oas"] = oas_score(evals, n)[0]
        if "rankme" in wanted:
            out["rankme"] = rankme(evals, n, tol)
        if want_fit:
            fit = GaussianFit.from_spectrum(stats, cov, evals, evecs, tol, rtol=rank_rtol)
    if "gsam_correlation" in wanted:
        null = _null_basis(cov, evals, tol, fit, stats.product_dtype) if evals is not None else None
        out["gsam_correlation"] = correlation_score(cov, n, stats.product_dtype, scale, evals=evals, null=null)
    if "mean_kurtosis" in wanted:
        k = stats.excess_kurtosis()
        k = k[torch.isfinite(k)]
        out["mean_kurtosis"] = float(k.mean()) if k.numel() else math.nan
    if "anisotropy" in wanted:
        out["anisotropy"] = anisotropy(stats)
    if "outlier_dims" in wanted:
        out["outlier_dims"] = outlier_dims(stats, outlier_factor)
    if "max_dim_rms" in wanted:
        out["max_dim_rms"] = max_dim_rms(stats)
    ref = _reference_fit(reference, rank_rtol) if wanted & REFERENCE_METRICS else None
    if ref is None:
        out.update(dict.fromkeys(wanted & REFERENCE_METRICS, math.nan))
    else:
        cov_u = None  # the drift metrics' product S U, shared with the held-out score
        if wanted.intersection(DRIFT_METRICS):
            cov_u = support_product(cov, ref)
            out.update(drift_metrics(stats.mean.to("cpu", torch.float64), cov, evals, n, ref, wanted, cov_u=cov_u))
        if "heldout_loglik" in wanted:
            chol = None if fit is None else fit.chol  # this window's own factor, shared
            out["heldout_loglik"] = heldout_loglik(stats, ref, cov=cov, chol=chol, cov_u=cov_u)
    if mardia is not None:
        out["mardia_kurtosis"] = mardia.value()
    return evals, fit


def _null_basis(
    cov: torch.Tensor,
    evals: torch.Tensor,
    tol: torch.Tensor,
    fit: GaussianFit | None,
    product_dtype: torch.dtype | None,
) -> torch.Tensor | None:
    """C's null basis for a rank-deficient correlation score (fp64 products): the fit's, or
    found here when no fit was made; ``None`` at full rank or when none is found."""
    keep = evals > tol
    if product_dtype != torch.float64 or bool(keep.all()):
        return None
    if fit is not None:
        return fit.null
    found = null_space(cov, evals, keep)
    return None if found is None else found[0]


def _reference_fit(reference: LayerStats | GaussianFit | None, rank_rtol: float | None) -> GaussianFit | None:
    """The reference's fit (made here, once for every reference metric, from a window of at
    least 2 rows); ``None`` without one."""
    if reference is None or isinstance(reference, GaussianFit):
        return reference
    return GaussianFit.from_stats(reference, rtol=rank_rtol) if float(reference.count) >= 2 else None
