"""Streaming activation statistics: ``LayerStats``.

``LayerStats`` keeps the moments of a stream of row vectors x in R^d that every metric of
``gsam_monitor.metrics`` needs, without storing a single row:

* ``count``      n = sum of row weights (1 per kept row; EMA windows decay it),
* ``shift``      K, a reference vector set from the first batch (never reduced),
* ``sum``        sum_i (x_i - K),
* ``gram``       sum_i (x_i - K)(x_i - K)^T,
* ``power3/4``   per-dimension sum_i (x_ij - K_j)^3 and ^4 (excess kurtosis),
* ``unit_sum``   sum_i x_i / ||x_i|| (mean pairwise cosine similarity, "anisotropy"),
* ``absmax``     per-dimension max_i |x_ij| (the int8 absmax scale; reduced with MAX, not SUM),
* ``nonfinite``  number of rows dropped because they held NaN or Inf,
* ``product_sq`` (products narrower than fp64 only) Σ over chunks of diag of each chunk's
                 Gram product: the scale of the products' rounding error (``product_scale``).

The shift follows the data: the first rows after construction or ``reset()`` set it, and
``reshift_`` moves it exactly (``GSAMMonitor`` re-centres windows that never reset at each
log), so a mean that moves never costs the products their digits.

Every field but the shift and the abs-max is a plain sum, so two states with the same shift
merge by addition and a distributed sync is one ``all_reduce(SUM)`` per tensor, as torchmetrics'
``dist_reduce_fx="sum"`` (the abs-max takes one ``all_reduce(MAX)``, ``dist_reduce_fx="max"``).
Shifting by K (a value near the mean) keeps the Gram matrix well conditioned when activations
sit far from the origin: the naive sum-of-squares formula loses every digit when |mean| is 1e4
times the spread; the shifted one does not
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

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from gsam_monitor._validate import positive_int
from gsam_monitor.stats.distributed import AllReduce, agree_on_shift, max_over_ranks, sum_over_ranks, sum_to_rank
from gsam_monitor.stats.feed import add_rows
from gsam_monitor.stats.moments import Moments
from gsam_monitor.stats.precision import resolve_product_dtype, resolve_state_dtype, shift_dtype
from gsam_monitor.stats.shift import shifted_sums

__all__ = ["LayerStats"]

_SUM_FIELDS = ("count", "sum", "gram", "power3", "power4", "unit_sum", "product_sq")
_MAX_FIELDS = ("absmax",)


def _check_rows(x: torch.Tensor, mask: torch.Tensor | None, dim: int) -> None:
    """``LayerStats.update``'s arguments: rows ``(..., dim)`` of a floating dtype and a mask of
    their leading shape.

    Raises:
        ValueError: naming the shape or dtype expected and the one given.
    """
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(
            f"x must have shape (..., {dim}); got {tuple(x.shape)}. Check that the "
            f"monitored layer's feature size matches LayerStats(dim={dim})."
        )
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor; got dtype {x.dtype}.")
    if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"mask must have shape {tuple(x.shape[:-1])} (x without its last dim); got {tuple(mask.shape)}."
        )


class LayerStats(Moments):
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
            the product's error model (``gsam_monitor.metrics.eigenvalue_tolerance``).
        higher_moments: Keep the per-dimension 3rd/4th power sums, the unit-vector sum and the
            per-dimension abs-max.

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
        dim = positive_int(dim, "dim", " (the feature size)")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        state_dtype = resolve_state_dtype(state_dtype, dev)
        self.dim = dim
        self.state_dtype = state_dtype
        self.higher_moments = bool(higher_moments)
        self._product_dtype_arg = product_dtype
        self.product_dtype = resolve_product_dtype(product_dtype, dev, state_dtype)
        self._shift_set = False  # the shift was set by data (or moved explicitly)
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
                self._state["absmax"] = torch.zeros(d, dtype=f, device=dev)
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
        """Where the state lives (the Gram sum's device)."""
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
        """The reference vector the sums are taken around (near the mean: keeps them exact)."""
        return self._state["shift"]

    @property
    def unit_sum(self) -> torch.Tensor:
        """Sum of the kept rows scaled to unit norm (``anisotropy``; states with higher moments)."""
        self._require_higher("unit_sum")
        return self._state["unit_sum"]

    @property
    def absmax(self) -> torch.Tensor:
        """Per-dimension largest |x| over the kept rows (0 before any row; an EMA window keeps
        the largest since its last reset: a maximum does not decay)."""
        self._require_higher("absmax")
        return self._state["absmax"]

    @property
    def untouched(self) -> bool:
        """Whether nothing was added (no update, merge or shift) since creation or the last
        ``reset()``: a host-side flag, read without a device sync."""
        return not self._shift_set

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors."""
        return sum(t.numel() * t.element_size() for t in self._state.values())

    @staticmethod
    def state_bytes(dim: int, state_dtype: torch.dtype = torch.float64) -> int:
        """Bytes of state a ``LayerStats(dim)`` holds: d² for the Gram matrix plus 6·d."""
        itemsize = torch.empty((), dtype=state_dtype).element_size()
        return itemsize * (dim * dim + 6 * dim) + 16

    def state_tensors(self) -> OrderedDict[str, torch.Tensor]:
        """The sum-reducible state (everything but the shift and the abs-max), by name."""
        return OrderedDict((k, v) for k, v in self._state.items() if k != "shift" and k not in _MAX_FIELDS)

    def max_tensors(self) -> OrderedDict[str, torch.Tensor]:
        """The max-reducible state (the per-dimension abs-max), by name."""
        return OrderedDict((k, v) for k, v in self._state.items() if k in _MAX_FIELDS)

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

        Many small CPU updates (a few dozen rows each) are faster held and added together:
        ``gsam_monitor.stats.feed.RowBuffer`` does that in front of a state, with an explicit
        ``flush()`` before the state is read.

        Raises:
            ValueError: if the last dimension is not ``dim`` or the mask shape does not match.
        """
        _check_rows(x, mask, self.dim)
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
        add_rows(self._state, rows, keep_in, self.product_dtype, set_shift=not self._shift_set)
        self._shift_set = True

    # ------------------------------------------------------------------ shift algebra
    def _representable_shift(self, shift: torch.Tensor) -> torch.Tensor:
        """``shift`` rounded to what the update subtracts exactly (``precision.shift_dtype``),
        in the state's dtype and device."""
        return shift.to(shift_dtype(self.product_dtype)).to(self.device, self.state_dtype)

    def _shifted_sums(self, new_shift: torch.Tensor) -> dict[str, torch.Tensor]:
        """The sums re-expressed around ``new_shift`` (exact algebra, fp64; the Gram sums as
        held, unsymmetrised: reads symmetrise them); ``{}`` when it is the shift already."""
        mine = self._wide("shift")
        delta = mine - new_shift.to(mine.device, torch.float64)
        if not bool(delta.any()):
            return {}
        powers = (self._wide("power3"), self._wide("power4")) if self.higher_moments else ()
        return shifted_sums(self._n(), self._wide("sum"), self._wide("gram"), delta, *powers)

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
        for k, v in self.max_tensors().items():
            torch.maximum(v, other._state[k].to(v.device, v.dtype), out=v)
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
        for t in (*self.state_tensors().values(), *self.max_tensors().values()):
            t.zero_()
        self._state["shift"].zero_()
        self._shift_set = False

    @torch.no_grad()
    def decay_(self, factor: float) -> LayerStats:
        """Multiply every sum, the count included, by ``factor`` (exponential windows); the
        abs-max is a maximum and stays."""
        if not 0.0 <= factor <= 1.0:
            raise ValueError(f"factor must be in [0, 1]; got {factor!r}.")
        for k in _SUM_FIELDS:
            if k in self._state:
                self._state[k].mul_(factor)
        return self

    def clone(self, device: torch.device | str | None = None) -> LayerStats:
        """An independent copy (ordinary tensors, also when called under inference mode), on
        ``device`` when given (the product dtype stays the one resolved here: the error model
        of the rows already in it)."""
        new = LayerStats.__new__(LayerStats)
        new.__dict__.update(self.__dict__)
        dev = self.device if device is None else torch.device(device)
        with torch.inference_mode(False):
            new._state = OrderedDict(
                (k, v.clone() if v.device == dev else v.to(dev)) for k, v in self._state.items()
            )
        if dev != self.device:
            new._product_dtype_arg = self.product_dtype
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
        """Sum this state over the ranks of ``group`` (any process group), in place: the ranks
        agree on a common shift in the first ``all_reduce`` and add their re-expressed sums
        exactly; the abs-max takes the maximum (``gsam_monitor.stats.distributed``).
        ``all_reduce`` (default ``torch.distributed.all_reduce``) is injectable for tests."""
        holders = self._agree_shift(group, all_reduce)
        sum_over_ranks(self.state_tensors().values(), group, all_reduce)
        max_over_ranks(self.max_tensors().values(), group, all_reduce)
        self._shift_set = bool(holders.item() > 0)
        return self

    def _agree_shift(self, group: Any, all_reduce: Callable[..., Any] | None) -> torch.Tensor:
        """Move the sums onto the shift the ranks agree on (one collective); returns how many
        ranks hold data (a 0-dim tensor)."""
        common, holders = agree_on_shift(self.shift, self._shift_set, group, all_reduce)
        common = self._representable_shift(common)
        if self._shift_set:
            self.reshift_(common)
        else:
            self._state["shift"].copy_(common)
        return holders

    @torch.no_grad()
    def reduce_(
        self, dst: int, group: Any = None, *, all_reduce: AllReduce | None = None, reduce: AllReduce | None = None
    ) -> LayerStats:
        """Sum this state over the ranks of ``group`` onto group rank ``dst``, in place: the
        shift as in ``all_reduce_``, ``count`` and ``nonfinite`` on every rank, the other sums
        (the Gram matrix above all) on ``dst`` only; elsewhere read only ``count`` and
        ``nonfinite``. ``all_reduce`` and ``reduce`` are injectable for tests."""
        holders = self._agree_shift(group, all_reduce)
        everywhere = ("count", "nonfinite")
        sum_over_ranks([self._state[k] for k in everywhere], group, all_reduce)
        sum_to_rank([v for k, v in self.state_tensors().items() if k not in everywhere], dst, group, reduce)
        max_over_ranks(self.max_tensors().values(), group, all_reduce)  # d values: everywhere
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
            if k in _MAX_FIELDS and k not in state_dict:
                v.fill_(float("nan"))  # a state saved before the field existed: the maximum is unknown
                continue
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
