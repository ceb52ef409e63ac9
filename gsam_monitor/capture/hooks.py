"""Hooks: capturing the padding mask and layer activations without disturbing the model.

Two kinds of hooks cooperate:

* On the root model, a forward pre-hook (``with_kwargs=True``, since Hugging Face models are
  called with keyword arguments) records the ``attention_mask`` (keyword or positional) and
  the phase of this forward pass; a forward hook with ``always_call=True`` clears them, also
  when the forward raises, so a stale mask never reaches a later call.
* On every monitored layer, a forward hook (or, for the embedding output, a forward pre-hook
  on the first block) hands the hidden-state tensor to the monitor.

Every hook returns ``None`` (anything else would replace the model's output) and never
synchronises with the host: the mask is applied as a weight inside ``LayerStats.update``,
and token subsampling draws random keys on the device.

Gradient checkpointing re-runs forwards during the backward pass; a hook that fires while
the autograd engine is executing (``gsam_monitor._compat.autograd_running``) is such a
recomputation and is skipped, so tokens are counted once. The phase is decided once per root
forward because reentrant checkpointing runs the first forward of a block under
``torch.no_grad()`` even in training.

Under ``torch.compile`` a layer hook is traced into the model's graph and reaches the monitor
through an opaque operator (``gsam_monitor.capture.compiled``).

``nn.DataParallel`` runs the replicas of one module in several threads that share its hooks,
so the forward context is thread-local (``ThreadForwardContext``), the context hooks go on
the module inside the wrapper (``context_root``), and the token sampler's generators are
created under a lock (``gsam_monitor.capture.rows``). A root hook traced by torch.compile
writes a plain ``ForwardContext`` instead: Dynamo tracks attribute writes on plain objects
within a trace, not on thread-locals, whose writes the traced layer hooks would not see.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gsam_monitor._compat import autograd_running

__all__ = [
    "ForwardContext",
    "HookHandles",
    "ThreadForwardContext",
    "attention_mask_position",
    "context_root",
    "extract_hidden",
    "in_backward",
    "infer_phase",
    "register_context_hooks",
    "register_layer_hook",
]

Phase = Literal["train", "eval"]
_HIDDEN_KEYS = ("last_hidden_state", "hidden_states", "hidden_state", "output", "logits")


class HookHandles:
    """Every ``RemovableHandle`` the monitor registered; ``remove()`` is idempotent."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def add(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)


@dataclass
class ForwardContext:
    """What the root pre-hook learned about the forward pass in flight."""

    mask: torch.Tensor | None = None
    phase: Phase | None = None
    active: bool = False
    opened: bool = False  # this forward opened the layer hooks (an evaluation forward between windows)

    def clear(self) -> None:
        self.mask = None
        self.phase = None
        self.active = False
        self.opened = False


class ThreadForwardContext(threading.local, ForwardContext):
    """A ``ForwardContext`` per thread (``nn.DataParallel`` runs one forward per replica in
    parallel threads, each with its slice of the batch)."""


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass (checkpoint recomputation).

    Always False while ``torch.compile`` traces: a compiled graph's recomputation happens
    inside its backward graph, without module hooks.
    """
    if torch.compiler.is_compiling():
        return False
    return autograd_running()


def infer_phase(module: nn.Module) -> Phase:
    """``"train"`` when gradients are on and the module is in training mode, else ``"eval"``."""
    return "train" if torch.is_grad_enabled() and module.training else "eval"


def attention_mask_position(model: nn.Module) -> int | None:
    """Index of ``attention_mask`` among the positional arguments of ``model.forward``."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for i, p in enumerate(positional):
        if p.name == "attention_mask":
            return i
    return None


def register_context_hooks(
    root: nn.Module,
    context: ForwardContext,
    mask_position: int | None,
    on_error: Callable[[BaseException], None],
    traced: ForwardContext | None = None,
    on_start: Callable[[Phase], bool] | None = None,
    on_end: Callable[[], None] | None = None,
) -> list[RemovableHandle]:
    """Hooks on the root model that fill ``context`` for the duration of each forward
    (``traced`` instead while torch.compile traces them, when given).

    Eagerly (never while torch.compile traces), ``on_start(phase)`` is called as each forward
    begins; when it returns True, ``on_end()`` is called as that forward ends, also when it
    raises (the monitor opens the layer hooks for one evaluation forward this way).
    """

    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            if in_backward():
                return None
            mask = kwargs.get("attention_mask")
            if mask is None and mask_position is not None and len(args) > mask_position:
                mask = args[mask_position]
            ctx = traced if traced is not None and torch.compiler.is_compiling() else context
            # Only the (B, T) keep-mask convention (1 = token, 0 = padding) is understood;
            # 4-D additive masks are left alone rather than misread.
            ctx.mask = mask.detach() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            ctx.phase = infer_phase(module)
            ctx.active = True
            if on_start is not None and not torch.compiler.is_compiling():
                ctx.opened = on_start(ctx.phase)
        except Exception as err:  # a monitor bug must never stop the model
            on_error(err)
        return None

    def post_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if in_backward():
            return None
        ctx = traced if traced is not None and torch.compiler.is_compiling() else context
        opened = ctx.opened
        ctx.clear()
        if opened and on_end is not None:
            try:
                on_end()
            except Exception as err:  # a monitor bug must never stop the model
                on_error(err)
        return None

    return [
        root.register_forward_pre_hook(pre_hook, with_kwargs=True),
        root.register_forward_hook(post_hook, with_kwargs=True, always_call=True),
    ]


def extract_hidden(output: Any) -> torch.Tensor | None:
    """The hidden-state tensor of a layer's output.

    A floating tensor is itself; a tuple/list gives its first floating tensor of at least two
    dimensions (Hugging Face blocks return ``(hidden, attn_weights, ...)``); a ``ModelOutput`` or
    dict gives ``last_hidden_state`` / ``hidden_states`` / ... when that is a tensor, else its
    first floating tensor value. ``None`` when nothing fits.
    """
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() and output.dim() >= 1 else None
    if isinstance(output, Mapping):
        for key in _HIDDEN_KEYS:
            value = output.get(key)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value
        values = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = list(output)
    else:
        return None
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2:
            return value
    return None


def register_layer_hook(
    module: nn.Module,
    kind: Literal["output", "input"],
    callback: Callable[[nn.Module, Any], None],
) -> RemovableHandle:
    """Hook ``module`` so that ``callback(module, value)`` sees its output (``kind="output"``)
    or its hidden-state input (``kind="input"``: the first positional argument, else the
    ``hidden_states`` keyword). The hook itself always returns ``None``.
    """
    if kind == "output":

        def output_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            callback(mod, output)
            return None

        return module.register_forward_hook(output_hook, with_kwargs=True)

    def input_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        value = args[0] if args else kwargs.get("hidden_states")
        callback(mod, value)
        return None

    return module.register_forward_pre_hook(input_hook, with_kwargs=True)


def context_root(model: nn.Module) -> nn.Module:
    """Where the forward-context hooks go: the model, or the module inside an
    ``nn.DataParallel`` (its replicas share that module's hooks and run them in their own
    threads with their own slice of the batch, attention mask included)."""
    module: nn.Module = model
    for _ in range(8):  # wrappers nest a few levels at most (compile, DataParallel)
        if isinstance(module, nn.DataParallel):
            return module.module
        inner = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
        if not isinstance(inner, nn.Module):
            break
        module = inner
    return model
