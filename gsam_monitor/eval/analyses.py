"""Distribution and geometry analyses in the eval: ``--analyses distributions,spectrum,classes``.

The token protocol's statistics see only the first two moments of each layer. The analyses
of ``gsam_monitor.analysis`` add, per layer:

- ``distributions``: a bounded, seeded reservoir sample of the pooled activation values
  (every coordinate of every non-padding token; ``gsam_monitor.stats.ReservoirSample``),
  then parametric family fits (``gsam_monitor.analysis.fit_families``, best first by
  ``--fit-criterion``, with the best family under every criterion beside it), KDE modes
  (``gsam_monitor.analysis.find_modes``) and tail fractions beyond 3, 5 and 10 sd
  (``gsam_monitor.analysis.tail_fractions``);
- ``spectrum``: the power law of the covariance spectrum over ranks 10-150 with its 95%
  interval (``gsam_monitor.analysis.powerlaw_fit``), on the eigenvalues the metrics
  already computed (no second eigendecomposition), restricted to the support (the layer's
  ``rank``) as the ``powerlaw_alpha`` metric is, so ``alpha`` equals that metric;
- ``classes``: LDA class separation (``gsam_monitor.analysis.class_separation``) from
  one ``LayerStats`` per class and layer, fed with the corpus labels; no activation is stored.

``classes`` uses the labels of the corpus being run. Every bundled corpus is labelled
(SST-2 sentiment, 0/1): the default token corpus ``sst2_300_filtered`` carries SST-2 *train*
labels; ``--corpus sst2_dev`` is the 872-sentence labelled dev set the studies used. An
unlabelled corpus (a plain text file) with ``classes`` is refused before any model is loaded.

Memory on top of the protocol: ``reservoir_size`` values (float32) per layer for
``distributions``; ``n_classes * 8 * d**2`` bytes per layer for ``classes``.

The results go under each layer's ``"analyses"`` key (plain JSON values; the sampled values
themselves are kept on ``ModelResult.samples <gsam_monitor.eval.protocols.ModelResult>``
for the plots, never written to the JSON).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gsam_monitor._jsonable import plain
from gsam_monitor._validate import is_positive_int
from gsam_monitor.analysis import FIT_CRITERIA, analyze_layer, find_modes, fit_families, powerlaw_fit
from gsam_monitor.analysis.distributions import MIN_VALUES
from gsam_monitor.eval.corpus import Corpus
from gsam_monitor.eval.parallel import DataParallel, MergedSample
from gsam_monitor.eval.protocols import ModelResult
from gsam_monitor.metrics.scores import POWERLAW_RANGE
from gsam_monitor.stats import LayerStats, ReservoirSample

__all__ = [
    "ANALYSES",
    "DEFAULT_DIM_CAPACITY",
    "DEFAULT_RESERVOIR_SIZE",
    "NAMED_ANALYSES",
    "AnalysisObserver",
    "check_analyses",
    "check_reservoir_size",
    "has_analyses",
    "parse_analyses",
    "parse_analysis_dims",
]

logger = logging.getLogger(__name__)

#: Names accepted by ``--analyses`` (``all`` selects every one).
ANALYSES: tuple[str, ...] = ("distributions", "spectrum", "classes")

#: Analyses run only when named (not by ``all``): ``concepts`` trains a sparse autoencoder on
#: its own corpus, minutes per layer (``gsam_monitor.eval.concepts``).
NAMED_ANALYSES: tuple[str, ...] = ("concepts",)

#: Values kept per layer by the reservoir sample (800 kB of float32). The fits use a seeded
#: 20k subsample of it (``analysis.FIT_MAX_VALUES``), the KDE another.
DEFAULT_RESERVOIR_SIZE = 200_000

#: Values kept per dimension when ``--analysis-dims`` asks for per-dimension fits.
DEFAULT_DIM_CAPACITY = 2_000


def parse_analyses(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Parse ``--analyses``: a comma-separated list of :data:`ANALYSES` and :data:`NAMED_ANALYSES`,
    or ``all`` (every one of :data:`ANALYSES`).

    Args:
        value: e.g. ``"distributions,spectrum"``, ``"all"``, ``"all,concepts"``, a list of names,
            or None/"" for none.

    Returns:
        The selected names, without repeats, in the order of :data:`ANALYSES` then
        :data:`NAMED_ANALYSES`.

    Raises:
        ValueError: for a name that is not an analysis, naming the flag and the valid values.
    """
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(item).strip().lower() for item in items if str(item).strip()]
    unknown = [name for name in names if name not in (*ANALYSES, *NAMED_ANALYSES, "all")]
    if unknown:
        raise ValueError(
            f"--analyses: expected a comma-separated list of {', '.join(ANALYSES)} (or 'all'), "
            f"got unknown {', '.join(map(repr, unknown))}; also {', '.join(NAMED_ANALYSES)} (run only when "
            f"named); e.g. --analyses distributions,spectrum"
        )
    return tuple(name for name in ANALYSES if name in names or "all" in names) + tuple(
        name for name in NAMED_ANALYSES if name in names
    )


