"""The monitor's names for a model's hidden states, so that an eval result and a monitor log of
the same output carry the same name.

``hidden_states[i]`` of a ``transformers`` model is the embedding output for ``i = 0`` and the
output of block ``i - 1`` after it, except that decoders return their final norm's output as
the last one. Rather than rely on that convention, the names are found on one forward: the
monitor's targets (``"embeddings"``, the blocks of ``"auto"``, ``"final_norm"``) are hooked,
and each hidden state is matched with the target output that equals it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from gsam_monitor.capture.hooks import extract_hidden, register_layer_hook
from gsam_monitor.capture.layers import AUTO, EMBEDDINGS, FINAL_NORM, LayerTarget, find_final_norm, resolve_layers

__all__ = ["monitor_names", "monitor_targets"]


def monitor_targets(model: Any) -> list[LayerTarget]:
    """What ``GSAMMonitor`` would call the model's hidden states: the embedding output, every
    block of the stack (``layers="auto"``) and the final norm where there is one."""
    targets = [*resolve_layers(model, EMBEDDINGS), *resolve_layers(model, AUTO)]
    if find_final_norm(model) is not None:
        targets += resolve_layers(model, FINAL_NORM)
    return targets


@contextlib.contextmanager
def monitor_names(model: Any, names: list[str | None] | None) -> Iterator[Callable[[Sequence[torch.Tensor]], None]]:
    """Name each hidden state as the monitor names the same output (``names``, filled in place;
    nothing is hooked when ``names`` is ``None`` or already filled).

    Inside the block, every forward's output of the monitor's targets is kept (a reference, no
    copy); the yielded function then matches ``hidden_states`` against them exactly (the same
    values: models return those very tensors, or the same computation), earlier targets first.
    A hidden state no target produced (a model that reshapes its states) is named ``None``.
    """
    if names is None or names:
        yield lambda hidden_states: None
        return
    seen: list[tuple[str, torch.Tensor]] = []
    handles = []
    try:
        targets = monitor_targets(model)
    except ValueError:  # no block stack the monitor can find: leave the names unknown
        targets = []
    for target in targets:

        def keep(module: Any, value: Any, name: str = target.name) -> None:
            hidden = extract_hidden(value)
            if hidden is not None:
                seen.append((name, hidden.detach()))

        handles.append(register_layer_hook(target.module, target.kind, keep))

    def match(hidden_states: Sequence[torch.Tensor]) -> None:
        names[:] = [
            next((name for name, t in seen if t.shape == h.shape and torch.equal(t, h)), None) for h in hidden_states
        ]
        seen.clear()

    try:
        yield match
    finally:
        for handle in handles:
            handle.remove()
