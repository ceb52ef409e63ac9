"""torch.compile: the layer hooks' way out of a compiled graph, and dropping stale compiled code.

Under ``torch.compile`` a layer hook is traced into the model's graph, where it calls the
custom operator ``gsam_monitor::observe`` (``observe``): an opaque, effectful call that the
compiled graph keeps (Inductor does not eliminate or reorder it) and that hands the hidden
state, the padding mask and the phase, all fixed when the graph was traced, to the monitor
registered under its key (``add_observer``). No graph break, so ``fullgraph=True`` works.

Compiled code never re-checks module hooks added after it was compiled (Dynamo guards on no
empty hook dict), so hooks attached after a compiled warm-up need the compiled code dropped
once (``gsam_monitor._compat.drop_compiled_code``), so that the next call traces them.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable

import torch

__all__ = ["add_observer", "observe", "remove_observer"]


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