def check_reservoir_size(reservoir_size: object) -> int:
    """``--reservoir-size``: the values sampled per layer, a positive int.

    Raises:
        ValueError: naming the flag, the value and a sensible one.
    """
    if not is_positive_int(reservoir_size):
        raise ValueError(
            f"--reservoir-size: expected a positive number of values, got {reservoir_size!r}; "
            f"e.g. {DEFAULT_RESERVOIR_SIZE}"
        )
    return int(reservoir_size)  # type: ignore[call-overload]


def parse_analysis_dims(value: str | int) -> int:
    """``--analysis-dims``: a number of dimensions (0 or more) or ``"all"``; as an int, -1 is all.

    Returns:
        The number of dimensions, -1 for all.

    Raises:
        ValueError: for anything else, naming the flag.
    """
    dims = None
    if value == "all":
        dims = -1
    elif isinstance(value, str):
        dims = int(value) if value.strip().isdigit() else None
    elif isinstance(value, int) and not isinstance(value, bool) and value >= -1:
        dims = value
    if dims is None:
        raise ValueError(f"--analysis-dims: expected a number of dimensions >= 0 or 'all', got {value!r}")
    return dims


def check_analyses(analyses: Sequence[str], corpus: Corpus, protocol: str = "token") -> None:
    """Refuse, before any model is loaded, analyses the run cannot do.

    Args:
        analyses: parsed names (see ``parse_analyses``).
        corpus: the corpus to run.
        protocol: ``token`` or ``paper``.

    Raises:
        ValueError: analyses with the paper protocol, or ``classes`` on a corpus without
            labels or with fewer than two distinct labels.
    """
    if not analyses:
        return
    if protocol != "token":
        raise ValueError(
            f"--analyses: the analyses run in the token protocol only, got --protocol {protocol}; "
            f"drop --analyses or use --protocol token"
        )
    if "classes" in analyses:
        if corpus.labels is None:
            raise ValueError(
                f"--analyses classes: the corpus {corpus.name!r} has no labels; pass --corpus "
                f"sst2_dev (the 872 labelled SST-2 dev sentences) or a .tsv file with a 'label' "
                f"column, or drop 'classes' from --analyses"
            )
        distinct = set(corpus.labels)
        if len(distinct) < 2:
            raise ValueError(
                f"--analyses classes: the corpus {corpus.name!r} has {len(distinct)} distinct "
                f"label(s), class separation needs at least 2; pass a corpus with both classes "
                f"(e.g. --corpus sst2_dev) or drop 'classes' from --analyses"
            )


