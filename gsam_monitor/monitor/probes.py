"""The per-forward probes' windows beside the layer statistics: attention, output logits.

``ProbeWindows`` owns the attention windows (``CollectOptions(attention_entropy=True)``) and the
output logits' log-partition windows (``logit_partition=``), each an ``AttentionWindows`` (sums
that follow the window kind, maxima since the last log, reduced over the ranks), and closes,
decays, resets and saves them together. A log's closed windows come by kind:
``{"attention": ..., "logit_partition": ...}`` (a kind that is off is absent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from gsam_monitor.monitor.attention import AttentionWindows

__all__ = ["ProbeWindows"]

Key = tuple[str, str]


class ProbeWindows:
    """The attention and log-partition windows of a monitor (either ``None`` when off).

    Args:
        window: The statistics' window kind.
        process_group: The group a log reduces over.
        attention: Whether attention entropy is measured.
        logits: Whether the output logits' log-partition is measured.
    """

    def __init__(self, window: str, process_group: Any, *, attention: bool, logits: bool) -> None:
        self.attention = AttentionWindows(window, process_group) if attention else None
        self.logits = AttentionWindows(window, process_group) if logits else None

    def _parts(self) -> list[tuple[str, AttentionWindows]]:
        parts = (("attention", self.attention), ("logit_partition", self.logits))
        return [(name, windows) for name, windows in parts if windows is not None]

    def close(self, phases: Sequence[str]) -> dict[str, dict[Key, torch.Tensor]]:
        """Each kind's windows of ``phases`` for a log, by kind (reduced over ranks: call it on
        every rank, which closes the kinds in one order); then the next windows."""
        return {name: windows.close(phases) for name, windows in self._parts()}

    def decay(self, factor: float) -> None:
        for _, windows in self._parts():
            windows.decay(factor)

    def reset(self) -> None:
        for _, windows in self._parts():
            windows.reset()

    def state_dict(self) -> dict[str, Any]:
        """``{"attention": ..., "logit_partition": ...}`` (``{}`` for a kind that is off)."""
        out: dict[str, Any] = {"attention": {}, "logit_partition": {}}
        out.update({name: windows.state_dict() for name, windows in self._parts()})
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s parts (a kind missing from ``state`` starts empty)."""
        for name, windows in self._parts():
            windows.load_state_dict(state.get(name, {}))
