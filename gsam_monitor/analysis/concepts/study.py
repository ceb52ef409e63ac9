"""The study's own lobe recipe, and the controls that tell its readings apart.

The "Geometry of Concepts" code (``ejmichaud/feature-geometry``, ``brain/``) clusters an SAE's
features twice and compares the two labelings:

- co-occurrence lobes: ``SpectralClustering(affinity="precomputed", assign_labels="kmeans",
  random_state=42)`` on the phi coefficient shifted by one, phi + 1 in [0, 2] (``shifted_phi``;
  the library's own recipe clips negative phi to 0 instead);
- geometry clusters: the same spectral clustering on the angular similarity of the unit decoder
  directions, 1 - arccos(cos(u_i, u_j)) / pi in [0, 1] (``angular_similarity``);
- agreement: adjusted mutual information (``lobes.ami_with_null``), and the balanced test
  accuracy of a logistic regression that predicts the lobe from the decoder direction on an
  80/20 split, against the same classifier on random unit vectors
  (``balanced_accuracy_with_null``).

The controls:

- ``mixed_source_blocks``: blocks rebuilt from thirds of blocks of different sources, so that
  every block holds every source: lobes that are only the sources cannot form there;
- ``ActivationHistogram`` and ``threshold_for_rate``: the firing threshold at which
  activations above it are as frequent, per token and feature, as in the study's SAE
  (``STUDY_ACTIVATION_RATE``), which is what sets the fraction of (feature, block) cells
  that fire.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .cooccurrence import CooccurrenceCounts, affinity

__all__ = [
    "STUDY_ACTIVATION_RATE",
    "STUDY_SEED",
    "ActivationHistogram",
    "angular_similarity",
    "balanced_accuracy_with_null",
    "mixed_source_blocks",
    "shifted_phi",
    "spectral_clusters",
    "threshold_for_rate",
]

#: ``random_state`` of every spectral clustering in the study's code.
STUDY_SEED = 42

#: Activations per token per feature of the study's SAE: Gemma Scope's layer-12 residual SAE of
#: 16,384 features with average L0 41 (its threshold of 1 removes few of them): 41 / 16,384.
STUDY_ACTIVATION_RATE = 41 / 16_384


def shifted_phi(counts: CooccurrenceCounts) -> np.ndarray:
    """The study's co-occurrence affinity: the (m, m) phi coefficient plus one, in [0, 2]."""
    return affinity(counts, "phi") + 1.0


def _unit_rows(directions: np.ndarray) -> np.ndarray:
    x = np.asarray(directions, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"directions: expected an (m, d) array, got shape {x.shape}")
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def angular_similarity(directions: np.ndarray) -> np.ndarray:
    """(m, m) angular similarity 1 - arccos(cos) / pi of the rows of ``directions`` (m, d).

    1 for parallel rows, 1/2 for orthogonal ones, 0 for opposite ones; the cosine is clipped to
    [-1, 1] against rounding.
    """
    u = _unit_rows(directions)
    return 1.0 - np.arccos(np.clip(u @ u.T, -1.0, 1.0)) / math.pi


def spectral_clusters(similarity: np.ndarray, k: int, *, seed: int = STUDY_SEED) -> np.ndarray:
    """The study's clustering: ``SpectralClustering(k, affinity="precomputed", assign_labels="kmeans")``.

    Args:
        similarity: (m, m) symmetric, non-negative similarity (``shifted_phi``,
            ``angular_similarity``).
        k: number of clusters.
        seed: ``random_state`` (the study's 42).

    Returns:
        (m,) int labels.

    Raises:
        ValueError: a negative similarity, or ``k`` not between 2 and m - 1.
    """
    from sklearn.cluster import SpectralClustering

    a = np.asarray(similarity, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"similarity: expected a square (m, m) matrix, got shape {a.shape}")
    if a.size and a.min() < 0:
        raise ValueError(f"similarity: spectral clustering needs non-negative similarities, got a minimum of "
                         f"{a.min():.3g}; shift it (phi + 1, shifted_phi) or use angular_similarity")
    if not 2 <= k < a.shape[0]:
        raise ValueError(f"k: expected 2 <= k < number of features ({a.shape[0]}), got {k}")
    model = SpectralClustering(n_clusters=k, affinity="precomputed", assign_labels="kmeans", random_state=seed)
    return model.fit_predict(a)


