"""Independent fp64 numpy/scipy two-pass computations that the library is tested against.

Nothing here imports gsam_monitor: these are the textbook formulas on the whole data matrix.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.stats


def mle_cov(x: np.ndarray) -> np.ndarray:
    return np.cov(x, rowvar=False, ddof=0)


def scipy_rank_tol(evals: np.ndarray) -> float:
    # scipy.stats._multivariate._eigvalsh_to_eps for float64 spectra.
    return 1e6 * np.finfo(np.float64).eps * np.max(np.abs(evals))


def gsam_scipy(x: np.ndarray) -> tuple[float, int]:
    """log N + mean logpdf under the MLE Gaussian, via scipy (allow_singular=True)."""
    n = x.shape[0]
    cov = mle_cov(x)
    mvn = scipy.stats.multivariate_normal(x.mean(0), cov, allow_singular=True)
    logp = mvn.logpdf(x)
    return math.log(n) + float(np.mean(logp)), int(
        np.linalg.matrix_rank(cov, tol=scipy_rank_tol(np.linalg.eigvalsh(cov)))
    )


def gsam_pdet(x: np.ndarray) -> tuple[float, int]:
    """The same on the support with numpy's eigh and the pseudo-determinant, written out
    (scipy's logpdf returns -inf for rows a hair off a singular support)."""
    n, _ = x.shape
    cov = mle_cov(x)
    lam, v = np.linalg.eigh(cov)
    keep = lam > scipy_rank_tol(lam)
    r = int(keep.sum())
    z = (x - x.mean(0)) @ v[:, keep]
    maha = np.sum(z * z / lam[keep], axis=1)
    logp = -0.5 * (r * math.log(2 * math.pi) + np.sum(np.log(lam[keep])) + maha)
    return math.log(n) + float(np.mean(logp)), r
