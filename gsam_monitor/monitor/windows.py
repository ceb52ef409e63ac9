"""The window store: one ``LayerStats`` per monitored (layer, phase), and what happens to them.

The hooks' rows reach a window through a ``RowBuffer`` (small CPU updates are held and added
together); every read of the windows (a log, ``compute``, a checkpoint) runs ``flush()``
first, under each window's lock.

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

import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gsam_monitor.capture.layers import LayerTarget
from gsam_monitor.metrics import GaussianFit
from gsam_monitor.monitor import ranks
from gsam_monitor.monitor.attention import AttentionWindows
from gsam_monitor.monitor.checkpoint import pack, unpack_samples, unpack_stats
from gsam_monitor.monitor.config import PHASES, MonitorConfig, gib
from gsam_monitor.monitor.reference import ReferenceFits, check_reference_mode, takes_reference
from gsam_monitor.stats import LayerStats, ReservoirSample
from gsam_monitor.stats.feed import RowBuffer

__all__ = ["Key", "WindowStore"]

Key = tuple[str, str]
"""(layer name, phase)."""


class WindowStore:
    """The statistics (``live``), held-out fits (``reference``) and samples of every window.

    Args:
        config: The monitor's settings (dtypes, window kind, budget, group, reservoir size).
        targets: The monitored layers.
        warn_once: Called with a key and a message when a layer is left out over the budget.
    """

    def __init__(
        self, config: MonitorConfig, targets: Sequence[LayerTarget], warn_once: Callable[[str, str], None]
    ) -> None:
        self.config = config
        self.targets = list(targets)
        self.live: dict[Key, LayerStats] = {}
        self.reference: dict[Key, LayerStats] = {}
        self.fits: dict[Key, GaussianFit] = {}  # the factorised references, made by their logs
        self.samples: dict[Key, ReservoirSample] = {}
        self._held: dict[Key, RowBuffer] = {}  # the hooks' small CPU updates, not in ``live`` yet
        self.fixed_fits = ReferenceFits()  # fixed references ("first", pinned), factorised once
        self.attention = AttentionWindows(config.window, config.process_group) if config.attention_entropy else None
        self.disabled: set[str] = set()  # layers left out over the memory budget
        self._warn_once = warn_once
        # nn.DataParallel runs each layer's hook from several threads at once: one lock per
        # window serialises its updates (uncontended, it costs a few hundred nanoseconds).
        self._locks = {(t.name, p): threading.Lock() for t in self.targets for p in PHASES}
        self._index = {t.name: i for i, t in enumerate(self.targets)}

    # ------------------------------------------------------------------ feeding
    def accepts(self, layer: str) -> bool:
        """Whether ``layer`` is still monitored."""
        return layer not in self.disabled

    def update(
        self, target: LayerTarget, module: nn.Module, phase: str, rows: torch.Tensor, keep: torch.Tensor | None
    ) -> None:
        """Add rows ``(N, d)`` of ``target`` (seen on ``module``, a replica under DataParallel)."""
        key = (target.name, phase)
        with self._locks[key]:
            stats = self._stats_for(target, module, phase, rows.shape[-1], rows.device)
            if stats is not None:
                held = self._held.get(key)
                if held is None or held.stats is not stats:
                    held = self._held[key] = RowBuffer(stats)
                held.add(rows, mask=keep)
            size = self.config.reservoir_size
            if size is not None:
                self._sample_for(target.name, phase, rows.device, size).update(rows, mask=keep)

    def _stats_for(
        self, target: LayerTarget, module: nn.Module, phase: str, dim: int, device: torch.device
    ) -> LayerStats | None:
        key = (target.name, phase)
        stats = self.live.get(key)
        # An nn.DataParallel replica (another module object, on another device) feeds the
        # statistics where the model lives; the statistics follow only the model itself.
        replica = module is not target.module
        if replica:
            device = _home_device(target.module, device)
        if stats is None:
            if not self._fits(target.name, key, dim):
                return None
            stats = self.live[key] = self._new_stats(dim, device)
        elif stats.device != device and not replica:  # the model moved after attach: follow it
            with torch.inference_mode(False):  # moved copies must stay ordinary tensors
                stats.to(device)
                ref = self.reference.get(key)
                if ref is not None:
                    ref.to(device)
        if stats.dim != dim:
            raise ValueError(
                f"layer {target.name!r} changed its feature size from {stats.dim} to {dim}; its statistics cannot "
                f"continue. Call monitor.reset() after changing the model."
            )
        return stats

    def _fits(self, layer: str, key: Key, dim: int) -> bool:
        """Whether a new window of ``dim`` stays within the budget; else the layer is left out."""
        budget = self.config.max_state_bytes
        if budget is None:
            return True
        live = [s.nbytes for s in self.live.values()]
        held = sum(live) + sum(s.nbytes for s in self.reference.values()) + self.config.log_copies * sum(live)
        # This window, the fit to be kept from it, and what a log copies of it.
        copies = 1 + (1 if self.config.heldout and key not in self.reference else 0) + self.config.log_copies
        need = self.config.window_bytes(dim, copies)
        if held + need <= budget:
            return True
        self.disabled.add(layer)
        self._warn_once(
            f"budget:{layer}",
            f"GSAMMonitor: layer {layer!r} (d = {dim}) would take the statistics to "
            f"{gib(held + need)}, over max_state_bytes = {gib(budget)}; it is not "
            f"monitored. Monitor fewer layers, use state_dtype=torch.float32, or raise max_state_bytes.",
        )
        return False

    def _sample_for(self, layer: str, phase: str, device: torch.device, size: int) -> ReservoirSample:
        sample = self.samples.get((layer, phase))
        if sample is None:
            # A distinct, deterministic stream per (layer, phase) and rank.
            offset = self._index[layer] * len(PHASES) + PHASES.index(phase)
            seed = self.config.seed + ranks.global_rank() + 7919 * offset
            with torch.inference_mode(False):  # an ordinary tensor, also under an inference-mode forward
                sample = self.samples[(layer, phase)] = ReservoirSample(size, seed=seed, device=device)
        return sample

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

    def flush(self) -> None:
        """Add the rows the hooks hold back to their windows, each under its window's lock: every
        read of the windows comes after this (a read itself never adds them)."""
        for key, held in list(self._held.items()):
            with self._locks[key]:
                if held.stats is self.live.get(key):  # else its window was dropped, rows and all
                    held.flush()

    def window(self, key: Key) -> LayerStats | None:
        """The live statistics of ``key`` with every held row added (``None`` before its first rows)."""
        self.flush()
        return self.live.get(key)

    # ------------------------------------------------------------------ logs
    def synced(self, phases: Sequence[str], *, in_place: bool) -> dict[Key, LayerStats]:
        """Each (layer, phase) window of ``phases``, summed over ranks under torch.distributed.

        ``in_place`` reduces the live statistics (they are reset right after, interval windows);
        otherwise clones are reduced so that the local state stays local.
        """
        self.flush()
        keys = [(t.name, p) for p in phases for t in self.targets if t.name not in self.disabled]
        dist = ranks.active_dist()
        group = self.config.process_group
        if dist is None or dist.get_world_size(group) == 1:
            return {k: self.live[k] for k in keys if k in self.live}
        # Ranks must reduce the same tensors in the same order: agree first on which windows
        # exist anywhere (and their sizes), creating empty ones where a rank saw no data.
        device = self._comm_device(dist)
        dims = torch.tensor([self.live[k].dim if k in self.live else 0 for k in keys], dtype=torch.int64, device=device)
        dist.all_reduce(dims, op=dist.ReduceOp.MAX, group=group)
        out: dict[Key, LayerStats] = {}
        for key, dim in zip(keys, dims.tolist(), strict=True):
            if dim == 0:
                continue
            stats = self.live.get(key)
            if stats is None:
                stats = self.live[key] = self._new_stats(int(dim), device)
            synced = stats if in_place else stats.clone()
            synced.all_reduce_(group)
            out[key] = synced
        return out

    def reduced(self, phases: Sequence[str], *, in_place: bool, spread: bool) -> tuple[dict[Key, LayerStats], set[Key]]:
        """For a log: each window of ``phases`` summed onto the one rank that computes its
        metrics (``LayerStats.reduce_``), and the keys this rank owns.

        ``spread``: owners round robin over the group (``ranks.owner`` of the window's place
        among the monitored (layer, phase) windows), so that each rank reduces and computes
        about windows / world size; else the writer owns every window (a background log,
        computed on the writer alone). Windows this rank does not own keep only their summed
        ``count`` and ``nonfinite``. Outside
        torch.distributed this is ``synced``, every window owned.
        """
        self.flush()
        keys = [(t.name, p) for p in phases for t in self.targets if t.name not in self.disabled]
        dist = ranks.active_dist()
        group = self.config.process_group
        if dist is None or dist.get_world_size(group) == 1:
            windows = {k: self.live[k] for k in keys if k in self.live}
            return windows, set(windows)
        device = self._comm_device(dist)
        dims = torch.tensor([self.live[k].dim if k in self.live else 0 for k in keys], dtype=torch.int64, device=device)
        dist.all_reduce(dims, op=dist.ReduceOp.MAX, group=group)
        me = dist.get_rank(group)
        out: dict[Key, LayerStats] = {}
        owned: set[Key] = set()
        for index, (key, dim) in enumerate(zip(keys, dims.tolist(), strict=True)):
            if dim == 0:
                continue
            stats = self.live.get(key)
            if stats is None:
                stats = self.live[key] = self._new_stats(int(dim), device)
            # By the window's place among the monitored ones: the same owner at every log, so
            # that it holds the window's previous reference.
            dst = ranks.owner(index, group) if spread else 0
            out[key] = (stats if in_place else stats.clone()).reduce_(dst, group)
            if dst == me:
                owned.add(key)
        return out, owned

    def _comm_device(self, dist: Any) -> torch.device:
        for stats in self.live.values():
            return stats.device
        if dist.get_backend(self.config.process_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def references(self, keys: Iterable[Key]) -> dict[Key, LayerStats | GaussianFit | Callable[[], Any] | None]:
        """The reference of each window (``None`` where there is none yet). Under ``"previous"``:
        the ``GaussianFit`` the previous log made of its window (``keep_fits``), else that
        window's statistics; under a fixed reference, a callable giving its fit, made once."""
        if self.config.reference == "previous":
            return {key: self.fits.get(key) or self.reference.get(key) for key in keys}
        return {key: self.fixed_fits.lazy(key, self.reference[key]) if key in self.reference else None for key in keys}

    def keep_fits(self, fits: Mapping[Key, GaussianFit]) -> None:
        """Under ``reference="previous"``, keep the fits a log made of its windows, where those
        windows are the references now (a fit that arrives after a ``reset`` or a newer
        reference is dropped). A fixed reference is factorised by ``fixed_fits`` instead: a
        later window of the same row count must never stand in for it."""
        if not self.config.fits_windows:
            return
        for key, fit in fits.items():
            ref = self.reference.get(key)
            if ref is not None and float(ref.count) == fit.n:
                self.fits[key] = fit

    def pin(self, phases: Sequence[str]) -> list[Key]:
        """Make each window of ``phases`` with at least 2 rows (summed over ranks) the fixed
        reference of its (layer, phase); those windows restart empty, as after a log.

        Raises:
            ValueError: under ``reference="previous"``, or when no window holds 2 rows.
        """
        if self.config.reference == "previous":
            raise ValueError(
                "pin_reference: this monitor compares each window with the previous one; construct it with "
                "GSAMMonitor(..., reference='pinned') (or 'first') to pin a reference."
            )
        pinned = []
        for key, window in self.synced(phases, in_place=False).items():
            if float(window.count) < 2:
                continue
            self.reference[key] = window
            if window is self.live.get(key):
                del self.live[key]  # the reference now; a fresh window starts at the next activation
            else:
                self.live[key].reset()  # a copy summed over ranks: the local window restarts
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
            snapshot = {k: w.clone() if w is self.live.get(k) else w for k, w in windows.items()}
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
            mine = owned is None or key in owned
            if not mine:  # another rank scores this window next
                self.reference.pop(key, None)
                self.fits.pop(key, None)
            keep = self.config.heldout and mine and takes_reference(self.config.reference, key, synced, self.reference)
            if keep:
                self.fits.pop(key, None)  # made from the reference replaced below
            if interval and handed_off:
                self.live.pop(key, None)  # the worker's now; a fresh window starts at the next activation
                if keep:
                    self.reference[key] = synced
            elif interval:
                if keep:
                    old = self.reference.get(key)
                    self.reference[key] = synced  # the synced live state, summed over ranks
                    if old is not None and self.config.reference == "previous":  # reused as the next window
                        old.reset()
                        self.live[key] = old
                    else:
                        del self.live[key]  # re-created at the next activation
                else:
                    self.live[key].reset()
            elif keep:
                self.reference[key] = synced if synced is not self.live.get(key) else synced.clone()
            if not interval and key in self.live:  # never reset: re-centre (exact)
                self.live[key].reshift_()

    def decay(self, factor: float) -> None:
        """Multiply every live window's sums by ``factor`` (EMA windows, once per step)."""
        self.flush()  # this step's rows decay with the window
        for stats in self.live.values():
            stats.decay_(factor)
        if self.attention is not None:
            self.attention.decay(factor)

    def close_attention(self, phases: Sequence[str]) -> dict[Key, torch.Tensor]:
        """The attention-entropy windows of ``phases`` for a log (summed over ranks), then the next ones."""
        return {} if self.attention is None else self.attention.close(phases)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Empty every window and sample and drop the held-out fits."""
        self._held.clear()
        for stats in self.live.values():
            stats.reset()
        self.reference.clear()
        self.fits.clear()
        self.fixed_fits.clear()
        for sample in self.samples.values():
            sample.reset()
        if self.attention is not None:
            self.attention.reset()

    def clear(self) -> None:
        """Free the statistics, held-out fits and samples."""
        self._held.clear()
        self.live.clear()
        self.reference.clear()
        self.fits.clear()
        self.fixed_fits.clear()
        self.samples.clear()
        if self.attention is not None:
            self.attention.reset()

    def state_dict(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{"stats", "reference", "samples"}``, each ``{phase: {layer: state}}`` on the CPU, and
        ``"reference_mode"``."""
        self.flush()
        return {
            "stats": pack(self.live),
            "reference": pack(self.reference),
            "reference_mode": self.config.reference,
            "samples": pack(self.samples),
            "attention": {} if self.attention is None else self.attention.state_dict(),
        }

    def load_windows(self, state: Mapping[str, Any]) -> None:
        """Restore the ``"stats"`` and ``"reference"`` parts of ``state_dict()``, each on its layer's device.

        Raises:
            ValueError: if the reference windows were kept under another ``reference=``.
        """
        check_reference_mode(state, self.config.reference)
        self._held.clear()
        self.live = unpack_stats(state["stats"], self.device_of, self.config.product_dtype)
        self.reference = unpack_stats(state["reference"], self.device_of, self.config.product_dtype)
        self.fits.clear()
        self.fixed_fits.clear()
        if self.attention is not None:
            self.attention.load_state_dict(state.get("attention", {}))

    def load_samples(self, samples: Mapping[str, Mapping[str, Any]]) -> None:
        """Restore the ``"samples"`` part of ``state_dict()`` (nothing without ``reservoir_size``).

        Raises:
            ValueError: if the saved samples have another capacity than ``reservoir_size``.
        """
        self.samples = unpack_samples(samples, self.config.reservoir_size, self.device_of)

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
