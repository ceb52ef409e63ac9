"""Marginal distributions of activation values: reservoir sample, family fits, modes, tails.

GSAM and the streaming moments see only the first two moments of the activations. The
analyses here look at the marginal distribution of activation values itself, as in the
"Beyond Gaussian" study: which parametric family describes it best (logistic, t, normal,
...), whether it has secondary modes beside the main one, and how heavy its tails are
compared with a Gaussian of the same mean and standard deviation.

They need the values themselves, so the monitor and the eval collect a bounded uniform
sample of them with :class:`ReservoirSample` (pooled over all coordinates, and per
dimension for chosen dimensions), then call the numpy/scipy functions below on
``sample.values()``.

References:
    J. S. Vitter, "Random sampling with a reservoir", ACM TOMS 11(1), 1985 (algorithm R).
    scipy.stats ``rv_continuous.fit`` (maximum likelihood), ``gaussian_kde``;
    scipy.signal ``find_peaks`` / ``peak_widths``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from scipy import signal, stats

__all__ = [
    "DEFAULT_FAMILIES",
    "FIT_MAX_VALUES",
    "MODES_MAX_VALUES",
    "ReservoirSample",
    "find_modes",
    "fit_families",
    "plot_distribution",
    "tail_fractions",
]

logger = logging.getLogger(__name__)

#: Families fitted by :func:`fit_families` when ``families`` is None (all of them).
DEFAULT_FAMILIES: tuple[str, ...] = (
    "norm",
    "logistic",
    "genlogistic",
    "hypsecant",
    "t",
    "gennorm",
    "laplace",
    "cauchy",
    "crystalball",
    "skewnorm",
    "johnsonsu",
)

#: Default cap on the number of values a fit uses (a seeded subsample above it). 20k values
#: fit all eleven families in about 1.5 s on one CPU core; MLE parameter errors at that
#: size are well below the differences between families.
FIT_MAX_VALUES = 20_000

#: Default cap on the number of values the KDE of :func:`find_modes` uses.
MODES_MAX_VALUES = 20_000

#: Smallest number of values a fit or a KDE accepts.
MIN_VALUES = 50

#: Bins of the density histogram behind ``criterion="sse"`` (the study's choice).
SSE_BINS = 150

# Starting guesses for the shape parameters of the families whose default scipy start is
# slow or lands in a poor local optimum; given for standardized data (median 0, robust sd 1).
_SHAPE_GUESSES: dict[str, tuple[float, ...]] = {
    "genlogistic": (1.0,),
    "t": (5.0,),
    "crystalball": (2.0, 3.0),
    "johnsonsu": (0.0, 1.5),
}

_CRITERIA = ("bic", "aic", "sse", "ks")

# Rows per chunk inside ReservoirSample.update, so temporaries stay ~ 8 * 2**20 bytes each
# whatever the batch size.
_CHUNK_VALUES = 1 << 20


# --------------------------------------------------------------------------- reservoir


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

    Non-finite values are dropped one by one (and counted in :attr:`nonfinite`); rows with
    ``mask == False`` are dropped entirely. Values are stored in ``dtype`` (float32 by
    default, enough for activations of any model dtype); :meth:`values` returns fp64 numpy.

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
        _check_positive_int("capacity", capacity)
        _check_positive_int("dim_capacity", dim_capacity)
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
            x: (..., d) float tensor, any dtype and device (moved to :attr:`device`).
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
            ValueError: if ``dim`` is not one of :attr:`dims`.
        """
        return int(self._dim_count[self._dim_position(dim)])

    def values(self, dim: int | None = None) -> np.ndarray:
        """The sampled values as a 1-d numpy float64 array.

        Args:
            dim: None for the pooled sample, or one of :attr:`dims` for that dimension's.

        Returns:
            At most ``capacity`` (``dim_capacity``) values; while the stream is shorter than
            the capacity, all of its values in stream order.

        Raises:
            ValueError: if ``dim`` is not one of :attr:`dims`.
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
        """Restore a :meth:`state_dict` taken from a sample with the same configuration.

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


