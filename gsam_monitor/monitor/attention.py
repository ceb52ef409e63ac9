"""The attention-entropy windows: per (layer, phase) sums that a log turns into mean entropies.

Each window is one fp64 vector ``[Σ entropy per head (H), counted rows per head (H), dropped
rows (1)]`` on the activations' device (``capture.attention.entropy_sums`` adds to it,
without a host synchronisation). Every entry is a plain sum, so the windows follow the
statistics' window kind (``"interval"`` restarts after a log, ``"cumulative"`` never does,
``"ema"`` decays at every step) and a distributed log sums them over the ranks with one
``all_reduce``. ``attention_report`` turns a closed window into the logged scalars:
``attn_entropy/{layer}/h{i}`` (the mean entropy of head i over the window's query rows, in
nats), ``attn_entropy/{layer}`` (the mean over heads) and ``attn_entropy_min/{layer}`` (the
lowest head: a collapsing head shows there first); the last two per (layer, phase) for the alerts.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from gsam_monitor.monitor import ranks
from gsam_monitor.sinks.keys import layer_key, metric_key

__all__ = ["ATTENTION_METRIC", "ATTENTION_MIN_METRIC", "AttentionWindows", "attention_report"]

ATTENTION_METRIC = "attn_entropy"
"""First segment of the attention-entropy keys."""
ATTENTION_MIN_METRIC = "attn_entropy_min"
"""The lowest head's mean entropy of a layer."""

Key = tuple[str, str]


class AttentionWindows:
    """The attention-entropy sums of each (layer, phase).

    Args:
        window: The statistics' window kind (``"interval"``, ``"cumulative"``, ``"ema"``).
        process_group: The group a log sums over.
    """

    def __init__(self, window: str, process_group: Any = None) -> None:
        self.window = window
        self.process_group = process_group
        self.sums: dict[Key, torch.Tensor] = {}
        self._lock = threading.Lock()  # nn.DataParallel replicas add from several threads

    def add(self, layer: str, phase: str, sums: torch.Tensor) -> None:
        """Add one forward's ``entropy_sums`` to ``layer``'s ``phase`` window (which follows
        the activations' device)."""
        key = (layer, phase)
        with self._lock:
            acc = self.sums.get(key)
            if acc is None:
                with torch.inference_mode(False):  # an ordinary tensor under inference-mode forwards
                    self.sums[key] = sums.clone()
                return
            if acc.shape != sums.shape:
                raise ValueError(
                    f"attention entropy: {layer!r} returned {(sums.numel() - 1) // 2} heads after "
                    f"{(acc.numel() - 1) // 2}; call monitor.reset() after changing the model."
                )
            if acc.device != sums.device:
                acc = self.sums[key] = acc.to(sums.device)
            acc += sums

    def close(self, phases: Sequence[str]) -> dict[Key, torch.Tensor]:
        """The windows of ``phases`` summed over ranks (call it on every rank), then the next
        windows: interval ones start empty, the others go on (the log gets a copy)."""
        with self._lock:
            windows = {k: v for k, v in sorted(self.sums.items()) if k[1] in phases}
            for key in windows:
                if self.window == "interval":
                    del self.sums[key]
                else:
                    windows[key] = windows[key].clone()
        return self._all_reduce(windows)

    def _all_reduce(self, windows: dict[Key, torch.Tensor]) -> dict[Key, torch.Tensor]:
        dist = ranks.active_dist()
        group = self.process_group
        if dist is None or dist.get_world_size(group) == 1:
            return windows
        # Ranks must reduce the same layout: agree on the keys and their sizes first.
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, {k: int(v.numel()) for k, v in windows.items()}, group=group)
        sizes = {k: n for part in gathered for k, n in part.items()}
        if not sizes:
            return {}
        keys = sorted(sizes)
        device = next(iter(windows.values())).device if windows else _comm_device(dist, group)
        zeros = torch.zeros(max(sizes.values()), dtype=torch.float64, device=device)
        flat = torch.cat([windows[k].to(device) if k in windows else zeros[: sizes[k]] for k in keys])
        dist.all_reduce(flat, group=group)
        return dict(zip(keys, flat.split([sizes[k] for k in keys]), strict=True))

    def decay(self, factor: float) -> None:
        """Multiply every window by ``factor`` (EMA windows, once per step)."""
        with self._lock:
            for acc in self.sums.values():
                acc.mul_(factor)

    def reset(self) -> None:
        with self._lock:
            self.sums.clear()

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{phase: {layer: sums}}`` on the CPU."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        with self._lock:
            for (layer, phase), acc in self.sums.items():
                out.setdefault(phase, {})[layer] = acc.to("cpu", copy=True)
        return out

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Restore ``state_dict()`` (on the CPU: each window moves to its activations' device
        at their next forward)."""
        with self._lock:
            self.sums = {
                (layer, phase): acc.to(torch.float64).clone() for phase, layers in state.items()
                for layer, acc in layers.items()
            }


def _comm_device(dist: Any, group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def attention_report(
    windows: Mapping[Key, torch.Tensor],
) -> tuple[dict[str, float], dict[Key, dict[str, float]], list[tuple[str, str]]]:
    """The logged scalars of closed windows, the per-layer values the alerts watch
    (``attn_entropy``, ``attn_entropy_min``), and the warnings they call for (rows dropped
    because their probabilities did not sum to 1)."""
    flat: dict[str, float] = {}
    alertable: dict[Key, dict[str, float]] = {}
    dropped = []
    for (layer, phase), acc in windows.items():
        values = acc.to("cpu", torch.float64)
        heads = (values.numel() - 1) // 2
        sums, rows, lost = values[:heads], values[heads : 2 * heads], float(values[-1])
        means = [float(s / r) for s, r in zip(sums, rows, strict=True) if r > 0]
        for i in range(heads):
            if rows[i] > 0:
                flat[metric_key(ATTENTION_METRIC, f"{layer}/h{i}", phase)] = float(sums[i] / rows[i])
        if means:
            alertable[(layer, phase)] = {ATTENTION_METRIC: sum(means) / len(means), ATTENTION_MIN_METRIC: min(means)}
            for metric, value in alertable[(layer, phase)].items():
                flat[metric_key(metric, layer, phase)] = value
        if lost > 0:
            dropped.append(f"{layer_key(layer, phase)}: {lost:g}")
    warnings = []
    if dropped:
        warnings.append((
            "attn-dropped",
            f"CollectOptions(attention_entropy=True): attention rows whose probabilities over the real tokens do not "
            f"sum to 1 were left out ({', '.join(dropped)} head-rows); the module puts probability on padding or "
            f"returns its weights after dropout or rescaling.",
        ))
    return flat, alertable, warnings
