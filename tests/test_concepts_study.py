"""The study's recipe and its controls (``analysis.concepts.study``), the supervised crystals and the
PCA baseline, each against an independent computation: written-out formulas and brute-force
counts on small cases, never the scikit-learn call the code makes."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import pytest
import torch

from gsam_monitor.analysis.concepts import (
    STUDY_SEED,
    ActivationHistogram,
    angular_similarity,
    balanced_accuracy_with_null,
    cooccurrence_counts,
    mixed_source_blocks,
    pca_explained_variance,
    shifted_phi,
    spectral_clusters,
    supervised_crystals,
    threshold_for_rate,
)
from gsam_monitor.stats import LayerStats

pytest.importorskip("sklearn")


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def test_angular_similarity_is_one_minus_the_angle_over_pi(rng):
    x = rng.standard_normal((6, 4)) * rng.uniform(0.5, 3.0, size=(6, 1))
    got = angular_similarity(x)
    for i in range(6):
        for j in range(6):
            cos = float(x[i] @ x[j]) / math.sqrt(float(x[i] @ x[i]) * float(x[j] @ x[j]))
            assert got[i, j] == pytest.approx(1.0 - math.acos(max(-1.0, min(1.0, cos))) / math.pi, abs=1e-7)
    e = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    np.testing.assert_allclose(angular_similarity(e)[0], [1.0, 0.5, 0.0], atol=1e-7)


def test_shifted_phi_is_the_phi_of_hand_counts_plus_one(rng):
    firing = rng.random((40, 5)) < np.array([0.2, 0.5, 0.8, 0.0, 1.0])  # feature 3 never fires, 4 always
    got = shifted_phi(cooccurrence_counts(firing))
    for i in range(5):
        for j in range(5):
            a, b = firing[:, i], firing[:, j]
            n11, n10 = int(np.sum(a & b)), int(np.sum(a & ~b))
            n01, n00 = int(np.sum(~a & b)), int(np.sum(~a & ~b))
            den = math.sqrt((n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00))
            phi = (n11 * n00 - n10 * n01) / den if den else 0.0
            assert got[i, j] == pytest.approx(phi + 1.0, abs=1e-12)
    assert got.min() >= 0.0 and got.max() <= 2.0 + 1e-12


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Brute force: i, j together in a exactly when together in b."""
    return bool(np.array_equal(a[:, None] == a[None, :], b[:, None] == b[None, :]))


def test_spectral_clusters_recover_planted_blocks_and_refuse_negative_similarities(rng):
    planted = np.repeat([0, 1, 2], 12)
    sim = np.where(planted[:, None] == planted[None, :], 1.0, 0.05) + 0.01 * rng.random((36, 36))
    sim = 0.5 * (sim + sim.T)
    assert _same_partition(spectral_clusters(sim, 3), planted)
    np.testing.assert_array_equal(spectral_clusters(sim, 3), spectral_clusters(sim, 3, seed=STUDY_SEED))
    with pytest.raises(ValueError, match=r"similarity: spectral clustering needs non-negative similarities, got a "
                                         r"minimum of -0\.5; shift it \(phi \+ 1"):
        spectral_clusters(sim - 0.5 - sim.min(), 3)
    with pytest.raises(ValueError, match=r"k: expected 2 <= k < number of features \(36\), got 36"):
        spectral_clusters(sim, 36)


class _Majority:
    """A stand-in classifier that always predicts the most frequent training label."""

    def __init__(self, **_: object) -> None:
        self.label = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> _Majority:
        values, counts = np.unique(y, return_counts=True)
        self.label = values[counts.argmax()]
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.full(x.shape[0], self.label)


class _FirstAxis:
    """A stand-in classifier: class 1 where the first coordinate is positive; remembers what it scored."""

    seen: ClassVar[list[np.ndarray]] = []

    def __init__(self, **_: object) -> None:
        pass

    def fit(self, x: np.ndarray, y: np.ndarray) -> _FirstAxis:
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        _FirstAxis.seen.append(x)
        return (x[:, 0] > 0).astype(int)


