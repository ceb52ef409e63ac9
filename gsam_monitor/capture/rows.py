"""Rows: an activation as feature rows, its padding mask aligned, its tokens subsampled.

Convolutional outputs count channels as features and positions as samples; a ``(B, T)``
keep-mask from the root forward is matched to each layer's leading shape (the newest
positions of a key/value-cache decoding step included); token subsampling draws random keys
on the device, so nothing is read back to the host.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["TokenSampler", "activation_rows", "align_mask", "to_rows"]

# Modules whose outputs are channels-first even when 3-D (B, C, L); 4-D/5-D outputs always are.
_CHANNELS_FIRST_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
)


def to_rows(x: torch.Tensor, module: nn.Module) -> tuple[torch.Tensor, bool]:
    """View an activation as feature rows: ``(..., d)`` stays, channels-first outputs move.

    Convolutional outputs ``(B, C, *spatial)`` count channels as features and positions as
    samples, as Delve does: 4-D and 5-D outputs always, 3-D ones of conv/norm/pool modules.

    Returns:
        ``(rows, channels_first)``: ``rows`` has the features last (not yet flattened).
    """
    channels_first = x.dim() >= 4 or (x.dim() == 3 and isinstance(module, _CHANNELS_FIRST_TYPES))
    if channels_first:
        x = x.movedim(1, -1)  # (B, C, H, W) -> (B, H, W, C)
    elif x.dim() == 1:
        x = x.unsqueeze(0)
    return x, channels_first


class TokenSampler:
    """Uniform sampling without replacement of at most ``k`` valid rows, on the device.

    Each row gets a uniform random key, invalid rows the key -1; the ``k`` largest keys are
    kept (``topk``), so every subset of valid rows is equally likely, and when fewer than ``k``
    rows are valid all of them are kept, the rest of the selection being masked out. Nothing
    is read back to the host. One generator per device, seeded with ``seed``.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()  # DataParallel replicas sample from several threads

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            with self._lock:
                gen = self._generators.get(key)
                if gen is None:
                    gen = torch.Generator(device=device)
                    gen.manual_seed(self.seed)
                    if key in self._pending:
                        gen.set_state(self._pending.pop(key))
                    self._generators[key] = gen
        return gen

    def sample(
        self, rows: torch.Tensor, mask: torch.Tensor | None, k: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows ``(N, d)`` and keep-mask ``(N,)`` -> at most ``k`` rows and their keep-mask."""
        n = rows.shape[0]
        if k is None or n <= k:
            return rows, mask
        keys = torch.rand(n, generator=self.generator(rows.device), device=rows.device)
        if mask is not None:
            keys = torch.where(mask, keys, torch.full_like(keys, -1.0))
        idx = torch.topk(keys, k, sorted=False).indices
        return rows.index_select(0, idx), (mask.index_select(0, idx) if mask is not None else None)

    def state_dict(self) -> dict[str, Any]:
        states = {k: g.get_state() for k, g in self._generators.items()}
        states.update({k: v for k, v in self._pending.items() if k not in states})
        return {"seed": self.seed, "generators": states}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seed = int(state["seed"])
        self._generators.clear()
        # Restored when each device's generator is first needed (the device may not exist yet).
        self._pending = {str(k): v for k, v in dict(state["generators"]).items()}


def align_mask(mask: torch.Tensor, lead_shape: tuple[int, ...]) -> torch.Tensor | None:
    """The part of a ``(B, T)`` keep-mask that belongs to a layer output of leading shape
    ``lead_shape`` (the output without its feature dimension); ``None`` when none does.

    Equal shapes match position by position. A ``(B, t)`` output with ``t < T`` is a decoding
    step with a key/value cache (``generate()``): the mask covers the cached positions and the
    new ones, and the layer sees only the newest ``t``, the mask's last ``t`` columns.
    """
    if tuple(mask.shape) == tuple(lead_shape):
        return mask
    if len(lead_shape) == 2 and mask.dim() == 2 and lead_shape[0] == mask.shape[0]:
        t = lead_shape[1]
        if 0 < t < mask.shape[1]:
            return mask[:, -t:]
    return None


def activation_rows(
    hidden: torch.Tensor, module: nn.Module, root_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """A layer's activation as rows ``(N, d)`` and their keep-mask ``(N,)`` (``None``: keep all).

    Returns:
        ``(rows, keep, unaligned)``; ``unaligned`` is True when a ``(B, T, d)`` output came
        with a root mask that fits none of its positions (its padding cannot be dropped).
    """
    x, channels_first = to_rows(hidden.detach(), module)  # (..., d)
    mask = None
    unaligned = False
    if root_mask is not None and not channels_first:
        aligned = align_mask(root_mask, tuple(x.shape[:-1]))  # (B, T), or the newest t of a KV cache
        if aligned is not None:
            mask = aligned.to(x.device, non_blocking=True) != 0
        elif x.dim() == 3:
            unaligned = True
    d = x.shape[-1]
    rows = x.reshape(-1, d)  # (B*T, d)
    return rows, (mask.reshape(-1) if mask is not None else None), unaligned
