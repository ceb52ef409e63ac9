"""One call per layer: every analysis of a layer as a JSON-serialisable dict.

``analyze_layer`` is what the eval (and a user at the end of a run) calls for each
monitored layer: family fits, modes and tails of the pooled reservoir sample, the best
family of each separately sampled dimension, the power law of the covariance spectrum, and
the LDA class separation from per-class moments.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from gsam_monitor.metrics.scores import POWERLAW_RANGE
from gsam_monitor.stats import ReservoirSample

from .distributions import (
    MIN_VALUES,
    find_modes,
    fit_families,
    tail_fractions,
)
from .spectrum import ClassMoments, class_separation, powerlaw_fit

__all__ = ["analyze_layer"]

logger = logging.getLogger(__name__)


def analyze_layer(
    sample: ReservoirSample | None,
    eigenvalues: np.ndarray | Sequence[float] | torch.Tensor | None = None,
    stats_by_class: Mapping[Any, ClassMoments] | Sequence[ClassMoments] | None = None,
    *,
    families: Iterable[str] | None = None,
    criterion: Literal["bic", "aic", "sse", "ks"] = "bic",
    rank_range: tuple[int, int] = POWERLAW_RANGE,
    tail_ks: Sequence[float] = (3, 5, 10),
    dim_max_values: int = 2_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Run every analysis that its inputs allow on one layer.

    Args:
        sample: the layer's reservoir sample, or None to skip the distribution analyses.
        eigenvalues: covariance eigenvalues (e.g. ``metrics.eigenvalues(stats)``), or None
            to skip the power law.
        stats_by_class: per-class ``LayerStats`` of the layer, or None to skip LDA.
        families: families for ``fit_families`` (default all).
        criterion: ranking criterion of the fits.
        rank_range: rank range of ``powerlaw_fit``.
        tail_ks: thresholds of ``tail_fractions``.
        dim_max_values: fit cap for each separately sampled dimension (11 fits per dim).
        seed: seed of the fit subsamples.

    Returns:
        Dict (only plain Python types; NaN may appear, which ``json.dumps`` writes as NaN):

        - ``distribution``: {``n``, ``nonfinite``, ``fits`` (list, best first, see
            ``fit_families``), ``best_family``, ``modes`` (see ``find_modes``),
            ``tails`` (str(k) -> see ``tail_fractions``)} or None without a sample or
            with fewer than 50 values;
        - ``dims``: str(dim) -> {``n``, ``best_family``, ``n_left_modes``,
            ``n_right_modes``} for each dim the sample tracks (with 50+ values), and
            ``best_family_counts``: family -> number of those dims it fits best;
        - ``powerlaw``: see ``powerlaw_fit``, or None;
        - ``class_separation``: see ``class_separation`` without ``directions``
            (labels as strings), or None.
    """
    out: dict[str, Any] = {
        "distribution": None,
        "dims": {},
        "best_family_counts": {},
        "powerlaw": None,
        "class_separation": None,
    }
    if sample is not None:
        values = sample.values()
        if values.size >= MIN_VALUES:
            fits = fit_families(values, families, criterion, seed=seed)
            out["distribution"] = {
                "n": int(values.size),
                "nonfinite": sample.nonfinite,
                "fits": fits,
                "best_family": fits[0]["family"],
                "modes": find_modes(values, seed=seed),
                "tails": {str(k): v for k, v in tail_fractions(values, tail_ks).items()},
            }
        else:
            warnings.warn(
                f"analyze_layer: the sample has {values.size} values (< {MIN_VALUES}); "
                f"distribution analyses skipped. Collect more tokens.",
                RuntimeWarning,
                stacklevel=2,
            )
        counts: Counter[str] = Counter()
        for dim in sample.dims:
            dim_values = sample.values(dim=dim)
            if dim_values.size < MIN_VALUES:
                continue
            dim_fits = fit_families(dim_values, families, criterion, max_values=dim_max_values, seed=seed)
            modes = find_modes(dim_values, max_values=dim_max_values, seed=seed)
            best = dim_fits[0]["family"]
            counts[best] += 1
            out["dims"][str(dim)] = {
                "n": int(dim_values.size),
                "best_family": best,
                "n_left_modes": len(modes["left"]),
                "n_right_modes": len(modes["right"]),
            }
        out["best_family_counts"] = dict(counts.most_common())
    if eigenvalues is not None:
        out["powerlaw"] = powerlaw_fit(eigenvalues, rank_range)
    if stats_by_class is not None:
        sep = class_separation(stats_by_class)
        sep.pop("directions")
        sep["labels"] = [str(label) for label in sep["labels"]]
        out["class_separation"] = sep
    return out
