"""Lobes: clusters of co-occurring features, and whether they are also clusters in space.

The study's two tests of spatial modularity, with scikit-learn:

- co-occurrence lobes: ``SpectralClustering(affinity="precomputed")`` on a co-occurrence
  affinity (negative phi values clipped to 0: spectral clustering needs a non-negative
  similarity);
- geometry clusters: k-means on the features' unit decoder directions;
- agreement: adjusted mutual information between the two labelings
  (``sklearn.metrics.adjusted_mutual_info_score``) against a null of the same AMI with one
  labeling shuffled (mean, sd, z = (AMI - mean) / sd);
- prediction: the 5-fold cross-validated accuracy of a logistic regression that predicts a
  feature's lobe from its decoder direction, against chance (the largest lobe's share,
  what always guessing it scores);
- specialisation: per lobe, the fraction of each source's blocks in which its features fire.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "ami_with_null",
    "geometry_clusters",
    "lobe_by_source",
    "lobe_from_geometry",
    "spectral_embedding_2d",
    "spectral_lobes",
]


def _nonnegative(affinity: np.ndarray) -> np.ndarray:
    a = np.clip(np.asarray(affinity, dtype=np.float64), 0.0, None)
    return 0.5 * (a + a.T)


def spectral_lobes(affinity: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """Lobe label per feature: spectral clustering of a precomputed affinity into ``k`` lobes.

    Args:
        affinity: (m, m) symmetric similarity; negative entries are clipped to 0.
        k: number of lobes.
        seed: ``random_state`` of the eigensolver and of the k-means label assignment.

    Returns:
        (m,) int labels.

    Raises:
        ValueError: if ``k`` is not between 2 and m - 1.
    """
    from sklearn.cluster import SpectralClustering

    a = _nonnegative(affinity)
    if not 2 <= k < a.shape[0]:
        raise ValueError(f"k: expected 2 <= k < number of features ({a.shape[0]}), got {k}")
    model = SpectralClustering(n_clusters=k, affinity="precomputed", random_state=seed, assign_labels="kmeans")
    return model.fit_predict(a)


def spectral_embedding_2d(affinity: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """(m, 2) spectral embedding of the same affinity, for the lobe plot."""
    from sklearn.manifold import spectral_embedding

    return spectral_embedding(_nonnegative(affinity), n_components=2, random_state=seed, drop_first=True)


def geometry_clusters(directions: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """Cluster label per feature: k-means (4 seeded starts) on unit decoder directions (m, d)."""
    from sklearn.cluster import KMeans

    x = np.asarray(directions, dtype=np.float64)
    x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x)


def ami_with_null(labels_a: np.ndarray, labels_b: np.ndarray, *, n_null: int = 200, seed: int = 0) -> dict[str, float]:
    """AMI of two labelings, and its null distribution under shuffling ``labels_b``.

    Args:
        labels_a: (m,) labels.
        labels_b: (m,) labels.
        n_null: shuffles of ``labels_b`` (``numpy.random.default_rng(seed).permutation``).
        seed: seed of the shuffles.

    Returns:
        ``ami``, ``null_mean``, ``null_sd`` (ddof 1), ``z`` ((ami - mean) / sd; NaN if sd is 0).

    Raises:
        ValueError: for labelings of different lengths or ``n_null < 2``.
    """
    from sklearn.metrics import adjusted_mutual_info_score

    a, b = np.asarray(labels_a), np.asarray(labels_b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"labels: expected two 1-d labelings of one length, got shapes {a.shape} and {b.shape}")
    if n_null < 2:
        raise ValueError(f"n_null: expected at least 2 shuffles for a standard deviation, got {n_null}")
    ami = float(adjusted_mutual_info_score(a, b))
    rng = np.random.default_rng(seed)
    null = np.array([adjusted_mutual_info_score(a, rng.permutation(b)) for _ in range(n_null)])
    mean, sd = float(null.mean()), float(null.std(ddof=1))
    return {"ami": ami, "null_mean": mean, "null_sd": sd, "z": (ami - mean) / sd if sd > 0 else math.nan}


def lobe_from_geometry(directions: np.ndarray, lobes: np.ndarray, *, folds: int = 5, seed: int = 0) -> dict[str, float]:
    """Cross-validated accuracy of predicting the lobe from the decoder direction.

    A multinomial ``LogisticRegression`` on unit directions, ``StratifiedKFold(folds,
    shuffle=True, random_state=seed)``; chance = the largest lobe's share.

    Returns:
        ``accuracy`` (mean over folds) and ``chance``.

    Raises:
        ValueError: if a lobe has fewer members than ``folds``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    y = np.asarray(lobes)
    _, sizes = np.unique(y, return_counts=True)
    if sizes.min() < folds:
        raise ValueError(
            f"lobes: every lobe needs at least {folds} features for {folds}-fold cross-validation, the "
            f"smallest has {sizes.min()}; use fewer lobes"
        )
    x = np.asarray(directions, dtype=np.float64)
    x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_score(LogisticRegression(max_iter=2000), x, y, cv=cv)
    return {"accuracy": float(scores.mean()), "chance": float(sizes.max() / sizes.sum())}


def lobe_by_source(firing: np.ndarray, block_sources: Sequence[str], lobes: np.ndarray,
                   sources: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per lobe: its size, and per source the mean fraction of that source's blocks its features fire in.

    Args:
        firing: (blocks, m') bool firing matrix of the clustered features.
        block_sources: source of each block.
        lobes: (m',) lobe labels.
        sources: the sources to report, in order.

    Returns:
        ``{"0": {"n_features": int, "prose": float, "code": float, ...}, ...}``.
    """
    f = np.asarray(firing, dtype=np.float64)
    src = np.asarray(block_sources)
    rates = {s: f[src == s].mean(axis=0) if np.any(src == s) else np.full(f.shape[1], np.nan) for s in sources}
    out: dict[str, dict[str, Any]] = {}
    for lobe in np.unique(lobes):
        members = np.asarray(lobes) == lobe
        entry: dict[str, Any] = {"n_features": int(members.sum())}
        entry.update({s: float(rates[s][members].mean()) for s in sources})
        out[str(int(lobe))] = entry
    return out