# --------------------------------------------------------------------------- fits


def fit_families(
    values: np.ndarray | Sequence[float] | torch.Tensor,
    families: Iterable[str] | None = None,
    criterion: Literal["bic", "aic", "sse", "ks"] = "bic",
    *,
    max_values: int | None = FIT_MAX_VALUES,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Fit parametric families by maximum likelihood and rank them.

    Each family is fitted with ``scipy.stats.<family>.fit`` (MLE) on the values after a
    robust standardization (median 0, IQR/1.349 = 1; location and scale are mapped back,
    so the parameters are in the data's units) which keeps the optimizers well conditioned
    for any activation scale. Families whose fit raises or returns non-finite parameters
    are skipped with a warning.

    Scores (lower is better for all four):

    - ``aic = 2k - 2 loglik``, ``bic = k ln(n) - 2 loglik`` with k the number of fitted
      parameters (shapes + loc + scale) and n the number of values fitted;
    - ``sse``: sum of squared differences between a 150-bin density histogram (over the
      data's range) and the pdf at the bin centres, the "Beyond Gaussian" study's method.
      It ignores the number of parameters, so families that nest the normal (gennorm,
      johnsonsu, t) beat the normal on Gaussian data; hence BIC is the default;
    - ``ks``: the Kolmogorov-Smirnov statistic (sup |ECDF - CDF|).

    Args:
        values: 1-d finite values (e.g. ``ReservoirSample.values()``).
        families: scipy.stats family names, default :data:`DEFAULT_FAMILIES`.
        criterion: the score to sort by: "bic", "aic", "sse" or "ks".
        max_values: above this many values, fit a uniform random subsample of this size
            (seeded with ``seed``); None fits all of them.
        seed: seed of the subsample.

    Returns:
        One dict per successfully fitted family, best first: ``family`` (name), ``params``
        (dict shape/loc/scale name -> float; ``getattr(scipy.stats, family)(**params)`` is
        the fitted distribution), ``loglik``, ``n_params``, ``n``, ``aic``, ``bic``,
        ``sse``, ``ks``.

    Raises:
        ValueError: on an unknown family or criterion, non-finite values, fewer than 50
            values, constant values, or a bad ``max_values``.
        RuntimeError: if every family's fit failed.
    """
    if criterion not in _CRITERIA:
        raise ValueError(
            f"criterion must be one of {list(_CRITERIA)}, got {criterion!r}; the default "
            f"'bic' penalises extra parameters, 'sse' reproduces the study."
        )
    if isinstance(families, str):
        families = [families]
    names = list(DEFAULT_FAMILIES if families is None else families)
    if not names:
        raise ValueError("families must name at least one family, got an empty list.")
    unknown = [f for f in names if not _is_continuous_family(f)]
    if unknown:
        raise ValueError(
            f"unknown families {unknown}; pass scipy.stats continuous distribution names, "
            f"e.g. {list(DEFAULT_FAMILIES)}."
        )
    if max_values is not None:
        _check_positive_int("max_values", max_values)
    x = _as_finite_1d(values, "values")
    x = _subsample(x, max_values, seed)
    n = x.size

    center = float(np.median(x))
    q75, q25 = np.percentile(x, [75, 25])
    scale = float(q75 - q25) / 1.349  # IQR of the standard normal
    if not scale > 0:
        scale = float(x.std())
    if not scale > 0:
        raise ValueError(f"values are constant ({center!r} for all {n}); no family can be fitted.")
    z = (x - center) / scale
    density, edges = np.histogram(x, bins=SSE_BINS, density=True)
    centres = 0.5 * (edges[:-1] + edges[1:])

    results: list[dict[str, Any]] = []
    for name in dict.fromkeys(names):  # keep order, drop repeats
        dist = getattr(stats, name)
        try:
            with warnings.catch_warnings():
                # Optimizer chatter (overflow in exp, invalid in a trial point) is expected.
                warnings.simplefilter("ignore")
                fitted = _fit_one(dist, name, z)
                shapes, loc, scl = fitted[:-2], fitted[-2], fitted[-1]
                params = (*shapes, loc * scale + center, scl * scale)
                if not all(math.isfinite(p) for p in params) or not params[-1] > 0:
                    raise FloatingPointError(f"non-finite or non-positive parameters {params}")
                frozen = dist(*params)
                loglik = float(np.sum(frozen.logpdf(x)))
                pdf = frozen.pdf(centres)
                sse = float(np.sum((density - pdf) ** 2))
                ks = float(stats.kstest(x, frozen.cdf).statistic)
        except Exception as exc:  # a family that cannot be fitted is skipped, not fatal
            warnings.warn(
                f"fit_families: fitting {name!r} failed ({type(exc).__name__}: {exc}); it is left out of the ranking.",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        k = len(params)
        param_names = [*(dist.shapes.split(", ") if dist.shapes else []), "loc", "scale"]
        results.append(
            {
                "family": name,
                "params": {p: float(v) for p, v in zip(param_names, params, strict=True)},
                "loglik": loglik,
                "n_params": k,
                "n": int(n),
                "aic": 2 * k - 2 * loglik,
                "bic": k * math.log(n) - 2 * loglik,
                "sse": sse,
                "ks": ks,
            }
        )
    if not results:
        raise RuntimeError(
            f"every family's fit failed on these {n} values ({names}); check the values "
            f"(e.g. a point mass) or pass other families."
        )
    # Non-finite scores (NaN, or inf from a loglik of -inf) sort last.
    results.sort(key=lambda r: (not math.isfinite(r[criterion]), r[criterion]))
    return results


def _fit_one(dist: stats.rv_continuous, name: str, z: np.ndarray) -> tuple[float, ...]:
    guesses = _SHAPE_GUESSES.get(name, ())
    return tuple(float(p) for p in dist.fit(z, *guesses, loc=0.0, scale=1.0))


def _is_continuous_family(name: object) -> bool:
    return isinstance(name, str) and isinstance(getattr(stats, name, None), stats.rv_continuous)


# --------------------------------------------------------------------------- modes


def find_modes(
    values: np.ndarray | Sequence[float] | torch.Tensor,
    *,
    bw_method: str | float | None = None,
    prominence: float = 0.01,
    distance: float = 0.5,
    grid_size: int = 2048,
    grid_range: tuple[float, float] | None = None,
    max_values: int | None = MODES_MAX_VALUES,
    seed: int = 0,
) -> dict[str, Any]:
    """Find the modes of the values' density with a Gaussian KDE.

    The density is ``scipy.stats.gaussian_kde(values, bw_method)`` evaluated on an even grid
    of ``grid_size`` points over ``grid_range`` (default: the data's range padded by three
    kernel bandwidths); peaks are ``scipy.signal.find_peaks`` of it, and widths the full
    width at half prominence from ``scipy.signal.peak_widths``. The highest peak is the
    primary mode; the others are secondary modes left and right of it.

    The grid spacing is range / grid_size, so a few values far out (massive activations)
    coarsen it; pass ``grid_range`` (or a larger ``grid_size``) then.

    Args:
        values: 1-d finite values.
        bw_method: KDE bandwidth rule, as in ``gaussian_kde`` (None = Scott's rule).
        prominence: minimum peak prominence, as a fraction of the primary peak's height
            (0.01: a secondary mode must rise 1% of the main peak above its surroundings).
        distance: minimum distance between two peaks, in standard deviations of the values.
        grid_size: number of grid points the KDE is evaluated at.
        grid_range: (low, high) of the grid in the data's units, or None for the default.
        max_values: above this many values, use a seeded uniform subsample of this size.
        seed: seed of the subsample.

    Returns:
        Dict with ``primary`` (a mode), ``left`` and ``right`` (lists of modes, nearest to
        the primary first), ``bandwidth`` (kernel sd in data units), ``sd`` (of the values,
        ddof 0) and ``n``. A mode is a dict with ``location`` (data units), ``offset_sd``
        ((location - primary location) / sd, signed), ``height`` (KDE density at the peak),
        ``width`` (full width at half prominence, data units) and ``volume`` (height * width,
        a rough probability mass).

    Raises:
        ValueError: on non-finite, constant or fewer than 50 values, or bad parameters.
    """
    if not (isinstance(prominence, (int, float)) and 0 <= prominence < 1):
        raise ValueError(
            f"prominence must be a fraction of the primary peak's height in [0, 1), got {prominence!r}; e.g. 0.01."
        )
    if not (isinstance(distance, (int, float)) and distance >= 0):
        raise ValueError(f"distance must be >= 0 (in standard deviations), got {distance!r}; e.g. 0.5.")
    _check_positive_int("grid_size", grid_size)
    if grid_size < 16:
        raise ValueError(f"grid_size must be >= 16, got {grid_size}; e.g. 2048.")
    if max_values is not None:
        _check_positive_int("max_values", max_values)
    x = _as_finite_1d(values, "values")
    x = _subsample(x, max_values, seed)
    sd = float(x.std())
    if not sd > 0:
        raise ValueError(f"values are constant ({x[0]!r}); a density has no modes to find.")
    kde = stats.gaussian_kde(x, bw_method=bw_method)
    bandwidth = float(np.sqrt(kde.covariance[0, 0]))
    if grid_range is None:
        low, high = float(x.min()) - 3 * bandwidth, float(x.max()) + 3 * bandwidth
    else:
        low, high = (float(v) for v in grid_range)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"grid_range must be finite (low, high) with low < high, got {grid_range!r}.")
    grid = np.linspace(low, high, grid_size)
    step = grid[1] - grid[0]
    density = kde(grid)
    # Pad with zeros so a peak at the grid's edge (a clipped grid_range) is still a peak.
    padded = np.concatenate([[0.0], density, [0.0]])
    peaks, _ = signal.find_peaks(
        padded,
        prominence=prominence * float(density.max()),
        distance=max(1, int(distance * sd / step)),
    )
    if peaks.size == 0:  # flat-topped density: take the maximum
        peaks = np.array([int(np.argmax(padded))])
    widths = signal.peak_widths(padded, peaks, rel_height=0.5)[0] * step
    peaks = peaks - 1
    modes = [
        {"location": float(grid[p]), "height": float(density[p]), "width": float(w)}
        for p, w in zip(peaks, widths, strict=True)
    ]
    primary = max(modes, key=lambda m: m["height"])
    for mode in modes:
        mode["offset_sd"] = (mode["location"] - primary["location"]) / sd
        mode["volume"] = mode["height"] * mode["width"]
    left = sorted((m for m in modes if m["location"] < primary["location"]), key=lambda m: -m["location"])
    right = sorted((m for m in modes if m["location"] > primary["location"]), key=lambda m: m["location"])
    return {
        "primary": primary,
        "left": left,
        "right": right,
        "bandwidth": bandwidth,
        "sd": sd,
        "n": int(x.size),
    }


# --------------------------------------------------------------------------- tails


def tail_fractions(
    values: np.ndarray | Sequence[float] | torch.Tensor,
    ks: Sequence[float] = (3, 5, 10),
) -> dict[float, dict[str, float]]:
    """Fraction of values beyond ±k standard deviations, next to the Gaussian's.

    Values are standardized with their own mean and sd (ddof 0); the Gaussian expectation
    is ``2 * scipy.stats.norm.sf(k)``.

    Args:
        values: 1-d finite values (at least 2, not constant).
        ks: positive thresholds in standard deviations.

    Returns:
        Dict k -> {``fraction``: observed fraction with |z| > k, ``gaussian``: 2 sf(k),
        ``ratio``: fraction / gaussian, ``count``: number of values beyond}.

    Raises:
        ValueError: on non-finite or constant values, fewer than 2 values, or ``ks`` that
            are not positive finite numbers.
    """
    ks_list = list(ks)
    if not ks_list or not all(isinstance(k, (int, float, np.number)) and math.isfinite(k) and k > 0 for k in ks_list):
        raise ValueError(f"ks must be positive finite numbers, got {ks!r}; e.g. (3, 5, 10).")
    x = _as_finite_1d(values, "values", minimum=2)
    sd = float(x.std())
    if not sd > 0:
        raise ValueError(f"values are constant ({x[0]!r}); tail fractions need a spread.")
    z = np.abs(x - x.mean()) / sd
    out: dict[float, dict[str, float]] = {}
    for k in ks_list:
        count = int(np.count_nonzero(z > k))
        gaussian = float(2 * stats.norm.sf(k))
        fraction = count / x.size
        out[k] = {
            "fraction": fraction,
            "gaussian": gaussian,
            "ratio": fraction / gaussian if gaussian > 0 else math.inf,
            "count": count,
        }
    return out


# --------------------------------------------------------------------------- plot


def plot_distribution(
    ax: Any,
    values: np.ndarray | Sequence[float] | torch.Tensor,
    fits: Sequence[Mapping[str, Any]] | None = None,
    modes: Mapping[str, Any] | None = None,
    *,
    bins: int = SSE_BINS,
    title: str | None = None,
) -> Any:
    """Draw a density histogram with the best fit, the Gaussian and the modes.

    Args:
        ax: a matplotlib Axes (matplotlib is imported only by the caller's figure).
        values: the values.
        fits: output of :func:`fit_families`; its first entry is drawn as "best", and the
            "norm" entry (if any, else the moment-matched normal) as the Gaussian.
        modes: output of :func:`find_modes`; secondary modes are marked with dashed lines,
            the primary with a dotted one.
        bins: histogram bins.
        title: axes title.

    Returns:
        ``ax``.
    """
    x = _as_finite_1d(values, "values", minimum=2)
    ax.hist(x, bins=bins, density=True, color="0.75", label=f"values (n={x.size})")
    grid = np.linspace(float(x.min()), float(x.max()), 512)
    gauss = None
    if fits:
        best = fits[0]
        ax.plot(
            grid,
            getattr(stats, best["family"])(**best["params"]).pdf(grid),
            color="C0",
            lw=1.5,
            label=f"best: {best['family']}",
        )
        gauss = next((f for f in fits if f["family"] == "norm"), None)
    if gauss is not None:
        pdf = stats.norm(**gauss["params"]).pdf(grid)
    else:
        pdf = stats.norm(x.mean(), x.std()).pdf(grid)
    ax.plot(grid, pdf, color="C3", lw=1.0, ls="--", label="Gaussian")
    if modes:
        ax.axvline(modes["primary"]["location"], color="k", lw=0.8, ls=":")
        for i, mode in enumerate([*modes.get("left", []), *modes.get("right", [])]):
            ax.axvline(
                mode["location"],
                color="C2",
                lw=0.8,
                ls="--",
                label="secondary modes" if i == 0 else None,
            )
    ax.set_xlabel("activation value")
    ax.set_ylabel("density")
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small")
    return ax


# --------------------------------------------------------------------------- helpers


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


def _as_finite_1d(values: Any, name: str, minimum: int = MIN_VALUES) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise ValueError(
            f"{name} has {bad} non-finite entries of {x.size}; drop them first, e.g. "
            f"{name}[np.isfinite({name})] (ReservoirSample drops them for you)."
        )
    if x.size < minimum:
        raise ValueError(f"{name} has {x.size} values, at least {minimum} are needed; collect more.")
    return x


def _subsample(x: np.ndarray, max_values: int | None, seed: int) -> np.ndarray:
    if max_values is None or x.size <= max_values:
        return x
    rng = np.random.default_rng(seed)
    return x[rng.choice(x.size, size=max_values, replace=False)]
