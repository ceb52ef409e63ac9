"""Eval-time analyses of activations that need more than streaming moments.

- ``distributions``: parametric family fits (logistic, t, normal, ...), KDE modes, tail
  fractions, a plotting helper, on the values a ``ReservoirSample`` (``gsam_monitor.stats``,
  re-exported here) collected.
- ``spectrum``: power law of the covariance spectrum, LDA class separation from
  per-class moments, group cosine-similarity contrasts.
- ``analyze_layer``: all of them for one layer, as a JSON-serialisable dict.
"""

from gsam_monitor.stats import ReservoirSample

from .distributions import (
    DEFAULT_FAMILIES,
    FIT_CRITERIA,
    find_modes,
    fit_families,
    plot_distribution,
    tail_fractions,
)
from .spectrum import class_separation, group_cosine_contrast, powerlaw_fit
from .summary import analyze_layer

__all__ = [
    "DEFAULT_FAMILIES",
    "FIT_CRITERIA",
    "ReservoirSample",
    "analyze_layer",
    "class_separation",
    "find_modes",
    "fit_families",
    "group_cosine_contrast",
    "plot_distribution",
    "powerlaw_fit",
    "tail_fractions",
]
