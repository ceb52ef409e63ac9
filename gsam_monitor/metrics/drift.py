"""Distances between a window's Gaussian and a reference window's: drift from a base model.

Both are maximum-likelihood Gaussians of activation windows, N(μ, S) now and N(m, R) for the
reference (``GaussianFit``: R factorised once on its support, R = U Λ Uᵀ with rank r).
Post-LayerNorm covariances are singular (rank d - 1) and windows of N ≤ d rows more so, so
every distance here is finite for singular covariances:

* ``drift_w2``: the 2-Wasserstein (Bures–Wasserstein) distance between the two Gaussians,
  W2² = |μ - m|² + tr S + tr R - 2 tr (R^{1/2} S R^{1/2})^{1/2}
  (Dowson & Landau 1982; Bhatia, Jain & Lim 2019), in the activations' units. It is a metric:
  symmetric, zero only when the means and covariances are equal, and it satisfies the
  triangle inequality. With R = U Λ Uᵀ the matrix R^{1/2} S R^{1/2} has the nonzero
  eigenvalues of the r × r matrix Λ^{1/2} (Uᵀ S U) Λ^{1/2}, so the trace term costs two
  d × d × r products and one r × r ``eigvalsh``, and nothing is inverted.
* ``drift_w2_relative``: W2² / (tr S + tr R), the squared distance in units of the two
  windows' total variance: unchanged when every activation is scaled by c, zero only when
  the Gaussians are equal, at most 1 when the means are (the trace term is ≥ 0), above 1
  only through a mean shift.
* ``drift_kl_oas``: KL(N(μ, Σ_S) ‖ N(m, Σ_R)) in nats between the OAS-shrunk Gaussians
  (Σ = (1 - s) C + s (tr C / d) I with each window's own OAS shrinkage s, as ``gsam_oas``;
  Chen et al. 2010): the current window scored against the reference, like
  ``heldout_loglik``. The shrinkage makes both covariances positive definite, so it is
  finite for post-LayerNorm windows and for N ≤ d. Zero when the two windows have equal
  means, covariances and row counts (the shrinkage depends on the row count). Σ_R shares
  R's eigenvectors and is (s_R tr R / d) I off R's support, so it needs the diagonal of
  Uᵀ S U (one d × d × r product) and the current window's eigenvalues (which ``compute``
  already has): no further eigendecomposition.

Cost per layer and log: the d × d × r product S U, shared by the three and by
``heldout_loglik`` when it is computed beside them (Σ⁺ = U Λ⁻¹ Uᵀ, then no factor of S);
``drift_kl_oas`` the window's own eigenvalues (``compute``'s eigendecomposition, shared with
the spectral metrics); ``drift_w2`` and ``drift_w2_relative`` (computed together) one more
product, Uᵀ(SU), and one ``eigvalsh`` of size r, but no spectrum of the window itself. The
reference's eigenvectors are made once per reference (``GaussianFit.eigenvectors``).
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch

from gsam_monitor.metrics.fit import GaussianFit
from gsam_monitor.metrics.linalg import rank_tolerance
from gsam_monitor.metrics.scores import oas_shrinkage

__all__ = ["DRIFT_METRICS", "bures_wasserstein", "drift_metrics", "kl_oas", "support_product"]

DRIFT_METRICS: tuple[str, ...] = ("drift_w2", "drift_w2_relative", "drift_kl_oas")
"""The distances to the reference window that ``compute`` can return."""

_EPS = torch.finfo(torch.float64).eps


def bures_wasserstein(
    mean: torch.Tensor, cov: torch.Tensor, reference: GaussianFit, *, cov_u: torch.Tensor | None = None
) -> tuple[float, float]:
    """(W2², tr S + tr R) between N(``mean``, ``cov``) and the ``reference`` Gaussian.

    W2² = |μ - m|² + tr S + tr R - 2 Σ_i sqrt(ν_i), ν the eigenvalues of
    Λ^{1/2} (Uᵀ S U) Λ^{1/2} (R = U Λ Uᵀ on its support). Eigenvalues ν below the fp64
    rounding level of that matrix count as 0, and a W2² below its own rounding error
    (d · eps64 · (tr S + tr R)) is 0: equal windows give exactly 0.

    Args:
        mean: (d,) the current window's mean (fp64).
        cov: (d, d) its MLE covariance S (fp64, symmetric).
        reference: The reference window's fit.
        cov_u: ``cov @ reference.eigenvectors()`` when the caller has it already.
    """
    u, lam = reference.eigenvectors(), reference.evals
    su = cov @ u if cov_u is None else cov_u
    half = lam.clamp_min(0.0).sqrt()
    # Λ^{1/2} Uᵀ S U Λ^{1/2} as one product of scaled columns; eigvalsh reads its lower triangle.
    inner = (u * half).T @ (su * half)
    nu = torch.linalg.eigvalsh(inner) if inner.numel() else inner.new_zeros(0)
    nu = torch.where(nu > rank_tolerance(nu, torch.float64), nu, 0.0)
    fidelity = float(nu.sqrt().sum())
    diff = mean - reference.mean
    total = float(torch.trace(cov)) + float(lam.sum())
    w2sq = float(diff @ diff) + total - 2.0 * fidelity
    if w2sq <= mean.numel() * _EPS * total:
        w2sq = 0.0
    return w2sq, total


def kl_oas(
    mean: torch.Tensor,
    cov: torch.Tensor,
    evals: torch.Tensor,
    n: float,
    reference: GaussianFit,
    *,
    cov_u: torch.Tensor | None = None,
) -> float:
    """KL(N(μ, Σ_S) ‖ N(m, Σ_R)) in nats between the OAS-shrunk Gaussians of the current
    window (``mean``, ``cov`` with eigenvalues ``evals``, ``n`` rows) and the reference.

    KL = ½ [tr(Σ_R⁻¹ Σ_S) + (μ - m)ᵀ Σ_R⁻¹ (μ - m) - d + log det Σ_R - log det Σ_S], with
    Σ_R⁻¹ = U diag(1/σ) Uᵀ + (I - U Uᵀ)/σ₀, σ = (1 - s) Λ + s μ_R, σ₀ = s μ_R.

    Args:
        mean: The current window's mean.
        cov: The current window's MLE covariance.
        evals: The eigenvalues of ``cov``.
        n: The current window's number of rows.
        reference: The reference window's fit.
        cov_u: ``cov @ reference.eigenvectors()`` when the caller has it already.
    """
    d, r = mean.numel(), reference.rank
    u, lam = reference.eigenvectors(), reference.evals.clamp_min(0.0)
    s_ref, mu_ref = oas_shrinkage(lam, reference.n, d)
    s_cur, mu_cur = oas_shrinkage(evals, n, d)
    if mu_ref <= 0 or mu_cur <= 0:
        return math.nan
    sigma = (1.0 - s_ref) * lam + s_ref * mu_ref
    sigma0 = s_ref * mu_ref  # Σ_R off R's support
    su = cov @ u if cov_u is None else cov_u
    on = (su * u).sum(0)  # diag(Uᵀ S U)
    off = max(float(torch.trace(cov)) - float(on.sum()), 0.0)
    tr_s = float((on / sigma).sum()) + off / sigma0  # tr(Σ_R⁻¹ S)
    tr_i = float((1.0 / sigma).sum()) + (d - r) / sigma0  # tr(Σ_R⁻¹)
    diff = mean - reference.mean
    c = u.T @ diff
    maha = float((c * c / sigma).sum()) + max(float(diff @ diff) - float(c @ c), 0.0) / sigma0
    logdet_ref = float(torch.log(sigma).sum()) + (d - r) * math.log(sigma0)
    logdet_cur = float(torch.log((1.0 - s_cur) * evals.clamp_min(0.0) + s_cur * mu_cur).sum())
    trace = (1.0 - s_cur) * tr_s + s_cur * mu_cur * tr_i
    return max(0.5 * (trace + maha - d + logdet_ref - logdet_cur), 0.0)


def support_product(cov: torch.Tensor, reference: GaussianFit) -> torch.Tensor | None:
    """S U, U the reference's support eigenvectors: the product the drift metrics share (and
    ``heldout_loglik`` beside them); ``None`` for a reference of another dimension or an
    empty support, against which every drift metric is NaN."""
    if reference.dim != cov.shape[0] or reference.rank == 0:
        return None
    return cov @ reference.eigenvectors()


def drift_metrics(
    mean: torch.Tensor,
    cov: torch.Tensor,
    evals: torch.Tensor | None,
    n: float,
    reference: GaussianFit,
    names: Collection[str] = DRIFT_METRICS,
    *,
    cov_u: torch.Tensor | None = None,
) -> dict[str, float]:
    """The ``DRIFT_METRICS`` in ``names`` of the current window against ``reference``
    (see the module docstring); NaN for a reference of another dimension or an empty support.
    ``evals``: ``cov``'s eigenvalues, which only ``drift_kl_oas`` reads (``None`` without it).
    ``cov_u``: ``cov @ reference.eigenvectors()`` when the caller has it already."""
    wanted = [m for m in DRIFT_METRICS if m in names]
    if not wanted:
        return {}
    if cov_u is None:
        cov_u = support_product(cov, reference)
    if cov_u is None:
        return dict.fromkeys(wanted, math.nan)
    out: dict[str, float] = {}
    if "drift_w2" in wanted or "drift_w2_relative" in wanted:
        w2sq, total = bures_wasserstein(mean, cov, reference, cov_u=cov_u)
        out["drift_w2"] = math.sqrt(w2sq)
        out["drift_w2_relative"] = w2sq / total if total > 0 else math.nan
    if "drift_kl_oas" in wanted:
        if evals is None:
            raise ValueError("drift_metrics: drift_kl_oas needs the current window's eigenvalues (evals).")
        out["drift_kl_oas"] = kl_oas(mean, cov, evals, n, reference, cov_u=cov_u)
    return {k: out[k] for k in wanted}
