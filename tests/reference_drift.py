"""Independent fp64 numpy/scipy/scikit-learn distances between the Gaussians of two sets of
rows (nothing here imports gsam_monitor): the textbook formulas on the whole data matrices."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
from sklearn.covariance import oas

from tests.reference import mle_cov


def w2sq_sqrtm(a: np.ndarray, b: np.ndarray) -> float:
    """Squared Bures–Wasserstein distance between the MLE Gaussians of rows ``a`` and ``b``,
    with ``scipy.linalg.sqrtm``: |μa - μb|² + tr Sa + tr Sb - 2 tr (Sb^½ Sa Sb^½)^½."""
    s1, s2 = mle_cov(b), mle_cov(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm warns on singular matrices
        root = scipy.linalg.sqrtm(s1)
        cross = scipy.linalg.sqrtm(root @ s2 @ root)
    dm = a.mean(0) - b.mean(0)
    return float(dm @ dm + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross).real)


def w2sq_eig(a: np.ndarray, b: np.ndarray) -> float:
    """The same another way: the fidelity term is Σ sqrt(eig(Sb Sa)) (real, non-negative)."""
    s1, s2 = mle_cov(b), mle_cov(a)
    ev = np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)
    dm = a.mean(0) - b.mean(0)
    return float(dm @ dm + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum())


def kl_oas(a: np.ndarray, b: np.ndarray) -> float:
    """KL(N(mean a, OAS(a)) || N(mean b, OAS(b))) with scikit-learn's OAS, written out."""
    sa, sb = oas(a)[0], oas(b)[0]
    d = a.shape[1]
    dm = a.mean(0) - b.mean(0)
    inv_b = np.linalg.inv(sb)
    _, logdet_a = np.linalg.slogdet(sa)
    _, logdet_b = np.linalg.slogdet(sb)
    return 0.5 * float(np.trace(inv_b @ sa) + dm @ inv_b @ dm - d + logdet_b - logdet_a)


def drift_reference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """``drift_w2``, ``drift_w2_relative`` and ``drift_kl_oas`` of rows ``a`` against rows ``b``."""
    w2sq = max(w2sq_eig(a, b), 0.0)
    total = float(np.trace(mle_cov(a)) + np.trace(mle_cov(b)))
    return {"drift_w2": w2sq**0.5, "drift_w2_relative": w2sq / total, "drift_kl_oas": kl_oas(a, b)}
