"""The original benchmark code's score of sentence vectors: z-score, ``np.cov``, ridge retries.

The pure scoring function of the ``paper`` protocol (``gsam_monitor.eval.protocols``): no
model, no corpus; ``paper_fit`` returns the score with the retries and ridge it needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["PAPER_EPS", "PAPER_EPS_GROWTH", "PAPER_MAX_RETRIES", "PaperFit", "paper_fit", "paper_score"]

#: First ridge of the original code's Cholesky retry loop, its growth and its retry limit.
PAPER_EPS = 1e-6
PAPER_EPS_GROWTH = 10.0
PAPER_MAX_RETRIES = 10


@dataclass(frozen=True)
class PaperFit:
    """The paper protocol's score and how it was reached.

    Attributes:
        score: mean log p (plus log N when asked).
        retries: Cholesky retries needed (each adds a ridge).
        ridge: total eps added to the diagonal.
        n: number of vectors.
        d: their dimension.
    """

    score: float
    retries: int
    ridge: float
    n: int
    d: int


def paper_fit(vectors: np.ndarray, with_log_n: bool = False) -> PaperFit:
    """Score sentence vectors exactly as the original benchmark code did.

    z-score per dimension (ddof 0, zero-variance dimensions left unscaled); ``np.cov``
    (ddof 1); Cholesky, adding eps·I on failure with eps = 1e-6 ×10 per retry, accumulating,
    up to 10 retries; mean log-density of the z-scored vectors under N(mean, cov) with
    ``torch.distributions.MultivariateNormal`` on the Cholesky factor that succeeded (the
    same density as ``scipy.stats.multivariate_normal(mean, cov).logpdf``, at the cost of
    one Cholesky instead of an eigendecomposition).

    Args:
        vectors: (N, d) array, one row per sentence.
        with_log_n: add log N (the report's formula; the original code omitted it).

    Returns:
        The ``PaperFit``.

    Raises:
        ValueError: if ``vectors`` is not a 2-D array of at least 2 finite rows.
        numpy.linalg.LinAlgError: if Cholesky still fails after 10 retries.
    """
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(
            f"vectors: expected a 2-D array (N sentences, d) with N >= 2, got shape {x.shape}"
        )
    if not np.isfinite(x).all():
        raise ValueError(
            "vectors: expected finite values, got NaN or Inf (run the model in float32: "
            "--dtype float32)"
        )
    n, d = x.shape
    sd = x.std(axis=0)
    sd[sd == 0] = 1.0
    z = (x - x.mean(axis=0)) / sd
    cov = np.cov(z, rowvar=False)
    eps, ridge, retries = PAPER_EPS, 0.0, 0
    while True:
        factor, info = torch.linalg.cholesky_ex(torch.from_numpy(cov))
        if int(info) == 0:
            break
        if retries == PAPER_MAX_RETRIES:
            raise np.linalg.LinAlgError(
                f"paper protocol: the covariance is not positive definite even after "
                f"{PAPER_MAX_RETRIES} ridge retries (total ridge {ridge:g}); the vectors are "
                f"degenerate"
            )
        cov = cov + eps * np.eye(d)
        ridge += eps
        eps *= PAPER_EPS_GROWTH
        retries += 1
    gaussian = torch.distributions.MultivariateNormal(
        torch.from_numpy(z.mean(axis=0)), scale_tril=factor, validate_args=False
    )
    score = float(gaussian.log_prob(torch.from_numpy(z)).mean())
    if with_log_n:
        score += math.log(n)
    return PaperFit(score=score, retries=retries, ridge=ridge, n=n, d=d)


def paper_score(vectors: np.ndarray, with_log_n: bool = False) -> float:
    """The original benchmark code's score of sentence vectors (see ``paper_fit``).

    Args:
        vectors: (N, d) array, one row per sentence.
        with_log_n: add log N, which the original code omitted.

    Returns:
        Mean log p of the z-scored vectors under the ridge-regularised Gaussian fit.
    """
    return paper_fit(vectors, with_log_n).score