class AnalysisObserver:
    """The eval's ``gsam_monitor.eval.protocols.LayerObserver`` for ``--analyses``.

    Fed in the token protocol's second pass; ``results`` returns, per layer index,
    ``{"analyses": {"distributions": ..., "classes": ...}}``; ``finish`` then adds
    ``"spectrum"`` from the eigenvalues the protocol already computed and keeps the sampled
    values on the result for the plots.

    Args:
        analyses: names from :data:`ANALYSES` (already checked with ``check_analyses``).
        corpus: the corpus being run (its labels feed ``classes``).
        reservoir_size: values kept per layer for ``distributions``.
        criterion: ranking criterion of the family fits (:data:`FIT_CRITERIA`).
        seed: seed of the reservoir sample (offset by the layer index) and of the fits.
        n_dims: also sample the first ``n_dims`` dimensions of each layer separately
            (``dim_capacity`` values each) and fit every family and find the modes of each
            (``distributions`` only; about 0.25 s per dimension on one CPU core); ``-1``
            for every dimension, 0 for none.
        dim_capacity: values kept per sampled dimension.
        first_sentence: under ``torchrun``, the corpus index of this rank's first sentence
            (``gsam_monitor.eval.parallel.Shard``); ``corpus`` stays the whole corpus, so
            every rank knows every class.

    Raises:
        ValueError: for an unknown analysis or criterion, a non-positive ``reservoir_size``
            or ``dim_capacity``, or ``n_dims < -1``.
    """

    def __init__(
        self, analyses: Sequence[str], corpus: Corpus, *, reservoir_size: int = DEFAULT_RESERVOIR_SIZE,
        criterion: str = "bic", seed: int = 0, n_dims: int = 0, dim_capacity: int = DEFAULT_DIM_CAPACITY,
        first_sentence: int = 0,
    ) -> None:
        self.analyses = parse_analyses(list(analyses))
        if criterion not in FIT_CRITERIA:
            raise ValueError(
                f"--fit-criterion: expected one of {', '.join(FIT_CRITERIA)}, got {criterion!r}"
            )
        self.reservoir_size = check_reservoir_size(reservoir_size)
        self.n_dims = parse_analysis_dims(n_dims)
        if not is_positive_int(dim_capacity) or dim_capacity < MIN_VALUES:
            raise ValueError(f"dim_capacity: expected at least {MIN_VALUES} values per dimension, got "
                             f"{dim_capacity!r}; e.g. {DEFAULT_DIM_CAPACITY}")
        self.dim_capacity = dim_capacity
        self.criterion = criterion
        self.seed = int(seed)
        self._labels = corpus.labels
        self._classes: list[Any] = sorted(set(corpus.labels or ()), key=str)
        self._class_index = {label: i for i, label in enumerate(self._classes)}
        self._offset = first_sentence  # sentences seen at layer 0, to slice non-integer corpus labels
        self._batch_classes: torch.Tensor | None = None
        self.samples: dict[int, ReservoirSample] = {}
        self.class_stats: dict[int, list[LayerStats]] = {}

    # ------------------------------------------------------------------ the second pass
    def update(
        self, layer: int, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None
    ) -> None:
        """Feed one batch of one layer: hidden (B, T, d), mask (B, T) bool, labels (B,)."""
        if "distributions" in self.analyses:
            sample = self.samples.get(layer)
            if sample is None:
                d = hidden.shape[-1]
                dims = range(d if self.n_dims == -1 else min(self.n_dims, d))
                sample = ReservoirSample(self.reservoir_size, dims=dims, dim_capacity=self.dim_capacity,
                                         seed=self.seed + layer, device=hidden.device)
                self.samples[layer] = sample
            sample.update(hidden, mask=mask)
        if "classes" in self.analyses:
            if layer == 0 or self._batch_classes is None:
                self._batch_classes = self._classes_of(labels, hidden.shape[0]).to(mask.device)
            per_class = self.class_stats.get(layer)
            if per_class is None:
                # No higher moments: LDA needs only counts, means and covariances.
                per_class = [
                    LayerStats(hidden.shape[-1], device=hidden.device, higher_moments=False)
                    for _ in self._classes
                ]
                self.class_stats[layer] = per_class
            for index, stats in enumerate(per_class):
                stats.update(hidden, mask=mask & (self._batch_classes == index)[:, None])

    def _classes_of(self, labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Class indices of the current batch (layer 0 comes first in every batch)."""
        if labels is not None:
            values = labels.tolist()
        else:  # string labels: the batches follow the corpus order
            values = list((self._labels or ())[self._offset : self._offset + batch])
        self._offset += batch
        if len(values) != batch:
            raise RuntimeError(
                f"--analyses classes: got {len(values)} labels for a batch of {batch} sentences; "
                f"the corpus labels and sentences are out of step"
            )
        return torch.tensor([self._class_index[v] for v in values], dtype=torch.int64)

    def reduce(self, parallel: DataParallel) -> None:
        """Under ``torchrun``, after the second pass: sum the per-class statistics over the ranks
        and merge the ranks' samples into one uniform sample of the union (a collective:
        ``gsam_monitor.eval.parallel``)."""
        for layer in sorted(self.class_stats):
            parallel.sum_stats(self.class_stats[layer])
        for layer in sorted(self.samples):
            self.samples[layer] = MergedSample.merge(parallel, self.samples[layer])  # type: ignore[assignment]

    def results(self, stats: Sequence[LayerStats]) -> dict[int, dict[str, Any]]:
        """Per-layer ``{"analyses": {...}}`` for ``distributions`` and ``classes``."""
        out: dict[int, dict[str, Any]] = {}
        for layer in range(len(stats)):
            entry: dict[str, Any] = {}
            sample = self.samples.get(layer)
            per_class = self.class_stats.get(layer)
            if sample is not None or per_class is not None:
                summary = analyze_layer(
                    sample,
                    None,
                    {label: s for label, s in zip(self._classes, per_class, strict=True)}
                    if per_class is not None else None,
                    criterion=self.criterion,  # type: ignore[arg-type]
                    seed=self.seed,
                )
                if sample is not None:
                    entry["distributions"] = _distribution_entry(summary["distribution"], sample, self)
                    if sample.dims and entry["distributions"] is not None:
                        entry["distributions"]["dims"] = self._per_dim(sample)
                if per_class is not None:
                    entry["classes"] = summary["class_separation"]
            out[layer] = {"analyses": plain(entry)}
        return out

    def _per_dim(self, sample: ReservoirSample) -> dict[str, Any]:
        """Family fits and modes of each separately sampled dimension, with counts."""
        counts: dict[str, dict[str, int]] = {c: {} for c in FIT_CRITERIA}
        per_dim, skipped = [], []
        n_with_modes = 0
        for dim in sample.dims:
            values = sample.values(dim=dim)
            try:
                fits = fit_families(values, criterion=self.criterion, max_values=self.dim_capacity,
                                    seed=self.seed)
                modes = find_modes(values, max_values=self.dim_capacity, seed=self.seed)
            except (ValueError, RuntimeError) as err:  # a constant (dead) or too short dimension
                logger.info("dimension %d not fitted: %s", dim, err)
                skipped.append(dim)
                continue
            best = {c: _best_by(fits, c) for c in FIT_CRITERIA}
            for c, family in best.items():
                counts[c][family] = counts[c].get(family, 0) + 1
            offsets = [m["offset_sd"] for m in (*modes["left"], *modes["right"])]
            n_with_modes += bool(offsets)
            per_dim.append({"dim": dim, "n": int(values.size), "best_family": best,
                            "secondary_modes_sd": offsets})
        return {
            "n_dims": len(per_dim),
            "dim_capacity": sample.dim_capacity,
            "skipped": skipped,
            "best_family_counts": {
                c: dict(sorted(v.items(), key=lambda kv: (-kv[1], kv[0]))) for c, v in counts.items()
            },
            "dims_with_secondary_modes": n_with_modes,
            "per_dim": per_dim,
        }

    def finish(self, result: ModelResult) -> None:
        """Add ``spectrum`` to every layer of ``result`` and keep the samples for the plots.

        Args:
            result: the token protocol's result for the model this observer watched.
        """
        for index, layer in enumerate(result.layers):
            entry = layer.setdefault("analyses", {})
            if "spectrum" in self.analyses:
                spectrum = result.spectra[index] if index < len(result.spectra) else np.zeros(0)
                # Only the support (the metrics' rank): the null eigenvalue of a LayerNorm
                # output is rounding noise and would steepen the fit when the range reaches it.
                spectrum = np.sort(np.asarray(spectrum, dtype=np.float64))[::-1][: int(layer.get("rank") or 0)]
                entry["spectrum"] = (
                    plain(powerlaw_fit(spectrum, POWERLAW_RANGE)) if spectrum.size else None
                )
        result.samples = {layer: sample.values() for layer, sample in self.samples.items()}


def _distribution_entry(
    summary: dict[str, Any] | None, sample: ReservoirSample, observer: AnalysisObserver
) -> dict[str, Any] | None:
    if summary is None:
        return None
    fits = summary["fits"]
    return {
        "sample": {
            "size": summary["n"],
            "seen": sample.count,
            "capacity": sample.capacity,
            "seed": sample.seed,
            "nonfinite": summary["nonfinite"],
            # Under torchrun: merged from each rank's sample (the same distribution as one
            # process's sample, not the same values).
            "merged_from_ranks": getattr(sample, "ranks", 1),
        },
        "criterion": observer.criterion,
        "best_family": summary["best_family"],
        "best_family_by": {c: _best_by(fits, c) for c in FIT_CRITERIA},
        "fits": fits,
        "modes": summary["modes"],
        "n_secondary_modes": len(summary["modes"]["left"]) + len(summary["modes"]["right"]),
        "tails": summary["tails"],
    }


def _best_by(fits: Sequence[dict[str, Any]], criterion: str) -> str:
    finite = [f for f in fits if math.isfinite(f[criterion])]
    return min(finite, key=lambda f: f[criterion])["family"] if finite else fits[0]["family"]


def has_analyses(results: Sequence[ModelResult]) -> bool:
    """Whether any layer of any result carries analyses."""
    return any(layer.get("analyses") for r in results for layer in r.layers)
