"""Crystals: word-pair relations as parallel difference vectors, before and after removing distractors.

For a relation with pairs (a_i, b_i) (country -> capital, male -> female, singular ->
plural) and word vectors v(w), the difference vectors d_i = v(b_i) - v(a_i) of a perfect
"crystal" are parallel: every face a_i b_i b_j a_j is a parallelogram. Its quality here is
the mean cosine of d_i and d_j over the pairs i < j of the relation, beside the same mean
across relations (the baseline) and the analogy accuracy (v(a_i) + mean_{j != i} d_j is
nearest, by cosine, to v(b_i) among every other word of the list).

The study finds that the faces sharpen once global "distractor" directions such as word
length are projected out, with linear discriminant analysis. Here the distractors are
labels of each word (its length in characters, its number of tokens), LDA finds the
directions that separate those classes (``lda_directions``, from per-class streaming
moments, the eigen-solver of scikit-learn's ``LinearDiscriminantAnalysis`` with a fixed
shrinkage), and ``remove_directions`` projects them out. A control removes as many
random directions.

``supervised_crystals`` measures the crystals as the study's code does (``atom/crystal_lda.py``):
LDA fitted on the difference vectors *with their relation labels*, the vectors projected onto
its components and the relations' clusters scored by their silhouette, in-sample (the study)
and on pairs held out of the fit, each beside the same with shuffled relation labels.

The word pairs are ``gsam_monitor/data/concepts_word_pairs.tsv`` (72 pairs, 24 per relation;
see ``PROVENANCE.md``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg

from gsam_monitor.analysis.spectrum import ClassMoments

__all__ = [
    "LENGTH_BINS",
    "WordPair",
    "distractor_labels",
    "lda_directions",
    "load_word_pairs",
    "parallelogram_quality",
    "remove_directions",
    "supervised_crystals",
]

#: Upper edges (inclusive) of the word-length classes, in characters; longer words form the last class.
LENGTH_BINS: tuple[int, ...] = (4, 6, 8)


@dataclass(frozen=True)
class WordPair:
    """One fact: ``a`` relates to ``b`` by ``relation`` (e.g. france -> paris, country_capital)."""

    relation: str
    a: str
    b: str


def load_word_pairs(path: str | Path | None = None) -> list[WordPair]:
    """Read a TSV with columns ``relation``, ``a``, ``b`` (default: the bundled list).

    Raises:
        ValueError: for a missing column or no pairs.
    """
    if path is None:
        path = Path(str(resources.files("gsam_monitor") / "data" / "concepts_word_pairs.tsv"))
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    header = lines[0].split("\t") if lines else []
    if not {"relation", "a", "b"} <= set(header):
        raise ValueError(f"word pairs: expected columns relation, a, b in {str(path)!r}, got {header!r}")
    cols = [header.index(c) for c in ("relation", "a", "b")]
    pairs = [WordPair(*(line.split("\t")[c].strip() for c in cols)) for line in lines[1:]]
    if not pairs:
        raise ValueError(f"word pairs: no pairs in {str(path)!r}")
    return pairs


def distractor_labels(words: Sequence[str], token_counts: Sequence[int]) -> dict[str, np.ndarray]:
    """Class labels of the two distractors of each word.

    ``word_length``: characters binned at :data:`LENGTH_BINS` (<= 4, 5-6, 7-8, >= 9);
    ``token_count``: 1, 2, >= 3 tokens.
    """
    lengths = np.array([len(w) for w in words])
    return {
        "word_length": np.searchsorted(np.array(LENGTH_BINS), lengths, side="left"),
        "token_count": np.minimum(np.asarray(token_counts), 3),
    }


def _shrunk(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    """(1 - s) C + s tr(C)/d I (``sklearn.covariance.shrunk_covariance``)."""
    d = cov.shape[0]
    return (1.0 - shrinkage) * cov + shrinkage * (np.trace(cov) / d) * np.eye(d)


def lda_directions(stats_by_class: Sequence[ClassMoments] | Mapping[Any, ClassMoments],
                   shrinkage: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """LDA discriminant directions from per-class moments, as scikit-learn's eigen solver.

    With class fractions p_c, means mu_c and MLE covariances C_c (e.g. one ``LayerStats`` per
    class): S_W = sum_c p_c C_c, S_T = S_W + sum_c p_c (mu_c - mu)(mu_c - mu)^T, both shrunk
    as (1 - s) S + s tr(S)/d I, S_b = S_T - S_W; the directions solve S_b v = lambda S_W v
    (``scipy.linalg.eigh``, so v^T S_W v = 1), largest lambda first. This is
    ``LinearDiscriminantAnalysis(solver="eigen", shrinkage=s)``'s ``scalings_`` (Duda, Hart &
    Stork, Pattern Classification, 2nd ed., §3.8.3) with the default priors.

    Args:
        stats_by_class: anything with ``count``, ``mean`` and ``covariance(ddof=0)`` per class;
            classes with count 0 are skipped.
        shrinkage: s in (0, 1]; > 0 keeps S_W invertible when a class has fewer rows than
            dimensions.

    Returns:
        ``(directions, eigenvalues)``: (d, C - 1) and (C - 1,), C = non-empty classes.

    Raises:
        ValueError: fewer than 2 non-empty classes, or a shrinkage outside (0, 1].
    """
    if not 0.0 < shrinkage <= 1.0:
        raise ValueError(f"shrinkage: expected a value in (0, 1], got {shrinkage!r}; e.g. 0.5")
    items = list(stats_by_class.values()) if isinstance(stats_by_class, Mapping) else list(stats_by_class)
    counts, means, covs = [], [], []
    for moments in items:
        count = float(np.asarray(_numpy(moments.count)))
        if count <= 0:
            continue
        counts.append(count)
        means.append(np.asarray(_numpy(moments.mean), dtype=np.float64).reshape(-1))
        covs.append(np.asarray(_numpy(moments.covariance(ddof=0)), dtype=np.float64))
    if len(counts) < 2:
        raise ValueError(f"lda_directions: expected at least 2 classes with rows, got {len(counts)}")
    p = np.asarray(counts) / sum(counts)
    mu_c = np.stack(means)
    diff = mu_c - p @ mu_c
    s_within = np.einsum("c,cij->ij", p, np.stack(covs))
    s_total = s_within + (diff.T * p) @ diff
    sw = _shrunk(0.5 * (s_within + s_within.T), shrinkage)
    sb = _shrunk(0.5 * (s_total + s_total.T), shrinkage) - sw
    d, r = sw.shape[0], min(len(counts) - 1, sw.shape[0])
    # Only the top r pairs: cheaper than the full generalized eigendecomposition.
    evals, evecs = scipy.linalg.eigh(sb, sw, subset_by_index=[d - r, d - 1])
    return evecs[:, ::-1], evals[::-1]


def _numpy(value: Any) -> Any:
    if hasattr(value, "detach"):
        return value.detach().to("cpu").double().numpy()
    return value


def remove_directions(vectors: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Project rows (n, d) onto the orthogonal complement of the span of ``directions`` (d, r)."""
    x = np.asarray(vectors, dtype=np.float64)
    q, _ = np.linalg.qr(np.asarray(directions, dtype=np.float64))
    return x - (x @ q) @ q.T


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