def balanced_accuracy_with_null(directions: np.ndarray, labels: np.ndarray, *, test_size: float = 0.2,
                                n_null: int = 10, seed: int = 0) -> dict[str, float]:
    """Balanced test accuracy of predicting ``labels`` from unit ``directions``, against random directions.

    A ``LogisticRegression(max_iter=2000)`` on a stratified ``train_test_split`` (80/20 by
    default, ``random_state=seed``), scored by ``balanced_accuracy_score`` (the mean over
    classes of each class's recall). The null replaces the directions by ``n_null`` draws of
    random unit vectors of the same shape (Gaussian rows, normalised; seeded), with the same
    labels and split; ``n_null=0`` skips it (NaN).

    Returns:
        ``balanced_accuracy``, ``null_mean``, ``null_sd`` (ddof 1), ``z``.

    Raises:
        ValueError: ``n_null`` of 1 or negative, a test size outside (0, 1), or a class with fewer than 2
            members (a stratified split needs 2).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import train_test_split

    x = _unit_rows(directions)
    y = np.asarray(labels)
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels: expected one label per direction ({x.shape[0]}), got shape {y.shape}")
    if n_null < 2 and n_null != 0:
        raise ValueError(f"n_null: expected at least 2 random draws for a standard deviation (or 0 for none), got "
                         f"{n_null}")
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size: expected a fraction in (0, 1), got {test_size}; e.g. 0.2")
    _, sizes = np.unique(y, return_counts=True)
    if sizes.min() < 2:
        raise ValueError(f"labels: every cluster needs at least 2 members for a stratified split, the smallest has "
                         f"{sizes.min()}; use fewer clusters")
    train, test = train_test_split(np.arange(y.size), test_size=test_size, random_state=seed, stratify=y)

    def score(features: np.ndarray) -> float:
        model = LogisticRegression(max_iter=2000).fit(features[train], y[train])
        return float(balanced_accuracy_score(y[test], model.predict(features[test])))

    observed = score(x)
    if n_null == 0:
        return {"balanced_accuracy": observed, "null_mean": math.nan, "null_sd": math.nan, "z": math.nan}
    rng = np.random.default_rng(seed)
    null = np.array([score(_unit_rows(rng.standard_normal(x.shape))) for _ in range(n_null)])
    mean, sd = float(null.mean()), float(null.std(ddof=1))
    return {"balanced_accuracy": observed, "null_mean": mean, "null_sd": sd,
            "z": (observed - mean) / sd if sd > 0 else math.nan}


def mixed_source_blocks(segment_max: np.ndarray, block_sources: Sequence[str], *, seed: int = 0) -> np.ndarray:
    """Blocks that mix the sources: each takes one segment from a block of every source.

    Args:
        segment_max: (blocks, S, m) largest activation of each feature in each of a block's S
            consecutive segments; S must equal the number of sources.
        block_sources: source of each block.
        seed: seed of the shuffles that pair the segments.

    Returns:
        (n, m) largest activation of each feature in each mixed block, n = the fewest
        segments of one source (every segment of that source used once). Segment i of each
        source's shuffled list of (block, segment) pairs goes into mixed block i.

    Raises:
        ValueError: a shape that does not match, or S different from the number of sources.
    """
    seg = np.asarray(segment_max)
    src = np.asarray(block_sources)
    if seg.ndim != 3 or src.shape != (seg.shape[0],):
        raise ValueError(f"segment_max: expected (blocks, segments, m) with one source per block, got shape "
                         f"{seg.shape} and {src.shape[0] if src.ndim else 0} sources")
    names = list(dict.fromkeys(src.tolist()))
    if len(names) != seg.shape[1]:
        raise ValueError(f"segment_max: expected one segment per source ({len(names)}: {', '.join(names)}), got "
                         f"{seg.shape[1]} segments per block")
    rng = np.random.default_rng(seed)
    units = []
    for name in names:
        rows = seg[src == name].reshape(-1, seg.shape[2])  # (blocks of the source * S, m)
        units.append(rows[rng.permutation(rows.shape[0])])
    n = min(u.shape[0] for u in units)
    return np.max(np.stack([u[:n] for u in units]), axis=0)


class ActivationHistogram:
    """Streamed counts of positive activation values above each threshold of a grid.

    Args:
        edges: increasing thresholds (default 0, 0.01, ..., 50).

    Example::

        hist = ActivationHistogram()
        hist.update(values)                         # any tensor of activations; zeros ignored
        above = hist.above()                        # (len(edges),) values > each edge
    """

    def __init__(self, edges: np.ndarray | None = None) -> None:
        grid = np.round(np.arange(0, 5001) * 0.01, 2) if edges is None else np.asarray(edges, dtype=np.float64)
        if grid.ndim != 1 or grid.size < 2 or np.any(np.diff(grid) <= 0):
            raise ValueError("edges: expected an increasing 1-d grid of at least 2 thresholds")
        self.edges = grid
        self._edges = torch.from_numpy(grid)
        self._counts = torch.zeros(grid.size + 1, dtype=torch.int64)
        self.n_values = 0

    def update(self, values: torch.Tensor) -> None:
        """Count the positive entries of ``values``."""
        v = values.detach().reshape(-1)
        v = v[v > 0].double().cpu()
        # bucketize(right=False): bucket j holds edges[j-1] < v <= edges[j].
        self._counts += torch.bincount(torch.bucketize(v, self._edges), minlength=self._counts.numel())
        self.n_values += int(v.numel())

    def above(self) -> np.ndarray:
        """(len(edges),) number of counted values strictly above each edge."""
        counts = self._counts.numpy()
        return np.cumsum(counts[::-1])[::-1][1:].astype(np.int64)


def threshold_for_rate(edges: np.ndarray, above: np.ndarray, n_cells: int, rate: float) -> float:
    """The threshold at which ``above / n_cells`` (activations above it per cell) falls to ``rate``.

    Linear interpolation between the two grid edges around the crossing.

    Args:
        edges: increasing thresholds.
        above: values above each edge (``ActivationHistogram.above``).
        n_cells: token x feature cells the values came from.
        rate: the target activations per cell (``STUDY_ACTIVATION_RATE``).

    Returns:
        The threshold; ``edges[0]`` if even that gives a lower rate, ``edges[-1]`` if no edge
        does.

    Raises:
        ValueError: a non-positive ``n_cells`` or ``rate``, or shapes that differ.
    """
    e = np.asarray(edges, dtype=np.float64)
    r = np.asarray(above, dtype=np.float64) / n_cells if n_cells > 0 else None
    if r is None or rate <= 0:
        raise ValueError(f"threshold_for_rate: expected n_cells > 0 and rate > 0, got {n_cells} and {rate}")
    if r.shape != e.shape:
        raise ValueError(f"threshold_for_rate: expected one count per edge ({e.size}), got {r.size}")
    if r[0] <= rate:
        return float(e[0])
    below = np.flatnonzero(r <= rate)
    if not below.size:
        return float(e[-1])
    j = int(below[0])
    # r falls from r[j-1] > rate to r[j] <= rate between e[j-1] and e[j].
    frac = (r[j - 1] - rate) / (r[j - 1] - r[j])
    return float(e[j - 1] + frac * (e[j] - e[j - 1]))
