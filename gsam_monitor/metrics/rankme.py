"""RankMe (Garrido, Balestriero, Najman & LeCun, "RankMe: Assessing the downstream performance
of pretrained self-supervised representations by their rank", ICML 2023), from the moments.

RankMe(Z) = exp(-Σ_k p_k log p_k),  p_k = σ_k / Σ_j σ_j + ε  (the paper's Eq. 1),

over the min(N, d) singular values σ_k of the N × d matrix of centred activations, with the
paper's ε = 1e-7. The singular values come from the covariance: σ_k = sqrt(N · λ_k), λ_k the
eigenvalues of the MLE covariance, so no row is stored; N cancels in the normalisation and
enters only through the number of terms. Eigenvalues below the rank tolerance (numerically
null: rounding, not spectrum) count as σ_k = 0, which leaves each such term at -ε log ε.

Not ``effective_rank``: that is the same entropy of p_k ∝ λ_k = σ_k² (Roy & Vetterli 2007).
Weighting by σ rather than σ² gives small directions more say, so RankMe ≥ effective_rank,
with equality only for a flat spectrum. The paper applies it to the raw embeddings; here the
rows are centred (the covariance's eigenvalues), so a common offset of every activation,
which ``anisotropy`` reports, does not count as a direction.
"""

from __future__ import annotations

import math

import torch

__all__ = ["RANKME_EPS", "rankme"]

RANKME_EPS = 1e-7
"""ε of the paper's Eq. 1."""


def rankme(evals: torch.Tensor, n: float, tol: float | torch.Tensor = 0.0, eps: float = RANKME_EPS) -> float:
    """RankMe of a window from its covariance eigenvalues (see the module docstring).

    Args:
        evals: Eigenvalues of the MLE covariance (descending).
        n: Rows in the window (the number of singular values is min(n, d)).
        tol: Rank tolerance, one threshold or one per eigenvalue: eigenvalues at or below it
            are null.
        eps: ε (default the paper's 1e-7).

    Returns:
        RankMe, or NaN for an all-zero spectrum.
    """
    k = max(min(int(n), evals.numel()), 1)
    lam = torch.where(evals > tol, evals.clamp_min(0.0), 0.0)[:k]
    sigma = lam.sqrt()
    total = float(sigma.sum())
    if total <= 0:
        return math.nan
    p = sigma / total + eps
    return math.exp(-float(torch.special.xlogy(p, p).sum()))  # 0 log 0 = 0 (eps = 0)
