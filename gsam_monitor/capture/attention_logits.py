"""The attention logits of a sample of query rows, read where the attention kernel receives q and k.

Every ``transformers`` v5 attention module looks its attention function up in the registry at
each forward (``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager)``) and
calls it with the q, k it has formed: after the model's own rotary embedding and KV cache, with
the mask and ``scaling`` it passes. ``AttentionRouter`` wraps that lookup (``_compat``), so that
a call from a monitored attention module first hands its arguments to the monitor, then runs the
original function, unchanged: eager, sdpa, flash or flex alike, and the outputs are identical.

From the call, on at most ``QUERY_SAMPLE`` query positions per sequence (all of them when there
are fewer; else evenly spaced over the sequence, the first and the last included: the same
positions at every forward), ``logit_stats`` computes the logits s = q·kᵀ·scaling in fp32 as the
kernel would (key heads repeated for grouped-query attention as ``repeat_kv`` does; soft-capping
and an additive position bias where the call passes them; the additive or boolean mask, the
causal mask the fused kernels apply themselves when the mask is ``None``, and a flash kernel's
``(batch, keys)`` padding mask), and per head:

* the max attention logit over the sampled rows and their unmasked keys (Wortsman et al., "Small-
  scale proxies for large-scale Transformer training instabilities", 2023: attention-logit growth
  precedes the divergence that qk-layernorm prevents);
* the entropy of softmax(s) over the unmasked keys, H = logsumexp(s) - Σ_k p_k s_k (nats), summed
  over the sampled rows.

Padding queries are left out (the root's ``attention_mask``, its last ``queries`` columns, where
its shape matches), and so is any row whose every key is masked. Cost: per call, the sampled
rows' share of the kernel's q·kᵀ (64 of T rows) in fp32, in chunks of at most ``_CHUNK`` logits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gsam_monitor import _compat

__all__ = ["QUERY_SAMPLE", "ROUTER", "AttentionRouter", "logit_stats", "query_sample"]

QUERY_SAMPLE = 64
"""Query positions per sequence whose logits are computed."""

_CHUNK = 1 << 24  # logits per chunk of key-head groups: ~64 MB of fp32 temporaries

Observer = Callable[[nn.Module, bool, tuple[Any, ...], dict[str, Any]], None]
"""Called with the module, whether the function is a registered kernel (not the model's own
eager default), and the call's arguments after the module."""


def query_sample(queries: int, limit: int = QUERY_SAMPLE, device: torch.device | str | None = None) -> torch.Tensor:
    """The sampled query positions: ``arange(queries)`` when ``queries <= limit``, else ``limit``
    positions evenly spaced from the first to the last (rounded to the nearest)."""
    if queries <= limit:
        return torch.arange(queries, device=device)
    return torch.linspace(0, queries - 1, limit, dtype=torch.float64, device=device).round().long()


