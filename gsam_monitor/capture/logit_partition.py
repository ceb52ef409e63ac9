"""The output logits' log-partition, log Z = logsumexp over the vocabulary, on a token sample.

z-loss (Wortsman et al., "Small-scale proxies for large-scale Transformer training
instabilities", 2023; PaLM) penalises (log Z)² because the softmax is shift-invariant: nothing
else anchors the logits' level, and without it they can drift until the loss diverges
("output-logit divergence"). A forward hook on the language-model head (found by
``model.get_output_embeddings()``, or named) reads the logits the model has already formed, in
its dtype, takes at most ``LOGIT_SAMPLE`` non-padding token rows of them (the same positions at
every forward: all of them when there are fewer, else evenly spaced over the non-padding tokens
of the batch, the first and the last included; chosen on the device, without a host
synchronisation) and computes log Z of those rows in fp32, ``_CHUNK`` logits at a time: never
the tokens × vocabulary of the whole batch in fp32.

Padding comes from the root's ``attention_mask`` that the monitor records (its last T columns
for logits of T positions, as under ``logits_to_keep`` or a KV cache). Not under
``torch.compile`` (the hook skips compiled forwards, like the attention hooks), and never where
the loss is a fused or chunked cross-entropy that takes the hidden states and the head's weight
(Liger kernels, ``CutCrossEntropy``): the head module is then never called. Either way the head
stays silent: after ``SILENT_FORWARDS`` collected root forwards without a call, one warning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gsam_monitor.capture.attention import AttentionFeed, ProbeHooks
from gsam_monitor.capture.hooks import ForwardContext, context_root, in_backward, infer_phase
from gsam_monitor.capture.layers import unwrap_model

__all__ = ["LOGIT_SAMPLE", "SILENT_FORWARDS", "LogitPartitionHooks", "find_head", "lse_stats", "token_sample"]

LOGIT_SAMPLE = 256
"""Non-padding token rows per forward whose log-partition is computed."""
SILENT_FORWARDS = 8
"""Collected root forwards without a call of the head before the monitor warns (once)."""

_CHUNK = 1 << 24  # fp32 logits per chunk of rows: ~64 MB of temporaries


def find_head(model: nn.Module, spec: bool | str) -> tuple[str, nn.Module]:
    """The language-model head's name and module: ``model.get_output_embeddings()`` for
    ``spec=True``, else the module named ``spec``.

    Raises:
        ValueError: naming ``CollectOptions(logit_partition=)`` when there is no such module.
    """
    inner = unwrap_model(model)
    names = {module: name for name, module in inner.named_modules()}
    if isinstance(spec, str):
        module = dict(inner.named_modules()).get(spec)
        if module is None or spec == "":
            raise ValueError(
                f"CollectOptions(logit_partition={spec!r}): {type(inner).__name__} has no module named {spec!r}; "
                f"name the module that outputs the logits (e.g. 'lm_head'), or pass True for a Hugging Face model's "
                f"get_output_embeddings()."
            )
        return spec, module
    getter = getattr(inner, "get_output_embeddings", None)
    module = getter() if callable(getter) else None
    if not isinstance(module, nn.Module) or module not in names:
        raise ValueError(
            f"CollectOptions(logit_partition=True): {type(inner).__name__} has no language-model head "
            f"(model.get_output_embeddings() gave {type(module).__name__}); monitor a model with one (e.g. "
            f"AutoModelForCausalLM, not AutoModel), name the module that outputs the logits, "
            f"CollectOptions(logit_partition='lm_head'), or drop logit_partition."
        )
    return names[module], module


def token_sample(keep: torch.Tensor | None, rows: int, limit: int = LOGIT_SAMPLE) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices (m,), valid (m,) bool): at most ``limit`` of the ``rows`` kept rows, all of
    them when there are fewer, else the kept rows of rank round(k·(n-1)/(limit-1)), k < limit.

    Args:
        keep: (rows,) keep-mask (1 = token, 0 = padding), or ``None`` (every row counts).
    """
    if keep is None:
        idx = torch.arange(rows) if rows <= limit else torch.linspace(0, rows - 1, limit, dtype=torch.float64).round()
        return idx.long(), torch.ones(idx.numel(), dtype=torch.bool)
    keep = keep.reshape(-1).bool()
    ranks = keep.long().cumsum(0)  # ranks[i]: kept rows up to row i
    total = ranks[-1]
    k = torch.arange(limit, device=keep.device)
    spaced = (k * (total - 1)).double().div(max(1, limit - 1)).round().long()
    wanted = torch.where(total > limit, spaced, k)  # the rank of each sampled row, from 0
    idx = torch.searchsorted(ranks, wanted + 1).clamp_(max=rows - 1)
    return idx, k < total


