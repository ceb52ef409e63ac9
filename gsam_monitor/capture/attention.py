"""Attention entropy per head, from the attention probabilities a block's attention returns.

For each query row, H = -Σ_k p_k log p_k (nats) over the keys of one head's attention
probabilities; a window's value per head is the mean over its query rows (Zhai et al.,
"Stabilizing transformer training by preventing attention entropy collapse", ICML 2023,
watch it fall towards 0 before a divergence). log(number of keys) is the ceiling: a head
attending uniformly to 20 tokens has entropy log 20 ≈ 3.0.

Two sources, per forward of each monitored attention module:

* **The attention logits** (``capture.attention_logits``): a Hugging Face v5 attention module
  looks its attention function up in ``transformers``' registry at every forward; the monitor
  wraps that lookup while it collects and, from the q, k the function receives, computes on a
  sample of at most 64 query rows per sequence the entropy above and the max attention logit,
  ``attn_logit_max``, then calls the function unchanged. This works under every implementation
  (``"eager"``, ``"sdpa"``, ``"flash_attention_2"``; not flex attention's block masks) and is the
  source wherever the call is seen: under eager too, so that every kernel gives the same numbers,
  and before attention dropout, so that training forwards count.
* **The eager probabilities**, the fallback for a forward whose call was not seen (an attention
  module that does not use the registry, or GPT-2's ``reorder_and_upcast_attn`` path): the
  models name, in ``_can_record_outputs`` (what ``output_attentions=True`` itself hooks), the
  attention module whose output holds the probabilities, shape (batch, heads, queries, keys);
  with ``attn_implementation="eager"`` a forward hook reads them there. Entropy only, over every
  query row. A fused kernel never forms them: such a module gives nothing, which the monitor
  says once at setup (the fix: ``attn_implementation="eager"``).

Masking (the probabilities): padding keys are left out of the sum (their probability is 0 under the model's
own mask; a row that put mass there is not a distribution over the real tokens and is
dropped, below), and padding queries are left out of the mean (the root's ``attention_mask``,
its last ``queries`` columns under a KV cache). A row whose probabilities over the real keys
do not sum to 1 within the dtype's rounding (``ROW_SUM_TOLERANCE``) is dropped and counted:
the eager kernels return the probabilities after attention dropout, so in training mode a
module with attention dropout (BERT's 0.1) returns rescaled, partly zeroed rows. Those
training forwards are skipped outright, with one warning (set the attention dropout to 0 to
count them); evaluation forwards are counted. Not under ``torch.compile``: the hooks skip
compiled forwards.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from gsam_monitor import _compat
from gsam_monitor.capture.attention_logits import ROUTER, logit_stats
from gsam_monitor.capture.hooks import ForwardContext, HookHandles, in_backward, infer_phase
from gsam_monitor.capture.layers import LayerTarget, unwrap_model

__all__ = [
    "ROW_SUM_TOLERANCE",
    "AttentionFeed",
    "AttentionHooks",
    "AttentionSite",
    "ProbeHooks",
    "attention_implementation",
    "attention_sites",
    "build_attention_hooks",
    "entropy_sums",
]

ROW_SUM_TOLERANCE = 1e-3
"""|Σ_k p_k - 1| allowed for a row of fp32/fp64 probabilities; 16-bit ones get their dtype's
eps (bf16: 2⁻⁷, which bounds the rounding of a sum of rounded probabilities)."""

_CHUNK = 1 << 24  # elements per head chunk: the entropy's temporaries stay at ~64 MB in fp32
_DROPOUT_NAMES = ("attention_dropout", "attn_dropout", "dropout")


@dataclass(frozen=True)
class AttentionSite:
    """One attention module whose output carries its probabilities.

    Attributes:
        layer: The key its entropies are logged under (the monitored block's name).
        module: The attention module.
        index: Where the probabilities are in its output tuple.
        dropout: The attention dropout it applies in training mode (0 when none was found).
        routed: Whether it looks its attention function up in ``transformers``' registry, so
            that its logits can be sampled.
    """

    layer: str
    module: nn.Module
    index: int
    dropout: float
    routed: bool = False


class AttentionFeed(Protocol):
    """Where the per-forward sums go (the monitor's attention windows)."""

    def add(self, layer: str, phase: str, sums: torch.Tensor, maxima: torch.Tensor | None = None) -> None:
        """Add ``[entropy sums (H), rows (H), dropped rows (1)]`` and the max logit per head
        (H, when the logits were sampled) to ``layer``'s ``phase`` window."""


def attention_implementation(model: nn.Module) -> str | None:
    """The model's ``config._attn_implementation`` (``None`` for a model without one)."""
    config = getattr(unwrap_model(model), "config", None)
    impl = getattr(config, "_attn_implementation", None)
    return impl if isinstance(impl, str) else None


def _recorders(model: nn.Module) -> list[tuple[type | None, str | None, str | None, int]]:
    """(class, class-name suffix, layer-name part, index) of every ``"attentions"`` entry of
    the ``_can_record_outputs`` of the Hugging Face models inside ``model``."""
    out = []
    for module in model.modules():
        spec = (getattr(type(module), "_can_record_outputs", None) or {}).get("attentions")
        if spec is None:
            continue
        if isinstance(spec, type):  # a plain class: the probabilities are output[1]
            out.append((spec, None, None, 1))
        else:  # an OutputRecorder
            out.append((spec.target_class, spec.class_name, spec.layer_name, int(spec.index)))
    return out


def _dropout(module: nn.Module) -> float:
    for name in _DROPOUT_NAMES:
        value = getattr(module, name, None)
        if isinstance(value, nn.Dropout):
            value = value.p
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return 0.0


def attention_sites(model: nn.Module, targets: Sequence[LayerTarget]) -> list[AttentionSite]:
    """The attention modules inside the monitored blocks (targets hooked on their output),
    as the model's ``_can_record_outputs["attentions"]`` names them."""
    recorders = _recorders(unwrap_model(model))
    sites = []
    for target in targets:
        if target.kind != "output":
            continue
        found = []
        for sub, module in target.module.named_modules():
            full = f".{target.module_name}.{sub}." if sub else f".{target.module_name}."
            for cls, class_name, layer_name, index in recorders:
                by_class = cls is not None and isinstance(module, cls)
                by_name = class_name is not None and full.rstrip(".").endswith(class_name)
                if (by_class or by_name) and (layer_name is None or f".{layer_name.strip('.')}." in full):
                    found.append((sub, module, index))
                    break
        for sub, module, index in found:
            layer = target.name if len(found) == 1 else f"{target.name}.{sub}"
            routed = _compat.calls_attention_registry(type(module))
            sites.append(AttentionSite(layer, module, index, _dropout(module), routed))
    return sites


def _tolerance(dtype: torch.dtype) -> float:
    return max(ROW_SUM_TOLERANCE, torch.finfo(dtype).eps)


@torch.no_grad()
def entropy_sums(probs: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """``[Σ entropy per head (H), counted rows per head (H), dropped rows (1)]`` in fp64.

    Args:
        probs: (B, H, Tq, Tk) attention probabilities.
        key_mask: (B, Tk) keep-mask of the keys (1 = token, 0 = padding), or ``None``; the
            queries are its last Tq columns.
    """
    b, h, tq, tk = probs.shape
    tol = _tolerance(probs.dtype)
    if key_mask is None:
        keys = torch.ones(b, tk, dtype=torch.bool, device=probs.device)
    else:
        keys = key_mask.to(probs.device).bool()
    queries = keys[:, tk - tq :]
    ent = torch.empty(b, h, tq, dtype=torch.float64, device=probs.device)
    ok = torch.empty(b, h, tq, dtype=torch.bool, device=probs.device)
    step = max(1, _CHUNK // max(1, b * tq * tk))
    for h0 in range(0, h, step):  # chunks of heads: the temporaries stay small
        chunk = probs[:, h0 : h0 + step]
        p = chunk.to(torch.promote_types(chunk.dtype, torch.float32)) * keys[:, None, None, :]
        ent[:, h0 : h0 + step] = -torch.special.xlogy(p, p).sum(-1, dtype=torch.float64)
        ok[:, h0 : h0 + step] = (p.sum(-1, dtype=torch.float64) - 1).abs() <= tol
    counted = queries[:, None, :] & ok
    sums = torch.where(counted, ent, 0.0).sum((0, 2))
    rows = counted.sum((0, 2), dtype=torch.float64)
    dropped = (queries[:, None, :] & ~ok).sum(dtype=torch.float64).reshape(1)
    return torch.cat([sums, rows, dropped])


class ProbeHooks:
    """What the per-forward probes' hooks share (the attention observers, the log-partition's
    head hook): the monitor's forward context, where the sums go, whether a phase is collected
    now, the error and warning callbacks, and the hook handles.

    Args:
        context: The monitor's forward context (mask and phase of the forward in flight).
        feed: Where the sums go.
        collecting: Whether the monitor collects a forward of this phase now.
        on_error: Called with an exception caught in a hook and where it happened.
        warn_once: Called with a key and a message for a degradation worth one warning.
    """

    def __init__(
        self,
        context: ForwardContext,
        feed: AttentionFeed,
        *,
        collecting: Callable[[str], bool],
        on_error: Callable[..., None],
        warn_once: Callable[[str, str], None],
    ) -> None:
        self._context = context
        self._feed = feed
        self._collecting = collecting
        self._on_error = on_error
        self._warn_once = warn_once
        self._handles = HookHandles()

    def _phase(self, module: nn.Module) -> str:
        """The phase of the forward in flight (the context's, else the module's mode)."""
        context = self._context
        return context.phase if context.active and context.phase else infer_phase(module)


class AttentionHooks(ProbeHooks):
    """The attention observers of the monitored blocks: each module's registry calls (the
    sampled logits) and its forward hook (the eager probabilities, where no call was seen).

    They read the forward's mask and phase from the monitor's ``ForwardContext`` (filled by
    the activation hooks' root pre-hook) and count a forward only when ``collecting(phase)`` says so.

    Args:
        sites: The attention modules (``attention_sites``).
        context: The monitor's forward context.
        feed: Where the sums go.
        collecting: Whether the monitor collects a forward of this phase now.
        on_error: Called with an exception caught in a hook and where it happened.
        warn_once: Called with a key and a message for a degradation worth one warning.
    """

    def __init__(
        self,
        sites: Sequence[AttentionSite],
        context: ForwardContext,
        feed: AttentionFeed,
        *,
        collecting: Callable[[str], bool],
        on_error: Callable[..., None],
        warn_once: Callable[[str, str], None],
    ) -> None:
        super().__init__(context, feed, collecting=collecting, on_error=on_error, warn_once=warn_once)
        self.sites = list(sites)
        self._routes: list[tuple[nn.Module, Callable[..., None]]] = []
        self._seen: set[nn.Module] = set()  # modules whose call this forward's logits came from

    def register(self) -> None:
        if len(self._handles):
            return
        for site in self.sites:
            self._handles.add(site.module.register_forward_hook(self._make_hook(site)))
            if site.routed:
                observer = self._make_observer(site)
                try:
                    ROUTER.add(site.module, observer)
                except Exception as err:  # transformers moved its registry: the probabilities remain
                    self._warn_once(
                        "attn-registry",
                        f"CollectOptions(attention_entropy=True): could not wrap transformers' attention-function "
                        f"registry ({type(err).__name__}: {err}); no attn_logit_max is logged, and attention entropy "
                        f"only where the eager kernel returns its probabilities.",
                    )
                    continue
                self._routes.append((site.module, observer))

    def remove(self) -> None:
        self._handles.remove()
        routes, self._routes = self._routes, []
        for module, observer in routes:
            ROUTER.remove(module, observer)
        self._seen.clear()

    def _make_hook(self, site: AttentionSite) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if torch.compiler.is_compiling() or in_backward():
                return None
            try:
                self._on_output(site, module, output)
            except Exception as err:  # never let monitoring stop the model
                self._on_error(err, site.layer)
            return None

        return hook

    def _make_observer(self, site: AttentionSite) -> Callable[..., None]:
        def observe(module: nn.Module, fused: bool, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if in_backward():
                return
            try:
                self._on_call(site, module, fused, args, kwargs)
            except Exception as err:  # never let monitoring stop the model
                self._on_error(err, site.layer)

        return observe

    def _on_call(
        self, site: AttentionSite, module: nn.Module, fused: bool, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        phase = self._phase(module)
        if not self._collecting(phase):
            return
        query, key = (args[0], args[1]) if len(args) > 1 else (kwargs.get("query"), kwargs.get("key"))
        mask = args[3] if len(args) > 3 else kwargs.get("attention_mask")
        readable = isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and query.dim() == key.dim() == 4
        if not readable or len(args) > 4 or not (mask is None or isinstance(mask, torch.Tensor)):
            self._warn_once(
                "attn-call",
                f"CollectOptions(attention_entropy=True): the attention function of {site.layer!r} was called with "
                f"arguments the monitor cannot read (a {type(mask).__name__} mask, as flex attention's block masks, or "
                f"positional arguments after the mask); its logits are not sampled there (not warned again).",
            )
            return
        if query.shape[1] % key.shape[1]:
            raise ValueError(f"attention logits: {query.shape[1]} query heads over {key.shape[1]} key heads")
        scaling = kwargs.get("scaling")
        is_causal = kwargs.get("is_causal")
        sums, maxima = logit_stats(
            query.detach(), key.detach(), None if mask is None else mask.detach(),
            scaling=query.shape[-1] ** -0.5 if scaling is None else float(scaling),
            # A mask-less call is causal only in the fused kernels (eager applies the mask it gets).
            is_causal=fused and bool(getattr(module, "is_causal", False) if is_causal is None else is_causal),
            query_mask=self._query_mask(site, query.shape[0], query.shape[2], key.shape[2]),
            softcap=kwargs.get("softcap"),
            bias=kwargs.get("position_bias") if isinstance(kwargs.get("position_bias"), torch.Tensor) else None,
        )  # fmt: skip
        self._feed.add(site.layer, phase, sums, maxima)
        self._seen.add(module)

    def _query_mask(self, site: AttentionSite, batch: int, queries: int, keys: int) -> torch.Tensor | None:
        """The root mask's last ``queries`` columns, when it matches the call's batch and keys."""
        mask = self._context.mask if self._context.active else None
        if mask is None:
            return None
        if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[-1] != keys:
            self._warn_mask(site, tuple(mask.shape), f"attended over {keys} keys in a batch of {batch}")
            return None
        return mask[:, keys - queries :]

    def _warn_mask(self, site: AttentionSite, mask: tuple[int, ...], got: str) -> None:
        self._warn_once(
            "attn-mask-shape",
            f"CollectOptions(attention_entropy=True): the attention_mask has shape {mask} but {site.layer!r} "
            f"{got}; padding cannot be left out there, so every position counts.",
        )

    def _on_output(self, site: AttentionSite, module: nn.Module, output: Any) -> None:
        if module in self._seen:  # counted from its logits
            self._seen.discard(module)
            return
        phase = self._phase(module)
        if not self._collecting(phase):
            return
        probs = output[site.index] if isinstance(output, (tuple, list)) and len(output) > site.index else None
        if not isinstance(probs, torch.Tensor) or probs.dim() != 4:
            self._warn_once(  # once per monitor: a fused kernel runs in every block alike
                "attn-none",
                f"CollectOptions(attention_entropy=True): {site.layer!r} returned no attention probabilities (its "
                f"kernel never formed them) and its attention function was not seen in transformers' registry; no "
                f"attention entropy is logged for it, nor for any other monitored attention layer that returns none "
                f"(not warned again). Load the model with attn_implementation='eager'.",
            )
            return
        if module.training and site.dropout > 0:
            self._warn_once(  # once per monitor, not per layer: every block of a model has the same dropout
                "attn-dropout",
                f"CollectOptions(attention_entropy=True): {site.layer!r} (and any other monitored block with attention "
                f"dropout) applies dropout (p = {site.dropout:g}) to its attention probabilities in training mode, "
                f"and returns them after the dropout; those training forwards are not counted (evaluation forwards "
                f"are). Set the model's attention dropout to 0 to count them.",
            )
            return
        mask = self._context.mask if self._context.active else None
        if mask is not None and (mask.shape[0] != probs.shape[0] or mask.shape[-1] != probs.shape[-1]):
            self._warn_mask(site, tuple(mask.shape), f"returned probabilities of shape {tuple(probs.shape)}")
            mask = None
        self._feed.add(site.layer, phase, entropy_sums(probs.detach(), mask))


def build_attention_hooks(
    model: nn.Module,
    targets: Sequence[LayerTarget],
    context: ForwardContext,
    feed: AttentionFeed,
    *,
    collecting: Callable[[str], bool],
    on_error: Callable[..., None],
    warn_once: Callable[[str, str], None],
    selection: Sequence[LayerTarget] | None = None,
) -> AttentionHooks:
    """The attention hooks of ``CollectOptions(attention_entropy=True)``, checked at setup: a
    warning names the monitored attention modules whose logits cannot be sampled (not in the
    registry), and says whether their eager probabilities remain.

    Args:
        targets: The layers this process hooks (under ``shard_layers``, the ones it owns).
        selection: Every monitored layer (default: ``targets``). The check is on the whole
            selection, so that every rank agrees; a rank whose own layers hold no attention
            module gets no attention hooks and measures nothing.

    Raises:
        ValueError: if no monitored block holds an attention module that returns its
            probabilities (``_can_record_outputs["attentions"]`` of a Hugging Face model).
    """
    sites = attention_sites(model, targets)
    if not sites and (selection is None or not attention_sites(model, selection)):
        raise ValueError(
            "attention_entropy=True: none of the monitored layers holds an attention module that returns its "
            "probabilities (a Hugging Face transformers model's _can_record_outputs['attentions']); monitor the "
            "transformer blocks (layers='auto') of such a model, or drop attention_entropy."
        )
    impl = attention_implementation(model)
    unrouted = [site.layer for site in sites if not site.routed]
    if unrouted and impl is not None and impl != "eager":
        warnings.warn(
            f"CollectOptions(attention_entropy=True): the model runs attn_implementation={impl!r}, a fused kernel "
            f"that never forms the attention probabilities, and the attention of {', '.join(unrouted)} does not go "
            f"through transformers' attention-function registry, so no attention entropy or attn_logit_max can be "
            f"logged for it. Load it with from_pretrained(..., attn_implementation='eager') or call "
            f"model.set_attn_implementation('eager') (for the entropy; the eager kernel keeps a queries x keys "
            f"matrix per head in memory).",
            UserWarning,
            stacklevel=4,
        )
    elif unrouted:
        warnings.warn(
            f"CollectOptions(attention_entropy=True): the attention of {', '.join(unrouted)} does not go through "
            f"transformers' attention-function registry, so its logits cannot be sampled: attention entropy comes "
            f"from its eager probabilities, and no attn_logit_max is logged for it.",
            UserWarning,
            stacklevel=4,
        )
    return AttentionHooks(sites, context, feed, collecting=collecting, on_error=on_error, warn_once=warn_once)
