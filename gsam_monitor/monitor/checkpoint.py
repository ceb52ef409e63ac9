"""The monitor's checkpoint: what ``GSAMMonitor.state_dict()`` holds, and the checks on loading.

Tensors and plain values only, so that ``torch.load(path, weights_only=True)`` reads it back:
the format tag, the layers it was saved for, the counters, every window (statistics,
held-out fits, reservoir samples; on the CPU) and the token sampler's generator states.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch

from gsam_monitor.metrics.compute import HIGHER_MOMENT_METRICS
from gsam_monitor.stats import LayerStats, ReservoirSample

__all__ = ["STATE_FORMAT", "check_state", "pack", "unpack_samples", "unpack_stats"]

Key = tuple[str, str]  # (layer name, phase)
Table = Mapping[str, Mapping[str, Any]]  # {phase: {layer: state}}

STATE_FORMAT = "gsam_monitor.GSAMMonitor"
"""The ``"format"`` entry of ``GSAMMonitor.state_dict()``."""


def check_state(state: Mapping[str, Any], layers: Sequence[str], metrics: Collection[str] = ()) -> None:
    """Refuse a state that is not a monitor's, that was saved for other layers, or whose windows
    lack the higher moments that this monitor's ``metrics`` need (a state that has them while
    this monitor keeps none is fine: ``unpack_stats`` drops them).

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
    needs = sorted(HIGHER_MOMENT_METRICS & set(metrics))
    lean = any(
        not sd.get("higher_moments", True) for part in ("stats", "reference")
        for table in state.get(part, {}).values() for sd in table.values()
    )  # fmt: skip
    if needs and lean:
        raise ValueError(
            f"load_state_dict: the state was saved without the higher moments (3rd and 4th powers) that metrics= "
            f"needs for {', '.join(needs)}; construct the monitor with the saved run's metrics= (without "
            f"{', '.join(needs)}), or start it without loading this state."
        )


def pack(table: Mapping[Key, Any]) -> dict[str, dict[str, Any]]:
    """``{(layer, phase): stats or sample}`` as ``{phase: {layer: state_dict on the CPU}}``."""
    out: dict[str, dict[str, Any]] = {}
    for (name, phase), stats in table.items():
        # To the host layer by layer: a device copy of every window at once would need as
        # much free accelerator memory again as the statistics themselves.
        state = {k: v.to("cpu") if isinstance(v, torch.Tensor) else v for k, v in stats.state_dict().items()}
        out.setdefault(phase, {})[name] = state
    return out


def unpack_stats(
    table: Table,
    device_of: Callable[[str], torch.device],
    product_dtype: torch.dtype | str | None,
    higher_moments: bool = True,
) -> dict[Key, LayerStats]:
    """``pack``'s statistics back, each on its layer's device (``device_of``). Without
    ``higher_moments`` (no selected metric needs them) saved higher moments are dropped, so that
    the windows merge with the monitor's new buffers; the other sums are kept as they are."""
    return {
        (name, phase): LayerStats.from_state_dict(
            {**sd, "higher_moments": bool(sd["higher_moments"]) and higher_moments},  # loads its own fields only
            device=device_of(name), product_dtype=product_dtype,
        )
        for phase, layers in table.items()
        for name, sd in layers.items()
    }


def unpack_samples(
    table: Table, size: int | None, device_of: Callable[[str], torch.device]
) -> dict[Key, ReservoirSample]:
    """``pack``'s reservoir samples back (none when the monitor keeps none: ``size`` is ``None``).

    Raises:
        ValueError: if a saved sample has another capacity than ``size``.
    """
    samples: dict[Key, ReservoirSample] = {}
    if size is None:
        return samples
    for phase, layers in table.items():
        for name, sd in layers.items():
            if int(sd["capacity"]) != size:
                raise ValueError(
                    f"load_state_dict: the state's reservoir samples hold {int(sd['capacity'])} values, "
                    f"this monitor has reservoir_size={size}; construct it with "
                    f"CollectOptions(reservoir_size={int(sd['capacity'])})."
                )
            sample = ReservoirSample(size)  # CPU: the saved generator state is a CPU one
            sample.load_state_dict(sd)
            samples[(name, phase)] = sample.to(device_of(name))
    return samples
