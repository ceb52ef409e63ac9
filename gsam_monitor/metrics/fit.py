"""``GaussianFit``: a window's MLE Gaussian, factorised once on its support.

Scores that compare a window with an earlier one (``heldout_loglik``; distances between
two windows' Gaussians) need the earlier covariance's eigendecomposition. A fit is made once,
when a window becomes a reference, and reused by every later log that compares against it,
instead of one eigendecomposition per comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gsam_monitor.metrics.linalg import eigenvalue_tolerance

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
        evecs: (d, r) the matching unit eigenvectors as columns.
    """

    n: float
    mean: torch.Tensor
    evals: torch.Tensor
    evecs: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.evals.numel())

    @property
    def dim(self) -> int:
        return int(self.mean.numel())

    @classmethod
    def from_stats(cls, stats: LayerStats, *, rtol: float | None = None) -> GaussianFit:
        """Factorise ``stats``' MLE covariance (one ``eigh``) and keep its support.

        Raises:
            ValueError: if ``stats`` holds fewer than 2 rows (no covariance to fit).
        """
        n = float(stats.count)
        if n < 2:
            raise ValueError(f"GaussianFit needs a window of at least 2 rows; this one has {n:g}.")
        cov = stats.covariance().to("cpu", torch.float64)
        evals, vecs = torch.linalg.eigh(cov)
        evals, vecs = evals.flip(0), vecs.flip(1)
        scale = stats.product_scale().to("cpu", torch.float64)
        keep = evals > eigenvalue_tolerance(evals, vecs, scale, stats.product_dtype, rtol)
        return cls(n=n, mean=stats.mean.to("cpu", torch.float64), evals=evals[keep], evecs=vecs[:, keep])
