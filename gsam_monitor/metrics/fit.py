"""``GaussianFit``: a window's MLE Gaussian, factorised once on its support.

Scores that compare a window with an earlier one (``heldout_loglik``; distances between
two windows' Gaussians) need the earlier covariance's pseudo-inverse and pseudo-determinant.
A fit is made once, when a window is logged (``compute(..., return_fit=True)``, from the
spectrum that log computes anyway), and reused by every later log that compares against it:
scoring a window against a fit is then O(d²), with no factorisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gsam_monitor.metrics.linalg import eigenvalue_tolerance, spectrum

if TYPE_CHECKING:
    from gsam_monitor.stats import LayerStats

__all__ = ["GaussianFit"]


@dataclass(frozen=True)
class GaussianFit:
    """The MLE Gaussian N(mean, S) of a window, on the support of S (fp64, CPU).

    Attributes:
        n: Rows (weighted count) the fit was made from.
        mean: (d,) the window's mean.
        evals: (r,) the support eigenvalues of S, descending (those above the window's rank
            tolerance: scipy's rule with fp64 products, the product's error model otherwise).
        precision: (d, d) the pseudo-inverse S⁺ on that support (S⁻¹ at full rank).
    """

    n: float
    mean: torch.Tensor
    evals: torch.Tensor
    precision: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.evals.numel())

    @property
    def dim(self) -> int:
        return int(self.mean.numel())

    @classmethod
    def from_stats(cls, stats: LayerStats, *, rtol: float | None = None) -> GaussianFit:
        """Factorise ``stats``' MLE covariance and keep its support.

        Prefer ``compute(..., return_fit=True)`` when the window's metrics are computed too:
        it reuses their spectrum instead of a second eigendecomposition.

        Raises:
            ValueError: if ``stats`` holds fewer than 2 rows (no covariance to fit).
        """
        n = float(stats.count)
        if n < 2:
            raise ValueError(f"GaussianFit needs a window of at least 2 rows; this one has {n:g}.")
        cov = stats.covariance().to("cpu", torch.float64)
        scale = stats.product_scale().to("cpu", torch.float64)
        evals, evecs, tol = spectrum(cov, scale, stats.product_dtype, rtol)
        return cls.from_spectrum(stats, cov, evals, evecs, tol, rtol=rtol)

    @classmethod
    def from_spectrum(
        cls,
        stats: LayerStats,
        cov: torch.Tensor,
        evals: torch.Tensor,
        evecs: torch.Tensor | None,
        tol: torch.Tensor,
        *,
        rtol: float | None = None,
    ) -> GaussianFit:
        """The fit of ``stats`` from its covariance ``cov`` (fp64, CPU) and its spectrum as
        ``linalg.spectrum`` returns it (eigenvalues descending, eigenvectors or ``None``,
        per-eigenvalue tolerance).

        The pseudo-inverse comes from the eigenvectors when they are at hand; at full rank
        from a Cholesky factorisation (S⁻¹ = L⁻ᵀL⁻¹: a third of the flops of an ``eigh``,
        all of them BLAS-3); else, on a rank-deficient support, from one ``eigh``.
        """
        mean = stats.mean.to("cpu", torch.float64)
        keep = evals > tol
        if evecs is None and bool(keep.all()):
            chol, info = torch.linalg.cholesky_ex(cov)
            if int(info) == 0:
                return cls(n=float(stats.count), mean=mean, evals=evals, precision=torch.cholesky_inverse(chol))
        if evecs is None:
            evals, evecs = torch.linalg.eigh(cov)
            evals, evecs = evals.flip(0), evecs.flip(1)
            scale = stats.product_scale().to("cpu", torch.float64)
            keep = evals > eigenvalue_tolerance(evals, evecs, scale, stats.product_dtype, rtol)
        lam, vecs = evals[keep], evecs[:, keep]
        precision = (vecs / lam) @ vecs.T
        return cls(n=float(stats.count), mean=mean, evals=lam, precision=0.5 * (precision + precision.T))