def _mask_parts(
    mask: torch.Tensor | None, idx: torch.Tensor, queries: int, keys: int, is_causal: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(keep (B|1, H|1, n, Tk) bool, additive (same) or ``None``) of the sampled rows, as the kernel masks them."""
    if mask is not None and mask.dim() == 4:
        rows = mask[..., :keys]
        rows = rows.index_select(-2, idx) if rows.shape[-2] == queries else rows
        if rows.dtype == torch.bool:
            return rows, None
        keep = rows > torch.finfo(rows.dtype).min / 2  # eager masks add finfo.min (or -inf) where masked
        return keep, torch.where(keep, rows, 0).float()
    keep = torch.ones(1, 1, idx.numel(), keys, dtype=torch.bool, device=idx.device)
    if mask is not None:  # (B, Tk) padding mask of the flash kernels
        keep = keep & mask[:, None, None, -keys:].bool()
    if is_causal:  # bottom-right aligned: query i sits at position Tk - Tq + i
        position = keys - queries + idx
        keep = keep & (torch.arange(keys, device=idx.device)[None, :] <= position[:, None])
    return keep, None


@torch.no_grad()
def logit_stats(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scaling: float,
    is_causal: bool = False,
    query_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
    limit: int = QUERY_SAMPLE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy sums and max logits of the sampled query rows.

    Args:
        query: (B, H, Tq, D) as the attention function receives it.
        key: (B, H_kv, Tk, D), H a multiple of H_kv.
        mask: The attention function's mask: 4D additive (float) or keep (bool), (B, Tk) keep
            (flash), or ``None`` (then ``is_causal`` says whether the kernel applies a causal mask).
        scaling: The factor of q·kᵀ.
        query_mask: (B, Tq) keep-mask of the query rows, or ``None``.
        softcap: Logits become softcap · tanh(s / softcap) before the mask, as Gemma-2's do.
        bias: An additive (B|1, H|1, Tq, Tk) position bias.

    Returns:
        ``[Σ entropy per head (H), counted rows per head (H), 0 (1)]`` in fp64, and the max
        logit per head (H) in fp64 (``-inf`` for a head without counted rows).
    """
    b, h, tq, d = query.shape
    groups, tk = key.shape[1], key.shape[2]
    rep = h // groups
    idx = query_sample(tq, limit, query.device)
    n = idx.numel()
    keep, additive = _mask_parts(mask, idx, tq, tk, is_causal)
    dtype = torch.promote_types(query.dtype, torch.float32)
    ent = torch.zeros(b, h, n, dtype=torch.float64, device=query.device)
    top = torch.full((b, h, n), -torch.inf, dtype=torch.float64, device=query.device)
    step = max(1, _CHUNK // max(1, b * rep * n * tk))
    for g0 in range(0, groups, step):
        g1 = min(groups, g0 + step)
        heads = slice(g0 * rep, g1 * rep)
        # Head g·rep + r uses key head g, as repeat_kv repeats them.
        q = query[:, heads].index_select(2, idx).to(dtype).reshape(b, g1 - g0, rep * n, d)
        s = (q @ key[:, g0:g1].to(dtype).transpose(-1, -2)).reshape(b, (g1 - g0) * rep, n, tk) * scaling
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        if bias is not None:
            rows = bias[..., :tk]
            rows = rows.index_select(-2, idx) if rows.shape[-2] == tq else rows
            s = s + (rows[:, heads] if rows.shape[1] > 1 else rows).to(dtype)
        if additive is not None:
            s = s + (additive[:, heads] if additive.shape[1] > 1 else additive)
        k = keep[:, heads] if keep.shape[1] > 1 else keep
        s = s.masked_fill(~k, -torch.inf)
        top[:, heads] = s.amax(-1).double()
        logp = torch.log_softmax(s, -1)
        ent[:, heads] = -torch.where(k, logp.exp() * logp, 0.0).sum(-1, dtype=torch.float64)
    counted = keep.any(-1).expand(b, h, n)
    if query_mask is not None:
        counted = counted & query_mask.to(query.device).bool().index_select(1, idx)[:, None, :]
    sums = torch.where(counted, ent, 0.0).sum((0, 2))
    rows = counted.sum((0, 2), dtype=torch.float64)
    maxima = torch.where(counted, top, -torch.inf).amax((0, 2))
    return torch.cat([sums, rows, sums.new_zeros(1)]), maxima


class AttentionRouter:
    """Routes the calls of chosen attention modules' attention functions to observers.

    While a module has an observer, the registry's lookup is wrapped (``_compat``): a call whose
    ``module`` has observers runs each on ``(module, fused, args, kwargs)`` (``fused``: the
    function is a registered kernel, not the model's own eager default; then the arguments after
    the module), then the original function. Calls of other modules pass straight through; the
    lookup is restored when the last observer leaves. One router serves the process (``ROUTER``):
    the lookup is process-wide, and several monitors may observe one module.
    """

    def __init__(self) -> None:
        self._observers: dict[nn.Module, list[Observer]] = {}
        self._lock = threading.Lock()
        self._restore: Callable[[], None] | None = None

    @property
    def installed(self) -> bool:
        """Whether the registry's lookup is wrapped now."""
        return self._restore is not None

    def add(self, module: nn.Module, observer: Observer) -> None:
        """Observe ``module``'s attention calls (wrap the lookup if it is not yet).

        Raises:
            ImportError, AttributeError: from ``_compat.route_attention_functions``.
        """
        with self._lock:
            if self._restore is None:
                self._restore = _compat.route_attention_functions(self._call)
            self._observers.setdefault(module, []).append(observer)

    def remove(self, module: nn.Module, observer: Observer) -> None:
        """Stop observing (idempotent); the last observer out restores the lookup."""
        with self._lock:
            observers = self._observers.get(module, [])
            if observer in observers:
                observers.remove(observer)
            if not observers:
                self._observers.pop(module, None)
            if not self._observers and self._restore is not None:
                self._restore()
                self._restore = None

    def _call(self, function: Callable[..., Any], fused: bool, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        observers = self._observers.get(module)
        if observers and not torch.compiler.is_compiling():
            for observer in list(observers):
                observer(module, fused, args, kwargs)  # observers catch their own errors
        return function(module, *args, **kwargs)


ROUTER = AttentionRouter()
"""The process's router."""
