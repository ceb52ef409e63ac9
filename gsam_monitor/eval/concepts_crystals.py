"""The crystals of ``--analyses concepts``: two named analyses of the word pairs' difference vectors.

- ``distractor_removal`` (the library's first reading of the study, reported under
  ``crystals.activations`` and ``crystals.features``): parallelism of the difference vectors
  before and after projecting out the LDA directions of word length and token count, beside
  as many random directions;
- ``supervised`` (the study's own measure, ``atom/crystal_lda.py``): LDA fitted on the
  difference vectors with their relation labels, silhouette of the projected relations,
  in-sample and held out, each beside shuffled labels (``supervised_crystals``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gsam_monitor.analysis.concepts import (
    distractor_labels,
    lda_directions,
    parallelogram_quality,
    remove_directions,
    supervised_crystals,
)
from gsam_monitor.eval.concepts_config import ConceptsConfig, LayerConcepts
from gsam_monitor.stats import LayerStats

__all__ = ["WordVectors", "crystal_results"]


@dataclass
class WordVectors:
    """Each word of the pair list run alone: token counts, mean activations and SAE codes per layer.

    Attributes:
        pairs: the ``WordPair`` list.
        index: word -> row.
        tokens: (words,) tokens of each word, special tokens excluded.
        activations: layer -> (words, d) mean hidden state over the word's tokens.
        features: layer -> (words, m) mean SAE code over the word's tokens.
    """

    pairs: list[Any]
    index: dict[str, int]
    tokens: np.ndarray
    activations: dict[int, np.ndarray]
    features: dict[int, np.ndarray]


def crystal_results(words: WordVectors, layer: int, config: ConceptsConfig, plot: LayerConcepts) -> dict[str, Any]:
    """The layer's ``crystals`` entry: ``activations`` and ``features`` (distractor removal), ``supervised``."""
    pairs = words.pairs
    ia = np.array([words.index[p.a] for p in pairs])
    ib = np.array([words.index[p.b] for p in pairs])
    relations = [p.relation for p in pairs]
    vocabulary = list(words.index)
    labels = distractor_labels(vocabulary, words.tokens.tolist())
    entry: dict[str, Any] = {
        "n_pairs": len(pairs),
        "relations": {r: relations.count(r) for r in dict.fromkeys(relations)},
        "distractors": list(labels),
        "lda_shrinkage": config.lda_shrinkage,
        "supervised": {},
    }
    rng = np.random.default_rng(config.seed)
    for space, vectors in (("activations", words.activations[layer]), ("features", words.features[layer])):
        if space == "features":
            active = np.flatnonzero(np.abs(vectors).sum(axis=0) > 0)
            vectors = vectors[:, active]
        entry[space] = _distractor_removal(vectors, ia, ib, relations, labels, config, rng)
        if space == "activations":
            plot.crystals = {"before": vectors, "after": entry[space].pop("_after"), "a": ia, "b": ib,
                             "relations": relations, "words": vocabulary}
        else:
            entry[space].pop("_after")
        try:
            entry["supervised"][space] = supervised_crystals(vectors[ia], vectors[ib], relations,
                                                             n_shuffles=config.crystal_shuffles, seed=config.seed)
        except ValueError as err:  # too few relations or pairs
            entry["supervised"][space] = {"skipped": str(err)}
    return entry


def _distractor_removal(vectors: np.ndarray, ia: np.ndarray, ib: np.ndarray, relations: list[str],
                        labels: dict[str, np.ndarray], config: ConceptsConfig,
                        rng: np.random.Generator) -> dict[str, Any]:
    directions, fisher = [], {}
    for distractor, classes in labels.items():
        if np.unique(classes).size < 2:  # e.g. every word is one token for this tokenizer
            continue
        per_class = []
        for c in np.unique(classes):
            stats = LayerStats(vectors.shape[1], higher_moments=False)
            stats.update(torch.from_numpy(vectors[classes == c]))
            per_class.append(stats)
        found, evals = lda_directions(per_class, config.lda_shrinkage)
        directions.append(found)
        fisher[distractor] = float(evals[0])
    removed = np.concatenate(directions, axis=1) if directions else np.zeros((vectors.shape[1], 0))
    after = remove_directions(vectors, removed)
    random_within = []
    for _ in range(config.n_random):
        control = remove_directions(vectors, rng.standard_normal((vectors.shape[1], removed.shape[1])))
        random_within.append(parallelogram_quality(control[ia], control[ib], relations)["within"])
    return {
        "dim": int(vectors.shape[1]),
        "removed_directions": int(removed.shape[1]),
        "distractor_fisher": fisher,
        "before": parallelogram_quality(vectors[ia], vectors[ib], relations),
        "after_lda": parallelogram_quality(after[ia], after[ib], relations),
        "after_random_within": float(np.mean(random_within)),
        "_after": after,
    }