def parallelogram_quality(vectors_a: np.ndarray, vectors_b: np.ndarray, relations: Sequence[str]) -> dict[str, Any]:
    """Parallelism of the difference vectors of each relation.

    Args:
        vectors_a: (n, d) vectors of the first words of the pairs.
        vectors_b: (n, d) vectors of the second words.
        relations: (n,) relation of each pair.

    Returns:
        ``within`` (mean over relations of the mean cosine between difference vectors of
        the same relation), ``across`` (mean cosine between difference vectors of different
        relations), ``per_relation`` (relation -> mean cosine), ``analogy_accuracy``
        (fraction of pairs whose b is the nearest other word, by cosine, to
        a + the mean difference of the relation's other pairs).
    """
    a = np.asarray(vectors_a, dtype=np.float64)
    b = np.asarray(vectors_b, dtype=np.float64)
    rel = np.asarray(relations)
    diffs = _unit(b - a)
    cos = diffs @ diffs.T
    same = rel[:, None] == rel[None, :]
    upper = np.triu(np.ones_like(cos, dtype=bool), k=1)
    per_relation = {str(r): float(cos[(rel[:, None] == r) & (rel[None, :] == r) & upper].mean())
                    for r in dict.fromkeys(rel.tolist())}
    across = cos[~same & upper]
    words = _unit(np.concatenate([a, b]))
    n = a.shape[0]
    hits = 0
    for i in range(n):
        others = (rel == rel[i]) & (np.arange(n) != i)
        target = _unit(a[i] + (b[others] - a[others]).mean(axis=0))
        scores = words @ target
        scores[i] = -np.inf  # the query word itself
        hits += int(np.argmax(scores) == n + i)
    return {
        "within": float(np.mean(list(per_relation.values()))),
        "across": float(across.mean()) if across.size else float("nan"),
        "per_relation": per_relation,
        "analogy_accuracy": hits / n,
    }