def test_balanced_accuracy_is_the_mean_recall_over_classes(rng, monkeypatch):
    import sklearn.linear_model

    directions = rng.standard_normal((50, 3))
    labels = np.array([0] * 40 + [1] * 10)
    # Always the majority: recall 1 for it, 0 for the other; balanced accuracy 1/2 (plain accuracy 0.8).
    monkeypatch.setattr(sklearn.linear_model, "LogisticRegression", _Majority)
    out = balanced_accuracy_with_null(directions, labels, n_null=3, seed=1)
    assert out["balanced_accuracy"] == 0.5 and out["null_mean"] == 0.5 and out["null_sd"] == 0.0
    assert math.isnan(out["z"])
    # A fixed rule: recompute each class's recall by hand on the rows it was shown.
    monkeypatch.setattr(sklearn.linear_model, "LogisticRegression", _FirstAxis)
    _FirstAxis.seen = []
    out = balanced_accuracy_with_null(directions, labels, n_null=2, seed=1)
    unit = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    test_rows = [int(np.argmin(np.linalg.norm(unit - row, axis=1))) for row in _FirstAxis.seen[0]]
    assert len(test_rows) == 10 and sorted(labels[test_rows].tolist()) == [0] * 8 + [1] * 2  # stratified 80/20
    predicted = (unit[test_rows, 0] > 0).astype(int)
    truth = labels[test_rows]
    recalls = [np.mean(predicted[truth == c] == c) for c in (0, 1)]
    assert out["balanced_accuracy"] == pytest.approx(sum(recalls) / 2, abs=1e-12)


def test_balanced_accuracy_separates_planted_lobes_from_random_directions(rng):
    centres = np.eye(8)[:3] * 4
    labels = np.repeat([0, 1, 2], 30)
    directions = centres[labels] + rng.standard_normal((90, 8))
    out = balanced_accuracy_with_null(directions, labels, n_null=4, seed=0)
    assert out["balanced_accuracy"] > 0.9
    assert abs(out["null_mean"] - 1 / 3) < 0.2 and out["z"] > 3
    with pytest.raises(ValueError, match="labels: every cluster needs at least 2 members for a stratified split"):
        balanced_accuracy_with_null(directions, np.r_[labels[:-1], 3], seed=0)
    with pytest.raises(ValueError, match="n_null: expected at least 2 random draws for a standard deviation \\(or 0"):
        balanced_accuracy_with_null(directions, labels, n_null=1)


def test_mixed_blocks_take_one_segment_of_every_source_each_once():
    sources = ["prose"] * 4 + ["code"] * 4 + ["math"] * 4
    units = 12 * 3
    seg = np.zeros((12, 3, units), dtype=np.float32)
    for b in range(12):
        for s in range(3):
            seg[b, s, b * 3 + s] = 1.0  # feature u fires only in unit u = (block, segment)
    mixed = mixed_source_blocks(seg, sources, seed=3)
    assert mixed.shape == (12, units)
    owner = np.repeat(np.array(sources), 3)  # source of each unit
    for row in mixed:
        fired = np.flatnonzero(row)
        assert sorted(owner[fired].tolist()) == ["code", "math", "prose"]
    np.testing.assert_array_equal(mixed.sum(axis=0), np.ones(units))  # every unit used exactly once
    with pytest.raises(ValueError, match=r"segment_max: expected one segment per source \(3: prose, code, math\), "
                                         r"got 2 segments"):
        mixed_source_blocks(seg[:, :2], sources)


