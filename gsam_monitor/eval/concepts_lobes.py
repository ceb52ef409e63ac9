"""The lobes of ``--analyses concepts``: the library's recipe and the study's, side by side, with their controls.

- ``library``: features firing in ``min_blocks`` blocks or more (and not in all of them),
  spectral lobes of the clipped phi affinity (``spectral_lobes``), k-means clusters of the unit
  decoder directions, AMI against shuffles, 5-fold logistic-regression accuracy against the
  largest lobe's share.
- ``study``: every feature that fires in at least one block (a feature that never fires has
  no co-occurrence to cluster on), ``spectral_clusters`` of phi + 1 and of the angular
  similarity of the decoder directions (``random_state`` 42), AMI against shuffles, the
  balanced accuracy of a logistic regression on an 80/20 split against random unit vectors.
- ``k_sweep``: the AMI of both recipes for each lobe count of ``ConceptsConfig.k_sweep`` (against
  ``SWEEP_NULL`` shuffles).
- ``over_seeds``: the AMI of both recipes and the study's balanced accuracy over ``n_seeds``
  clustering seeds (the study's 42 and the next ones; the library's seed and the next ones),
  mean and sd; with ``--sae-seeds`` > 1 also the study's numbers over SAEs trained with
  different seeds.
- ``mixed_blocks``: the study's recipe on blocks that mix the sources (a third of a block of
  each, ``mixed_source_blocks``) beside the same on the single-source blocks: the AMI of the
  lobes with the source each feature fires on most tells "the lobes are the sources" from
  lobes that survive without them.
- ``threshold_sweep``: the fraction of (feature, block) cells that fire, the activations per
  token and feature above the threshold, and the AMI of both recipes, per threshold.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from gsam_monitor.analysis.concepts import (
    AFFINITIES,
    SOURCES,
    STUDY_SEED,
    affinity,
    ami_with_null,
    angular_similarity,
    balanced_accuracy_with_null,
    cooccurrence_counts,
    geometry_clusters,
    lobe_by_source,
    lobe_from_geometry,
    mixed_source_blocks,
    shifted_phi,
    spectral_clusters,
    spectral_embedding_2d,
    spectral_lobes,
)
from gsam_monitor.eval.concepts_config import ConceptsConfig, LayerConcepts

__all__ = ["SWEEP_NULL", "lobe_results", "single_threaded", "study_summary", "summarise", "threshold_sweep"]

logger = logging.getLogger(__name__)


@contextmanager
def single_threaded() -> Iterator[None]:
    """OpenMP (scikit-learn's k-means) on one thread: on a 2-core machine shared with other work its
    threads wait on each other (measured: a k sweep took 10.2 s on two threads, 7.1 s on one)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="openmp"):
        yield


def summarise(values: Sequence[float]) -> dict[str, Any]:
    """``mean``, ``sd`` (ddof 1; NaN for one value) and the ``values`` themselves (NaNs ignored)."""
    v = np.asarray([x for x in values if isinstance(x, (int, float)) and math.isfinite(x)], dtype=np.float64)
    return {"mean": float(v.mean()) if v.size else math.nan,
            "sd": float(v.std(ddof=1)) if v.size > 1 else math.nan, "values": [float(x) for x in values]}


def _ami(result: dict[str, float]) -> dict[str, float]:
    return {"ami": result["ami"], "null_mean": result["null_mean"], "null_sd": result["null_sd"], "z": result["z"]}


def _ami_only(a: np.ndarray, b: np.ndarray) -> float:
    from sklearn.metrics import adjusted_mutual_info_score

    return float(adjusted_mutual_info_score(a, b))


def _too_few(n_features: int, k: int) -> bool:
    return n_features < max(2 * k, 10)


