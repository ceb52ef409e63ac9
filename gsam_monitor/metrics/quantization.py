"""The int8 absmax round-off a layer's activations would suffer, from moments and the abs-max.

Per-tensor symmetric absmax int8 quantization (the scheme of LLM.int8()'s vector-wise baseline
and of static activation quantization, Dettmers et al. 2022) maps x to
s · clamp(round(x / s), -127, 127) with the scale s = A / 127, A = max_ij |x_ij| over the rows
(``LayerStats.absmax``, a running maximum: the moments alone do not hold it). Absmax scaling
never clips, so the error of an element is its round-off, |e| ≤ s/2.

Expected squared round-off of dimension j, modelling x_j as N(μ_j, σ_j²) from the streamed
mean and variance:

    E[e_j²] = Σ_k ∫_{(k-½)s}^{(k+½)s} (x - ks)² N(x; μ_j, σ_j²) dx,

one closed form per bin (with α, β the bin's standardised edges and δ = μ_j - ks:
δ²[Φ(β)-Φ(α)] + 2δσ[φ(α)-φ(β)] + σ²[Φ(β)-Φ(α) + αφ(α) - βφ(β)]). When σ_j ≥ s this is
s²/12 (Widrow's uniform model; the Gaussian's deviation from it is below 1e-8 relative there),
whatever the distribution's shape; when σ_j ≪ s the values round to the few levels around
μ_j and the error is about (μ_j - s·round(μ_j/s))² + σ_j²: such a dimension's variation is
rounded away. Only the regime in between depends on the Gaussian model.

One outlier dimension sets A for the whole tensor: the summary also gives the scale, the
error and the SQNR with the outlier dimensions left out of the scale (what keeping them in
higher precision, as LLM.int8()'s mixed-precision decomposition does, would give).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gsam_monitor.stats import LayerStats

__all__ = ["INT8_LEVELS", "expected_roundoff", "int8_absmax_error"]

INT8_LEVELS = 127
"""Positive levels of symmetric int8 (the scale maps the abs-max to 127)."""

_BINS = 10  # bins each side of a narrow dimension's mean: σ < s, so ±8σ lies within ±9 bins


def _phi(z: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def expected_roundoff(mean: torch.Tensor, variance: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-dimension E[(x - s·round(x/s))²] for x_j ~ N(mean_j, variance_j), fp64 (see the module).

    Args:
        mean: Per-dimension means (d,).
        variance: Per-dimension variances (d,), MLE.
        scale: The quantization step s (> 0).
    """
    mu = mean.to("cpu", torch.float64)
    sd = variance.to("cpu", torch.float64).clamp_min(0.0).sqrt()
    s = float(scale)
    out = torch.full_like(mu, s * s / 12.0)
    narrow = sd < s
    if not bool(narrow.any()):
        return out
    m, v = mu[narrow], sd[narrow]
    centre = torch.round(m / s)
    k = centre[:, None] + torch.arange(-_BINS, _BINS + 1, dtype=torch.float64)[None, :]  # (n, 2B+1) levels
    delta = m[:, None] - k * s
    point = v == 0  # a constant dimension: its one value's round-off, exactly
    safe = torch.where(point, torch.ones_like(v), v)[:, None]
    alpha = (k * s - 0.5 * s - m[:, None]) / safe
    beta = (k * s + 0.5 * s - m[:, None]) / safe
    mass = torch.special.ndtr(beta) - torch.special.ndtr(alpha)
    fa, fb = _phi(alpha), _phi(beta)
    sig = safe
    per_bin = delta * delta * mass + 2 * delta * sig * (fa - fb) + sig * sig * (mass + alpha * fa - beta * fb)
    gauss = per_bin.sum(1)
    exact = (m - s * centre) ** 2
    out[narrow] = torch.where(point, exact, gauss)
    return out


