"""The window store: one ``Window`` per monitored (layer, phase), and what happens to them.

Each ``Window`` (``gsam_monitor.monitor.window``) owns its statistics, the rows its hooks
hold back, its reference and that reference's fit, and its sample; the store creates,
syncs and advances them, and ``ReferencePolicy`` says which window becomes a reference.
Every read of the windows (a log, ``compute``, a checkpoint) runs ``flush()`` first.

Windows are created at their layer's first activation (where the activations are, within
the memory budget: a layer that would exceed it is left out, with one warning), follow the
model when it moves, are summed over the ranks for a log (``synced``), and then advance:
``"interval"`` windows restart, ``"cumulative"`` ones go on, ``"ema"`` ones decay at every
step. With ``heldout_loglik`` or a drift metric a reference window is kept: the logged window
for the next log (with the ``GaussianFit`` its log made, ``keep_fits``: what the next log
scores against), or a fixed one (``reference="first"``, ``pin_reference()``: see
``gsam_monitor.monitor.reference``).
A background log takes the closed windows over (``hand_off``): interval windows themselves,
copies of the others, so that nothing the worker reads is modified. Optional reservoir
samples of the values live beside the statistics (``reservoir_size=``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gsam_monitor.capture.layers import LayerTarget
from gsam_monitor.metrics import GaussianFit
from gsam_monitor.monitor import ranks, sync
from gsam_monitor.monitor.checkpoint import pack, unpack_samples, unpack_stats
from gsam_monitor.monitor.config import PHASES, MonitorConfig, gib
from gsam_monitor.monitor.probes import ProbeWindows
from gsam_monitor.monitor.reference import Reference, ReferencePolicy, check_reference_mode
from gsam_monitor.monitor.window import HOST, Transfer, Window, empty_totals, host_copy
from gsam_monitor.stats import LayerStats, ReservoirSample
from gsam_monitor.stats.precision import resolve_product_dtype

__all__ = ["Key", "WindowStore"]

Key = tuple[str, str]
"""(layer name, phase)."""


class WindowStore:
    """The ``Window`` of every monitored (layer, phase), created within the memory budget.

    Args:
        config: The monitor's settings (dtypes, window kind, budget, group, reservoir size).
        targets: The monitored layers.
        warn_once: Called with a key and a message when a layer is left out over the budget.
        on_flush_error: Called with the key and the exception when a window's flush fails
            (default: the exception propagates).
    """

    def __init__(
        self,
        config: MonitorConfig,
        targets: Sequence[LayerTarget],
        warn_once: Callable[[str, str], None],
        on_flush_error: Callable[[Key, BaseException], None] | None = None,
    ) -> None:
        self.config = config
        self.targets = list(targets)
        self.windows: dict[Key, Window] = {(t.name, p): Window() for t in self.targets for p in PHASES}
        self.policy = ReferencePolicy(config.reference)
        self.probes = ProbeWindows(  # attention and output-logit windows
            config.window, config.process_group, attention=config.attention_entropy, logits=bool(config.logit_partition)
        )
        self.disabled: set[str] = set()  # layers left out over the memory budget
        self.transfer: Transfer = host_copy  # how a flush copies a buffer to the host (injectable)
        self._warn_once = warn_once
        self._on_flush_error = on_flush_error
        self._index = {t.name: i for i, t in enumerate(self.targets)}

    @property
    def live(self) -> dict[Key, LayerStats]:
        """Every window's statistics, by key (those that exist)."""
        return {k: w.stats for k, w in self.windows.items() if w.stats is not None}

    @property
    def buffers(self) -> dict[Key, LayerStats]:
        """Every window's accumulation buffer, by key (those allocated now)."""
        return {k: w.buffer for k, w in self.windows.items() if w.buffer is not None}

    @property
    def references(self) -> dict[Key, LayerStats]:
        """Every window's reference, by key (those that exist)."""
        return {k: w.reference for k, w in self.windows.items() if w.reference is not None}

    def widths(self) -> dict[str, int]:
        """The feature size of every layer that has statistics (a buffer or totals)."""
        return {key[0]: s.dim for key, s in {**self.live, **self.buffers}.items()}

    def held_bytes(self) -> dict[str, int]:
        """What the windows hold now: ``{"device_bytes": the buffers, "host_bytes": the totals
        and references}`` (the buffers live where the activations are: on a CPU run, the host)."""
        host = [*self.live.values(), *self.references.values()]
        return {
            "device_bytes": sum(b.nbytes for b in self.buffers.values()),
            "host_bytes": sum(s.nbytes for s in host),
        }

    def sample(self, key: Key) -> ReservoirSample | None:
        """The reservoir sample of ``key`` (``None`` before its first rows)."""
        return self.windows[key].sample

    # ------------------------------------------------------------------ feeding
    def accepts(self, layer: str) -> bool:
        """Whether ``layer`` is still monitored."""
        return layer not in self.disabled

    def update(
        self, target: LayerTarget, module: nn.Module, phase: str, rows: torch.Tensor, keep: torch.Tensor | None
    ) -> None:
        """Add rows ``(N, d)`` of ``target`` (seen on ``module``, a replica under DataParallel)."""
        window = self.windows[(target.name, phase)]
        with window.lock:
            if self._buffer_for(target, module, window, rows.shape[-1], rows.device) is not None:
                window.add(rows, keep)
            size = self.config.reservoir_size
            if size is not None:
                self._sample_for(target.name, phase, window, rows.device, size).update(rows, mask=keep)

    def _buffer_for(
        self, target: LayerTarget, module: nn.Module, window: Window, dim: int, device: torch.device
    ) -> LayerStats | None:
        """The window's accumulation buffer, allocated where the activations are (within the
        device budget); the caller holds the window's lock."""
        buffer = window.buffer
        # An nn.DataParallel replica (another module object, on another device) feeds the
        # buffer where the model lives; the buffer follows only the model itself.
        replica = module is not target.module
        if replica:
            device = _home_device(target.module, device)
        if buffer is not None and buffer.device != device and not replica:
            # The model moved after attach: its rows so far go to the totals, a new buffer follows it.
            window.flush_locked(self.transfer, release=True)
            buffer = None
        if buffer is None:
            if not self._fits(target.name, window, dim):
                return None
            buffer = window.buffer = self._new_stats(dim, device)
        old = next((s.dim for s in (buffer, window.stats) if s is not None and s.dim != dim), None)
        if old is not None:
            raise ValueError(
                f"layer {target.name!r} changed its feature size from {old} to {dim}; its statistics cannot "
                f"continue. Call monitor.reset() after changing the model."
            )
        return buffer

    def _fits(self, layer: str, window: Window, dim: int) -> bool:
        """Whether a new accumulation buffer of ``dim`` keeps the device within its budget
        (``ComputeOptions.max_state_bytes``); else the layer is left out, with one warning."""
        budget = self.config.max_state_bytes
        if budget is None:
            return True
        dims = [*(b.dim for b in self.buffers.values()), dim]  # counted as at construction (check_budget)
        need, workspace = self.config.device_bytes(dims)
        if need <= budget:
            return True
        self.disabled.add(layer)
        self._warn_once(
            f"budget:{layer}",
            f"GSAMMonitor: layer {layer!r} (d = {dim}) would take the device to {gib(need)} ({len(dims)} "
            f"accumulation buffer(s) of d = {', '.join(map(str, dims))}, plus {gib(workspace)} of update workspace), "
            f"over max_state_bytes = {gib(budget)}; it is not monitored. Monitor fewer layers, use "
            f"compute=ComputeOptions(state_dtype=torch.float32), or raise ComputeOptions(max_state_bytes=).",
        )
        return False

    def _sample_for(self, layer: str, phase: str, window: Window, device: torch.device, size: int) -> ReservoirSample:
        if window.sample is None:
            # A distinct, deterministic stream per (layer, phase) and rank.
            offset = self._index[layer] * len(PHASES) + PHASES.index(phase)
            seed = self.config.seed + ranks.global_rank() + 7919 * offset
            with torch.inference_mode(False):  # an ordinary tensor, also under an inference-mode forward
                window.sample = ReservoirSample(size, seed=seed, device=device)
        return window.sample

    def _new_stats(self, dim: int, device: torch.device | str) -> LayerStats:
        # Ordinary tensors even when the first activation comes from an inference-mode forward:
        # an inference tensor could not be updated in place by a later training step.
        with torch.inference_mode(False):
            return LayerStats(
                dim,
                device=device,
                state_dtype=self.config.state_dtype,
                product_dtype=self.config.product_dtype,
                higher_moments=self.config.higher_moments,
            )

    def flush(self, keys: Iterable[Key] | None = None, *, release: bool = False) -> None:
        """Move every row added so far into the totals (``Window.flush``, each under its window's
        lock): every read of the windows comes after this (a read itself never adds them).
        ``release`` frees the buffers (a window's end). A window whose flush fails is reported
        to ``on_flush_error`` (counted and warned once by the monitor) and keeps its rows in its
        buffer for the next flush; the others go on."""
        for key in self.windows if keys is None else keys:
            try:
                self.windows[key].flush(self.transfer, release=release)
            except Exception as err:  # the rows stay in the buffer for the next flush
                if self._on_flush_error is None:
                    raise
                self._on_flush_error(key, err)

    def window(self, key: Key) -> LayerStats | None:
        """The totals of ``key`` with every row added (``None`` before its first rows)."""
        self.flush([key])  # this window's rows only: the others are not read
        return self.windows[key].stats

    # ------------------------------------------------------------------ logs
    def synced(self, phases: Sequence[str], *, in_place: bool) -> dict[Key, LayerStats]:
        """Each (layer, phase) window of ``phases`` with every row flushed, summed over ranks
        under torch.distributed (``sync.synced``): ``in_place`` reduces the totals themselves
        (interval windows, reset right after), else copies, so that the local state stays local."""
        self.flush()
        return sync.synced(self._sync_windows(phases), self.config.process_group, in_place=in_place)

    def reduced(self, phases: Sequence[str], *, in_place: bool, spread: bool) -> tuple[dict[Key, LayerStats], set[Key]]:
        """For a log: each window of ``phases`` with every row flushed, summed onto the rank that
        computes its metrics, and the keys this rank owns (``sync.reduced``; ``spread``: owners
        round robin over the group, else the writer owns every window)."""
        self.flush()
        return sync.reduced(
            self._sync_windows(phases), self.config.process_group, in_place=in_place, spread=spread
        )

    def local(self, phases: Sequence[str], layers: Sequence[str]) -> tuple[dict[Key, LayerStats], set[Key]]:
        """For a sharded log: the totals of ``layers`` (those this rank collects) in ``phases``,
        every row flushed, not summed over ranks; all of them this rank's to compute."""
        keys = [(name, p) for p in phases for name in layers if name not in self.disabled]
        self.flush(keys)
        out = {k: self.windows[k].stats for k in keys if self.windows[k].stats is not None}
        return out, set(out)

    def _sync_windows(self, phases: Sequence[str]) -> sync.Windows:
        """The monitored windows of ``phases`` in the order every rank syncs them, and how to
        create the empty totals of a window this rank saw no data for."""
        keys = [(t.name, p) for p in phases for t in self.targets if t.name not in self.disabled]
        return sync.Windows({k: self.windows[k] for k in keys}, self._empty_totals)

    def _empty_totals(self, key: Key, dim: int) -> LayerStats:
        """Empty totals for ``key``, as its first flush would make them (fp64, on the host, with
        the product dtype of its layer's device): every rank reduces the same tensors."""
        product = resolve_product_dtype(self.config.product_dtype, self.device_of(key[0]), self.config.state_dtype)
        return empty_totals(dim, product, self.config.higher_moments)

    def references_for(self, keys: Iterable[Key]) -> dict[Key, Reference]:
        """What a log compares each window with (``ReferencePolicy.for_log``; ``None`` where
        there is no reference yet)."""
        return {key: self.policy.for_log(self.windows[key]) for key in keys}

    def keep_fits(self, fits: Mapping[Key, GaussianFit]) -> None:
        """Keep the fits a log made of its windows where those windows are the references now
        (``ReferencePolicy.keep_fit``)."""
        if not self.config.fits_windows:
            return
        for key, fit in fits.items():
            self.policy.keep_fit(self.windows[key], fit)

    def pin(self, phases: Sequence[str]) -> list[Key]:
        """Make each window of ``phases`` with at least 2 rows (summed over ranks) the fixed
        reference of its (layer, phase); those windows restart empty, as after a log.

        Raises:
            ValueError: under ``reference="previous"``, or when no window holds 2 rows.
        """
        if self.config.reference == "previous":
            raise ValueError(
                "pin_reference: this monitor compares each window with the previous one; construct it with "
                "GSAMMonitor(..., windows=WindowOptions(reference='pinned')) (or 'first') to pin a reference."
            )
        pinned = []
        for key, synced in self.synced(phases, in_place=False).items():
            if float(synced.count) < 2:
                continue
            window = self.windows[key]
            window.set_reference(synced)
            if synced is window.stats:
                window.stats = None  # the reference now; a fresh window starts at the next activation
            else:
                window.stats.reset()  # a copy summed over ranks: the local window restarts
            pinned.append(key)
        if not pinned:
            raise ValueError(
                f"pin_reference: no window of phase(s) {', '.join(phases)} holds 2 rows yet; run the model "
                f"(e.g. an evaluation pass of the base model) while the monitor is attached, then pin."
            )
        return pinned

    def hand_off(self, windows: Mapping[Key, LayerStats]) -> dict[Key, LayerStats]:
        """Give synced windows to a background log and start the next ones.

        Nothing is copied for interval windows: the worker takes the synced windows
        themselves and fresh ones start at the next activation. Cumulative and EMA windows go
        on, so the worker gets a copy (the one the sync made, under torch.distributed). The
        held-out fits are replaced, never modified, so the worker reads them as they are.
        """
        if self.config.window == "interval":
            snapshot = dict(windows)
        else:
            snapshot = {k: w.clone() if w is self.windows[k].stats else w for k, w in windows.items()}
        self.advance(snapshot, handed_off=True)
        return snapshot

    @torch.no_grad()
    def advance(
        self, windows: Mapping[Key, LayerStats], *, handed_off: bool = False, owned: Collection[Key] | None = None
    ) -> None:
        """Start the next windows after a log and keep the held-out fits.

        ``handed_off``: a background log owns ``windows`` (the synced interval windows
        themselves, or copies of the cumulative/EMA ones): they are never reset or reused.
        ``owned``: the windows whose sums this rank holds (``reduced``; default all): only
        those become references here, the rank that scores them next.
        """
        interval = self.config.window == "interval"
        for key, synced in windows.items():
            window = self.windows[key]
            mine = owned is None or key in owned
            if not mine:  # another rank scores this window next
                window.set_reference(None)
            keep = self.config.heldout and mine and self.policy.takes(window, synced)
            if interval and handed_off:
                window.stats = None  # the worker's now; a fresh window starts at the next activation
                if keep:
                    window.set_reference(synced)
            elif interval:
                if keep:
                    old = window.reference
                    window.set_reference(synced)  # the synced live state, summed over ranks
                    if old is not None and not self.policy.fixed:  # reused as the next window
                        old.reset()
                        window.stats = old
                    else:
                        window.stats = None  # re-created at the next activation
                else:
                    window.stats.reset()
            elif keep:
                window.set_reference(synced if synced is not window.stats else synced.clone())
            if not interval and window.stats is not None:  # never reset: re-centre (exact)
                window.stats.reshift_()
        # The window's end: its buffers (flushed by the read before this log) leave the device
        # until the next collection allocates them again.
        self.flush(windows.keys(), release=True)

    def decay(self, factor: float) -> None:
        """Multiply every window's sums by ``factor`` (EMA windows, once per step): the
        buffers' now, the totals' at their next flush (``Window.decay``)."""
        for window in self.windows.values():
            window.decay(factor)
        self.probes.decay(factor)

    def close_probes(self, phases: Sequence[str]) -> dict[str, dict[Key, torch.Tensor]]:
        """The probes' windows of ``phases`` for a log, by kind (``ProbeWindows.close``), then the next ones."""
        return self.probes.close(phases)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Empty every window and sample and drop the references and their fits."""
        self.flush()  # a window that saw rows keeps its (emptied) totals: stats() reads n = 0
        for window in self.windows.values():
            window.drop_rows()
            if window.stats is not None:
                window.stats.reset()
            window.set_reference(None)
            if window.sample is not None:
                window.sample.reset()
        self.probes.reset()

    def clear(self) -> None:
        """Free the statistics, references, fits and samples."""
        for window in self.windows.values():
            window.drop_rows()
            window.buffer = window.stats = window.sample = None
            window.set_reference(None)
        self.probes.reset()

    def state_dict(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{"stats", "reference", "samples"}``, each ``{phase: {layer: state}}`` on the CPU, and
        ``"reference_mode"``."""
        self.flush()
        return {
            "stats": pack(self.live),
            "reference": pack(self.references),
            "reference_mode": self.config.reference,
            "samples": pack({k: w.sample for k, w in self.windows.items() if w.sample is not None}),
            **self.probes.state_dict(),  # "attention", "logit_partition"
        }

    def load_windows(self, state: Mapping[str, Any]) -> None:
        """Restore the ``"stats"`` and ``"reference"`` parts of ``state_dict()`` as host totals.

        Raises:
            ValueError: if the reference windows were kept under another ``reference=``.
        """
        check_reference_mode(state, self.config.reference)
        # On the host, with the product dtype of the layers' device (the buffers' error model).
        first = self.targets[0].name if self.targets else ""
        product = resolve_product_dtype(self.config.product_dtype, self.device_of(first), self.config.state_dtype)
        live = unpack_stats(state["stats"], lambda _: HOST, product, self.config.higher_moments)
        references = unpack_stats(state["reference"], lambda _: HOST, product, self.config.higher_moments)
        for key, window in self.windows.items():
            window.drop_rows()
            window.stats = live.get(key)
            window.set_reference(references.get(key))
        self.probes.load_state_dict(state)

    def load_samples(self, samples: Mapping[str, Mapping[str, Any]]) -> None:
        """Restore the ``"samples"`` part of ``state_dict()`` (nothing without ``reservoir_size``).

        Raises:
            ValueError: if the saved samples have another capacity than ``reservoir_size``.
        """
        loaded = unpack_samples(samples, self.config.reservoir_size, self.device_of)
        for key, window in self.windows.items():
            window.sample = loaded.get(key)

    def device_of(self, layer: str) -> torch.device:
        """The device of ``layer``'s first parameter (the CPU when it has none)."""
        for target in self.targets:
            if target.name == layer:
                param = next(target.module.parameters(), None)
                if param is not None:
                    return param.device
        return torch.device("cpu")


def _home_device(module: nn.Module, fallback: torch.device) -> torch.device:
    """The device of ``module``'s first parameter or buffer, else ``fallback``."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return fallback
