"""Streaming activation statistics: ``LayerStats``.

``LayerStats`` keeps the moments of a stream of row vectors x in R^d that every metric of
``gsam_monitor.metrics`` needs, without storing a single row:

* ``count``      n = sum of row weights (1 per kept row; EMA windows decay it),
* ``shift``      K, a reference vector set from the first batch (never reduced),
* ``sum``        sum_i (x_i - K),
* ``gram``       sum_i (x_i - K)(x_i - K)^T,
* ``power3/4``   per-dimension sum_i (x_ij - K_j)^3 and ^4 (excess kurtosis),
* ``unit_sum``   sum_i x_i / ||x_i|| (mean pairwise cosine similarity, "anisotropy"),
* ``nonfinite``  number of rows dropped because they held NaN or Inf,
* ``product_sq`` (products narrower than fp64 only) Σ over chunks of diag of each chunk's
                 Gram product: the scale of the products' rounding error (``product_scale``).

The shift follows the data: the first rows after construction or ``reset()`` set it, and
``reshift_`` moves it exactly (``GSAMMonitor`` re-centres windows that never reset at each
log), so a mean that moves never costs the products their digits.

Every field but the shift is a plain sum, so two states with the same shift merge by
addition and a distributed sync is one ``all_reduce(SUM)`` per tensor, as torchmetrics'
``dist_reduce_fx="sum"``. Shifting by K (a value near the mean) keeps the Gram matrix well
conditioned when activations sit far from the origin: the naive sum-of-squares formula loses
every digit when |mean| is 1e4 times the spread; the shifted one does not
(Chan, Golub & LeVeque, "Algorithms for computing the sample variance", 1983).

``update`` ignores the caller's numeric context: it runs with autocast disabled and with
fp32 matmuls in full IEEE precision (no TF32 on CUDA, no bf16 on AMX CPUs), and restores the
caller's settings afterwards. Hooks run inside the user's autocast region, where a bf16 Gram
product reported rank 79 for rank-64 data.

Nothing in ``update`` reads a value back to the host: rows to drop (masked or non-finite)
are zeroed and weighted 0 instead of being indexed away, so a CUDA update never waits. (On
CPU, where there is nothing to wait for, masked rows are indexed away before the products.)
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = [
    "LayerStats",
    "exact_numerics",
    "fast_fp64",
    "resolve_product_dtype",
    "resolve_state_dtype",
]

_SUM_FIELDS = ("count", "sum", "gram", "power3", "power4", "unit_sum", "product_sq")


# CUDA parts whose fp64 throughput is at least half their fp32 throughput (P100, V100,
# A100, H100/H200, B200: the data-centre chips). Every other CUDA part (consumer and
# workstation GPUs, the inference parts such as T4/L4/L40) runs fp64 at 1/32-1/64 of fp32.
FULL_RATE_FP64_CAPABILITIES: frozenset[tuple[int, int]] = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})


def fast_fp64(device: torch.device) -> bool:
    """Whether ``device`` runs fp64 GEMMs at half its fp32 rate or better (CPUs, data-centre GPUs).

    MPS has no fp64 at all; other accelerators are assumed not to.
    """
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return tuple(torch.cuda.get_device_capability(device)) in FULL_RATE_FP64_CAPABILITIES
    return False


def resolve_state_dtype(state_dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype of the accumulated sums: fp64 unless the device has none (MPS: fp32).

    Raises:
        ValueError: if ``state_dtype`` is not a floating torch dtype.
    """
    if state_dtype is None:
        state_dtype = torch.float64
    if not isinstance(state_dtype, torch.dtype) or not state_dtype.is_floating_point:
        raise ValueError(f"state_dtype must be a floating torch dtype such as torch.float64; got {state_dtype!r}.")
    if device.type == "mps" and state_dtype == torch.float64:
        # MPS has no float64 tensors. Keeping fp64 state on the CPU instead would copy every
        # batch (or its Gram product) to the host, a synchronisation per hook; fp32 state on
        # the device keeps the hook asynchronous. The metrics' rank tolerance follows.
        warnings.warn(
            "LayerStats: MPS has no float64, so the statistics are kept in float32 on the MPS "
            "device (pass device='cpu' for fp64 state, at the cost of a host copy per batch).",
            UserWarning,
            stacklevel=3,
        )
        return torch.float32
    return state_dtype