def test_activation_histogram_and_threshold_match_a_brute_force_count(rng):
    values = torch.from_numpy(rng.exponential(2.0, size=(300, 16))) * (torch.rand(300, 16) < 0.5)
    hist = ActivationHistogram()
    for chunk in values.split(70):
        hist.update(chunk)
    flat = values.numpy().ravel()
    assert hist.n_values == int((flat > 0).sum())
    for edge in (0.0, 0.5, 1.234, 3.0, 7.77):
        i = int(np.searchsorted(hist.edges, edge))
        assert hist.above()[i] == int((flat > hist.edges[i]).sum())
    n_cells, rate = 300 * 16, 0.05
    t = threshold_for_rate(hist.edges, hist.above(), n_cells, rate)
    target = rate * n_cells
    assert (flat > t + 0.01).sum() <= target <= (flat > t - 0.01).sum()
    # Hand case: rates 1.0, 0.6, 0.2 at 0, 1, 2; 0.5 is a quarter of the way from 0.6 to 0.2.
    assert threshold_for_rate(np.array([0.0, 1.0, 2.0]), np.array([10, 6, 2]), 10, 0.5) == pytest.approx(1.25)
    assert threshold_for_rate(np.array([0.0, 1.0, 2.0]), np.array([10, 6, 2]), 10, 2.0) == 0.0
    assert threshold_for_rate(np.array([0.0, 1.0, 2.0]), np.array([10, 6, 2]), 10, 0.1) == 2.0
    with pytest.raises(ValueError, match="threshold_for_rate: expected n_cells > 0 and rate > 0"):
        threshold_for_rate(hist.edges, hist.above(), 0, rate)


def _silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Written out: s(i) = (b - a) / max(a, b), a = mean distance within i's cluster (others), b = the
    smallest mean distance to another cluster."""
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    scores = []
    for i in range(x.shape[0]):
        same = (labels == labels[i]) & (np.arange(x.shape[0]) != i)
        a = dist[i, same].mean()
        b = min(dist[i, labels == c].mean() for c in np.unique(labels) if c != labels[i])
        scores.append((b - a) / max(a, b))
    return float(np.mean(scores))


def test_supervised_crystals_score_silhouettes_in_sample_held_out_and_shuffled(rng):
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    relations = np.repeat(["capital", "gender", "plural", "tense"], 10)
    offsets = {r: rng.standard_normal(12) * 1.5 for r in np.unique(relations)}
    a = rng.standard_normal((40, 12))
    b = a + np.stack([offsets[r] for r in relations]) + 0.5 * rng.standard_normal((40, 12))
    out = supervised_crystals(a, b, relations, components=range(2, 12), folds=5, n_shuffles=4, seed=0)
    y = np.unique(relations, return_inverse=True)[1]
    assert out["n_relations"] == 4 and out["components"] == [2, 3]  # at most C - 1
    assert out["before"] == pytest.approx(_silhouette(b - a, y), abs=1e-9)
    projected = LinearDiscriminantAnalysis(n_components=3).fit_transform(b - a, y)
    assert out["in_sample"]["3"] == pytest.approx(_silhouette(projected, y), abs=1e-9)
    assert out["in_sample"]["3"] > 0.5 and out["heldout"]["3"]["mean"] > 0.3
    assert out["heldout_shuffled"]["3"]["mean"] < 0.1 < out["heldout"]["3"]["mean"]
    assert out["in_sample_shuffled"]["3"]["mean"] < out["in_sample"]["3"]
    with pytest.raises(ValueError, match="relations: expected at least 3 relations"):
        supervised_crystals(a[:20], b[:20], relations[:20])
    with pytest.raises(ValueError, match="relations: every relation needs at least 12 pairs for 12-fold"):
        supervised_crystals(a, b, relations, folds=12)


def test_pca_explained_variance_from_moments_equals_numpy_svd(rng):
    mix = rng.standard_normal((10, 10)) * np.linspace(3, 0.1, 10)[:, None]
    train = rng.standard_normal((400, 10)) @ mix + 2.0
    test = rng.standard_normal((150, 10)) @ mix + 2.3  # a shifted mean too
    mu = train.mean(axis=0)
    _, _, vt = np.linalg.svd(train - mu, full_matrices=False)
    stats = {}
    for name, rows in (("train", train), ("test", test)):
        stats[name] = LayerStats(10, higher_moments=False)
        stats[name].update(torch.from_numpy(rows))
    for k in (1, 3, 10):
        p = vt[:k]
        recon = mu + (test - mu) @ p.T @ p
        expected = 1 - ((test - recon) ** 2).sum() / ((test - test.mean(axis=0)) ** 2).sum()
        assert pca_explained_variance(stats["train"], stats["test"], k) == pytest.approx(expected, abs=1e-9)
    with pytest.raises(ValueError, match=r"n_components: expected 1..10 principal components, got 11"):
        pca_explained_variance(stats["train"], stats["test"], 11)