def _mean_sd(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else float("nan")}


def supervised_crystals(vectors_a: np.ndarray, vectors_b: np.ndarray, relations: Sequence[str], *,
                        components: Sequence[int] = tuple(range(2, 12)), folds: int = 5, n_shuffles: int = 20,
                        seed: int = 0) -> dict[str, Any]:
    """Silhouette of the relations' difference vectors after an LDA fitted on the relation labels.

    The difference vectors d_i = v(b_i) - v(a_i) are labelled by relation;
    ``LinearDiscriminantAnalysis(n_components=n)`` (scikit-learn's default SVD solver, as the
    study) is fitted on them and ``silhouette_score`` (Euclidean) scores the projected
    clusters, for n in ``components`` up to C - 1 (C relations; LDA has no more components):

    - ``in_sample``: fitted and scored on every pair (the study's number; partly circular,
      since the fit has seen the labels it is scored on);
    - ``heldout``: ``StratifiedKFold(folds, shuffle=True, random_state=seed)``, fitted on the
      other folds and scored on the held-out pairs; mean and sd over the folds;
    - ``in_sample_shuffled``, ``heldout_shuffled``: the same with the relation labels permuted
      (``n_shuffles`` seeded permutations; mean and sd over them), what the procedure finds
      where there is nothing to find;
    - ``before``: the silhouette of the difference vectors themselves, before any projection.

    Returns:
        ``n_relations``, ``components`` (the n used), ``before``, and per key above a dict
        from n (as a string) to the score (``in_sample``) or its ``mean`` and ``sd``.

    Raises:
        ValueError: fewer than 3 relations (LDA would have fewer than 2 components), a relation
            with fewer pairs than ``folds``, ``folds < 2`` or ``n_shuffles < 2``.
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedKFold

    diffs = np.asarray(vectors_b, dtype=np.float64) - np.asarray(vectors_a, dtype=np.float64)
    names, y = np.unique(np.asarray(relations), return_inverse=True)
    if names.size < 3:
        raise ValueError(f"relations: expected at least 3 relations for a 2-component LDA, got {names.size}")
    if folds < 2 or n_shuffles < 2:
        raise ValueError(f"supervised_crystals: expected folds >= 2 and n_shuffles >= 2, got {folds} and {n_shuffles}")
    if np.bincount(y).min() < folds:
        raise ValueError(f"relations: every relation needs at least {folds} pairs for {folds}-fold held-out scores, "
                         f"the smallest has {np.bincount(y).min()}; pass fewer folds")
    used = [int(n) for n in components if 1 <= n <= min(names.size - 1, diffs.shape[1])]
    if not used:
        raise ValueError(f"components: expected numbers between 1 and {min(names.size - 1, diffs.shape[1])}, got "
                         f"{list(components)}")

    def in_sample(labels: np.ndarray, n: int) -> float:
        projected = LinearDiscriminantAnalysis(n_components=n).fit_transform(diffs, labels)
        return float(silhouette_score(projected, labels))

    def heldout(labels: np.ndarray, n: int) -> list[float]:
        scores = []
        for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(diffs, labels):
            lda = LinearDiscriminantAnalysis(n_components=n).fit(diffs[train], labels[train])
            scores.append(float(silhouette_score(lda.transform(diffs[test]), labels[test])))
        return scores

    rng = np.random.default_rng(seed)
    shuffles = [rng.permutation(y) for _ in range(n_shuffles)]
    out: dict[str, Any] = {"n_relations": int(names.size), "components": used,
                           "before": float(silhouette_score(diffs, y)),
                           "in_sample": {}, "heldout": {}, "in_sample_shuffled": {}, "heldout_shuffled": {}}
    for n in used:
        out["in_sample"][str(n)] = in_sample(y, n)
        out["heldout"][str(n)] = _mean_sd(heldout(y, n))
        out["in_sample_shuffled"][str(n)] = _mean_sd([in_sample(s, n) for s in shuffles])
        out["heldout_shuffled"][str(n)] = _mean_sd([float(np.mean(heldout(s, n))) for s in shuffles])
    return out
