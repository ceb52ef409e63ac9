"""Hidden states of chosen layers, one forward at a time, through the library's hooks.

``LayerCapture`` registers the monitor's own hooks (``gsam_monitor.capture.hooks``): a
forward pre-hook on the root model that records the ``attention_mask``, and a hook per
selected layer (``gsam_monitor.capture.layers.resolve_layers`` with ``"embeddings"`` and
``"auto"``: index 0 is the embedding output, index i the output of block i, as Hugging Face's
``hidden_states[i]``). Each call runs one forward and returns the selected layers' hidden
states with the keep-mask (attention mask, minus the positions the caller marks as special
tokens); nothing is kept between calls, so activations stream and are never stored.

The forward stops after the deepest selected layer (a private exception raised by that
layer's hook and caught here): the blocks above it cannot change the captured states, and
for the middle block of a model this halves the cost of a pass. The root hook that clears
the mask runs with ``always_call=True``, so the stop leaves no stale state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gsam_monitor.capture.hooks import (
    ForwardContext,
    HookHandles,
    attention_mask_position,
    extract_hidden,
    register_context_hooks,
    register_layer_hook,
)
from gsam_monitor.capture.layers import AUTO, EMBEDDINGS, resolve_layers

__all__ = ["LayerCapture", "hidden_layer_names"]


class _StopForward(Exception):
    """Raised by the deepest selected layer's hook: the rest of the model is not needed."""


def hidden_layer_names(model: nn.Module) -> list[str]:
    """Names of the capturable points, index 0 = embeddings, i = block i (``hidden_states[i]``)."""
    return [target.name for target in resolve_layers(model, [EMBEDDINGS, AUTO])]


class LayerCapture:
    """Capture the hidden states of chosen layers of a model, one forward at a time.

    Args:
        model: a transformer whose blocks ``layers="auto"`` finds (any Hugging Face model).
        layers: indices as in ``hidden_states``: 0 = embedding output, i = block i.
        stop_early: stop the forward after the deepest selected layer.

    Raises:
        ValueError: an index outside ``0 .. number of blocks``, or no layer selected.

    Example::

        with LayerCapture(model, [3]) as capture:
            hidden, keep = capture(input_ids, attention_mask)   # {3: (B, T, d)}, (B, T)
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], *, stop_early: bool = True) -> None:
        targets = resolve_layers(model, [EMBEDDINGS, AUTO])
        wanted = sorted({int(i) for i in layers})
        if not wanted:
            raise ValueError("layers: expected at least one layer index, got none")
        bad = [i for i in wanted if not 0 <= i < len(targets)]
        if bad:
            raise ValueError(
                f"layers: expected indices 0..{len(targets) - 1} (0 = embeddings, i = block i), got {bad}"
            )
        self.model = model
        self.layers = wanted
        self.names = {i: targets[i].name for i in wanted}
        self._targets = {i: targets[i] for i in wanted}
        self._deepest = wanted[-1] if stop_early else None
        self._context = ForwardContext()
        self._handles = HookHandles()
        self._captured: dict[int, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self._error: BaseException | None = None
        for handle in register_context_hooks(model, self._context, attention_mask_position(model), self._on_error):
            self._handles.add(handle)
        for index, target in self._targets.items():
            self._handles.add(register_layer_hook(target.module, target.kind, self._callback(index)))

    def _on_error(self, err: BaseException) -> None:
        self._error = err

    def _callback(self, index: int) -> Any:
        def callback(module: nn.Module, value: Any) -> None:
            hidden = extract_hidden(value)
            if hidden is None:
                raise RuntimeError(
                    f"layer {self.names[index]!r} produced {type(value).__name__} with no hidden-state tensor"
                )
            self._captured[index] = hidden.detach()
            if self._mask is None and self._context.mask is not None:
                self._mask = self._context.mask != 0
            if index == self._deepest:
                raise _StopForward

        return callback

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        special: torch.Tensor | None = None,
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Run one forward; return ``{layer: hidden (B, T, d)}`` and the keep-mask (B, T) bool.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T), 1 = token, 0 = padding (default: all ones).
            special: (B, T) bool, True for special tokens to drop as well (e.g. [CLS]).

        Raises:
            RuntimeError: if a selected layer did not run or returned no hidden states.
        """
        self._captured, self._mask, self._error = {}, None, None
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask)
        except _StopForward:
            pass
        if self._error is not None:
            raise RuntimeError(f"the attention-mask hook failed: {self._error}") from self._error
        missing = [self.names[i] for i in self.layers if i not in self._captured]
        if missing:
            raise RuntimeError(f"layers {missing} did not run in the forward pass")
        keep = self._mask if self._mask is not None else attention_mask.to(torch.bool)
        keep = keep.to(input_ids.device)
        if special is not None:
            keep = keep & ~special.to(keep.device)
        return dict(self._captured), keep

    def close(self) -> None:
        """Remove every hook (idempotent)."""
        self._handles.remove()
        self._context.clear()

    def __enter__(self) -> LayerCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
