"""Streaming activation statistics: ``LayerStats`` and the Mardia second pass.

``LayerStats`` keeps the moments of a stream of row vectors x in R^d that every metric of
``gsam_monitor.metrics`` needs, without storing a single row:

* ``count``      n = sum of row weights (1 per kept row; EMA windows decay it),
* ``shift``      K, a reference vector set from the first batch (never reduced),
* ``sum``        sum_i (x_i - K),
* ``gram``       sum_i (x_i - K)(x_i - K)^T,
* ``power3/4``   per-dimension sum_i (x_ij - K_j)^3 and ^4 (excess kurtosis),
* ``unit_sum``   sum_i x_i / ||x_i|| (mean pairwise cosine similarity, "anisotropy"),
* ``nonfinite``  number of rows dropped because they held NaN or Inf.

Every field but the shift is a plain sum, so two states with the same shift merge by
addition and a distributed sync is one ``all_reduce(SUM)`` per tensor, as torchmetrics'
``dist_reduce_fx="sum"``. Shifting by K (a value near the mean) keeps the Gram matrix well
conditioned when activations sit far from the origin: the naive sum-of-squares formula loses
every digit when |mean| is 1e4 times the spread; the shifted one does not
(Chan, Golub & LeVeque, "Algorithms for computing the sample variance", 1983).

Nothing in ``update`` reads a value back to the host: rows to drop (masked or non-finite)
are zeroed and weighted 0 instead of being indexed away, so a CUDA update never waits. (On
CPU, where there is nothing to wait for, masked rows are indexed away before the products.)
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["LayerStats", "MardiaAccumulator", "resolve_product_dtype"]

_SUM_FIELDS = ("count", "sum", "gram", "power3", "power4", "unit_sum")


def resolve_product_dtype(
    product_dtype: torch.dtype | str | None, device: torch.device, state_dtype: torch.dtype
) -> torch.dtype | None:
    """Choose the dtype the per-batch Gram product is computed in.

    ``None`` picks fp64 on CPU (exact enough that batch order does not matter to 1e-9) and
    fp32 elsewhere (GPUs run fp64 GEMMs at a small fraction of their fp32 rate); ``"native"``
    (returned as ``None``) multiplies in the activations' own dtype when it is fp32 or fp64,
    and in fp32 for bf16/fp16 activations (shifted half values are not representable in half).
    """
    if product_dtype == "native":
        return None
    if product_dtype is None:
        if device.type == "cpu":
            return torch.float64 if state_dtype == torch.float64 else torch.float32
        return torch.float32
    if isinstance(product_dtype, str):
        raise ValueError(f"product_dtype must be a torch floating dtype, None or 'native'; got {product_dtype!r}.")
    if not product_dtype.is_floating_point:
        raise ValueError(f"product_dtype must be a floating dtype; got {product_dtype}.")
    return product_dtype


_WORKSPACE_ELEMENTS = 1 << 22  # rows per chunk x dim; 32 MB per fp64 buffer
_workspace_cache = threading.local()


def _chunk_rows(dim: int) -> int:
    """Rows per update chunk: bounds the workspace, large enough to keep the GEMM efficient."""
    return max(256, _WORKSPACE_ELEMENTS // dim)


def _workspace(device: torch.device, dtype: torch.dtype, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two reusable (n, d) buffers per (thread, device, dtype), grown on demand."""
    cache = getattr(_workspace_cache, "buffers", None)
    if cache is None:
        cache = _workspace_cache.buffers = {}
    key = (device, dtype)
    need = n * d
    buf = cache.get(key)
    if buf is None or buf.numel() < 2 * need:
        # A normal tensor, even when first needed under inference_mode: an inference tensor
        # could not be written in place by a later update outside it.
        with torch.inference_mode(False):
            buf = torch.empty(2 * need, dtype=dtype, device=device)
        cache[key] = buf
    return buf[:need].view(n, d), buf[need : 2 * need].view(n, d)


