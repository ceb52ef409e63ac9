"""Mardia's multivariate kurtosis: a second pass over the rows under a frozen Gaussian fit."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from gsam_monitor.metrics.linalg import eigenvalue_tolerance

if TYPE_CHECKING:
    from gsam_monitor.stats import LayerStats

__all__ = ["MardiaAccumulator"]


class MardiaAccumulator:
    """Second pass for Mardia's multivariate kurtosis under a frozen Gaussian fit.

    b2 = (1/n) sum_i ((x_i - mu)^T S^+ (x_i - mu))^2 with mu, S the MLE fit of ``stats``
    (pseudo-inverse on the support, rank r). For Gaussian data b2 -> r(r+2); ``value()``
    returns the normalised excess (b2 - r(r+2)) / r, 0 for Gaussian data
    (Mardia, "Measures of multivariate skewness and kurtosis", Biometrika 1970).

    Args:
        stats: The fitted statistics (the first pass over the same rows).
        rank_tol: Relative eigenvalue tolerance for the support; default as ``metrics``
            (``metrics.eigenvalue_tolerance``).

    Raises:
        ValueError: if ``stats`` holds fewer than 2 rows.
    """

    def __init__(self, stats: LayerStats, rank_tol: float | None = None) -> None:
        if float(stats.count) < 2:
            raise ValueError("MardiaAccumulator needs a fit from at least 2 rows.")
        cov = stats.covariance().cpu()
        evals, evecs = torch.linalg.eigh(cov)
        scale = stats.product_scale().cpu()
        support = evals > eigenvalue_tolerance(evals, evecs, scale, stats.product_dtype, rank_tol)
        self.rank = int(support.sum())
        # The second pass runs where fp64 exists (MPS has none: there it runs on the CPU).
        dev = stats.device if stats.device.type != "mps" else torch.device("cpu")
        with torch.inference_mode(False):  # ordinary tensors, as LayerStats'
            self._mean = stats.mean.to(dev)
            self._whiten = (evecs[:, support] / evals[support].sqrt()).to(dev)
            self._sum = torch.zeros((), dtype=torch.float64, device=dev)
            self._n = torch.zeros((), dtype=torch.float64, device=dev)

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add rows ``x`` of shape ``(..., d)``; ``False`` entries of ``mask`` (``x.shape[:-1]``)
        and rows holding NaN/Inf are left out."""
        d = self._mean.shape[0]
        rows = x.detach().reshape(-1, d).to(self._mean.device, torch.float64)
        keep = torch.isfinite(rows).all(1)
        if mask is not None:
            keep &= mask.reshape(-1).to(keep.device).bool()
        z = torch.where(keep[:, None], rows - self._mean, 0) @ self._whiten
        m = (z * z).sum(1)
        self._sum += (m * m).sum()
        self._n += keep.sum()

    @torch.no_grad()
    def all_reduce_(self, group: Any = None, *, device: torch.device | str | None = None) -> MardiaAccumulator:
        """Sum the rows seen over the ranks of ``group``, in place, in one ``all_reduce``
        (on ``device`` when given: the backend's device). Every rank must hold the same fit:
        build it from a ``LayerStats`` already summed with ``LayerStats.all_reduce_``."""
        from gsam_monitor.stats.distributed import sum_over_ranks

        packed = torch.stack([self._sum, self._n]).to(device if device is not None else self._sum.device)
        sum_over_ranks([packed], group)
        self._sum.copy_(packed[0])
        self._n.copy_(packed[1])
        return self

    def b2(self) -> float:
        """Mardia's b2 over the rows seen so far."""
        return float(self._sum / self._n)

    def value(self) -> float:
        """The normalised excess (b2 - r(r+2)) / r; NaN before any row or on an empty support."""
        r = self.rank
        if float(self._n) == 0 or r == 0:
            return math.nan
        return (self.b2() - r * (r + 2)) / r
