"""The monitor's checkpoint: what ``GSAMMonitor.state_dict()`` holds, and the checks on loading.

Tensors and plain values only, so that ``torch.load(path, weights_only=True)`` reads it back:
the format tag, the layers it was saved for, the counters, every window (statistics,
held-out fits, reservoir samples; on the CPU) and the token sampler's generator states.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["STATE_FORMAT", "check_state"]

STATE_FORMAT = "gsam_monitor.GSAMMonitor"
"""The ``"format"`` entry of ``GSAMMonitor.state_dict()``."""


def check_state(state: Mapping[str, Any], layers: Sequence[str]) -> None:
    """Refuse a state that is not a monitor's, or that was saved for other layers.

    Raises:
        ValueError: naming what differs and how to construct a matching monitor.
    """
    if state.get("format") != STATE_FORMAT:
        raise ValueError(
            f"load_state_dict: not a GSAMMonitor state (no format {STATE_FORMAT!r}); pass the dict that "
            "monitor.state_dict() returned."
        )
    saved = list(state["layers"])
    if saved != list(layers):
        raise ValueError(
            f"load_state_dict: the state is for layers {saved}, this monitor watches {list(layers)}; construct "
            f"the monitor with the same layers= and ignore= as the run that saved it."
        )
