"""The attention windows: per (layer, phase) entropy sums and max logits that a log reports.

Each window is one fp64 vector ``[Σ entropy per head (H), counted rows per head (H), dropped
rows (1)]`` on the activations' device (``capture.attention.entropy_sums`` and
``capture.attention_logits.logit_stats`` add to it, without a host synchronisation), and,
where the logits were sampled, the max attention logit per head (H). Every entry of the first is
a plain sum, so those windows follow the statistics' window kind (``"interval"`` restarts after a
log, ``"cumulative"`` never does, ``"ema"`` decays at every step) and a distributed log sums them
over the ranks with one ``all_reduce``. A maximum can neither decay nor be summed: the max logit
always covers the forwards since the previous log, whatever the window kind (a maximum since the
start of the run could only grow), and the ranks take its maximum.

``attention_report`` turns a closed window into the logged scalars: ``attn_entropy/{layer}/h{i}``
(the mean entropy of head i over the window's query rows, in nats), ``attn_entropy/{layer}`` (the
mean over heads), ``attn_entropy_min/{layer}`` (the lowest head: a collapsing head shows there
first), ``attn_logit_max/{layer}/h{i}`` (the largest attention logit of head i) and
``attn_logit_max/{layer}`` (the largest over heads); the per-layer ones per (layer, phase) for the
alerts.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from gsam_monitor.monitor import ranks
from gsam_monitor.sinks.keys import layer_key, metric_key

__all__ = [
    "ATTENTION_ALERT_METRICS",
    "ATTENTION_LOGIT_METRIC",
    "ATTENTION_METRIC",
    "ATTENTION_MIN_METRIC",
    "AttentionWindows",
    "attention_report",
]

ATTENTION_METRIC = "attn_entropy"
"""First segment of the attention-entropy keys."""
ATTENTION_MIN_METRIC = "attn_entropy_min"
"""The lowest head's mean entropy of a layer."""
ATTENTION_LOGIT_METRIC = "attn_logit_max"
"""First segment of the max-attention-logit keys."""
ATTENTION_ALERT_METRICS = (ATTENTION_METRIC, ATTENTION_MIN_METRIC, ATTENTION_LOGIT_METRIC)
"""The per-layer attention values the alerts can watch."""

Key = tuple[str, str]


