"""A small TopK sparse autoencoder, trained on streamed activations.

Architecture and training follow Gao et al., "Scaling and evaluating sparse autoencoders"
(2024), the TopK SAE that ``sae-lens`` also implements:

    z = ReLU(TopK_k(W_enc (s x - b_dec) + b_enc));   x_hat = (z W_dec + b_dec) / s

- ``s`` scales the input so that the centred activations have mean squared norm ``d``
  (``sae-lens``'s ``expected_average_only_in`` does the same with the uncentred norm); it and
  ``b_dec`` (the mean) are set from the first buffer of rows. Feature activations are
  therefore in units where a typical token's centred norm is sqrt(d), whatever the model's
  own scale: a firing threshold means the same for every layer and model.
- Decoder rows (one per feature) have unit norm, restored after every Adam step, so a
  feature's activation is its coefficient along a unit direction; the rows are the feature
  point cloud of the lobe and galaxy analyses.
- Dead features (no activation in the last ``dead_after`` rows) are revived by the AuxK
  loss: the top ``aux_k`` dead features reconstruct the residual x - x_hat, weighted 1/32.

Training reads an iterator of (N, d) row batches, e.g. the model's hidden states with the
padding dropped, through a bounded shuffle buffer (``buffer_rows``), never a stored dump.
``evaluate_sae`` streams held-out rows and reports explained variance, L0 and the
features that fired. ``pca_explained_variance`` is the baseline: the same held-out score for a
projection onto the top principal components of the training rows, from moments alone.

Why not ``sae-lens``: its ``SAETrainer`` does accept any iterator of activation batches, and
``sae-lens 6.54`` installs next to torch 2.13 and transformers 5.24, but it brings 36 more
packages (``transformer-lens``, ``datasets``, ``pandas``, ``pyarrow``, ``statsmodels``,
``plotly``, ``nltk``, ...), its trainer imports ``wandb``, importing the trainer takes 7-8 s
on a 2-core CPU, and its TopK step is 1.3x slower than this one at the default size
(``benchmarks/sae_step.py``); this module is about 300 lines.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["SAEEvaluator", "SAEQuality", "SAETrainer", "TopKSAE", "evaluate_sae", "pca_explained_variance"]

logger = logging.getLogger(__name__)


class TopKSAE(nn.Module):
    """TopK sparse autoencoder with unit-norm decoder rows.

    Args:
        d_in: activation dimension d.
        n_features: dictionary size m.
        k: active features per token.
        seed: seed of the initial weights.

    Raises:
        ValueError: for non-positive sizes or ``k > n_features``.
    """

    def __init__(self, d_in: int, n_features: int, k: int, *, seed: int = 0) -> None:
        super().__init__()
        if d_in < 1 or n_features < 1 or not 1 <= k <= n_features:
            raise ValueError(
                f"TopKSAE: expected d_in >= 1, n_features >= 1 and 1 <= k <= n_features, got "
                f"d_in={d_in}, n_features={n_features}, k={k}"
            )
        self.d_in, self.n_features, self.k = d_in, n_features, k
        gen = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(n_features, d_in, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)  # (m, d), unit rows
        self.W_enc = nn.Parameter(w_dec.clone())  # (m, d): encoder initialised as the decoder's transpose
        self.b_enc = nn.Parameter(torch.zeros(n_features))
        self.b_dec = nn.Parameter(torch.zeros(d_in))  # in scaled units
        self.register_buffer("scale", torch.ones(()))

    @torch.no_grad()
    def init_from(self, rows: torch.Tensor) -> None:
        """Set the input scale and ``b_dec`` from a sample of rows (N, d)."""
        x = rows.to(self.W_dec.dtype)
        mean = x.mean(0)
        msq = float(((x - mean) ** 2).sum(1).mean())
        self.scale.fill_(math.sqrt(self.d_in / msq) if msq > 0 else 1.0)
        self.b_dec.copy_(mean * self.scale)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations (N, m) of raw rows (N, d)."""
        return (x * self.scale - self.b_dec) @ self.W_enc.T + self.b_enc

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices), each (N, k): the kept activations (ReLU applied) and their features."""
        values, indices = self.pre_activations(x).topk(self.k, dim=-1)
        return values.relu(), indices

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense feature activations (N, m), zero outside the top k."""
        values, indices = self.encode_topk(x)
        return torch.zeros(*x.shape[:-1], self.n_features, dtype=values.dtype, device=values.device).scatter_(
            -1, indices, values
        )

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the input's units from (N, k) values and indices."""
        x_scaled = torch.einsum("nk,nkd->nd", values, self.W_dec[indices]) + self.b_dec
        return x_scaled / self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of rows (N, d)."""
        return self.decode_sparse(*self.encode_topk(x))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass
class SAEQuality:
    """What ``evaluate_sae`` measured on held-out rows.

    Attributes:
        n_rows: rows seen.
        explained_variance: 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (fp64 sums).
        l0: mean number of non-zero features per row.
        fired: per feature, the number of rows on which it was non-zero (``int64``).
    """

    n_rows: int
    explained_variance: float
    l0: float
    fired: torch.Tensor

    @property
    def dead_fraction(self) -> float:
        """Fraction of features that never fired on these rows."""
        return float((self.fired == 0).double().mean())


class SAEEvaluator:
    """Streams rows through an SAE and accumulates its quality (see ``evaluate_sae``).

    Sums are fp64 and shifted by the first batch's mean, so the total variance has no
    cancellation error however far the activations sit from the origin.

    Args:
        sae: the trained SAE.
    """

    def __init__(self, sae: TopKSAE) -> None:
        self.sae = sae
        self.n = 0
        self._shift: torch.Tensor | None = None
        self._sum = torch.zeros(sae.d_in, dtype=torch.float64)
        self._sum_sq = torch.zeros((), dtype=torch.float64)
        self._sse = torch.zeros((), dtype=torch.float64)
        self._active = 0
        self.fired = torch.zeros(sae.n_features, dtype=torch.int64)

    @torch.no_grad()
    def update(self, x: torch.Tensor, encoded: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Add rows (N, d), padding already dropped; ``encoded`` = ``sae.encode_topk(x)`` if known."""
        if x.shape[0] == 0:
            return
        values, indices = encoded if encoded is not None else self.sae.encode_topk(x)
        x_hat = self.sae.decode_sparse(values, indices)
        x64 = x.double().cpu()
        if self._shift is None:
            self._shift = x64.mean(0)
        centred = x64 - self._shift
        self._sum += centred.sum(0)
        self._sum_sq += (centred * centred).sum()
        self._sse += ((x64 - x_hat.double().cpu()) ** 2).sum()
        active = (values > 0).cpu()
        self._active += int(active.sum())
        self.fired.index_add_(0, indices.cpu()[active], torch.ones(int(active.sum()), dtype=torch.int64))
        self.n += x.shape[0]

    def result(self) -> SAEQuality:
        """The ``SAEQuality`` of the rows seen.

        Raises:
            ValueError: if no rows were given.
        """
        if self.n == 0:
            raise ValueError("SAE evaluation: no rows to evaluate; pass at least one non-empty batch")
        total = float(self._sum_sq - (self._sum * self._sum).sum() / self.n)
        return SAEQuality(
            n_rows=self.n,
            explained_variance=1.0 - float(self._sse) / total if total > 0 else math.nan,
            l0=self._active / self.n,
            fired=self.fired.clone(),
        )


