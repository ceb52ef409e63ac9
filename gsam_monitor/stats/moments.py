"""Reading the moments out of the sums: mean, covariance, variance, higher moments, error scale.

Everything here is computed in fp64 from the shifted sums (x - K): the mean is K + Σ/n and
the covariance (G - s sᵀ/n) / (n - ddof), so the shift never costs a digit.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

__all__ = ["Moments"]


class Moments:
    """The read-out half of ``LayerStats``: the moments of the rows its sums describe.

    A base class: ``LayerStats`` provides the state (``_state``, ``dim``, ``state_dtype``,
    ``higher_moments``); the methods here only read it.
    """

    _state: OrderedDict[str, torch.Tensor]
    dim: int
    state_dtype: torch.dtype
    higher_moments: bool

    def _wide(self, name: str) -> torch.Tensor:
        """A state tensor in fp64 (on the CPU for MPS, which has no fp64)."""
        t = self._state[name]
        return t.double() if t.device.type != "mps" else t.to("cpu", torch.float64)

    def _n(self) -> torch.Tensor:
        return self._wide("count")

    def _gram(self) -> torch.Tensor:
        """The Gram state in fp64, symmetric by construction: a GEMM's two triangles may
        differ in the last bit (BLAS kernels sum i,j and j,i in different orders)."""
        g = self._wide("gram")
        return 0.5 * (g + g.T)

    @property
    def mean(self) -> torch.Tensor:
        """Mean of the kept rows, fp64 (NaN when no row was kept)."""
        return self._wide("shift") + self._wide("sum") / self._n()

    def covariance(self, ddof: int = 0) -> torch.Tensor:
        """Covariance of the kept rows in fp64: MLE with ``ddof=0``, unbiased with ``ddof=1``."""
        if ddof not in (0, 1):
            raise ValueError(f"ddof must be 0 (maximum likelihood) or 1 (unbiased); got {ddof!r}.")
        n = self._n()
        g = self._wide("gram")
        # (G + Gᵀ - 2 s sᵀ/n) / (2(n - ddof)), in place on one d x d buffer: symmetric to the
        # last bit (r_i r_j = r_j r_i), and a third of the passes over d² of the plain formula.
        cov = g + g.T
        r = self._wide("sum") * n.rsqrt()
        return cov.addr_(r, r, alpha=-2.0).mul_(0.5 / (n - ddof))

    def variance(self, ddof: int = 0) -> torch.Tensor:
        """Per-dimension variance in fp64 (the covariance diagonal, without forming it)."""
        if ddof not in (0, 1):
            raise ValueError(f"ddof must be 0 (maximum likelihood) or 1 (unbiased); got {ddof!r}.")
        n = self._n()
        s = self._wide("sum")
        return (torch.diagonal(self._wide("gram")) - s * s / n) / (n - ddof)

    def product_scale(self) -> torch.Tensor:
        """Per-dimension scale of the Gram products' rounding error, fp64 (length ``dim``).

        An fp32 product's error in covariance entry (i, j) is at most about
        c · eps32 · sqrt(scale_i · scale_j) (``metrics.eigenvalue_tolerance``), with scale_i
        the mean over rows of the squared terms the products summed: Σ (x_i - m_i)² / n, each
        chunk centred on its own mean m (kept in ``product_sq``; Cauchy-Schwarz bounds the
        sum of the chunks' errors by it). An fp32 state also rounds each sum at the magnitude
        of its entries around the shift K, adding diag(Σ (x-K)(x-K)ᵀ) / n. Zero for fp64
        products, whose rounding lies far below scipy's rule.
        """
        if "product_sq" not in self._state:  # fp64 products: rounding far below any tolerance
            return torch.zeros(self.dim, dtype=torch.float64, device=self._n().device)
        scale = self._wide("product_sq") / self._n()
        if self.state_dtype != torch.float64:
            scale = scale + torch.diagonal(self._wide("gram")) / self._n()
        return scale

    def central_moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-dimension central moments (m2, m3, m4), fp64, MLE normalisation."""
        self._require_higher("central_moments")
        n = self._n()
        mu = self._wide("sum") / n  # mean of the shifted rows
        p2 = torch.diagonal(self._wide("gram")) / n
        p3 = self._wide("power3") / n
        p4 = self._wide("power4") / n
        m2 = p2 - mu**2
        m3 = p3 - 3 * mu * p2 + 2 * mu**3
        m4 = p4 - 4 * mu * p3 + 6 * mu**2 * p2 - 3 * mu**4
        return m2, m3, m4

    def excess_kurtosis(self) -> torch.Tensor:
        """Per-dimension excess kurtosis m4/m2² - 3 (0 for Gaussian data; NaN where m2 = 0)."""
        m2, _, m4 = self.central_moments()
        m2 = torch.where(m2 > 0, m2, torch.full_like(m2, float("nan")))
        return m4 / m2**2 - 3.0

    def skewness(self) -> torch.Tensor:
        """Per-dimension skewness m3/m2^1.5 (NaN where m2 = 0)."""
        m2, m3, _ = self.central_moments()
        m2 = torch.where(m2 > 0, m2, torch.full_like(m2, float("nan")))
        return m3 / m2**1.5

    def _require_higher(self, what: str) -> None:
        if not self.higher_moments:
            raise RuntimeError(f"{what} needs the higher moments; create LayerStats(..., higher_moments=True).")