def resolve_product_dtype(
    product_dtype: torch.dtype | str | None, device: torch.device, state_dtype: torch.dtype
) -> torch.dtype | None:
    """Choose the dtype the per-batch Gram product is computed in.

    ``None`` (the default) picks fp64 where the device runs fp64 at half its fp32 rate or
    better (CPUs; CUDA compute capability 6.0, 7.0, 8.0, 9.0, 10.0) and the state is fp64, and
    fp32 elsewhere (consumer GPUs, MPS, an fp32 state). ``"native"`` (returned as ``None``)
    multiplies in the activations' own dtype when it is fp32 or fp64, and in fp32 for
    bf16/fp16 activations (shifted half values are not representable in half).

    Raises:
        ValueError: for anything but a floating dtype, ``None`` or ``"native"``.
    """
    if product_dtype == "native":
        return None
    if product_dtype is None:
        return torch.float64 if state_dtype == torch.float64 and fast_fp64(device) else torch.float32
    if isinstance(product_dtype, str) or not isinstance(product_dtype, torch.dtype):
        raise ValueError(f"product_dtype must be a torch floating dtype, None or 'native'; got {product_dtype!r}.")
    if not product_dtype.is_floating_point:
        raise ValueError(f"product_dtype must be a floating dtype; got {product_dtype}.")
    if device.type == "mps" and product_dtype == torch.float64:
        raise ValueError("product_dtype=torch.float64 is not available on MPS (no float64); use torch.float32.")
    return product_dtype


@contextlib.contextmanager
def exact_numerics(device_type: str) -> Iterator[None]:
    """Autocast off for ``device_type`` and fp32 matmuls in IEEE precision, the caller's
    settings restored on exit (also on an exception). Host-side flags only: no sync.

    TF32 (CUDA) and bf16 (oneDNN on AMX CPUs) are both selected by
    ``torch.set_float32_matmul_precision("high"/"medium")``; the per-backend
    ``fp32_precision`` properties are read and written directly, because the legacy getter
    raises once a program has mixed the legacy and the per-backend APIs.
    """
    cuda_mm = torch.backends.cuda.matmul
    cpu_mm = torch.backends.mkldnn.matmul
    saved = (cuda_mm.fp32_precision, cpu_mm.fp32_precision)
    with torch.autocast(device_type, enabled=False):
        try:
            cuda_mm.fp32_precision = "ieee"
            cpu_mm.fp32_precision = "ieee"
            yield
        finally:
            cuda_mm.fp32_precision, cpu_mm.fp32_precision = saved


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