def evaluate_sae(sae: TopKSAE, batches: Iterable[torch.Tensor]) -> SAEQuality:
    """Stream held-out rows through the SAE: explained variance, L0, firing counts.

    Args:
        sae: the trained SAE.
        batches: (N, d) row tensors (padding already dropped).

    Returns:
        The ``SAEQuality``.

    Raises:
        ValueError: if no rows were given.
    """
    evaluator = SAEEvaluator(sae)
    for x in batches:
        evaluator.update(x)
    return evaluator.result()


def _moments(stats: Any) -> tuple[float, np.ndarray, np.ndarray]:
    def numpy(value: Any) -> np.ndarray:
        return np.asarray(value.detach().cpu().double().numpy() if hasattr(value, "detach") else value,
                          dtype=np.float64)

    return float(numpy(stats.count)), numpy(stats.mean).reshape(-1), numpy(stats.covariance(ddof=0))


def pca_explained_variance(train: Any, test: Any, n_components: int) -> float:
    """Held-out explained variance of the top ``n_components`` principal components of the training rows.

    With the training mean mu and the projection P onto the top eigenvectors of the training
    covariance, each test row x is reconstructed as mu + P (x - mu); the score is, as for the
    SAE, 1 - sum ||x - x_hat||^2 / sum ||x - mean_test||^2, from the moments of the two sets:
    with Q = I - P, the error sum is n_test (tr(Q C_test) + (mu_test - mu)^T Q (mu_test - mu)) and
    the total n_test tr(C_test) (C: MLE covariances).

    Args:
        train: moments of the training rows: anything with ``count``, ``mean`` and
            ``covariance(ddof=0)`` (a ``LayerStats``).
        test: moments of the held-out rows.
        n_components: principal components kept (an SAE's k, its active features per token).

    Returns:
        The explained variance (NaN if the test rows have no variance).

    Raises:
        ValueError: ``n_components`` outside 1..d, or empty sets.
    """
    n_train, mu, cov = _moments(train)
    n_test, mu_test, cov_test = _moments(test)
    d = cov.shape[0]
    if not 1 <= n_components <= d:
        raise ValueError(f"n_components: expected 1..{d} principal components, got {n_components}")
    if n_train <= 0 or n_test <= 0:
        raise ValueError(f"pca_explained_variance: expected rows in both sets, got {n_train:g} and {n_test:g}")
    _, vectors = np.linalg.eigh(0.5 * (cov + cov.T))
    top = vectors[:, -n_components:]  # (d, n): eigh sorts eigenvalues ascending
    shift = mu_test - mu
    total = float(np.trace(cov_test))
    residual = total - float(np.sum((cov_test @ top) * top)) + float(shift @ shift - np.sum((shift @ top) ** 2))
    return 1.0 - residual / total if total > 0 else math.nan


