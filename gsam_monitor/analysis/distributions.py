"""Marginal distributions of activation values: family fits, modes, tails, a plot.

GSAM and the streaming moments see only the first two moments of the activations. The
analyses here look at the marginal distribution of activation values itself, as in the
"Beyond Gaussian" study: which parametric family describes it best (logistic, t, normal,
...), whether it has secondary modes beside the main one, and how heavy its tails are
compared with a Gaussian of the same mean and standard deviation.

They need the values themselves, so the monitor and the eval collect a bounded uniform
sample of them with ``gsam_monitor.stats.ReservoirSample`` (pooled over all
coordinates, and per dimension for chosen dimensions), then call the numpy/scipy functions
below on ``sample.values()``.

References:
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

from gsam_monitor._validate import positive_int

__all__ = [
    "DEFAULT_FAMILIES",
    "FIT_CRITERIA",
    "FIT_MAX_VALUES",
    "MODES_MAX_VALUES",
    "find_modes",
    "fit_families",
    "plot_distribution",
    "tail_fractions",
]

logger = logging.getLogger(__name__)

#: Families fitted by ``fit_families`` when ``families`` is None (all of them).
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

#: Default cap on the number of values the KDE of ``find_modes`` uses.
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

FIT_CRITERIA: tuple[str, ...] = ("bic", "aic", "sse", "ks")
"""The scores ``fit_families`` ranks by (``criterion=``); lower is better for each."""

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
    if criterion not in FIT_CRITERIA:
        raise ValueError(
            f"criterion must be one of {list(FIT_CRITERIA)}, got {criterion!r}; the default "
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
        positive_int(max_values, "max_values", sep=",")
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
    positive_int(grid_size, "grid_size", sep=",")
    if grid_size < 16:
        raise ValueError(f"grid_size must be >= 16, got {grid_size}; e.g. 2048.")
    if max_values is not None:
        positive_int(max_values, "max_values", sep=",")
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
        fits: output of ``fit_families``; its first entry is drawn as "best", and the
            "norm" entry (if any, else the moment-matched normal) as the Gaussian.
        modes: output of ``find_modes``; secondary modes are marked with dashed lines,
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
