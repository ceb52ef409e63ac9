"""Feature firing per block, co-occurrence counts, and the five co-occurrence affinities.

A feature *fires* in a block when its activation exceeds a threshold on at least one of the
block's tokens (padding and special tokens excluded). With F the (blocks x features) 0/1
firing matrix, every pairwise statistic comes from four counts per pair (i, j):

    n11 = #blocks where both fire = (F^T F)_ij,  n10 = n1_i - n11,  n01 = n1_j - n11,
    n00 = n - n1_i - n1_j + n11

and the affinities (the study's five; Choi, Cha & Tappert, "A survey of binary similarity
and distance measures", 2010):

    simple matching  (n11 + n00) / n
    Jaccard          n11 / (n11 + n10 + n01)
    Dice             2 n11 / (2 n11 + n10 + n01)
    overlap          n11 / min(n1_i, n1_j)
    phi              (n11 n00 - n10 n01) / sqrt(n1_i n0_i n1_j n0_j)

A ratio whose denominator is zero (a feature that never fires, or phi for a feature that
fires in every block) is defined as 0 there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["AFFINITIES", "BlockFiring", "CooccurrenceCounts", "affinity", "cooccurrence_counts"]

#: Affinity names, in the study's order.
AFFINITIES: tuple[str, ...] = ("simple_matching", "jaccard", "dice", "overlap", "phi")


class BlockFiring:
    """Accumulates, block by block, each feature's largest activation (and each block's source).

    Args:
        n_features: number of features m.
        threshold: a feature fires in a block when its largest activation there is strictly
            above this (``matrix`` accepts another threshold).

    Example::

        firing = BlockFiring(sae.n_features, threshold=1.0)
        firing.update(codes, keep, sources=["code", "math"])   # codes (B, T, m), keep (B, T)
        counts = cooccurrence_counts(firing.matrix())
    """

    def __init__(self, n_features: int, threshold: float) -> None:
        if n_features < 1:
            raise ValueError(f"n_features: expected a positive number of features, got {n_features}")
        self.n_features = n_features
        self.threshold = float(threshold)
        self._rows: list[np.ndarray] = []
        self.sources: list[str] = []

    def update(self, codes: torch.Tensor, keep: torch.Tensor, sources: Sequence[str]) -> None:
        """Add blocks: codes (B, T, m) feature activations, keep (B, T) bool, one source per block.

        Raises:
            ValueError: if the shapes or the number of sources do not match.
        """
        if codes.dim() != 3 or codes.shape[-1] != self.n_features or tuple(keep.shape) != tuple(codes.shape[:2]):
            raise ValueError(
                f"BlockFiring.update: expected codes (B, T, {self.n_features}) and keep (B, T), got "
                f"{tuple(codes.shape)} and {tuple(keep.shape)}"
            )
        if len(sources) != codes.shape[0]:
            raise ValueError(
                f"BlockFiring.update: expected {codes.shape[0]} sources, one per block, got {len(sources)}"
            )
        keep = keep.to(codes.device, torch.bool)
        block = torch.arange(codes.shape[0], device=codes.device)[:, None].expand_as(keep)
        self.update_rows(codes[keep], block[keep], sources)

    def update_rows(self, codes: torch.Tensor, block: torch.Tensor, sources: Sequence[str]) -> None:
        """Add blocks from their kept tokens only: codes (N, m), block (N,) index into ``sources``.

        Raises:
            ValueError: if the shapes do not match or a block index is out of range.
        """
        if codes.dim() != 2 or codes.shape[-1] != self.n_features or tuple(block.shape) != (codes.shape[0],):
            raise ValueError(
                f"BlockFiring.update_rows: expected codes (N, {self.n_features}) and block (N,), got "
                f"{tuple(codes.shape)} and {tuple(block.shape)}"
            )
        n_blocks = len(sources)
        if block.numel() and not 0 <= int(block.min()) <= int(block.max()) < n_blocks:
            raise ValueError(f"BlockFiring.update_rows: block indices must lie in 0..{n_blocks - 1}")
        # -inf for a block without kept tokens: nothing fires there.
        top = torch.full((n_blocks, self.n_features), -math.inf, dtype=torch.float32, device=codes.device)
        top.scatter_reduce_(0, block.long()[:, None].expand(-1, self.n_features), codes.float(), reduce="amax")
        self._rows.append(top.cpu().numpy())
        self.sources.extend(str(s) for s in sources)

    def block_max(self) -> np.ndarray:
        """(blocks, m) largest activation of each feature in each block, in update order."""
        if not self._rows:
            return np.zeros((0, self.n_features), dtype=np.float32)
        return np.concatenate(self._rows)

    def matrix(self, threshold: float | None = None) -> np.ndarray:
        """The (blocks, m) bool firing matrix at ``threshold`` (default: the constructor's)."""
        return self.block_max() > (self.threshold if threshold is None else float(threshold))


@dataclass(frozen=True)
class CooccurrenceCounts:
    """Pair counts of a firing matrix.

    Attributes:
        n: number of blocks.
        fires: (m,) blocks in which each feature fires (n1).
        both: (m, m) blocks in which both fire (n11); the diagonal equals ``fires``.
    """

    n: int
    fires: np.ndarray
    both: np.ndarray


def cooccurrence_counts(firing: np.ndarray) -> CooccurrenceCounts:
    """Pair counts n11 = F^T F and n1 = column sums of a (blocks, m) 0/1 matrix (int64)."""
    f = np.asarray(firing)
    if f.ndim != 2:
        raise ValueError(f"firing: expected a (blocks, features) matrix, got shape {f.shape}")
    f64 = f.astype(np.float64)  # exact for counts below 2**53; BLAS instead of an int matmul
    both = np.rint(f64.T @ f64).astype(np.int64)
    return CooccurrenceCounts(n=int(f.shape[0]), fires=f.sum(axis=0).astype(np.int64), both=both)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def affinity(counts: CooccurrenceCounts, name: str) -> np.ndarray:
    """The (m, m) affinity ``name`` (one of :data:`AFFINITIES`) from pair counts.

    Raises:
        ValueError: for an unknown name.
    """
    n = float(counts.n)
    n11 = counts.both.astype(np.float64)
    n1 = counts.fires.astype(np.float64)
    n10 = n1[:, None] - n11
    n01 = n1[None, :] - n11
    n00 = n - n1[:, None] - n1[None, :] + n11
    if name == "simple_matching":
        return _ratio(n11 + n00, np.full_like(n11, n))
    if name == "jaccard":
        return _ratio(n11, n11 + n10 + n01)
    if name == "dice":
        return _ratio(2.0 * n11, 2.0 * n11 + n10 + n01)
    if name == "overlap":
        return _ratio(n11, np.minimum(n1[:, None], n1[None, :]))
    if name == "phi":
        n0 = n - n1
        return _ratio(n11 * n00 - n10 * n01, np.sqrt(np.outer(n1 * n0, n1 * n0)))
    raise ValueError(f"affinity: expected one of {', '.join(AFFINITIES)}, got {name!r}")
