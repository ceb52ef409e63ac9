"""Which covariance eigenvalues are numerically null: the rank tolerances, the eigensolve and the null space.

A leaf module (torch only): the metrics, Mardia's second pass and the LDA of
``gsam_monitor.analysis`` all decide the support of a covariance here, so that they agree.

With fp64 Gram products scipy's rule (relative to λmax) applies and the rank equals
scipy's; with fp32 products the tolerance of each eigenvalue comes from the product's
per-entry error model, so that one huge dimension (the "massive activations" of LLMs) does
not hide every other direction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gsam_monitor.stats import LayerStats

__all__ = ["PRODUCT_ERROR_FACTOR", "eigenvalue_tolerance", "eigenvalues", "null_space", "rank_tolerance", "spectrum"]


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


def spectrum(
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


def eigenvalues(stats: LayerStats) -> torch.Tensor:
    """Eigenvalues of the MLE covariance, fp64 on the CPU, descending."""
    cov = stats.covariance(ddof=0).to("cpu", torch.float64)
    return torch.linalg.eigvalsh(cov).flip(0)


NULL_SPACE_MAX = 16
"""Most null directions ``null_space`` finds by inverse iteration (post-LayerNorm layers have
one); beyond it an ``eigh`` is as cheap."""
_NULL_SPACE_ITERATIONS = 4


def null_space(cov: torch.Tensor, evals: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(N, μ): an orthonormal basis (d, k) of the null directions of the symmetric ``cov``,
    and μ = diag(NᵀSN), without an ``eigh``; ``None`` when it cannot be found that way.

    ``evals`` are ``cov``'s eigenvalues descending and ``keep`` marks the support, so the
    null directions are the last k. Inverse iteration with the Cholesky factor of
    S + σI (σ = 10⁻⁴ of the smallest kept eigenvalue) shrinks every kept direction by ≈ 10⁻⁴
    per step; 4 steps of k vectors cost O(d²k) after the factor (d³/3 flops). ``None`` for
    no or more than ``NULL_SPACE_MAX`` null directions, a factor that fails, or a basis whose
    residual ‖SN‖₂ exceeds the tolerance scipy's rule gives the spectrum.
    """
    k = int((~keep).sum())
    if not 0 < k <= NULL_SPACE_MAX or not bool(keep[:-k].all()):
        return None
    floor = float(evals[:-k].min())
    shifted = cov.clone()
    shifted.diagonal().add_(1e-4 * floor)
    chol, info = torch.linalg.cholesky_ex(shifted)
    del shifted
    if int(info) != 0:
        return None
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(cov.shape[0], k, dtype=cov.dtype, generator=gen)).Q
    for _ in range(_NULL_SPACE_ITERATIONS):
        basis = torch.linalg.qr(torch.cholesky_solve(basis, chol)).Q
    s_n = cov @ basis
    tol = rank_tolerance(evals, torch.float64)
    if float(torch.linalg.matrix_norm(s_n, ord=2)) > max(tol, 1e-8 * floor):
        return None
    return basis, (basis * s_n).sum(0)