class LayerStats:
    """Streaming first to fourth moments of row vectors, sum-reducible and exact.

    Args:
        dim: The feature dimension d of the rows.
        device: Where the state lives (default: CPU). Put it where the activations are.
        state_dtype: Dtype of the accumulated sums. fp64 (default) keeps the exactness
            guarantees; fp32 halves the memory (4·d² bytes per layer instead of 8·d²).
        product_dtype: Dtype of each batch's Gram product before it is added to the state:
            ``None`` = fp64 on CPU and fp32 on accelerators, ``"native"`` = the activations'
            own dtype (fp32 for bf16/fp16 activations), or a dtype.
        higher_moments: Keep the per-dimension 3rd/4th power sums and the unit-vector sum.

    Raises:
        ValueError: if ``dim`` is not a positive int or a dtype is not floating point.

    Example::

        stats = LayerStats(384)
        for hidden, mask in batches:          # hidden: (B, T, 384), mask: (B, T) bool
            stats.update(hidden, mask=mask)
        cov = stats.covariance()              # (384, 384) fp64
    """

    def __init__(
        self,
        dim: int,
        *,
        device: torch.device | str | None = None,
        state_dtype: torch.dtype = torch.float64,
        product_dtype: torch.dtype | str | None = None,
        higher_moments: bool = True,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int (the feature size); got {dim!r}.")
        if not isinstance(state_dtype, torch.dtype) or not state_dtype.is_floating_point:
            raise ValueError(f"state_dtype must be a floating torch dtype such as torch.float64; got {state_dtype!r}.")
        self.dim = dim
        self.state_dtype = state_dtype
        self.higher_moments = bool(higher_moments)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self._product_dtype_arg = product_dtype
        self.product_dtype = resolve_product_dtype(product_dtype, dev, state_dtype)
        self._shift_set = False
        self._state: OrderedDict[str, torch.Tensor] = OrderedDict()
        d, f = dim, state_dtype
        self._state["shift"] = torch.zeros(d, dtype=f, device=dev)
        self._state["count"] = torch.zeros((), dtype=torch.float64, device=dev)
        self._state["sum"] = torch.zeros(d, dtype=f, device=dev)
        self._state["gram"] = torch.zeros(d, d, dtype=f, device=dev)
        if self.higher_moments:
            self._state["power3"] = torch.zeros(d, dtype=f, device=dev)
            self._state["power4"] = torch.zeros(d, dtype=f, device=dev)
            self._state["unit_sum"] = torch.zeros(d, dtype=f, device=dev)
        self._state["nonfinite"] = torch.zeros((), dtype=torch.int64, device=dev)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self._state["gram"].device

    @property
    def count(self) -> torch.Tensor:
        """Weighted number of kept rows (0-dim fp64 tensor)."""
        return self._state["count"]

    @property
    def nonfinite(self) -> torch.Tensor:
        """Number of rows dropped because they held NaN or Inf (0-dim int64 tensor)."""
        return self._state["nonfinite"]

    @property
    def shift(self) -> torch.Tensor:
        return self._state["shift"]

    @property
    def unit_sum(self) -> torch.Tensor:
        self._require_higher("unit_sum")
        return self._state["unit_sum"]

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors."""
        return sum(t.numel() * t.element_size() for t in self._state.values())

    @staticmethod
    def state_bytes(dim: int, state_dtype: torch.dtype = torch.float64) -> int:
        """Bytes of state a ``LayerStats(dim)`` holds: d² for the Gram matrix plus 5·d."""
        itemsize = torch.empty((), dtype=state_dtype).element_size()
        return itemsize * (dim * dim + 5 * dim) + 16

    def state_tensors(self) -> OrderedDict[str, torch.Tensor]:
        """The sum-reducible state (everything but the shift), by name."""
        return OrderedDict((k, v) for k, v in self._state.items() if k != "shift")

    # ------------------------------------------------------------------ moments
    def _n(self) -> torch.Tensor:
        return self._state["count"]

    @property
    def mean(self) -> torch.Tensor:
        """Mean of the kept rows, fp64 (NaN when no row was kept)."""
        n = self._n()
        return self._state["shift"].double() + self._state["sum"].double() / n

    def covariance(self, ddof: int = 0) -> torch.Tensor:
        """Covariance of the kept rows in fp64: MLE with ``ddof=0``, unbiased with ``ddof=1``."""
        if ddof not in (0, 1):
            raise ValueError(f"ddof must be 0 (maximum likelihood) or 1 (unbiased); got {ddof!r}.")
        n = self._n()
        s = self._state["sum"].double()
        centred = self._state["gram"].double() - torch.outer(s, s) / n
        centred = 0.5 * (centred + centred.T)
        return centred / (n - ddof)

    def variance(self, ddof: int = 0) -> torch.Tensor:
        """Per-dimension variance in fp64 (the covariance diagonal, without forming it)."""
        if ddof not in (0, 1):
            raise ValueError(f"ddof must be 0 (maximum likelihood) or 1 (unbiased); got {ddof!r}.")
        n = self._n()
        s = self._state["sum"].double()
        return (torch.diagonal(self._state["gram"]).double() - s * s / n) / (n - ddof)

    def central_moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-dimension central moments (m2, m3, m4), fp64, MLE normalisation."""
        self._require_higher("central_moments")
        n = self._n()
        mu = self._state["sum"].double() / n  # mean of the shifted rows
        p2 = torch.diagonal(self._state["gram"]).double() / n
        p3 = self._state["power3"].double() / n
        p4 = self._state["power4"].double() / n
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

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add rows to the statistics.

        Args:
            x: Activations of shape ``(..., dim)``, any floating dtype, on the state's device
                (moved if not).
            mask: Optional bool tensor of shape ``x.shape[:-1]``; ``False`` rows (padding) are
                ignored. Rows holding NaN/Inf are ignored too and counted in ``nonfinite``.

        Raises:
            ValueError: if the last dimension is not ``dim`` or the mask shape does not match.
        """
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(
                f"x must have shape (..., {self.dim}); got {tuple(x.shape)}. Check that the "
                f"monitored layer's feature size matches LayerStats(dim={self.dim})."
            )
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating tensor; got dtype {x.dtype}.")
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"mask must have shape {tuple(x.shape[:-1])} (x without its last dim); got {tuple(mask.shape)}."
            )
        dev = self.device
        rows = x.detach().reshape(-1, self.dim)
        if rows.device != dev:
            rows = rows.to(dev, non_blocking=True)
        keep_in = None
        if mask is not None:
            keep_in = mask.detach().reshape(-1).to(dev, non_blocking=True).bool()
            if dev.type == "cpu":
                # No device to wait for on CPU: drop padding before the products instead of
                # multiplying zeros (padded batches are often half padding).
                rows, keep_in = rows[keep_in], None
        step = _chunk_rows(self.dim)
        for start in range(0, rows.shape[0], step):
            part = rows[start : start + step]
            self._update_rows(part, None if keep_in is None else keep_in[start : start + step])

    def _update_rows(self, rows: torch.Tensor, keep_in: torch.Tensor | None) -> None:
        st = self._state
        sd = self.state_dtype
        # Products run in product_dtype; half activations are widened to fp32 first, since
        # the shifted values x - K are no longer representable in bf16/fp16.
        work = self.product_dtype or rows.dtype
        if work in (torch.float16, torch.bfloat16):
            work = torch.float32
        n = rows.shape[0]
        # Every n x d temporary lives in a reused workspace: fresh multi-megabyte buffers per
        # op cost page faults that, on CPU, took longer than the arithmetic itself.
        xs, tmp = _workspace(rows.device, work, n, self.dim)
        xs.copy_(rows)
        finite = torch.isfinite(xs.sum(dim=1))
        if keep_in is None:
            keep = finite
            st["nonfinite"] += n - finite.sum()
        else:
            keep = keep_in & finite
            st["nonfinite"] += (keep_in & ~finite).sum()
        xs.masked_fill_(~keep[:, None], 0.0)  # dropped rows (padding, NaN/Inf) become 0
        keep_w = keep.to(work)
        st["count"] += keep_w.sum(dtype=torch.float64)
        if not self._shift_set:
            # First batch: K = mean of its kept rows (0 if none), computed on the device.
            st["shift"].copy_(xs.sum(0) / keep_w.sum().clamp_min(1))
            self._shift_set = True
        if self.higher_moments:
            inv_norm = keep_w / torch.linalg.vector_norm(xs, dim=1).clamp_min(torch.finfo(work).tiny)
            st["unit_sum"] += (inv_norm @ xs).to(sd)
        xs.addr_(keep_w, st["shift"].to(work), alpha=-1.0)  # x - K on kept rows, 0 elsewhere
        st["sum"] += xs.sum(0).to(sd)
        if work == sd:
            st["gram"].addmm_(xs.T, xs)
        else:
            st["gram"] += (xs.T @ xs).to(sd)
        if self.higher_moments:
            torch.mul(xs, xs, out=tmp)
            st["power4"] += torch.linalg.vector_norm(tmp, dim=0).square().to(sd)
            st["power3"] += tmp.mul_(xs).sum(0).to(sd)

    # ------------------------------------------------------------------ shift algebra
    def _shifted_sums(self, new_shift: torch.Tensor) -> dict[str, torch.Tensor]:
        """The sums re-expressed around ``new_shift`` (exact algebra, fp64)."""
        st = self._state
        delta = st["shift"].double() - new_shift.double()  # x - K' = (x - K) + delta
        n = st["count"]
        s = st["sum"].double()
        out: dict[str, torch.Tensor] = {}
        out["sum"] = s + n * delta
        g = st["gram"].double()
        sd = torch.outer(s, delta)
        out["gram"] = g + sd + sd.T + n * torch.outer(delta, delta)
        if self.higher_moments:
            p2 = torch.diagonal(g)
            p3 = st["power3"].double()
            p4 = st["power4"].double()
            out["power3"] = p3 + 3 * delta * p2 + 3 * delta**2 * s + n * delta**3
            out["power4"] = p4 + 4 * delta * p3 + 6 * delta**2 * p2 + 4 * delta**3 * s + n * delta**4
        return out

    @torch.no_grad()
    def reshift_(self, new_shift: torch.Tensor) -> LayerStats:
        """Re-express the state around another reference vector (no change to any moment)."""
        new_shift = new_shift.to(self.device)
        for k, v in self._shifted_sums(new_shift).items():
            self._state[k].copy_(v.to(self.state_dtype))
        self._state["shift"].copy_(new_shift.to(self._state["shift"].dtype))
        self._shift_set = True
        return self

    # ------------------------------------------------------------------ combine
    def _check_compatible(self, other: LayerStats) -> None:
        if not isinstance(other, LayerStats):
            raise TypeError(f"other must be a LayerStats; got {type(other).__name__}.")
        if other.dim != self.dim:
            raise ValueError(f"cannot merge LayerStats of dim {other.dim} into dim {self.dim}.")
        if other.higher_moments != self.higher_moments:
            raise ValueError("cannot merge LayerStats with and without higher_moments.")

    @torch.no_grad()
    def merge(self, other: LayerStats) -> LayerStats:
        """Add another stream's statistics to this one (exact; order does not matter)."""
        self._check_compatible(other)
        if not other._shift_set:
            self._state["nonfinite"] += other._state["nonfinite"].to(self.device)
            return self
        if not self._shift_set:
            self._state["shift"].copy_(other._state["shift"].to(self.device))
            self._shift_set = True
        moved = other._shifted_sums(self._state["shift"].to(other.device))
        for k in self.state_tensors():
            src = moved[k] if k in moved else other._state[k]
            self._state[k] += src.to(self.device, self._state[k].dtype)
        return self

    @torch.no_grad()
    def reset(self) -> None:
        """Zero the sums. The shift is kept: the last window's mean is a good reference."""
        for t in self.state_tensors().values():
            t.zero_()

    @torch.no_grad()
    def decay_(self, factor: float) -> LayerStats:
        """Multiply every sum, the count included, by ``factor`` (exponential windows)."""
        if not 0.0 <= factor <= 1.0:
            raise ValueError(f"factor must be in [0, 1]; got {factor!r}.")
        for k in _SUM_FIELDS:
            if k in self._state:
                self._state[k].mul_(factor)
        return self

    def clone(self) -> LayerStats:
        new = LayerStats.__new__(LayerStats)
        new.__dict__.update(self.__dict__)
        new._state = OrderedDict((k, v.clone()) for k, v in self._state.items())
        return new

    def to(self, device: torch.device | str) -> LayerStats:
        """Move the state (in place) and return self."""
        dev = torch.device(device)
        for k, v in self._state.items():
            self._state[k] = v.to(dev)
        self.product_dtype = resolve_product_dtype(self._product_dtype_arg, dev, self.state_dtype)
        return self

    # ------------------------------------------------------------------ distributed
    @torch.no_grad()
    def all_reduce_(
        self,
        group: Any = None,
        *,
        all_reduce: Callable[..., Any] | None = None,
        broadcast: Callable[..., Any] | None = None,
    ) -> LayerStats:
        """Sum this state over the ranks of ``group``, in place.

        Rank 0's shift is broadcast first and every rank re-expresses its sums around it, so
        the sums add exactly. ``all_reduce`` and ``broadcast`` default to
        ``torch.distributed``'s and are injectable for tests.
        """
        import torch.distributed as dist

        all_reduce = all_reduce or dist.all_reduce
        broadcast = broadcast or dist.broadcast
        flag = torch.tensor(1.0 if self._shift_set else 0.0, device=self.device)
        shift = self._state["shift"].clone()
        # Rank 0 may hold no data; then take the first rank's shift that has some: use the
        # count-weighted average of the shifts instead of a single rank's.
        weighted = shift.double() * flag
        all_reduce(weighted, group=group)
        all_reduce(flag, group=group)
        common = (weighted / flag.clamp_min(1)).to(shift.dtype)
        broadcast(common, src=0, group=group)
        if self._shift_set:
            self.reshift_(common)
        else:
            self._state["shift"].copy_(common)
        for t in self.state_tensors().values():
            all_reduce(t, group=group)
        self._shift_set = bool(flag.item() > 0)
        return self

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only: loadable with ``torch.load(weights_only=True)``."""
        sd: dict[str, Any] = {k: v.detach().clone() for k, v in self._state.items()}
        sd["dim"] = self.dim
        sd["shift_set"] = self._shift_set
        sd["higher_moments"] = self.higher_moments
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dim") != self.dim:
            raise ValueError(f"state_dict is for dim {state_dict.get('dim')!r}, this LayerStats has dim {self.dim}.")
        if bool(state_dict.get("higher_moments")) != self.higher_moments:
            raise ValueError("state_dict and this LayerStats disagree on higher_moments.")
        for k, v in self._state.items():
            if k not in state_dict:
                raise KeyError(f"state_dict lacks {k!r}")
            v.copy_(state_dict[k].to(v.device, v.dtype))
        self._shift_set = bool(state_dict["shift_set"])

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Any], **kwargs: Any) -> LayerStats:
        s = cls(
            int(state_dict["dim"]),
            higher_moments=bool(state_dict["higher_moments"]),
            state_dtype=state_dict["gram"].dtype,
            **kwargs,
        )
        s.load_state_dict(state_dict)
        return s

    def __repr__(self) -> str:
        return (
            f"LayerStats(dim={self.dim}, count={float(self.count):g}, device={self.device}, "
            f"state_dtype={self.state_dtype})"
        )


class MardiaAccumulator:
    """Second pass for Mardia's multivariate kurtosis under a frozen Gaussian fit.

    b2 = (1/n) sum_i ((x_i - mu)^T S^+ (x_i - mu))^2 with mu, S the MLE fit of ``stats``
    (pseudo-inverse on the support, rank r). For Gaussian data b2 -> r(r+2); ``value()``
    returns the normalised excess (b2 - r(r+2)) / r, 0 for Gaussian data
    (Mardia, "Measures of multivariate skewness and kurtosis", Biometrika 1970).

    Args:
        stats: The fitted statistics (the first pass over the same rows).
        rank_tol: Relative eigenvalue tolerance for the support; default as ``metrics``.
    """

    def __init__(self, stats: LayerStats, rank_tol: float | None = None) -> None:
        from gsam_monitor import metrics as _metrics

        if float(stats.count) < 2:
            raise ValueError("MardiaAccumulator needs a fit from at least 2 rows.")
        cov = stats.covariance().cpu()
        evals, evecs = torch.linalg.eigh(cov)
        tol = _metrics.rank_tolerance(evals, stats.product_dtype or torch.float32, rank_tol)
        support = evals > tol
        self.rank = int(support.sum())
        dev = stats.device
        self._mean = stats.mean.to(dev)
        self._whiten = (evecs[:, support] / evals[support].sqrt()).to(dev)
        self._sum = torch.zeros((), dtype=torch.float64, device=dev)
        self._n = torch.zeros((), dtype=torch.float64, device=dev)

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        d = self._mean.shape[0]
        rows = x.detach().reshape(-1, d).to(self._mean.device, torch.float64)
        keep = torch.isfinite(rows).all(1)
        if mask is not None:
            keep &= mask.reshape(-1).to(keep.device).bool()
        z = torch.where(keep[:, None], rows - self._mean, 0) @ self._whiten
        m = (z * z).sum(1)
        self._sum += (m * m).sum()
        self._n += keep.sum()

    def b2(self) -> float:
        return float(self._sum / self._n)

    def value(self) -> float:
        r = self.rank
        if float(self._n) == 0 or r == 0:
            return math.nan
        return (self.b2() - r * (r + 2)) / r