def _summary(mean: torch.Tensor, var: torch.Tensor, absmax: torch.Tensor) -> dict[str, float]:
    """Scale, expected round-off and SQNR of the dimensions given (their own abs-max sets the scale)."""
    peak = float(absmax.max()) if absmax.numel() else math.nan
    if not peak > 0 or not math.isfinite(peak):
        return {"absmax": peak, "scale": math.nan, "mse": math.nan, "sqnr_db": math.nan}
    s = peak / INT8_LEVELS
    mse = expected_roundoff(mean, var, s)
    power = float((var + mean * mean).sum())
    noise = float(mse.sum())
    return {
        "absmax": peak,
        "scale": s,
        "mse": noise / mse.numel(),
        "sqnr_db": 10.0 * math.log10(power / noise) if noise > 0 else math.inf,
    }


def int8_absmax_error(
    stats: LayerStats | None = None,
    *,
    mean: torch.Tensor | None = None,
    variance: torch.Tensor | None = None,
    absmax: torch.Tensor | None = None,
    outliers: torch.Tensor | list[int] | None = None,
) -> dict[str, float]:
    """The expected per-tensor int8 absmax round-off of a window's rows (see the module).

    Args:
        stats: A ``LayerStats`` with higher moments (its mean, MLE variance and abs-max); or
            give ``mean``, ``variance`` and ``absmax`` (d,) directly.
        outliers: Indices of the outlier dimensions, for the ``*_without_outliers`` entries.

    Returns:
        ``absmax`` (A), ``scale`` (s = A/127), ``scale_dim`` (the dimension holding A),
        ``mse`` (mean over dimensions of the expected squared round-off per element),
        ``uniform_mse`` (s²/12), ``sqnr_db`` (10 log10 of Σ E[x_j²] / Σ E[e_j²]),
        ``dims_below_step`` (dimensions whose sd is under one step s: mostly rounded away),
        ``median_noise_to_variance`` (median over dimensions of E[e_j²] / σ_j²), and
        ``scale_without_outliers``, ``mse_without_outliers``, ``sqnr_db_without_outliers``
        (the other dimensions, scaled by their own abs-max). NaN where undefined.

    Raises:
        ValueError: neither ``stats`` nor all three vectors, or vectors of different lengths.
    """
    if stats is not None:
        mean, variance, absmax = stats.mean, stats.variance(), stats.absmax
    if mean is None or variance is None or absmax is None:
        raise ValueError(
            "int8_absmax_error: pass a LayerStats, or mean=, variance= and absmax= (one value per dimension)."
        )
    mu = mean.to("cpu", torch.float64).reshape(-1)
    var = variance.to("cpu", torch.float64).reshape(-1).clamp_min(0.0)
    amax = absmax.to("cpu", torch.float64).reshape(-1)
    if not mu.numel() == var.numel() == amax.numel():
        raise ValueError(
            f"int8_absmax_error: mean, variance and absmax must have one value per dimension; got lengths "
            f"{mu.numel()}, {var.numel()}, {amax.numel()}."
        )
    out = _summary(mu, var, amax)
    s = out["scale"]
    out["scale_dim"] = int(amax.argmax()) if amax.numel() else -1
    out["uniform_mse"] = s * s / 12.0
    if math.isfinite(s):
        mse = expected_roundoff(mu, var, s)
        out["dims_below_step"] = int((var.sqrt() < s).sum())
        live = var > 0
        ratio = mse[live] / var[live]
        out["median_noise_to_variance"] = float(ratio.median()) if ratio.numel() else math.nan
    else:
        out["dims_below_step"], out["median_noise_to_variance"] = 0, math.nan
    keep = torch.ones_like(mu, dtype=torch.bool)
    if outliers is not None and len(outliers):
        keep[torch.as_tensor(list(outliers), dtype=torch.long)] = False
    rest = _summary(mu[keep], var[keep], amax[keep])
    out["scale_without_outliers"] = rest["scale"]
    out["mse_without_outliers"] = rest["mse"]
    out["sqnr_db_without_outliers"] = rest["sqnr_db"]
    return out
