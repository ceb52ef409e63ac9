"""Covariance spectrum and class geometry: power law, LDA separation, cosine contrasts.

Three analyses of "The Geometry of Concepts" and "Beyond Gaussian" studies, all on
quantities the monitor already has or on a small set of vectors:

- ``powerlaw_fit``: the covariance eigenvalues decay as a power law,
  lambda_k ~ k^-alpha, over a middle range of ranks; alpha is the slope of log lambda_k
  against log k, with a 95% confidence interval (the ``powerlaw_alpha`` metric,
  ``gsam_monitor.metrics.powerlaw_alpha``, is the same slope without the interval).
- ``class_separation``: linear discriminant analysis (Fisher's criterion) from
  per-class streaming moments (count, mean, MLE covariance of a ``LayerStats`` each), so no
  activation has to be stored.
- ``group_cosine_contrast``: how much more similar (cosine) vectors of the same group
  are than vectors of different groups, for one or two groupings (e.g. subject and
  attribute of a sentence).

References:
    R. A. Fisher, "The use of multiple measurements in taxonomic problems", 1936;
    Hastie, Tibshirani, Friedman, The Elements of Statistical Learning, 2nd ed., §4.3.3
    (reduced-rank LDA as the generalized eigenproblem S_B v = lambda S_W v).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import scipy.linalg
import torch
from scipy import stats

from gsam_monitor.metrics.linalg import rank_tolerance
from gsam_monitor.metrics.scores import POWERLAW_RANGE

__all__ = [
    "class_separation",
    "group_cosine_contrast",
    "powerlaw_fit",
]

logger = logging.getLogger(__name__)


class ClassMoments(Protocol):
    """What ``class_separation`` reads from each class (``LayerStats`` satisfies it)."""

    @property
    def count(self) -> Any: ...  # weighted row count (0-dim tensor or number)

    @property
    def mean(self) -> Any: ...  # (d,)

    def covariance(self, ddof: int = 0) -> Any: ...  # (d, d)


# --------------------------------------------------------------------------- power law


def powerlaw_fit(
    eigenvalues: np.ndarray | Sequence[float] | torch.Tensor,
    rank_range: tuple[int, int] = POWERLAW_RANGE,
) -> dict[str, float]:
    """Power-law exponent of an eigenvalue spectrum, lambda_k ~ k^-alpha.

    The eigenvalues are sorted descending and ranked k = 1, 2, ...; the least-squares line
    of log(lambda_k) against log(k) over ``rank_range[0] <= k <= rank_range[1]``
    (inclusive, clipped to the number of positive eigenvalues) has slope -alpha
    (``scipy.stats.linregress``). The 95% interval is alpha ± t_{0.975, n-2} * stderr.

    Args:
        eigenvalues: 1-d eigenvalues, any order (e.g. ``metrics.eigenvalues(stats)``);
            zeros and negative rounding noise are ignored.
        rank_range: (first, last) 1-based rank of the fitted range.

    Returns:
        Dict with ``alpha``, ``ci_low``, ``ci_high``, ``r2`` (squared correlation of the
        log-log points) and ``n_points`` (ranks used). With fewer than 3 points in the
        range every value but ``n_points`` is NaN.

    Raises:
        ValueError: if ``rank_range`` is not 1 <= first < last, or eigenvalues are
            non-finite or not 1-d.
    """
    if (
        not isinstance(rank_range, (tuple, list))
        or len(rank_range) != 2
        or not all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) for r in rank_range)
        or not 1 <= rank_range[0] < rank_range[1]
    ):
        raise ValueError(
            f"rank_range must be (first, last) 1-based ints with 1 <= first < last, got {rank_range!r}; e.g. (10, 150)."
        )
    lam = _as_array(eigenvalues, "eigenvalues")
    if lam.ndim != 1:
        raise ValueError(
            f"eigenvalues must be 1-d, got shape {lam.shape}; pass the spectrum, not the "
            f"covariance matrix (np.linalg.eigvalsh(cov))."
        )
    if not np.all(np.isfinite(lam)):
        raise ValueError("eigenvalues contain NaN or inf; compute them from a finite matrix.")
    lam = np.sort(lam)[::-1]
    n_positive = int(np.count_nonzero(lam > 0))
    first, last = int(rank_range[0]), min(int(rank_range[1]), n_positive)
    ranks = np.arange(first, last + 1)
    n_points = int(ranks.size)
    if n_points < 3:
        return {
            "alpha": math.nan,
            "ci_low": math.nan,
            "ci_high": math.nan,
            "r2": math.nan,
            "n_points": n_points,
        }
    fit = stats.linregress(np.log(ranks), np.log(lam[ranks - 1]))
    alpha = -float(fit.slope)
    half = float(stats.t.ppf(0.975, n_points - 2) * fit.stderr)
    return {
        "alpha": alpha,
        "ci_low": alpha - half,
        "ci_high": alpha + half,
        "r2": float(fit.rvalue**2),
        "n_points": n_points,
    }


# --------------------------------------------------------------------------- LDA


def class_separation(
    stats_by_class: Mapping[Any, ClassMoments] | Sequence[ClassMoments],
    *,
    rtol: float | None = None,
) -> dict[str, Any]:
    """LDA class separation from per-class streaming moments.

    With class fractions p_c = n_c / n, overall mean mu = sum_c p_c mu_c,

        S_B = sum_c p_c (mu_c - mu)(mu_c - mu)^T,   S_W = sum_c p_c Sigma_c (MLE),

    the separation is the generalized eigenproblem S_B v = lambda S_W v: lambda is the ratio
    of between-class to within-class variance along v; the largest is Fisher's criterion.

    S_W is singular for post-LayerNorm activations (they lie on a hyperplane: rank d-1) and
    whenever a class has fewer rows than dimensions. The problem is then solved on the
    support of S_W (no ridge): the eigenvectors of S_W with eigenvalue above the monitor's
    rank tolerance (``metrics.rank_tolerance``, scipy's rule: ``1e6 * eps(fp64) * max`` ~
    2.2e-10 relative when every class's Gram products were fp64, ``1e3 * eps(fp32) * max``
    ~ 1.2e-4 when any were fp32, as on GPU; objects without ``product_dtype`` count as
    fp64) span it, so ``rank`` here equals the ``rank`` metric of the pooled within-class
    scatter, and ``scipy.linalg.eigh(U^T S_B U, U^T S_W U)`` is
    solved there. For LayerNorm outputs the class means lie in the same hyperplane, so
    nothing is lost; in general, between-class variance outside the support (directions
    with zero within-class variance, i.e. infinite separation) is dropped and reported as
    ``between_outside_support``.

    Args:
        stats_by_class: per-class moments, a dict label -> ``LayerStats`` or a sequence of
            them; anything with ``.count``, ``.mean`` and ``.covariance(ddof=0)`` works.
            Classes with count 0 are ignored.
        rtol: relative eigenvalue threshold of the support of S_W, overriding the rule
            above.

    Returns:
        Dict with ``fisher_ratio`` (largest lambda), ``eigenvalues`` (the top
        min(C - 1, rank) lambdas, descending, as a list), ``directions`` (numpy (d, k)
        array of the matching LDA directions, unit Euclidean norm, sign fixed so the
        largest-magnitude entry is positive), ``labels`` (the classes used, in order),
        ``class_fractions``, ``rank`` (of S_W), ``between_outside_support`` (fraction of
        tr S_B outside the support of S_W; 0 when all of it is inside), ``n`` and ``d``.

    Raises:
        ValueError: with fewer than 2 non-empty classes, mismatched dimensions, non-finite
            moments, a zero within-class covariance, or a bad ``rtol``.
    """
    if rtol is not None and not (isinstance(rtol, (int, float)) and 0 < rtol < 1):
        raise ValueError(f"rtol must be in (0, 1) or None, got {rtol!r}; e.g. 1e-10.")
    if isinstance(stats_by_class, Mapping):
        items = list(stats_by_class.items())
    else:
        items = list(enumerate(stats_by_class))
    labels, counts, means, covs = [], [], [], []
    dim = None
    product_dtype = torch.float64
    for label, moments in items:
        count = float(_as_array(moments.count, "count"))
        if count <= 0:
            continue
        mean = _as_array(moments.mean, "mean").reshape(-1)
        cov = _as_array(moments.covariance(ddof=0), "covariance")
        if dim is None:
            dim = mean.size
        if mean.size != dim or cov.shape != (dim, dim):
            raise ValueError(
                f"class {label!r} has mean of size {mean.size} and covariance "
                f"{cov.shape}, expected ({dim},) and ({dim}, {dim}) like the first class; "
                f"use the stats of one layer for every class."
            )
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(cov))):
            raise ValueError(f"class {label!r} has non-finite mean or covariance; check the activations.")
        # LayerStats with product_dtype None ("native") may have fp32 products: as metrics.
        class_dtype = getattr(moments, "product_dtype", torch.float64) or torch.float32
        if class_dtype != torch.float64:
            product_dtype = torch.float32
        labels.append(label)
        counts.append(count)
        means.append(mean)
        covs.append(cov)
    if len(labels) < 2:
        raise ValueError(
            f"class_separation needs at least 2 classes with count > 0, got {len(labels)} "
            f"of {len(items)}; feed each class's rows to its own LayerStats."
        )
    n = float(sum(counts))
    p = np.asarray(counts) / n
    mu_c = np.stack(means)  # (C, d)
    mu = p @ mu_c
    diff = mu_c - mu
    s_between = (diff.T * p) @ diff
    s_within = np.einsum("c,cij->ij", p, np.stack(covs))
    s_within = 0.5 * (s_within + s_within.T)

    w, u = np.linalg.eigh(s_within)
    if not w[-1] > 0:
        raise ValueError(
            "the within-class covariance is zero (every class is a point mass); the separation is undefined."
        )
    support = w > rank_tolerance(torch.from_numpy(w), product_dtype, rtol)
    u_r = u[:, support]  # (d, r)
    reduced_between = u_r.T @ s_between @ u_r
    reduced_between = 0.5 * (reduced_between + reduced_between.T)
    trace_between = float(np.trace(s_between))
    outside = max(0.0, 1.0 - float(np.trace(reduced_between)) / trace_between) if trace_between > 0 else 0.0
    if outside > 1e-6:
        logger.warning(
            "class_separation: %.3g of the between-class variance lies outside the support "
            "of the within-class covariance (infinite separation there); it is ignored.",
            outside,
        )
    lam, v_r = scipy.linalg.eigh(reduced_between, np.diag(w[support]))
    order = np.argsort(lam)[::-1]
    k = min(len(labels) - 1, int(support.sum()))
    lam = np.clip(lam[order][:k], 0.0, None)  # S_B is PSD: negatives are rounding
    directions = u_r @ v_r[:, order][:, :k]
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)
    pivot = np.argmax(np.abs(directions), axis=0)
    directions *= np.sign(directions[pivot, np.arange(k)])
    return {
        "fisher_ratio": float(lam[0]),
        "eigenvalues": [float(v) for v in lam],
        "directions": directions,
        "labels": labels,
        "class_fractions": [float(v) for v in p],
        "rank": int(support.sum()),
        "between_outside_support": outside,
        "n": n,
        "d": int(dim),
    }


# --------------------------------------------------------------------------- cosine


def group_cosine_contrast(
    vectors: np.ndarray | torch.Tensor,
    labels_a: Sequence[Any] | np.ndarray,
    labels_b: Sequence[Any] | np.ndarray | None = None,
    pca_variance: float | None = None,
) -> dict[str, Any]:
    """Within-group minus between-group mean cosine similarity, for one or two groupings.

    The "Beyond Gaussian" subject/attribute differential: with sentences labelled by
    subject (``labels_a``) and by attribute (``labels_b``), ``contrast_a`` says how much
    closer (in cosine) representations of the same subject are than of different
    subjects, and ``difference = contrast_a - contrast_b`` whether the representation is
    organised more by subject than by attribute.

    For every unordered pair i < j of vectors, s_ij = cos(x_i, x_j). ``within`` is the mean
    of s_ij over pairs with the same label, ``between`` over pairs with different labels,
    ``contrast = within - between``. Computed in O(n d) from group sums of unit vectors
    (sum_{i<j in G} s_ij = (|sum_G u_i|^2 - |G|) / 2), never forming the n x n matrix.

    With ``pca_variance`` the vectors are first centred and projected on the fewest
    principal components (numpy SVD) whose cumulative explained variance reaches
    ``pca_variance`` (like ``sklearn.decomposition.PCA(n_components=0.9)``); cosines are
    then between the centred PCA scores. Without it, cosines are between the raw vectors.

    Args:
        vectors: (n, d) vectors, one per item (e.g. a sentence's mean hidden state).
        labels_a: n labels of the first grouping.
        labels_b: n labels of a second grouping, or None.
        pca_variance: fraction of variance in (0, 1] to keep, or None for no PCA.

    Returns:
        Dict with ``a`` (and ``b`` when ``labels_b`` is given): each {``within``,
        ``between``, ``contrast``, ``n_within_pairs``, ``n_between_pairs``,
        ``n_groups``}; ``difference`` (contrast_a - contrast_b, only with ``labels_b``);
        ``n``; ``n_components`` (dimensions the cosines were taken in) and
        ``explained_variance`` (kept fraction; 1.0 without PCA).

    Raises:
        ValueError: on a non-2-d or non-finite ``vectors``, fewer than 3 vectors, a zero
            vector, label lengths that differ from n, a grouping without both a within and
            a between pair, or ``pca_variance`` outside (0, 1].
    """
    x = _as_array(vectors, "vectors")
    if x.ndim != 2 or x.shape[0] < 3 or x.shape[1] < 1:
        raise ValueError(f"vectors must be (n, d) with n >= 3, got shape {x.shape}; stack one vector per item.")
    if not np.all(np.isfinite(x)):
        raise ValueError("vectors contain NaN or inf; drop those items first.")
    if pca_variance is not None and not (isinstance(pca_variance, (int, float)) and 0 < pca_variance <= 1):
        raise ValueError(f"pca_variance must be a fraction in (0, 1] or None, got {pca_variance!r}; e.g. 0.9.")
    n = x.shape[0]
    explained = 1.0
    if pca_variance is not None:
        centred = x - x.mean(axis=0)
        _, sing, vt = np.linalg.svd(centred, full_matrices=False)
        var = sing**2
        if not var.sum() > 0:
            raise ValueError("vectors are all identical; PCA has no variance to keep.")
        ratio = np.cumsum(var) / var.sum()
        # Fewest components explaining more than pca_variance, as sklearn's PCA chooses.
        m = min(int(np.searchsorted(ratio, pca_variance, side="right")) + 1, var.size)
        x = centred @ vt[:m].T
        explained = float(ratio[m - 1])
    norms = np.linalg.norm(x, axis=1)
    if not np.all(norms > 0):
        bad = np.flatnonzero(~(norms > 0))[:5].tolist()
        raise ValueError(
            f"vectors {bad} have zero norm (after PCA centring, if used); cosine "
            f"similarity is undefined for them; drop them."
        )
    unit = x / norms[:, None]
    total_sum = 0.5 * (float(np.sum(unit.sum(axis=0) ** 2)) - n)
    total_pairs = n * (n - 1) // 2

    def contrast(labels: Any, name: str) -> dict[str, float]:
        lab = np.asarray(labels, dtype=object).reshape(-1)
        if lab.size != n:
            raise ValueError(f"{name} has {lab.size} labels but vectors has {n} rows; give one label per vector.")
        groups: dict[Any, list[int]] = {}
        for i, g in enumerate(lab.tolist()):
            groups.setdefault(g, []).append(i)
        within_sum, within_pairs = 0.0, 0
        for idx in groups.values():
            s = unit[idx].sum(axis=0)
            within_sum += 0.5 * (float(s @ s) - len(idx))
            within_pairs += len(idx) * (len(idx) - 1) // 2
        between_pairs = total_pairs - within_pairs
        if within_pairs == 0 or between_pairs == 0:
            raise ValueError(
                f"{name} must have a group with 2+ members and at least 2 groups, got "
                f"{len(groups)} groups of sizes {sorted(len(v) for v in groups.values())}."
            )
        within = within_sum / within_pairs
        between = (total_sum - within_sum) / between_pairs
        return {
            "within": within,
            "between": between,
            "contrast": within - between,
            "n_within_pairs": within_pairs,
            "n_between_pairs": between_pairs,
            "n_groups": len(groups),
        }

    out: dict[str, Any] = {"a": contrast(labels_a, "labels_a")}
    if labels_b is not None:
        out["b"] = contrast(labels_b, "labels_b")
        out["difference"] = out["a"]["contrast"] - out["b"]["contrast"]
    out.update(n=n, n_components=int(x.shape[1]), explained_variance=explained)
    return out


# --------------------------------------------------------------------------- helpers


def _as_array(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a tensor or an array of numbers, got {type(value).__name__}.") from None