@torch.no_grad()
def lse_stats(
    logits: torch.Tensor, keep: torch.Tensor | None, limit: int = LOGIT_SAMPLE
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[Σ log Z, sampled rows, 0]`` and ``[max log Z]`` (fp64; ``-inf`` without rows) of the
    sampled rows of ``logits`` (..., V), the attention windows' layout with one "head".

    Args:
        keep: A keep-mask of ``logits``' leading dimensions (N,), or ``None``.
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    idx, valid = token_sample(keep, flat.shape[0], limit)
    rows = flat.index_select(0, idx.to(flat.device))  # (m, V), the model's dtype
    dtype = torch.promote_types(rows.dtype, torch.float32)
    step = max(1, _CHUNK // max(1, vocab))
    lse = torch.cat([rows[i : i + step].to(dtype).logsumexp(-1) for i in range(0, rows.shape[0], step)]).double()
    valid = valid.to(lse.device)
    total = torch.where(valid, lse, 0.0).sum()
    sums = torch.stack([total, valid.sum(dtype=torch.float64), total.new_zeros(())])
    return sums, torch.where(valid, lse, -torch.inf).amax().reshape(1)


class LogitPartitionHooks(ProbeHooks):
    """The head's forward hook (the sampled log Z of each collected forward) and the root's,
    which counts the collected forwards in which the head was not called.

    Args:
        model: The model (wrappers allowed).
        head: ``CollectOptions(logit_partition=)``: ``True`` or the head's module name.
        context: The monitor's forward context (mask and phase of the forward in flight).
        feed: Where the sums go (keyed by the head's name).
        collecting: Whether the monitor collects a forward of this phase now.
        on_error: Called with an exception caught in a hook and where it happened.
        warn_once: Called with a key and a message for a degradation worth one warning.

    Raises:
        ValueError: from ``find_head``.
    """

    def __init__(
        self,
        model: nn.Module,
        head: bool | str,
        context: ForwardContext,
        feed: AttentionFeed,
        *,
        collecting: Callable[[str], bool],
        on_error: Callable[..., None],
        warn_once: Callable[[str, str], None],
    ) -> None:
        super().__init__(context, feed, collecting=collecting, on_error=on_error, warn_once=warn_once)
        self.name, self.module = find_head(model, head)
        self._root = context_root(model)
        self._called = False  # the head ran during the root forward in flight
        self.silent = 0  # collected root forwards since the head's last call

    def register(self) -> None:
        if len(self._handles):
            return
        self._handles.add(self.module.register_forward_hook(self._on_head))
        self._handles.add(self._root.register_forward_hook(self._on_root, always_call=True))

    def remove(self) -> None:
        self._handles.remove()

    def _on_head(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling() or in_backward():
            return None
        self._called = True
        try:
            phase = self._phase(module)
            if self._collecting(phase) and isinstance(output, torch.Tensor) and output.is_floating_point():
                self._feed.add(self.name, phase, *lse_stats(output.detach(), self._keep(output)))
        except Exception as err:  # never let monitoring stop the model
            self._on_error(err, self.name)
        return None

    def _keep(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The root mask's last T columns for (B, T, V) logits, when its batch matches."""
        mask = self._context.mask if self._context.active else None
        if mask is None:
            return None
        if logits.dim() != 3 or mask.shape[0] != logits.shape[0] or mask.shape[-1] < logits.shape[1]:
            self._warn_once(
                "logit-mask-shape",
                f"CollectOptions(logit_partition=): the attention_mask has shape {tuple(mask.shape)} but "
                f"{self.name!r} output logits of shape {tuple(logits.shape)}; padding cannot be left out there, "
                f"so every position counts.",
            )
            return None
        return mask[:, mask.shape[-1] - logits.shape[1] :].to(logits.device)

    def _on_root(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling() or in_backward():
            return None
        called, self._called = self._called, False
        if called:
            self.silent = 0
        elif self._collecting(infer_phase(module)):
            self.silent += 1
            if self.silent == SILENT_FORWARDS:
                self._warn_once(
                    "logit-silent",
                    f"CollectOptions(logit_partition=): the head {self.name!r} was not called in {SILENT_FORWARDS} "
                    f"collected forwards; no logit_lse is logged. Its logits are never formed (a fused or chunked "
                    f"cross-entropy, e.g. Liger kernels, takes the hidden states and the head's weight), or the "
                    f"model runs under torch.compile, whose forwards the hook skips.",
                )
        return None