def _shift_power_sums(
    n: torch.Tensor, s: torch.Tensor, p2: torch.Tensor, p3: torch.Tensor, p4: torch.Tensor, delta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension 3rd and 4th power sums of y + δ from those of y (binomial expansion):
    Σ(y+δ)³ = p3 + 3δ p2 + 3δ² s + n δ³, Σ(y+δ)⁴ = p4 + 4δ p3 + 6δ² p2 + 4δ³ s + n δ⁴."""
    d2 = delta * delta
    p3_new = p3 + 3 * delta * p2 + 3 * d2 * s + n * d2 * delta
    p4_new = p4 + 4 * delta * p3 + 6 * d2 * p2 + 4 * d2 * delta * s + n * d2 * d2
    return p3_new, p4_new


class LayerStats:
    """Streaming first to fourth moments of row vectors, sum-reducible and exact.

    Args:
        dim: The feature dimension d of the rows.
        device: Where the state lives (default: CPU). Put it where the activations are.
        state_dtype: Dtype of the accumulated sums. fp64 (default; fp32 on MPS, which has
            no fp64) keeps the exactness guarantees; fp32 halves the memory (4·d² bytes per
            layer instead of 8·d²).
        product_dtype: Dtype of each batch's Gram product before it is added to the state:
            ``None`` = fp64 where the device runs fp64 at half its fp32 rate or better (CPU;
            CUDA compute capability 6.0/7.0/8.0/9.0/10.0) and fp32 elsewhere (consumer GPUs,
            MPS; see ``resolve_product_dtype``), ``"native"`` = the activations' own dtype
            (fp32 for bf16/fp16 activations), or a dtype. The metrics' rank tolerance follows
            the product's error model (``gsam_monitor.metrics.support``).
        higher_moments: Keep the per-dimension 3rd/4th power sums and the unit-vector sum.

    State tensors are ordinary tensors whatever mode they are created or updated in: a
    ``LayerStats`` first touched under ``torch.inference_mode()`` keeps working outside it.

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
        state_dtype: torch.dtype | None = None,
        product_dtype: torch.dtype | str | None = None,
        higher_moments: bool = True,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int (the feature size); got {dim!r}.")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        state_dtype = resolve_state_dtype(state_dtype, dev)
        self.dim = dim
        self.state_dtype = state_dtype
        self.higher_moments = bool(higher_moments)
        self._product_dtype_arg = product_dtype
        self.product_dtype = resolve_product_dtype(product_dtype, dev, state_dtype)
        self._shift_set = False
        self._state: OrderedDict[str, torch.Tensor] = OrderedDict()
        d, f = dim, state_dtype
        # fp64 counts where the device has fp64; MPS counts in fp32 (exact to 2**24 rows).
        cf = torch.float64 if dev.type != "mps" else torch.float32
        # Ordinary tensors even when first created under inference_mode (a hook in an eval
        # loop): inference tensors could never be updated in place outside it.
        with torch.inference_mode(False):
            self._state["shift"] = torch.zeros(d, dtype=f, device=dev)
            self._state["count"] = torch.zeros((), dtype=cf, device=dev)
            self._state["sum"] = torch.zeros(d, dtype=f, device=dev)
            self._state["gram"] = torch.zeros(d, d, dtype=f, device=dev)
            if self.higher_moments:
                self._state["power3"] = torch.zeros(d, dtype=f, device=dev)
                self._state["power4"] = torch.zeros(d, dtype=f, device=dev)
                self._state["unit_sum"] = torch.zeros(d, dtype=f, device=dev)
            self._state["nonfinite"] = torch.zeros((), dtype=torch.int64, device=dev)
        self._track_product_error()

    def _track_product_error(self) -> None:
        """Narrower products than fp64 keep ``product_sq`` for their error model."""
        if self.product_dtype != torch.float64 and "product_sq" not in self._state:
            gram = self._state["gram"]
            with torch.inference_mode(False):
                self._state["product_sq"] = torch.zeros(self.dim, dtype=gram.dtype, device=gram.device)

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
        s = self._wide("sum")
        return (self._gram() - torch.outer(s, s) / n) / (n - ddof)

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

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add rows to the statistics.

        Args:
            x: Activations of shape ``(..., dim)``, any floating dtype, on the state's device
                (moved if not).
            mask: Optional bool tensor of shape ``x.shape[:-1]``; ``False`` rows (padding) are
                ignored. Rows holding NaN/Inf are ignored too and counted in ``nonfinite``.

        The products run with autocast off and fp32 matmuls in IEEE precision whatever the
        caller's context (``exact_numerics``); rows are processed in chunks of
        ``2**22 // dim`` rows (at least 256) so that the workspace stays bounded.

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
        # A non-blocking copy is safe only into device memory, which later kernels read in
        # stream order; into host memory the CPU would read the buffer before it is filled.
        async_copy = dev.type == "cuda"
        rows = x.detach().reshape(-1, self.dim)
        if rows.device != dev:
            rows = rows.to(dev, non_blocking=async_copy)
        keep_in = None
        if mask is not None:
            keep_in = mask.detach().reshape(-1).to(dev, non_blocking=async_copy).bool()
            if dev.type == "cpu":
                # No device to wait for on CPU: drop padding before the products instead of
                # multiplying zeros (padded batches are often half padding).
                rows, keep_in = rows[keep_in], None
        step = _chunk_rows(self.dim)
        with exact_numerics(dev.type):
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
        kept = keep_w.sum(dtype=st["count"].dtype)
        st["count"] += kept
        if not self._shift_set:
            # First batch: K = mean of its kept rows (0 if none), computed on the device.
            st["shift"].copy_(self._representable_shift(xs.sum(0) / kept.clamp_min(1)))
            self._shift_set = True
        if self.higher_moments:
            inv_norm = keep_w / torch.linalg.vector_norm(xs, dim=1).clamp_min(torch.finfo(work).tiny)
            if work == torch.float64:
                st["unit_sum"] += (inv_norm @ xs).to(sd)
            else:  # a pairwise column sum: an fp32 GEMV sums each column's rows one by one
                st["unit_sum"] += torch.mul(xs, inv_norm[:, None], out=tmp).sum(0).to(sd)
        if work == torch.float64:
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
            return  # (a product_sq kept from narrower products before to() gains nothing)
        # Narrower products centre each chunk on its own mean m and move its sums to the
        # window's shift K in the state dtype, exactly (Chan, Golub & LeVeque 1979's pairwise
        # update): the GEMM never sees an offset, so a mean far from K (a window that
        # drifted, a batch that jumped) costs fp32 products no digits.
        local = xs.sum(0) / kept.clamp_min(1).to(work)
        xs.addr_(keep_w, local, alpha=-1.0)  # x - m on kept rows, 0 elsewhere
        delta = local.to(sd) - st["shift"]  # x - K = (x - m) + delta
        s_b = xs.sum(0).to(sd)
        n_b = kept.to(sd)
        st["sum"] += s_b + n_b * delta
        st["gram"].add_(xs.T @ xs)  # widened as it is added: no d x d temporary in sd
        # + s δᵀ + δ sᵀ + n δδᵀ = u δᵀ + δ uᵀ with u = s + n δ / 2: one pass over the state.
        u = s_b + 0.5 * n_b * delta
        st["gram"].addmm_(torch.stack([u, delta], 1), torch.stack([delta, u]))
        # Power sums as pairwise column sums of the powers (an fp32 vector_norm of x² lost
        # 1e-4 of Σx⁴ over 1e5 rows). xs is not needed after them.
        torch.mul(xs, xs, out=tmp)
        p2 = tmp.sum(0).to(sd)
        st["product_sq"] += p2
        if self.higher_moments:
            p3 = xs.mul_(tmp).sum(0).to(sd)
            p4 = tmp.mul_(tmp).sum(0).to(sd)
            p3, p4 = _shift_power_sums(n_b, s_b, p2, p3, p4, delta)
            st["power3"] += p3
            st["power4"] += p4

    # ------------------------------------------------------------------ shift algebra
    def _representable_shift(self, shift: torch.Tensor) -> torch.Tensor:
        """``shift`` rounded to the product dtype (fp32 unless the products are fp64), in
        the state's dtype and device. The update subtracts the shift in the product dtype,
        so a shift that dtype holds exactly keeps ``mean = K + sum / n`` exact."""
        exact = torch.float64 if self.product_dtype == torch.float64 else torch.float32
        return shift.to(exact).to(self.device, self.state_dtype)

    def _shifted_sums(self, new_shift: torch.Tensor) -> dict[str, torch.Tensor]:
        """The sums re-expressed around ``new_shift`` (exact algebra, fp64):
        x - K' = (x - K) + δ with δ = K - K', expanded in powers of δ."""
        delta = self._wide("shift") - new_shift.to(torch.float64)
        n = self._n()
        s = self._wide("sum")
        out: dict[str, torch.Tensor] = {}
        out["sum"] = s + n * delta
        g = self._gram()
        sd = torch.outer(s, delta)
        out["gram"] = g + sd + sd.T + n * torch.outer(delta, delta)
        if self.higher_moments:
            out["power3"], out["power4"] = _shift_power_sums(
                n, s, torch.diagonal(g), self._wide("power3"), self._wide("power4"), delta
            )
        return out

    @torch.no_grad()
    def reshift_(self, new_shift: torch.Tensor | None = None) -> LayerStats:
        """Re-express the state around another reference vector, exactly (no moment changes).

        Args:
            new_shift: The new reference vector K (length ``dim``); default the current mean,
                which re-centres a window whose data have moved away from its first rows.
                It is rounded to the product dtype, so that the update subtracts it exactly.

        Returns:
            self. A state without data is left as it is.
        """
        if new_shift is None:
            if not self._shift_set:
                return self
            new_shift = self.mean
        target = self._representable_shift(new_shift.detach().reshape(self.dim))
        if not self._shift_set:  # no data: the sums are zero around any reference
            self._state["shift"].copy_(target)
            self._shift_set = True
            return self
        moved = self._shifted_sums(target)
        for k, v in moved.items():
            self._state[k].copy_(v.to(self.device, self.state_dtype))
        self._state["shift"].copy_(target)
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
        """Add another stream's statistics to this one (exact; order does not matter).

        ``other`` is re-expressed around this state's shift; an empty state takes
        ``other``'s shift.
        """
        self._check_compatible(other)
        if not other._shift_set:
            self._state["nonfinite"] += other._state["nonfinite"].to(self.device)
            return self
        if not self._shift_set:
            self._state["shift"].copy_(self._representable_shift(other._wide("shift")))
            self._shift_set = True
        moved = other._shifted_sums(self._wide("shift"))
        for k in self.state_tensors():
            if k not in moved and k not in other._state:
                continue  # product_sq of fp64 products: their rounding adds nothing to it
            src = moved[k] if k in moved else other._state[k]
            self._state[k] += src.to(self.device, self._state[k].dtype)
        return self

    @torch.no_grad()
    def reset(self) -> None:
        """Zero the sums and release the shift: the next window's first rows set it, so a
        window whose mean moved far from the last one's keeps every digit."""
        for t in self.state_tensors().values():
            t.zero_()
        self._state["shift"].zero_()
        self._shift_set = False

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
        """An independent copy (ordinary tensors, also when called under inference mode)."""
        new = LayerStats.__new__(LayerStats)
        new.__dict__.update(self.__dict__)
        with torch.inference_mode(False):
            new._state = OrderedDict((k, v.clone()) for k, v in self._state.items())
        return new

    def to(self, device: torch.device | str) -> LayerStats:
        """Move the state (in place) and return self.

        Raises:
            ValueError: when moving an fp64 state to MPS, which has no fp64.
        """
        dev = torch.device(device)
        if dev.type == "mps" and self.state_dtype == torch.float64:
            raise ValueError(
                "cannot move an fp64 LayerStats to MPS (no float64 there); create it with "
                "LayerStats(dim, device='mps') to get fp32 state, or keep it on the CPU."
            )
        with torch.inference_mode(False):
            for k, v in self._state.items():
                self._state[k] = v.to(dev)
        self.product_dtype = resolve_product_dtype(self._product_dtype_arg, dev, self.state_dtype)
        self._track_product_error()
        return self

    # ------------------------------------------------------------------ distributed
    @torch.no_grad()
    def all_reduce_(self, group: Any = None, *, all_reduce: Callable[..., Any] | None = None) -> LayerStats:
        """Sum this state over the ranks of ``group``, in place (any process group: the
        group's ranks need not include global rank 0).

        The common shift is the plain (unweighted) mean of the shifts of the ranks that hold
        data, agreed by the first ``all_reduce`` itself: every rank receives the same sums, so
        no broadcast (and no source rank) is needed. Each rank then re-expresses its sums
        around it, so that the sums add exactly. ``all_reduce`` defaults to
        ``torch.distributed.all_reduce`` and is injectable for tests.
        """
        import torch.distributed as dist

        all_reduce = all_reduce or dist.all_reduce
        has = 1.0 if self._shift_set else 0.0
        # One collective for the agreement: [has * shift..., has] summed over the ranks.
        # (fp32 on MPS, where fp64 does not exist.)
        wide = torch.float64 if self.device.type != "mps" else torch.float32
        packed = torch.cat(
            [self._state["shift"].to(wide) * has, torch.tensor([has], dtype=wide, device=self.device)]
        )
        all_reduce(packed, group=group)
        holders = packed[-1]
        common = self._representable_shift(packed[:-1] / holders.clamp_min(1))
        if self._shift_set:
            self.reshift_(common)
        else:
            self._state["shift"].copy_(common)
        for t in self.state_tensors().values():
            all_reduce(t, group=group)
        self._shift_set = bool(holders.item() > 0)
        return self

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only: loadable with ``torch.load(weights_only=True)``.
        The Gram matrix is symmetrised (see ``covariance``)."""
        with torch.inference_mode(False):
            sd: dict[str, Any] = {k: v.detach().clone() for k, v in self._state.items()}
            sd["gram"] = self._gram().to(self.device, self.state_dtype)
        sd["dim"] = self.dim
        sd["shift_set"] = self._shift_set
        sd["higher_moments"] = self.higher_moments
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict`` (of any device and dtype) into this state's tensors.

        Raises:
            ValueError: if the dimension or ``higher_moments`` differ.
            KeyError: if a state tensor is missing.
        """
        if state_dict.get("dim") != self.dim:
            raise ValueError(f"state_dict is for dim {state_dict.get('dim')!r}, this LayerStats has dim {self.dim}.")
        if bool(state_dict.get("higher_moments")) != self.higher_moments:
            raise ValueError("state_dict and this LayerStats disagree on higher_moments.")
        for k, v in self._state.items():
            if k == "product_sq" and k not in state_dict:
                # A state saved before the field existed: its products were not centred per
                # chunk, so their error scale is the diagonal of the Gram around the shift.
                v.copy_(torch.diagonal(state_dict["gram"]).to(v.device, v.dtype))
                continue
            if k not in state_dict:
                raise KeyError(f"state_dict lacks {k!r}")
            v.copy_(state_dict[k].to(v.device, v.dtype))
        self._shift_set = bool(state_dict["shift_set"])

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Any], **kwargs: Any) -> LayerStats:
        """A new ``LayerStats`` holding ``state_dict``; ``kwargs`` go to the constructor."""
        kwargs.setdefault("state_dtype", state_dict["gram"].dtype)
        s = cls(int(state_dict["dim"]), higher_moments=bool(state_dict["higher_moments"]), **kwargs)
        s.load_state_dict(state_dict)
        return s

    def __repr__(self) -> str:
        return (
            f"LayerStats(dim={self.dim}, count={float(self.count):g}, device={self.device}, "
            f"state_dtype={self.state_dtype})"
        )