class _Study:
    """The study's recipe on one firing matrix; the similarity matrices are computed once."""

    def __init__(self, matrix: np.ndarray, directions: np.ndarray) -> None:
        self.features = np.flatnonzero(matrix.any(axis=0))
        self.n_blocks = matrix.shape[0]
        sub = matrix[:, self.features]
        self.phi = shifted_phi(cooccurrence_counts(sub)) if self.features.size else np.zeros((0, 0))
        self.angular = angular_similarity(directions[self.features]) if self.features.size else np.zeros((0, 0))
        self.directions = directions[self.features]

    def labels(self, k: int, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
        if _too_few(self.features.size, k):
            return None
        return spectral_clusters(self.phi, k, seed=seed), spectral_clusters(self.angular, k, seed=seed)

    def accuracy(self, lobes: np.ndarray, config: ConceptsConfig, seed: int, *, null: bool = True) -> dict[str, float]:
        try:
            return balanced_accuracy_with_null(self.directions, lobes, n_null=config.n_feature_null if null else 0,
                                               seed=seed)
        except ValueError as err:  # a lobe of one feature
            logger.info("balanced accuracy skipped: %s", err)
            return {"balanced_accuracy": math.nan, "null_mean": math.nan, "null_sd": math.nan, "z": math.nan}


class _Library:
    """The library's recipe on one firing matrix."""

    def __init__(self, matrix: np.ndarray, directions: np.ndarray, config: ConceptsConfig) -> None:
        counts = cooccurrence_counts(matrix)
        self.features = np.flatnonzero((counts.fires >= config.min_blocks) & (counts.fires < counts.n))
        idx = self.features
        self.sub = type(counts)(n=counts.n, fires=counts.fires[idx], both=counts.both[np.ix_(idx, idx)])
        self.directions = directions[idx]
        self.headline = affinity(self.sub, config.affinity) if idx.size else np.zeros((0, 0))

    def labels(self, k: int, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
        if _too_few(self.features.size, k):
            return None
        return spectral_lobes(self.headline, k, seed=seed), geometry_clusters(self.directions, k, seed=seed)


def _dominant(matrix: np.ndarray, block_sources: Sequence[str], features: np.ndarray) -> np.ndarray:
    """Index into ``SOURCES`` of the source each feature fires in most often (share of that source's blocks)."""
    src = np.asarray(block_sources)
    rates = np.stack([matrix[src == s][:, features].mean(axis=0) if np.any(src == s) else np.zeros(features.size)
                      for s in SOURCES])
    return rates.argmax(axis=0)


def _library_headline(lib: _Library, matrix: np.ndarray, block_sources: Sequence[str], config: ConceptsConfig,
                      plot: LayerConcepts) -> dict[str, Any]:
    """The library's recipe at ``n_lobes``: every affinity, logistic regression, lobe x source, the plot."""
    pair = lib.labels(config.n_lobes, config.seed)
    assert pair is not None
    headline, geometry = pair
    by_affinity: dict[str, dict[str, Any]] = {}
    for name in AFFINITIES:
        a = lib.headline if name == config.affinity else affinity(lib.sub, name)
        lobes = headline if name == config.affinity else spectral_lobes(a, config.n_lobes, seed=config.seed)
        ami = ami_with_null(lobes, geometry, n_null=config.n_null, seed=config.seed)
        by_affinity[name] = {"ami": ami["ami"], "ami_null_mean": ami["null_mean"], "ami_null_sd": ami["null_sd"],
                             "ami_z": ami["z"], "lobe_sizes": np.bincount(lobes, minlength=config.n_lobes).tolist()}
    plot.embedding = spectral_embedding_2d(lib.headline, seed=config.seed)
    try:  # logistic regression for the headline lobes only: it is the slow step
        logreg = lobe_from_geometry(lib.directions, headline, seed=config.seed)
    except ValueError as err:  # a lobe smaller than the folds
        logger.info("logistic regression skipped: %s", err)
        logreg = {"accuracy": math.nan, "chance": math.nan}
    plot.lobes = headline
    plot.dominant_source = [SOURCES[i] for i in _dominant(matrix, block_sources, lib.features)]
    plot.labels.update({"library_features": lib.features, "library_lobes": headline, "library_geometry": geometry})
    top = by_affinity[config.affinity]
    return {"ami": top["ami"], "ami_null_mean": top["ami_null_mean"], "ami_null_sd": top["ami_null_sd"],
            "ami_z": top["ami_z"], "logreg_accuracy": logreg["accuracy"], "chance": logreg["chance"],
            "lobe_by_source": lobe_by_source(matrix[:, lib.features], block_sources, headline, SOURCES),
            "by_affinity": by_affinity}


def _study_headline(study: _Study, matrix: np.ndarray, block_sources: Sequence[str], config: ConceptsConfig,
                    plot: LayerConcepts) -> dict[str, Any]:
    entry: dict[str, Any] = {"k": config.n_lobes, "seed": STUDY_SEED, "n_features": int(study.features.size),
                             "affinity": "phi + 1", "geometry": "angular similarity 1 - arccos(cos)/pi"}
    pair = study.labels(config.n_lobes, STUDY_SEED)
    if pair is None:
        return {**entry, "ami": None, "balanced_accuracy": None}
    lobes, geometry = pair
    plot.labels.update({"study_features": study.features, "study_lobes": lobes, "study_geometry": geometry})
    return {**entry, "ami": _ami(ami_with_null(lobes, geometry, n_null=config.n_null, seed=config.seed)),
            "balanced_accuracy": study.accuracy(lobes, config, config.seed),
            "lobe_sizes": np.bincount(lobes, minlength=config.n_lobes).tolist(),
            "geometry_sizes": np.bincount(geometry, minlength=config.n_lobes).tolist(),
            "lobe_by_source": lobe_by_source(matrix[:, study.features], block_sources, lobes, SOURCES)}


#: Shuffles of the AMI null in the k sweep (fewer than the headline's: it is run for every k).
SWEEP_NULL = 50


def _k_sweep(study: _Study, lib: _Library, config: ConceptsConfig) -> dict[str, Any]:
    n_null = min(config.n_null, SWEEP_NULL)
    out: dict[str, Any] = {"k": list(config.k_sweep), "n_null": n_null, "study": [], "library": []}
    for k in config.k_sweep:
        for name, recipe, seed in (("study", study, STUDY_SEED), ("library", lib, config.seed)):
            pair = recipe.labels(k, seed)
            out[name].append(None if pair is None else _ami(ami_with_null(*pair, n_null=n_null, seed=config.seed)))
    return out


def _over_seeds(study: _Study, lib: _Library, config: ConceptsConfig) -> dict[str, Any]:
    k = config.n_lobes
    study_ami, study_acc, lib_ami = [], [], []
    for i in range(config.n_seeds):
        pair = study.labels(k, STUDY_SEED + i)
        if pair is not None:
            study_ami.append(_ami_only(*pair))
            # The split's seed moves with the clustering's: both sources of spread are in the sd.
            study_acc.append(study.accuracy(pair[0], config, config.seed + i, null=False)["balanced_accuracy"])
        pair = lib.labels(k, config.seed + i)
        if pair is not None:
            lib_ami.append(_ami_only(*pair))
    return {"k": k, "study_seeds": [STUDY_SEED + i for i in range(config.n_seeds)],
            "library_seeds": [config.seed + i for i in range(config.n_seeds)],
            "study": {"ami": summarise(study_ami), "balanced_accuracy": summarise(study_acc)},
            "library": {"ami": summarise(lib_ami)}}


def _mixed_blocks(segment_max: np.ndarray, block_sources: Sequence[str], directions: np.ndarray, threshold: float,
                  config: ConceptsConfig) -> dict[str, Any]:
    single = segment_max.max(axis=1) > threshold
    mixed = mixed_source_blocks(segment_max, block_sources, seed=config.seed) > threshold
    out: dict[str, Any] = {"segments": int(segment_max.shape[1]), "k": config.n_lobes}
    for name, matrix in (("single_source", single), ("mixed", mixed)):
        study = _Study(matrix, directions)
        entry: dict[str, Any] = {"n_blocks": int(matrix.shape[0]), "n_features": int(study.features.size),
                                 "firing_density": float(matrix.mean()) if matrix.size else math.nan}
        pair = study.labels(config.n_lobes, STUDY_SEED)
        if pair is not None:
            lobes, geometry = pair
            source = _dominant(single, block_sources, study.features)  # from the real, single-source blocks
            entry.update({
                "ami_geometry": _ami(ami_with_null(lobes, geometry, n_null=config.n_null, seed=config.seed)),
                "ami_source": _ami(ami_with_null(lobes, source, n_null=config.n_null, seed=config.seed)),
                "lobe_sizes": np.bincount(lobes, minlength=config.n_lobes).tolist(),
                # Per lobe, the fraction of each source's (single-source) blocks its features fire in.
                "lobe_by_source": lobe_by_source(single[:, study.features], block_sources, lobes, SOURCES),
            })
        out[name] = entry
    return out


def study_summary(block_max: np.ndarray, directions: np.ndarray, threshold: float,
                  config: ConceptsConfig) -> dict[str, float]:
    """The study's AMI and balanced accuracy at ``n_lobes`` (seed 42), for the extra SAE seeds."""
    study = _Study(block_max > threshold, directions)
    pair = study.labels(config.n_lobes, STUDY_SEED)
    if pair is None:
        return {"ami": math.nan, "balanced_accuracy": math.nan}
    return {"ami": _ami_only(*pair),
            "balanced_accuracy": study.accuracy(pair[0], config, config.seed, null=False)["balanced_accuracy"]}


def lobe_results(segment_max: np.ndarray, block_sources: Sequence[str], directions: np.ndarray, threshold: float,
                 config: ConceptsConfig, plot: LayerConcepts) -> dict[str, Any]:
    """Both recipes' lobes on one SAE, with the k sweep, the seeds and the mixed-block control.

    Args:
        segment_max: (blocks, S, m) largest activation of each feature in each segment of each
            block (S = the number of sources).
        block_sources: source of each block.
        directions: (m, d) decoder rows.
        threshold: the firing threshold.
        config: settings.
        plot: receives the embedding, labels and sweeps.

    Returns:
        The layer's ``lobes`` entry: the library recipe's headline under the flat keys
        (``ami``, ``logreg_accuracy``, ... as before), and ``library``, ``study``, ``k_sweep``,
        ``over_seeds``, ``mixed_blocks``.
    """
    block_max = segment_max.max(axis=1)
    matrix = block_max > threshold
    lib = _Library(matrix, directions, config)
    study = _Study(matrix, directions)
    entry: dict[str, Any] = {
        "k": config.n_lobes, "affinity": config.affinity, "threshold": threshold, "n_blocks": int(matrix.shape[0]),
        "n_features": int(lib.features.size),
        "firing_density": float(matrix.mean()) if matrix.size else math.nan,
        # Filled below unless too few features fire to form lobes.
        "ami": math.nan, "ami_null_mean": math.nan, "ami_null_sd": math.nan, "ami_z": math.nan,
        "logreg_accuracy": math.nan, "chance": math.nan, "lobe_by_source": {}, "by_affinity": {},
    }
    if _too_few(lib.features.size, config.n_lobes):
        warnings.warn(f"concepts: only {lib.features.size} features fire in at least {config.min_blocks} blocks (and "
                      f"not in all); the library's lobes are skipped", stacklevel=3)
        library: dict[str, Any] = {}
    else:
        library = _library_headline(lib, matrix, block_sources, config, plot)
        entry.update(library)
    entry["library"] = {"k": config.n_lobes, "seed": config.seed, "n_features": int(lib.features.size),
                        "affinity": f"{config.affinity}, negative values clipped to 0",
                        "geometry": "k-means of the unit decoder directions",
                        **{key: library.get(key, math.nan) for key in ("ami", "ami_null_mean", "ami_null_sd", "ami_z",
                                                                       "logreg_accuracy", "chance")}}
    entry["study"] = _study_headline(study, matrix, block_sources, config, plot)
    entry["k_sweep"] = _k_sweep(study, lib, config)
    entry["over_seeds"] = _over_seeds(study, lib, config)
    entry["mixed_blocks"] = _mixed_blocks(segment_max, block_sources, directions, threshold, config)
    plot.sweeps["k_sweep"] = entry["k_sweep"]
    return entry


def threshold_sweep(block_max: np.ndarray, directions: np.ndarray, thresholds: Sequence[float],
                    rate_at: Callable[[float], float], config: ConceptsConfig) -> list[dict[str, Any]]:
    """Per threshold: fraction of cells firing, activations per token and feature above it, AMI of both recipes.

    Args:
        block_max: (blocks, m) largest activation of each feature in each block.
        directions: (m, d) decoder rows.
        thresholds: the thresholds, in order.
        rate_at: activations above a threshold per token and feature.
        config: settings (``n_lobes``, ``n_null``, seeds).
    """
    rows = []
    for t in thresholds:
        matrix = block_max > t
        row: dict[str, Any] = {"threshold": float(t), "firing_density": float(matrix.mean()),
                               "activation_rate": float(rate_at(t))}
        for name, recipe, seed in (("study", _Study(matrix, directions), STUDY_SEED),
                                   ("library", _Library(matrix, directions, config), config.seed)):
            pair = recipe.labels(config.n_lobes, seed)
            row[f"n_features_{name}"] = int(recipe.features.size)
            row[f"ami_{name}"] = _ami_only(*pair) if pair else math.nan
        rows.append(row)
    return rows
