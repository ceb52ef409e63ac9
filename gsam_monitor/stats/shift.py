"""Shift algebra: power sums of y re-expressed as power sums of y + δ, exactly.

The statistics accumulate sums of x - K around a reference vector K. Moving K (to merge two
states, to agree on one shift across ranks, or to re-centre a window whose data moved) is a
binomial expansion in δ = K - K' of the sums already held: no row is needed, and nothing is
lost (Chan, Golub & LeVeque, "Algorithms for computing the sample variance", 1983).
"""

from __future__ import annotations

import torch

__all__ = ["shift_power_sums", "shifted_sums"]


def shift_power_sums(
    n: torch.Tensor, s: torch.Tensor, p2: torch.Tensor, p3: torch.Tensor, p4: torch.Tensor, delta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension 3rd and 4th power sums of y + δ from those of y (binomial expansion):
    Σ(y+δ)³ = p3 + 3δ p2 + 3δ² s + n δ³, Σ(y+δ)⁴ = p4 + 4δ p3 + 6δ² p2 + 4δ³ s + n δ⁴."""
    d2 = delta * delta
    p3_new = p3 + 3 * delta * p2 + 3 * d2 * s + n * d2 * delta
    p4_new = p4 + 4 * delta * p3 + 6 * d2 * p2 + 4 * d2 * delta * s + n * d2 * d2
    return p3_new, p4_new


def shifted_sums(
    n: torch.Tensor,
    s: torch.Tensor,
    gram: torch.Tensor,
    delta: torch.Tensor,
    power3: torch.Tensor | None = None,
    power4: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The sums of y = x - K (count ``n``, sum ``s``, ``gram``, and the per-dimension power
    sums when given) re-expressed as sums of x - K' = y + δ, δ = K - K' (all fp64)."""
    out: dict[str, torch.Tensor] = {"sum": s + n * delta}
    # s δᵀ + δ sᵀ + n δδᵀ = u δᵀ + δ uᵀ with u = s + n δ / 2: one rank-2 GEMM pass over the d x d
    # sums, no transposed copy (reads symmetrise the Gram sums).
    u = s + 0.5 * n * delta
    out["gram"] = torch.addmm(gram, torch.stack([u, delta], 1), torch.stack([delta, u]))
    if power3 is not None and power4 is not None:
        out["power3"], out["power4"] = shift_power_sums(n, s, torch.diagonal(gram), power3, power4, delta)
    return out
