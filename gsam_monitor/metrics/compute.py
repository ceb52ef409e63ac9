"""``compute``: every metric of one window's statistics, from one eigendecomposition.

``compute`` runs one eigendecomposition of the MLE covariance and derives every spectral
metric from it; the correlation-matrix variant of GSAM needs a second one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from gsam_monitor._validate import with_suggestion
from gsam_monitor.metrics.drift import DRIFT_METRICS, drift_metrics
from gsam_monitor.metrics.fit import GaussianFit
from gsam_monitor.metrics.linalg import spectrum
from gsam_monitor.metrics.rankme import rankme
from gsam_monitor.metrics.scores import (
    POWERLAW_RANGE,
    SPECTRAL_METRICS,
    anisotropy,
    correlation_score,
    gaussian_score,
    heldout_loglik,
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
    "METRIC_NAMES",
    "REFERENCE_METRICS",
    "compute",
    "validate_names",
]

METRIC_NAMES: tuple[str, ...] = (
    "n",
    "d",
    "rank",
    "nonfinite",
    "gsam",
    "gsam_correlation",
    "gsam_oas",
    "mean_kurtosis",
    *SPECTRAL_METRICS,
    "rankme",
    "anisotropy",
    "outlier_dims",
    "heldout_loglik",
    *DRIFT_METRICS,
    "mardia_kurtosis",
)
"""Every key ``compute`` can return."""

DEFAULT_METRICS: tuple[str, ...] = tuple(m for m in METRIC_NAMES if m not in ("mardia_kurtosis", *DRIFT_METRICS))
"""What ``compute`` returns by default (``heldout_loglik`` only when given a reference;
``mardia_kurtosis`` needs a second pass over the rows and is returned when one is given).
The ``DRIFT_METRICS`` are not: ``drift_w2`` costs a second eigendecomposition per layer, and
against the previous window they mostly measure sampling noise (``GSAMMonitor(reference=
"first")`` selects them)."""

REFERENCE_METRICS = frozenset({"heldout_loglik", *DRIFT_METRICS})
"""The metrics that compare a window with a reference window (computed when one is given)."""

HIGHER_MOMENT_METRICS = frozenset({"mean_kurtosis", "anisotropy"})
"""The metrics that need ``LayerStats(higher_moments=True)``."""

_ALWAYS = ("n", "d", "nonfinite")


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
    return_spectrum: bool = False,
) -> dict[str, float] | tuple[dict[str, float], torch.Tensor | None]:
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
        return_spectrum: Also return the covariance eigenvalues the metrics were computed
            from (fp64, CPU, descending; ``None`` with fewer than 2 rows), e.g. for a
            spectrum histogram, without a second eigendecomposition.

    Returns:
        ``{"n", "d", "nonfinite", ...}``; with fewer than 2 rows every other metric is NaN.
        With ``return_spectrum=True``, ``(metrics, eigenvalues)``.

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
    evals = None
    if n < 2:
        out.update({k: math.nan for k in wanted if k not in out})
        if "rank" in wanted:
            out["rank"] = 0
    else:
        evals = _fill(out, wanted, stats, reference, mardia, powerlaw_range, outlier_factor, rank_rtol)
    values = {k: v for k, v in out.items() if k in wanted or k in _ALWAYS}
    return (values, evals) if return_spectrum else values


def _fill(
    out: dict[str, float],
    wanted: set[str],
    stats: LayerStats,
    reference: LayerStats | GaussianFit | None,
    mardia: MardiaAccumulator | None,
    powerlaw_range: tuple[int, int],
    outlier_factor: float,
    rank_rtol: float | None,
) -> torch.Tensor:
    """Add the metrics of a window of at least 2 rows to ``out``; returns the eigenvalues."""
    n = float(stats.count)
    cov = stats.covariance(ddof=0).to("cpu", torch.float64)
    scale = stats.product_scale().to("cpu", torch.float64)
    evals, _, tol = spectrum(cov, scale, stats.product_dtype, rank_rtol)
    out["gsam"], out["rank"] = gaussian_score(evals, n, tol)
    if "gsam_oas" in wanted:
        out["gsam_oas"] = oas_score(evals, n)[0]
    if "gsam_correlation" in wanted:
        out["gsam_correlation"] = correlation_score(cov, n, stats.product_dtype, scale)
    out.update(spectral_metrics(evals, tol, powerlaw_range))
    if "rankme" in wanted:
        out["rankme"] = rankme(evals, n, tol)
    if "mean_kurtosis" in wanted:
        k = stats.excess_kurtosis()
        k = k[torch.isfinite(k)]
        out["mean_kurtosis"] = float(k.mean()) if k.numel() else math.nan
    if "anisotropy" in wanted:
        out["anisotropy"] = anisotropy(stats)
    if "outlier_dims" in wanted:
        out["outlier_dims"] = outlier_dims(stats, outlier_factor)
    fit = _reference_fit(reference, rank_rtol) if wanted & REFERENCE_METRICS else None
    if fit is None:
        out.update(dict.fromkeys(wanted & REFERENCE_METRICS, math.nan))
    else:
        if "heldout_loglik" in wanted:
            out["heldout_loglik"] = heldout_loglik(stats, fit)
        out.update(drift_metrics(stats.mean.to("cpu", torch.float64), cov, evals, n, fit, wanted))
    if mardia is not None:
        out["mardia_kurtosis"] = mardia.value()
    return evals


def _reference_fit(reference: LayerStats | GaussianFit | None, rank_rtol: float | None) -> GaussianFit | None:
    """The reference's fit (made here, once for every reference metric, from a window of at
    least 2 rows); ``None`` without one."""
    if reference is None or isinstance(reference, GaussianFit):
        return reference
    return GaussianFit.from_stats(reference, rtol=rank_rtol) if float(reference.count) >= 2 else None
