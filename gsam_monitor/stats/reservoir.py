"""``ReservoirSample``: a bounded uniform sample of activation values, streamed on the device.

GSAM and the streaming moments see only the first two moments of the activations; the
distribution analyses (``gsam_monitor.analysis``) need the values themselves. This keeps a
uniform random sample of them, without replacement, in bounded memory, beside the
``LayerStats`` that the same rows feed: the monitor (``reservoir_size=``) and the eval
(``--analyses distributions``) fill one per layer.

References:
    J. S. Vitter, "Random sampling with a reservoir", ACM TOMS 11(1), 1985 (algorithm R).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from gsam_monitor._validate import positive_int

__all__ = ["ReservoirSample"]

# Rows per chunk inside ReservoirSample.update, so temporaries stay ~ 8 * 2**20 bytes each
# whatever the batch size.
_CHUNK_VALUES = 1 << 20


def _reservoir_update(
    buffer: torch.Tensor,
    count: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    capacity: int,
    generator: torch.Generator,
) -> None:
    """Algorithm R on D independent streams at once, without host synchronisation.

    Value ``values[i, c]`` is element number ``t = count[c] + (valid values so far)`` of
    stream c. Algorithm R keeps it in slot t-1 while t <= capacity, else draws
    j ~ U{0, ..., t-1} and replaces slot j when j < capacity. The draws are independent of
    each other, so they can all be made at once; only the order of writes to the same slot
    matters (the later element wins), which the ``amax`` scatter over the element's stream
    position reproduces exactly.

    Args:
        buffer: (D, capacity + 1) storage; column ``capacity`` is a dump slot for rejects.
        count: (D,) int64 number of valid values seen so far per stream, updated in place.
        values: (m, D) new values, row order = stream order.
        valid: (m, D) bool, False = skip this value.
        capacity: reservoir size per stream.
        generator: random generator on the buffer's device.
    """
    m, n_streams = values.shape
    device = values.device
    position = count.unsqueeze(0) + valid.cumsum(0)  # (m, D) 1-based stream index
    draw = torch.rand((m, n_streams), generator=generator, device=device, dtype=torch.float64)
    # floor(u * t) is uniform on {0, ..., t-1}; the minimum guards u * t rounding up to t.
    j = torch.minimum((draw * position.to(torch.float64)).floor().to(torch.int64), position - 1)
    slot = torch.where(position <= capacity, position - 1, j)
    slot = torch.where(valid & (slot < capacity), slot, capacity)  # (m, D)
    flat_slot = slot + torch.arange(n_streams, device=device) * (capacity + 1)
    # Row-major flat index grows with the row for a fixed column: amax = last write wins.
    order = torch.arange(m * n_streams, device=device)
    winner = torch.full((n_streams * (capacity + 1),), -1, dtype=torch.int64, device=device)
    winner.scatter_reduce_(0, flat_slot.reshape(-1), order, reduce="amax")
    picked = values.reshape(-1)[winner.clamp(min=0)]
    flat = buffer.view(-1)
    flat.copy_(torch.where(winner >= 0, picked, flat))
    count.add_(valid.sum(0))


class ReservoirSample:
    """Bounded uniform sample of activation values, pooled and per dimension.

    Every finite value of every kept row of ``x`` (shape ``(..., d)``, like
    ``LayerStats.update``) is one element of the *pooled* stream, in row-major order; for
    each dimension in ``dims``, the values of that dimension form their own stream. Each
    stream keeps a uniform random sample without replacement of at most its capacity
    (algorithm R, vectorised: one uniform draw per value, no host synchronisation, no
    Python loop over values), so memory is bounded by
    ``(capacity + len(dims) * dim_capacity) * dtype size`` whatever the stream length.

    Non-finite values are dropped one by one (and counted in ``nonfinite``); rows with
    ``mask == False`` are dropped entirely. Values are stored in ``dtype`` (float32 by
    default, enough for activations of any model dtype); ``values`` returns fp64 numpy.

    Args:
        capacity: size of the pooled sample.
        dims: dimensions (indices into the last axis of ``x``) to sample separately, or
            None for none.
        dim_capacity: size of each per-dimension sample.
        seed: seed of the sampler's random generator (same seed + same data = same sample).
        device: where the buffers and the generator live; inputs are moved there. Pass the
            activations' device to keep a GPU hook free of device-to-host copies.
        dtype: storage dtype of the sampled values.

    Raises:
        ValueError: if ``capacity`` or ``dim_capacity`` is not a positive int, or ``dims``
            has negative or repeated entries.

    Example::

        sample = ReservoirSample(50_000, dims=[0, 7], seed=0)
        for batch in batches:
            sample.update(hidden, mask=attention_mask.bool())   # hidden: (B, T, d)
        pooled = sample.values()          # numpy fp64, at most 50_000 values
        dim7 = sample.values(dim=7)
    """

    def __init__(
        self,
        capacity: int = 100_000,
        *,
        dims: Sequence[int] | None = None,
        dim_capacity: int = 10_000,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        positive_int(capacity, "capacity", sep=",")
        positive_int(dim_capacity, "dim_capacity", sep=",")
        dims_list = [] if dims is None else list(dims)
        for j in dims_list:
            if isinstance(j, bool) or not isinstance(j, (int, np.integer)) or j < 0:
                raise ValueError(
                    f"dims must be non-negative ints (indices into the last axis of x), got "
                    f"{dims!r}; pass e.g. dims=[0, 5]."
                )
        if len(set(dims_list)) != len(dims_list):
            raise ValueError(f"dims must not repeat an index, got {dims!r}; drop the repeats.")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}; use torch.float32.")
        self.capacity = int(capacity)
        self.dim_capacity = int(dim_capacity)
        self.dims: tuple[int, ...] = tuple(int(j) for j in dims_list)
        self.seed = int(seed)
        self.dtype = dtype
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self._input_dim = -1  # d of the first update; later updates must match
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(self.seed)
        # Ordinary tensors even when first created under inference_mode (an eval loop's
        # hook): inference tensors could never be updated in place outside it.
        with torch.inference_mode(False):
            self._pooled = torch.zeros((1, self.capacity + 1), dtype=dtype, device=self.device)
            self._pooled_count = torch.zeros(1, dtype=torch.int64, device=self.device)
            self._dim_buffer = torch.zeros((len(self.dims), self.dim_capacity + 1), dtype=dtype, device=self.device)
            self._dim_count = torch.zeros(len(self.dims), dtype=torch.int64, device=self.device)
            self._dim_index = torch.tensor(self.dims, dtype=torch.int64, device=self.device)
            self._nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)

    # ----------------------------------------------------------------------- update

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Feed a batch of activations.

        Args:
            x: (..., d) float tensor, any dtype and device (moved to ``device``).
            mask: bool tensor of shape ``x.shape[:-1]``, True = keep the row; None keeps
                every row.

        Raises:
            ValueError: if ``x`` has no last axis, its last axis differs from earlier
                updates or does not contain every tracked dim, or ``mask`` has the wrong
                shape.
        """
        if x.dim() < 1 or x.shape[-1] == 0:
            raise ValueError(
                f"x must have shape (..., d) with d >= 1, got {tuple(x.shape)}; pass the "
                f"hidden states, e.g. (batch, tokens, d)."
            )
        d = int(x.shape[-1])
        if self._input_dim < 0:
            if self.dims and max(self.dims) >= d:
                raise ValueError(f"dims {self.dims} must be < d = {d} (the last axis of x); drop the indices >= {d}.")
            self._input_dim = d
        elif d != self._input_dim:
            raise ValueError(
                f"x has d = {d} values per row but earlier updates had {self._input_dim}; "
                f"use one ReservoirSample per layer."
            )
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"mask must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, got "
                f"{tuple(mask.shape)}; pass the attention mask of the batch as bool."
            )
        rows = x.detach().reshape(-1, d).to(self.device)
        finite = torch.isfinite(rows)  # before the cast: fp64 values beyond fp32 range drop
        if mask is not None:
            keep_rows = mask.reshape(-1, 1).to(device=self.device, dtype=torch.bool)
            self._nonfinite.add_((~finite & keep_rows).sum())
            finite = finite & keep_rows
        else:
            self._nonfinite.add_((~finite).sum())
        rows = torch.where(finite, rows, 0.0).to(self.dtype)
        n_rows = rows.shape[0]
        chunk_rows = max(1, _CHUNK_VALUES // d)
        for start in range(0, n_rows, chunk_rows):
            block = rows[start : start + chunk_rows]
            keep = finite[start : start + chunk_rows]
            _reservoir_update(
                self._pooled,
                self._pooled_count,
                block.reshape(-1, 1),
                keep.reshape(-1, 1),
                self.capacity,
                self._generator,
            )
            if self.dims:
                _reservoir_update(
                    self._dim_buffer,
                    self._dim_count,
                    block.index_select(1, self._dim_index),
                    keep.index_select(1, self._dim_index),
                    self.dim_capacity,
                    self._generator,
                )

    # ----------------------------------------------------------------------- read

    @property
    def count(self) -> int:
        """Number of values the pooled stream has seen (finite, unmasked)."""
        return int(self._pooled_count[0])

    @property
    def nonfinite(self) -> int:
        """Number of non-finite values dropped from unmasked rows."""
        return int(self._nonfinite)

    def dim_count(self, dim: int) -> int:
        """Number of values the stream of dimension ``dim`` has seen.

        Raises:
            ValueError: if ``dim`` is not one of ``dims``.
        """
        return int(self._dim_count[self._dim_position(dim)])

    def values(self, dim: int | None = None) -> np.ndarray:
        """The sampled values as a 1-d numpy float64 array.

        Args:
            dim: None for the pooled sample, or one of ``dims`` for that dimension's.

        Returns:
            At most ``capacity`` (``dim_capacity``) values; while the stream is shorter than
            the capacity, all of its values in stream order.

        Raises:
            ValueError: if ``dim`` is not one of ``dims``.
        """
        if dim is None:
            n = min(self.count, self.capacity)
            out = self._pooled[0, :n]
        else:
            row = self._dim_position(dim)
            n = min(int(self._dim_count[row]), self.dim_capacity)
            out = self._dim_buffer[row, :n]
        return out.detach().to("cpu", torch.float64).numpy().copy()

    def _dim_position(self, dim: int) -> int:
        try:
            return self.dims.index(int(dim))
        except ValueError:
            raise ValueError(
                f"dim={dim!r} is not sampled separately; tracked dims are {list(self.dims)}. "
                f"Pass it in ReservoirSample(dims=...), or use values() for the pooled sample."
            ) from None

    # ----------------------------------------------------------------------- state

    def reset(self) -> None:
        """Empty every sample (the random generator keeps running)."""
        self._pooled_count.zero_()
        self._dim_count.zero_()
        self._nonfinite.zero_()
        self._input_dim = -1

    def to(self, device: torch.device | str) -> ReservoirSample:
        """Move the buffers to ``device`` (in place) and return self.

        Generator states are not portable across device types, so the generator on the
        new device is seeded from a draw of the old one (still deterministic).
        """
        device = torch.device(device)
        if device == self.device:
            return self
        next_seed = int(torch.randint(0, 2**62, (1,), generator=self._generator, device=self.device))
        self.device = device
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(next_seed)
        with torch.inference_mode(False):
            for name in (
                "_pooled",
                "_pooled_count",
                "_dim_buffer",
                "_dim_count",
                "_dim_index",
                "_nonfinite",
            ):
                setattr(self, name, getattr(self, name).to(device))
        return self

    def state_dict(self) -> dict[str, Any]:
        """Tensors (on CPU) and ints that restore the sample and its random stream."""
        with torch.inference_mode(False):
            return self._state_dict()

    def _state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "dim_capacity": self.dim_capacity,
            "dims": torch.tensor(self.dims, dtype=torch.int64),
            "input_dim": self._input_dim,
            "pooled": self._pooled.detach().cpu().clone(),
            "pooled_count": self._pooled_count.detach().cpu().clone(),
            "dim_buffer": self._dim_buffer.detach().cpu().clone(),
            "dim_count": self._dim_count.detach().cpu().clone(),
            "nonfinite": self._nonfinite.detach().cpu().clone(),
            "rng_state": self._generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict`` taken from a sample with the same configuration.

        Raises:
            ValueError: if keys are missing, or capacity, dim_capacity or dims differ.
        """
        missing = {
            "capacity",
            "dim_capacity",
            "dims",
            "input_dim",
            "pooled",
            "pooled_count",
            "dim_buffer",
            "dim_count",
            "nonfinite",
            "rng_state",
        } - set(state)
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}; pass ReservoirSample.state_dict().")
        saved = (
            int(state["capacity"]),
            int(state["dim_capacity"]),
            tuple(int(j) for j in state["dims"].tolist()),
        )
        if saved != (self.capacity, self.dim_capacity, self.dims):
            raise ValueError(
                f"state has (capacity, dim_capacity, dims) = {saved}, this sample has "
                f"{(self.capacity, self.dim_capacity, self.dims)}; construct the sample with "
                f"the saved configuration first."
            )
        self._input_dim = int(state["input_dim"])
        self._pooled.copy_(state["pooled"])
        self._pooled_count.copy_(state["pooled_count"])
        self._dim_buffer.copy_(state["dim_buffer"])
        self._dim_count.copy_(state["dim_count"])
        self._nonfinite.copy_(state["nonfinite"])
        self._generator.set_state(state["rng_state"])

    def __repr__(self) -> str:
        return (
            f"ReservoirSample(capacity={self.capacity}, dims={list(self.dims)}, "
            f"dim_capacity={self.dim_capacity}, count={self.count}, device={self.device})"
        )