class SAETrainer:
    """Adam on the normalised MSE of a ``TopKSAE``, plus AuxK for dead features.

    Args:
        sae: the SAE to train (its scale and ``b_dec`` are set from the first buffer).
        lr: Adam learning rate.
        batch_size: rows per step.
        buffer_rows: rows gathered (and shuffled) before they are used; bounds memory.
        dead_after: a feature that has not fired in this many rows is dead for AuxK.
        aux_k: dead features used by AuxK (Gao et al.: d/2).
        aux_coef: weight of the AuxK loss (Gao et al.: 1/32).
        seed: seed of the shuffles.

    Raises:
        ValueError: for a non-positive size or rate.
    """

    def __init__(
        self,
        sae: TopKSAE,
        *,
        lr: float = 1e-3,
        batch_size: int = 1024,
        buffer_rows: int = 16_384,
        dead_after: int = 50_000,
        aux_k: int | None = None,
        aux_coef: float = 1.0 / 32.0,
        seed: int = 0,
    ) -> None:
        if lr <= 0 or batch_size < 1 or buffer_rows < batch_size or dead_after < 1:
            raise ValueError(
                f"SAETrainer: expected lr > 0, batch_size >= 1, buffer_rows >= batch_size and dead_after >= 1, "
                f"got lr={lr}, batch_size={batch_size}, buffer_rows={buffer_rows}, dead_after={dead_after}"
            )
        self.sae = sae
        self.batch_size = batch_size
        self.buffer_rows = buffer_rows
        self.dead_after = dead_after
        self.aux_k = aux_k if aux_k is not None else max(1, sae.d_in // 2)
        self.aux_coef = aux_coef
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.rows_since_fired = torch.zeros(sae.n_features, dtype=torch.int64)
        self.steps = 0
        self.rows_seen = 0
        self.last_loss = math.nan
        self._initialised = False
        self._buffer: list[torch.Tensor] = []
        self._buffered = 0

    def fit(self, batches: Iterable[torch.Tensor], on_step: Callable[[SAETrainer], None] | None = None) -> TopKSAE:
        """Train on every row of ``batches`` once (through the shuffle buffer); returns the SAE."""
        for rows in batches:
            self.feed(rows, on_step)
        self.flush(on_step)
        return self.sae

    def feed(self, rows: torch.Tensor, on_step: Callable[[SAETrainer], None] | None = None) -> None:
        """Add rows (N, d); train on the buffer whenever it is full."""
        if rows.shape[0] == 0:
            return
        self._buffer.append(rows.detach().to(self.sae.W_dec.dtype))
        self._buffered += rows.shape[0]
        if self._buffered >= self.buffer_rows:
            self.flush(on_step)

    def flush(self, on_step: Callable[[SAETrainer], None] | None = None) -> None:
        """Train on what the buffer holds (shuffled), then empty it."""
        if not self._buffer:
            return
        data = torch.cat(self._buffer)
        self._buffer, self._buffered = [], 0
        if not self._initialised:
            self.sae.init_from(data)
            self._initialised = True
        order = torch.randperm(data.shape[0], generator=self.generator)
        for start in range(0, data.shape[0], self.batch_size):
            self.step(data[order[start : start + self.batch_size].to(data.device)])
            if on_step is not None:
                on_step(self)

    def step(self, x: torch.Tensor) -> float:
        """One Adam step on rows x (N, d); returns the loss (normalised MSE + AuxK)."""
        sae = self.sae
        target = x * sae.scale
        inp = target - sae.b_dec
        pre = inp @ sae.W_enc.T + sae.b_enc  # (N, m)
        values, indices = pre.topk(sae.k, dim=-1)
        values = values.relu()
        codes = torch.zeros_like(pre).scatter(-1, indices, values)
        recon = codes @ sae.W_dec + sae.b_dec
        # Normalised MSE: the squared error over the batch's total variance.
        variance = (target - target.mean(0)).pow(2).sum(1).mean().clamp_min(1e-12)
        loss = (recon - target).pow(2).sum(1).mean() / variance
        fired = (codes.detach() > 0).any(0).cpu()
        self.rows_since_fired += x.shape[0]
        self.rows_since_fired[fired] = 0
        dead = (self.rows_since_fired >= self.dead_after).to(x.device)
        n_dead = int(dead.sum())
        if n_dead and self.aux_coef > 0:
            # AuxK: the top aux_k dead features reconstruct what the live ones missed.
            residual = (target - recon).detach()
            dead_pre = pre.masked_fill(~dead, -math.inf)
            aux_values, aux_indices = dead_pre.topk(min(self.aux_k, n_dead), dim=-1)
            aux_codes = torch.zeros_like(pre).scatter(-1, aux_indices, aux_values.relu())
            aux_recon = aux_codes @ sae.W_dec
            res_var = (residual - residual.mean(0)).pow(2).sum(1).mean().clamp_min(1e-12)
            loss = loss + self.aux_coef * (aux_recon - residual).pow(2).sum(1).mean() / res_var
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        sae.normalize_decoder_()
        self.steps += 1
        self.rows_seen += x.shape[0]
        self.last_loss = float(loss.detach())
        return self.last_loss