class AttentionWindows:
    """The attention sums and max logits of each (layer, phase).

    Args:
        window: The statistics' window kind (``"interval"``, ``"cumulative"``, ``"ema"``).
        process_group: The group a log sums over.
    """

    def __init__(self, window: str, process_group: Any = None) -> None:
        self.window = window
        self.process_group = process_group
        self.sums: dict[Key, torch.Tensor] = {}
        self.maxima: dict[Key, torch.Tensor] = {}  # since the last log, whatever the window kind
        self._lock = threading.Lock()  # nn.DataParallel replicas add from several threads

    def add(self, layer: str, phase: str, sums: torch.Tensor, maxima: torch.Tensor | None = None) -> None:
        """Add one forward's ``entropy_sums`` (or ``logit_stats``) to ``layer``'s ``phase``
        window (which follows the activations' device), and its max logit per head."""
        key = (layer, phase)
        with self._lock:
            acc = self.sums.get(key)
            if acc is not None and acc.shape != sums.shape:
                raise ValueError(
                    f"attention entropy: {layer!r} returned {(sums.numel() - 1) // 2} heads after "
                    f"{(acc.numel() - 1) // 2}; call monitor.reset() after changing the model."
                )
            self.sums[key] = _copy(sums) if acc is None else acc.to(sums.device).add_(sums)
            if maxima is not None:
                top = self.maxima.get(key)
                self.maxima[key] = _copy(maxima) if top is None else torch.maximum(top.to(maxima.device), maxima)

    def close(self, phases: Sequence[str]) -> dict[Key, torch.Tensor]:
        """The windows of ``phases`` summed over ranks (call it on every rank), each as
        ``[entropy sums (H), rows (H), dropped (1), max logit (H)]`` (``-inf`` where no logit was
        sampled), then the next windows: interval ones start empty, the others go on (the log
        gets a copy); the max logits restart."""
        with self._lock:
            windows = {k: v for k, v in sorted(self.sums.items()) if k[1] in phases}
            maxima = {k: self.maxima.pop(k) for k in sorted(self.maxima) if k[1] in phases}
            for key in windows:
                if self.window == "interval":
                    del self.sums[key]
                else:
                    windows[key] = windows[key].clone()
        sums, maxima = self._all_reduce(windows, maxima)
        out = {}
        for key, acc in sums.items():
            heads = (acc.numel() - 1) // 2
            top = maxima.get(key, acc.new_full((heads,), -torch.inf)).to(acc.device, torch.float64)
            out[key] = torch.cat([acc, top if top.numel() == heads else acc.new_full((heads,), -torch.inf)])
        return out

    def _all_reduce(
        self, windows: dict[Key, torch.Tensor], maxima: dict[Key, torch.Tensor]
    ) -> tuple[dict[Key, torch.Tensor], dict[Key, torch.Tensor]]:
        dist = ranks.active_dist()
        group = self.process_group
        if dist is None or dist.get_world_size(group) == 1:
            return windows, maxima
        # Ranks must reduce the same layout: agree on the keys and their sizes first.
        gathered: list[Any] = [None] * dist.get_world_size(group)
        local = ({k: int(v.numel()) for k, v in windows.items()}, {k: int(v.numel()) for k, v in maxima.items()})
        dist.all_gather_object(gathered, local, group=group)
        device = next(iter([*windows.values(), *maxima.values()]), None)
        device = device.device if device is not None else _comm_device(dist, group)
        reduced = []
        for part, parts, op, fill in ((windows, 0, dist.ReduceOp.SUM, 0.0), (maxima, 1, dist.ReduceOp.MAX, -torch.inf)):
            sizes = {k: n for ranks_parts in gathered for k, n in ranks_parts[parts].items()}
            if not sizes:
                reduced.append({})
                continue
            keys = sorted(sizes)
            pad = torch.full((max(sizes.values()),), fill, dtype=torch.float64, device=device)
            flat = torch.cat([part[k].to(device, torch.float64) if k in part else pad[: sizes[k]] for k in keys])
            dist.all_reduce(flat, op=op, group=group)
            reduced.append(dict(zip(keys, flat.split([sizes[k] for k in keys]), strict=True)))
        return reduced[0], reduced[1]

    def decay(self, factor: float) -> None:
        """Multiply every sum by ``factor`` (EMA windows, once per step); the max logits stay."""
        with self._lock:
            for acc in self.sums.values():
                acc.mul_(factor)

    def reset(self) -> None:
        with self._lock:
            self.sums.clear()
            self.maxima.clear()

    def state_dict(self) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        """``{"sums": {phase: {layer: sums}}, "maxima": {phase: {layer: max logits}}}`` on the CPU."""
        out: dict[str, dict[str, dict[str, torch.Tensor]]] = {"sums": {}, "maxima": {}}
        with self._lock:
            for part, accs in (("sums", self.sums), ("maxima", self.maxima)):
                for (layer, phase), acc in accs.items():
                    out[part].setdefault(phase, {})[layer] = acc.to("cpu", copy=True)
        return out

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Restore ``state_dict()`` (on the CPU: each window moves to its activations' device
        at their next forward); a checkpoint from before the max logits, ``{phase: {layer:
        sums}}``, restores the sums."""
        parts = state if "sums" in state else {"sums": state, "maxima": {}}

        def unpack(part: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[Key, torch.Tensor]:
            return {(layer, phase): acc.to(torch.float64).clone() for phase, layers in part.items()
                    for layer, acc in layers.items()}  # fmt: skip

        with self._lock:
            self.sums = unpack(parts["sums"])
            self.maxima = unpack(parts.get("maxima", {}))


def _copy(value: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(False):  # an ordinary tensor under inference-mode forwards
        return value.clone()


def _comm_device(dist: Any, group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def attention_report(
    windows: Mapping[Key, torch.Tensor],
) -> tuple[dict[str, float], dict[Key, dict[str, float]], list[tuple[str, str]]]:
    """The logged scalars of closed windows (``AttentionWindows.close``), the per-layer values
    the alerts watch (``ATTENTION_ALERT_METRICS``), and the warnings they call for (rows dropped
    because their probabilities did not sum to 1)."""
    flat: dict[str, float] = {}
    alertable: dict[Key, dict[str, float]] = {}
    dropped = []
    for (layer, phase), acc in windows.items():
        values = acc.to("cpu", torch.float64)
        heads = (values.numel() - 1) // 3
        sums, rows, lost = values[:heads], values[heads : 2 * heads], float(values[2 * heads])
        tops = values[2 * heads + 1 :]
        means = [float(s / r) for s, r in zip(sums, rows, strict=True) if r > 0]
        for i in range(heads):
            if rows[i] > 0:
                flat[metric_key(ATTENTION_METRIC, f"{layer}/h{i}", phase)] = float(sums[i] / rows[i])
            if torch.isfinite(tops[i]):
                flat[metric_key(ATTENTION_LOGIT_METRIC, f"{layer}/h{i}", phase)] = float(tops[i])
        values_of = alertable.setdefault((layer, phase), {})
        if means:
            values_of.update({ATTENTION_METRIC: sum(means) / len(means), ATTENTION_MIN_METRIC: min(means)})
        if bool(torch.isfinite(tops).any()):
            values_of[ATTENTION_LOGIT_METRIC] = float(tops[torch.isfinite(tops)].max())
        for metric, value in values_of.items():
            flat[metric_key(metric, layer, phase)] = value
        if not values_of:
            del alertable[(layer, phase)]
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
