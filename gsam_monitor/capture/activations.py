"""``ActivationCapture``: the monitor's hooks on a model, from a layer's output to rows in a window.

It registers the root's context hooks (mask and phase of the forward in flight) and one hook
per monitored layer, switches them on and off as the schedule says, and turns each
activation into rows (padding dropped, tokens sampled: ``gsam_monitor.capture.rows``) that
it hands to the windows. The schedule governs training forwards only: every evaluation
forward is collected when the eval phase is monitored. Between windows the root's context
hooks stay on, and an evaluation forward opens the layer hooks for its own duration
(the two root hooks are all that training forwards pay there). Eager forwards run the
hooks directly; under ``torch.compile`` the hooks are traced into the graph as ``observe``
calls (``gsam_monitor.capture.compiled``), and hooks the graph has traced stay registered,
switched by a flag that the compiled graph is specialised on (two variants, no recompilation
per window).

A problem inside a hook never stops the model: it is handed to ``on_error`` and skipped.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from gsam_monitor._compat import drop_compiled_code, has_compiled_code
from gsam_monitor.capture.attention import AttentionFeed, build_attention_hooks
from gsam_monitor.capture.compiled import add_observer, observe, remove_observer
from gsam_monitor.capture.hooks import (
    ForwardContext,
    HookHandles,
    ThreadForwardContext,
    attention_mask_position,
    context_root,
    extract_hidden,
    in_backward,
    infer_phase,
    register_context_hooks,
    register_layer_hook,
)
from gsam_monitor.capture.layers import LayerTarget, unwrap_model
from gsam_monitor.capture.logit_partition import LogitPartitionHooks
from gsam_monitor.capture.rows import TokenSampler, activation_rows

__all__ = ["ActivationCapture", "WindowFeed"]

log = logging.getLogger(__name__)


class WindowFeed(Protocol):
    """Where the captured rows go (the monitor's window store)."""

    def accepts(self, layer: str) -> bool:
        """Whether ``layer`` is still monitored (not dropped over the memory budget)."""

    def update(
        self, target: LayerTarget, module: nn.Module, phase: str, rows: torch.Tensor, keep: torch.Tensor | None
    ) -> None:
        """Add rows ``(N, d)`` (keep-mask ``(N,)``) of ``target``, seen on ``module``, to ``phase``'s window."""


class ActivationCapture:
    """The hooks that feed the windows: registered, switched, removed, and their row pipeline.

    Args:
        model: The model (wrappers allowed).
        targets: The monitored layers.
        phases: The monitored phases; activations of other phases are ignored.
        windows: Where the rows go.
        seed: Seed of the token sampler.
        max_tokens: At most this many tokens per layer per forward (``None``: all).
        on_error: Called with an exception caught in a hook and where it happened.
        warn_once: Called with a key and a message for a degradation worth one warning.
        attention: Where the attention entropies go (``attention_entropy=True``), or ``None``.
        selection: Every monitored layer, when ``targets`` is this rank's share of them
            (``shard_layers``): the attention check is on the whole selection.
        logits: Where the output logits' log-partition goes (``logit_partition=``), or ``None``.
        logit_head: ``CollectOptions(logit_partition=)``: ``True`` or the head's module name.

    Raises:
        ValueError: with ``attention``, when no monitored block's attention returns probabilities;
            with ``logits``, when the model has no such head.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: Sequence[LayerTarget],
        phases: Sequence[str],
        windows: WindowFeed,
        *,
        seed: int,
        max_tokens: int | None,
        on_error: Callable[..., None],
        warn_once: Callable[[str, str], None],
        attention: AttentionFeed | None = None,
        selection: Sequence[LayerTarget] | None = None,
        logits: AttentionFeed | None = None,
        logit_head: bool | str = True,
    ) -> None:
        self.model = model
        self.targets = list(targets)
        self.phases = tuple(phases)
        self.max_tokens = max_tokens
        self.sampler = TokenSampler(seed)
        self.context: ForwardContext = ThreadForwardContext()
        self.traced_context = ForwardContext()  # written by root hooks that torch.compile traces
        # Read by the layer hooks, also while torch.compile traces: the compiled graph is
        # specialised on it (a guard), so a switched-off hook costs the graph nothing.
        self.collecting = False
        # Evaluation forwards are collected whatever the schedule says (the eval phase's rule).
        self.eval_always = "eval" in self.phases
        self.compiled = False  # a compiled graph has traced the hooks: they stay registered
        self.attach_pending = False  # the next registration is the first since attach()
        self.unreadable: set[str] = set()  # layers whose traced output held no hidden state
        self._windows = windows
        self._on_error = on_error
        self._warn_once = warn_once
        self._mask_position = attention_mask_position(unwrap_model(model))
        self._handles = HookHandles()  # the layer (and attention) hooks
        self._context_handles = HookHandles()  # the root's context hooks
        self._eval_lock = threading.Lock()  # nn.DataParallel replicas start forwards in parallel threads
        self._eval_forwards = 0  # evaluation forwards in flight that opened the layer hooks
        self._attention = None if attention is None else build_attention_hooks(
            model, self.targets, self.context, attention, collecting=self.wants,
            on_error=on_error, warn_once=warn_once, selection=selection,
        )
        self._logits = None if logits is None else LogitPartitionHooks(
            model, logit_head, self.context, logits, collecting=self.wants, on_error=on_error, warn_once=warn_once
        )
        self._observer_key = add_observer(self._observe_traced)
        weakref.finalize(self, remove_observer, self._observer_key)

    @property
    def registered(self) -> bool:
        """Whether the layer hooks are on the model now."""
        return len(self._handles) > 0

    def wants(self, phase: str) -> bool:
        """Whether a forward of ``phase`` is collected now: an evaluation forward whenever the
        eval phase is monitored, a training forward while the schedule collects."""
        return phase in self.phases and (self.collecting or (phase == "eval" and self.eval_always))

    def switch(self, want: bool, attached: bool) -> None:
        """Collect the next training forwards or not (``want``); register or remove the hooks to match.

        Hooks that compiled graphs have traced stay registered while attached, switched by
        ``collecting``: removing them would recompile the graphs, and a graph compiled
        without them would never notice them coming back (Dynamo guards on no empty hook dict).
        While attached with the eval phase monitored, the root's context hooks stay on, so that
        an evaluation forward can open the layer hooks (``_eval_forward_started``).
        """
        self.collecting = want
        keep = want or (self.compiled and attached)
        if keep or (attached and self.eval_always):
            if not len(self._context_handles):
                self._register_context()
        elif len(self._context_handles):
            self._context_handles.remove()
        with self._eval_lock:
            if self._eval_forwards:  # an evaluation forward in flight closes them as it ends
                return
            if keep and not self.registered:
                self._register()
            elif not keep and self.registered:
                self._remove_layer_hooks()

    def remove(self) -> None:
        """Remove every hook (idempotent) and forget the forward in flight."""
        self._context_handles.remove()
        with self._eval_lock:  # a forward interrupted mid-way (Ctrl-C) never closed its hooks
            self._eval_forwards = 0
            self._remove_layer_hooks()
        self.collecting = False
        self.context.clear()
        self.traced_context.clear()

    def _remove_layer_hooks(self) -> None:
        self._handles.remove()
        for hooks in (self._attention, self._logits):
            if hooks is not None:
                hooks.remove()

    def report_unreadable(self) -> None:
        """Warn about the layers whose traced output held no hidden state (a compiled graph
        cannot warn from inside)."""
        for layer in sorted(self.unreadable):
            self.warn_unreadable(layer)

    def warn_unreadable(self, layer: str, kind: str = "an output") -> None:
        self._warn_once(
            f"unpack:{layer}",
            f"GSAMMonitor: layer {layer!r} produced {kind} with no floating tensor of shape (..., d); it is not "
            f"monitored. Select a sub-module that returns the hidden states.",
        )

    # ------------------------------------------------------------------ registration
    def _register_context(self) -> None:
        for handle in register_context_hooks(
            context_root(self.model), self.context, self._mask_position, self._on_error, self.traced_context,
            on_start=self._eval_forward_started, on_end=self._eval_forward_ended,
        ):  # fmt: skip
            self._context_handles.add(handle)

    def _eval_forward_started(self, phase: str) -> bool:
        """An eager root forward begins: open the layer hooks for it when it is an evaluation
        forward that the schedule's parked hooks would miss. Returns whether it opened them."""
        if phase != "eval" or not self.eval_always:
            return False
        with self._eval_lock:
            if self.registered and not self._eval_forwards:
                return False  # on already (a collection window, or compiled graphs)
            if not self.registered:
                self._register()
            self._eval_forwards += 1
            return True

    def _eval_forward_ended(self) -> None:
        """The evaluation forward that opened the layer hooks ended: park them again unless the
        schedule wants them now."""
        with self._eval_lock:
            self._eval_forwards -= 1
            if not self._eval_forwards and not (self.collecting or self.compiled):
                self._remove_layer_hooks()

    def _register(self) -> None:
        for index, target in enumerate(self.targets):
            self._handles.add(register_layer_hook(target.module, target.kind, self._make_callback(index, target)))
        for hooks in (self._attention, self._logits):
            if hooks is not None:
                hooks.register()
        first, self.attach_pending = self.attach_pending, False
        if first or self.compiled or has_compiled_code(type(unwrap_model(self.model)).forward):
            self._drop_compiled_code()

    def _drop_compiled_code(self) -> None:
        """Make torch.compile'd code trace the hooks just registered (see ``drop_compiled_code``)."""
        try:
            dropped = drop_compiled_code()
        except Exception as err:  # Dynamo internals moved: say what to do instead
            self._warn_once(
                "compile-reset",
                f"GSAMMonitor: could not make torch.compile'd code trace the hooks attached now "
                f"({type(err).__name__}: {err}); a model compiled and run before attach() may log nothing. "
                f"Attach the monitor before the first compiled call, or call torch._dynamo.reset() after attach().",
            )
            return
        if dropped:
            log.info(
                "GSAMMonitor: dropped the compiled code of %d function(s) so that their next call compiles them "
                "with the monitor's hooks (a model compiled and run before attach()).",
                dropped,
            )

    def _make_callback(self, index: int, target: LayerTarget) -> Callable[[nn.Module, Any], None]:
        def callback(module: nn.Module, value: Any) -> None:
            if not (self.collecting or self.eval_always):
                return
            if torch.compiler.is_compiling():
                self._trace_activation(index, target, module, value)
            else:
                self._on_activation(target, module, value)

        return callback

    # ------------------------------------------------------------------ the hook path
    def _trace_activation(self, index: int, target: LayerTarget, module: nn.Module, value: Any) -> None:
        """The hook inside a torch.compile trace: put one ``observe`` call into the graph. The
        phase and the mask are those of the forward being traced (the graph is specialised on
        the phase: grad mode, ``training`` and the context are guarded)."""
        hidden = extract_hidden(value)
        if hidden is None:
            # Nothing to observe. No warning from inside the graph (a graph break, which
            # fullgraph=True forbids): the monitor's step() warns.
            self.unreadable.add(target.name)
            return
        # The root's hooks ran in this trace (a compiled model or training step), or eagerly
        # before it (torch.compile(model): OptimizedModule calls them outside the graph).
        context = self.traced_context if self.traced_context.active else self.context
        phase = context.phase if context.active and context.phase else infer_phase(module)
        if not self.wants(phase):
            return
        observe(hidden, context.mask if context.active else None, self._observer_key, index, phase)

    def _observe_traced(self, index: int, hidden: torch.Tensor, mask: torch.Tensor | None, phase: str) -> None:
        """Run by the compiled graph's ``observe`` call, eagerly, with real tensors."""
        self.compiled = True
        target = self.targets[index]
        try:
            self._collect(target, target.module, hidden, phase, mask)
        except Exception as err:  # never let monitoring stop the model
            self._on_error(err, target.name)

    def _on_activation(self, target: LayerTarget, module: nn.Module, value: Any) -> None:
        try:
            if in_backward():
                return  # a gradient-checkpointing recomputation: these tokens were counted
            context = self.context
            phase = context.phase if context.active and context.phase else infer_phase(module)
            if not self.wants(phase):
                return
            hidden = extract_hidden(value)
            if hidden is None:
                self.warn_unreadable(target.name, type(value).__name__)
                return
            self._collect(target, module, hidden, phase, context.mask if context.active else None)
        except Exception as err:  # never let monitoring stop the model
            self._on_error(err, target.name)

    def _collect(
        self, target: LayerTarget, module: nn.Module, hidden: torch.Tensor, phase: str, root_mask: torch.Tensor | None
    ) -> None:
        """Feed one activation of ``target`` to its window (padding dropped, tokens sampled)."""
        if not self._windows.accepts(target.name):
            return
        rows, keep, unaligned = activation_rows(hidden, module, root_mask)
        if unaligned and root_mask is not None:
            self._warn_once(
                "mask-shape",
                f"GSAMMonitor: the attention_mask has shape {tuple(root_mask.shape)} but layer "
                f"{target.name!r} outputs {tuple(hidden.shape)}; its padding cannot be dropped, so every "
                f"position is counted.",
            )
        rows, keep = self.sampler.sample(rows, keep, self.max_tokens)
        self._windows.update(target, module, phase, rows, keep)
