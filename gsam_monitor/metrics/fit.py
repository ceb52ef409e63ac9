"""``GaussianFit``: a window's MLE Gaussian, factorised once on its support.

Scores that compare a window with an earlier one (``heldout_loglik``; distances between
two windows' Gaussians) need the earlier covariance's pseudo-inverse and pseudo-determinant.
A fit is made once, when a window is logged (``compute(..., with_fit=True).fit``, from the
spectrum that log computes anyway), and reused by the next log that compares against it:
at full rank a Cholesky factor (scoring against it: a Cholesky factor of the new window,
which its own fit reuses, and one triangular solve), else the pseudo-inverse on the support
(scoring: O(d²)). No eigendecomposition of the reference is redone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gsam_monitor.metrics.linalg import eigenvalue_tolerance, null_space, spectrum

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
        chol: (d, d) the lower Cholesky factor L of S (S = LLᵀ) at full rank, else ``None``.
        pinv: (d, d) the pseudo-inverse S⁺ on the support when S is rank-deficient, else ``None``.
        evecs: (d, r) the support eigenvectors, matching ``evals``, when the fit was made from
            them; ``eigenvectors()`` makes them once otherwise (only the drift metrics need them).
        null: (d, d - r) an orthonormal basis of the null directions, when the fit found them
            by inverse iteration (``linalg.null_space``).
    """

    n: float
    mean: torch.Tensor
    evals: torch.Tensor
    chol: torch.Tensor | None = None
    pinv: torch.Tensor | None = None
    evecs: torch.Tensor | None = None
    null: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.evals.numel())

    @property
    def dim(self) -> int:
        return int(self.mean.numel())

    @property
    def precision(self) -> torch.Tensor:
        """S⁺ (S⁻¹ at full rank), formed on demand from the Cholesky factor."""
        return self.pinv if self.chol is None else torch.cholesky_inverse(self.chol)

    def eigenvectors(self) -> torch.Tensor:
        """(d, r) eigenvectors of S on its support, in the order of ``evals``.

        A fit made without them holds a Cholesky factor or the pseudo-inverse: they are made
        here once (an ``eigh`` of LLᵀ or of S⁺) and kept, so a fixed reference pays it once
        per run.
        """
        if self.evecs is None:
            if self.chol is not None:
                _, vecs = torch.linalg.eigh(self.chol @ self.chol.T)
                vecs = vecs.flip(1)
            else:  # S⁺'s eigenvalues ascending: the null ones, then 1/λ for λ descending
                _, vecs = torch.linalg.eigh(self.pinv)
                vecs = vecs[:, self.dim - self.rank :]
            object.__setattr__(self, "evecs", vecs)  # a cache on a frozen value
        return self.evecs

    @classmethod
    def from_stats(cls, stats: LayerStats, *, rtol: float | None = None) -> GaussianFit:
        """Factorise ``stats``' MLE covariance and keep its support.

        Prefer ``compute(..., with_fit=True).fit`` when the window's metrics are computed too:
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

        At full rank the fit is a Cholesky factor (a ninth of the flops of an ``eigh``, all
        BLAS-3; scores against it are triangular solves); on a rank-deficient support, the
        pseudo-inverse: from the eigenvectors when they are at hand, else from the null
        space found by inverse iteration (``_from_null_space``), else one ``eigh``.
        """
        mean = stats.mean.to("cpu", torch.float64)
        n = float(stats.count)
        keep = evals > tol
        if bool(keep.all()):
            chol, info = torch.linalg.cholesky_ex(cov)
            if int(info) == 0:
                return cls(n=n, mean=mean, evals=evals, chol=chol)
        if evecs is None:
            null_fit = cls._from_null_space(stats, cov, evals, keep)
            if null_fit is not None:
                return null_fit
            evals, evecs = torch.linalg.eigh(cov)
            evals, evecs = evals.flip(0), evecs.flip(1)
            scale = stats.product_scale().to("cpu", torch.float64)
            keep = evals > eigenvalue_tolerance(evals, evecs, scale, stats.product_dtype, rtol)
        lam, vecs = evals[keep], evecs[:, keep]
        pinv = (vecs / lam) @ vecs.T
        return cls(n=n, mean=mean, evals=lam, pinv=0.5 * (pinv + pinv.T), evecs=vecs)

    @classmethod
    def _from_null_space(
        cls, stats: LayerStats, cov: torch.Tensor, evals: torch.Tensor, keep: torch.Tensor
    ) -> GaussianFit | None:
        """The pseudo-inverse of a covariance with a few null directions, without an ``eigh``.

        With the null basis N and μ = diag(NᵀSN) from ``linalg.null_space`` and c the mean
        kept eigenvalue, S + cNNᵀ has full rank and S⁺ = (S + cNNᵀ)⁻¹ - N diag(1/(μ + c)) Nᵀ:
        with the null space's own factor, two Cholesky factorisations and one inverse
        (≈ 0.6–0.9 ``eigvalsh`` at d = 4096) where an ``eigh`` costs ≈ 3. ``None`` (the
        caller falls back to ``eigh``) when ``null_space`` finds none.
        """
        found = null_space(cov, evals, keep)
        if found is None:
            return None
        basis, mu = found
        lam = evals[keep]
        c = float(lam.mean())
        full, info = torch.linalg.cholesky_ex(torch.addmm(cov, basis, basis.T, alpha=c))
        if int(info) != 0:
            return None
        scaled = basis * (mu + c).rsqrt()
        pinv = torch.cholesky_inverse(full).addmm_(scaled, scaled.T, alpha=-1.0)
        mean = stats.mean.to("cpu", torch.float64)
        return cls(n=float(stats.count), mean=mean, evals=lam, pinv=pinv, null=basis)
