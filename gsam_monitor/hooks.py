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
the autograd engine is executing (``torch._C._current_graph_task_id() != -1``) is such a
recomputation and is skipped, so tokens are counted once. The phase is decided once per root
forward because reentrant checkpointing runs the first forward of a block under
``torch.no_grad()`` even in training.

Under ``torch.compile`` a layer hook is traced into the model's graph, where it calls the
custom operator ``gsam_monitor::observe`` (``observe``): an opaque, effectful call that the
compiled graph keeps (Inductor does not eliminate or reorder it) and that hands the hidden
state, the padding mask and the phase, all fixed when the graph was traced, to the monitor
registered under its key (``add_observer``). No graph break, so ``fullgraph=True`` works.

``nn.DataParallel`` runs the replicas of one module in several threads that share its hooks,
so the forward context is thread-local (``ThreadForwardContext``) and the token sampler's
generators are created under a lock. A root hook traced by torch.compile writes a plain
``ForwardContext`` instead: Dynamo tracks attribute writes on plain objects within a trace,
not on thread-locals, whose writes the traced layer hooks would not see.
"""

from __future__ import annotations

import inspect
import itertools
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "ForwardContext",
    "HookHandles",
    "ThreadForwardContext",
    "TokenSampler",
    "add_observer",
    "align_mask",
    "attention_mask_position",
    "extract_hidden",
    "in_backward",
    "infer_phase",
    "observe",
    "register_context_hooks",
    "register_layer_hook",
    "remove_observer",
    "to_rows",
]

Phase = Literal["train", "eval"]
_HIDDEN_KEYS = ("last_hidden_state", "hidden_states", "hidden_state", "output", "logits")
# Modules whose outputs are channels-first even when 3-D (B, C, L); 4-D/5-D outputs always are.
_CHANNELS_FIRST_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
)


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

    def clear(self) -> None:
        self.mask = None
        self.phase = None
        self.active = False


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
    return torch._C._current_graph_task_id() != -1


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
) -> list[RemovableHandle]:
    """Hooks on the root model that fill ``context`` for the duration of each forward
    (``traced`` instead while torch.compile traces them, when given)."""

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
        except Exception as err:  # a monitor bug must never stop the model
            on_error(err)
        return None

    def post_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not in_backward():
            (traced if traced is not None and torch.compiler.is_compiling() else context).clear()
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


# ---------------------------------------------------------------------------------------------
# torch.compile: an opaque operator that carries the hook's tensors out of the compiled graph.
# ---------------------------------------------------------------------------------------------

_observers: dict[int, Callable[[int, torch.Tensor, torch.Tensor | None, str], None]] = {}
_observer_keys = itertools.count()


def add_observer(method: Callable[[int, torch.Tensor, torch.Tensor | None, str], None]) -> int:
    """Register a bound method ``(layer_index, hidden, mask, phase)`` for ``observe`` calls and
    return its key. Only a weak reference is kept: a dropped monitor is never called."""
    key = next(_observer_keys)
    ref = weakref.WeakMethod(method)  # type: ignore[arg-type]

    def call(layer: int, hidden: torch.Tensor, mask: torch.Tensor | None, phase: str) -> None:
        fn = ref()
        if fn is not None:
            fn(layer, hidden, mask, phase)

    _observers[key] = call
    return key


def remove_observer(key: int) -> None:
    _observers.pop(key, None)


# cudagraph_unsafe: a CUDA graph replays kernels, not Python; Inductor must run this call
# outside any graph it captures (torch.compile(mode="reduce-overhead")).
@torch.library.custom_op("gsam_monitor::observe", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def observe(hidden: torch.Tensor, mask: torch.Tensor | None, key: int, layer: int, phase: str) -> None:
    """Hand a layer's hidden state to the observer registered under ``key`` (see module docstring)."""
    fn = _observers.get(key)
    if fn is not None:
        fn(layer, hidden, mask, phase)


@observe.register_fake
def _observe_fake(hidden: torch.Tensor, mask: torch.Tensor | None, key: int, layer: int, phase: str) -> None:
    return None


# Without a registered effect a call whose result nobody uses is dead code to the compiler:
# Inductor dropped it from no-grad graphs.
observe.register_effect(torch.library.EffectType.ORDERED)
