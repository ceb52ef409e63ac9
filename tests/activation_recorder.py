"""Independent forward hooks (no gsam_monitor code) that keep what the monitored layers
output, for tests that recompute the monitor's metrics with numpy."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn


class Recorder:
    """Every training-phase (grad enabled, ``module.training``) output of the named layers,
    as the model produced it, in fp64 numpy, padding dropped.

    ``rows[layer][step]`` lists the ``(tokens, d)`` arrays of the forwards that belong to the
    1-based optimizer step ``step_of()``. The padding mask is the ``attention_mask`` keyword
    of the root module's forward, as the monitor reads it. Register before wrapping the model
    (FSDP1 replaces its sub-modules by wrappers; hooks on the real modules stay).
    """

    def __init__(self, root: nn.Module, layers: Iterable[str], step_of: Callable[[], int]) -> None:
        modules = dict(root.named_modules())
        self.rows: dict[str, dict[int, list[np.ndarray]]] = {name: {} for name in layers}
        self.dtypes: dict[str, set[torch.dtype]] = {name: set() for name in layers}
        self.step_of = step_of
        self.mask: torch.Tensor | None = None
        self.handles = [root.register_forward_pre_hook(self._capture_mask, with_kwargs=True)]
        self.handles += [modules[name].register_forward_hook(self._hook(name)) for name in self.rows]

    def _capture_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.mask = kwargs.get("attention_mask")

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            if not (torch.is_grad_enabled() and module.training):
                return
            hidden = (output[0] if isinstance(output, tuple) else output).detach()  # (B, T, d)
            self.dtypes[name].add(hidden.dtype)
            if self.mask is not None and tuple(self.mask.shape) == tuple(hidden.shape[:-1]):
                hidden = hidden[self.mask.bool()]
            x = hidden.reshape(-1, hidden.shape[-1]).to(torch.float64).numpy().copy()  # (tokens, d)
            self.rows[name].setdefault(self.step_of(), []).append(x)

        return hook

    def window(self, layer: str, last_step: int, every: int) -> np.ndarray:
        """The rows of optimizer steps ``last_step - every + 1 .. last_step``."""
        return np.concatenate([x for s in range(last_step - every + 1, last_step + 1) for x in self.rows[layer][s]])

    def save(self, path: str | Path) -> None:
        """``np.savez`` of every step's rows, keyed ``"{layer}@{step}"``."""
        np.savez(path, **{f"{name}@{s}": np.concatenate(xs) for name, steps in self.rows.items()
                          for s, xs in steps.items()})

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
