"""GSAMMonitor: per-layer activation geometry of a model, logged while it trains or runs.

The monitor hooks the chosen layers (``gsam_monitor.layers``), feeds every forward's hidden
states, padding dropped and tokens optionally subsampled (``gsam_monitor.hooks``), into one
``LayerStats`` per layer and phase, and every ``every_n_steps`` optimizer steps turns them
into metrics (``gsam_monitor.metrics.compute``) that go to the sinks (``gsam_monitor.sinks``).

Windows: ``"interval"`` statistics restart after every log; ``"cumulative"`` ones never do;
``"ema"`` ones decay by ``0.5 ** (1 / ema_half_life)`` at every ``step()``. Held-out scores
(``heldout_loglik``) rate each window under the previous logged window's fit.

Memory: a monitored layer holds ``LayerStats.state_bytes(d)`` = ``itemsize·(d² + 5d)`` bytes
per phase (fp64: 8·d², so d = 768: 4.7 MB, d = 4096: 134 MB, d = 8192: 537 MB), twice that
when ``heldout_loglik`` is selected (the previous window's fit is kept), plus one copy more
where a log must copy a window (``log_copies``: background logs, and cumulative/EMA windows
kept as held-out fits or summed over ranks). Interval windows are never copied: a
background log takes the synced window itself and a fresh one starts. The budget
``max_state_bytes`` is checked at construction. ``close()`` frees the statistics;
``detach()`` keeps them for a later ``attach()``.

torch.compile: the layer hooks are traced into the compiled graph as calls of an opaque
operator (``hooks.observe``), without graph breaks. Compiled graphs do not re-check module
hooks, so hooks the graph has traced stay registered and are switched by a flag that the
graph is specialised on (two variants, no recompilation per window), and attaching after a
compiled warm-up drops Dynamo's compiled code once so that the next call traces the hooks.

A monitor problem never stops training: exceptions inside hooks, metric computation or a
sink are counted (``errors``), warned about once, and skipped; a failing sink is disabled.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from gsam_monitor import metrics as _metrics
from gsam_monitor.hooks import (
    ForwardContext,
    HookHandles,
    ThreadForwardContext,
    TokenSampler,
    add_observer,
    align_mask,
    attention_mask_position,
    extract_hidden,
    in_backward,
    infer_phase,
    observe,
    register_context_hooks,
    register_layer_hook,
    remove_observer,
    to_rows,
)
from gsam_monitor.layers import LayerSpec, LayerTarget, resolve_layers, unwrap_model
from gsam_monitor.sinks import Sink, layer_key, make_sink, metric_key
from gsam_monitor.stats import LayerStats, ReservoirSample

__all__ = ["DEFAULT_MAX_STATE_BYTES", "GSAMMonitor", "state_bytes_per_layer"]

log = logging.getLogger(__name__)

DEFAULT_MAX_STATE_BYTES = 8 * 2**30
"""8 GiB: e.g. three d = 8192 layers in fp64, train and eval phases, with held-out fits, logged
inline (a background log's copy makes that two such layers)."""

_PHASES = ("train", "eval")
_WINDOWS = ("interval", "cumulative", "ema")
META_PREFIX = "gsam_monitor"


def state_bytes_per_layer(
    dim: int,
    *,
    state_dtype: torch.dtype = torch.float64,
    phases: Sequence[str] = _PHASES,
    heldout: bool = True,
    log_copies: int = 0,
) -> int:
    """Bytes of statistics the monitor keeps for one layer of feature size ``dim``, at most.

    ``LayerStats.state_bytes(dim)`` per phase, times one (the live window), plus one when the
    previous window's fit is kept for ``heldout_loglik``, plus ``log_copies`` (the copies a
    log holds while it is computed: 1 for background logs and for cumulative/EMA windows
    that are kept as held-out fits or summed over ranks, else 0).
    """
    copies = 1 + (1 if heldout else 0) + log_copies
    return LayerStats.state_bytes(dim, state_dtype) * len(phases) * copies


@dataclass
class _LogResult:
    """One log's output, computed inline or on the background thread."""

    step: int
    flat: dict[str, float] = field(default_factory=dict)
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    errors: list[tuple[BaseException, str]] = field(default_factory=list)


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def _dist() -> Any | None:
    """``torch.distributed`` when a process group is initialised, else ``None``."""
    if not torch.distributed.is_available():
        return None
    import torch.distributed as dist

    return dist if dist.is_initialized() else None


class GSAMMonitor:
    """Watch the activation geometry of chosen layers and log GSAM and related metrics.

    Args:
        model: The model (DDP-, FSDP- or ``torch.compile``-wrapped models are fine).
        layers: What to watch: ``"auto"`` (every block of the repeated stack), module names,
            globs (``"encoder.layer.*"``), compiled regexes, module types or module objects,
            plus ``"embeddings"`` (embedding output) and ``"final_norm"``; one or a list.
        ignore: Specs of the same kinds to leave out.
        every_n_steps: Log every this many optimizer steps (``step()`` calls).
        window: ``"interval"`` (reset after each log), ``"cumulative"`` (never reset) or
            ``"ema"`` (moments decay with ``ema_half_life``).
        ema_half_life: Half-life of the EMA window in ``step()`` calls; default ``every_n_steps``.
        collect_steps: Collect only during the last ``k`` steps before each log; the hooks
            are removed on the other steps, so they cost nothing (under ``torch.compile``,
            once traced, they stay and a flag switches them, which the compiled graph is
            specialised on). ``"auto"`` (default):
            ``min(every_n_steps, max(10, every_n_steps // 10))``, i.e. the last 10 of every
            100 steps (every step when ``every_n_steps <= 10``): a tenth of the collection
            cost, and each logged window describes the model as it is at the log, not
            averaged over an interval of training; before the first ``step()`` (inference,
            or the first forward of training) every forward is collected. ``None``: every step.
        max_tokens_per_layer: At most this many tokens per layer per forward call, sampled
            uniformly without replacement among the non-padding ones; ``None``: every token.
        metrics: ``"default"``, ``"all"`` or a list of ``metrics.METRIC_NAMES``.
        sinks: Sink objects, callables ``(metrics, step)`` or names (``"tensorboard"``,
            ``"wandb"``, ``"jsonl"``, ``"logging"``).
        state_dtype: Dtype of the accumulated moments (fp64; fp32 halves the memory).
        product_dtype: Dtype of the per-batch Gram products (see ``LayerStats``).
        phases: Which phases to monitor: ``"train"`` (grad enabled and ``model.training``)
            and/or ``"eval"`` (``torch.no_grad()`` or eval mode, e.g. plain inference).
        seed: Seed of the token subsampling (offset by the distributed rank).
        max_state_bytes: Refuse configurations whose statistics would exceed this many bytes
            (see ``state_bytes_per_layer``); ``None`` for no limit.
        spectrum_every_n_logs: Send each layer's log10 eigenvalue histogram to the sinks that
            support it every this many logs; ``None`` or 0 never.
        process_group: The ``torch.distributed`` group to sync over (default: the world). Its
            rank zero computes and writes the metrics.
        background: Compute the scheduled logs' metrics (the eigendecompositions) on a
            background thread, so that the training step does not wait for them: the windows
            are synced and snapshotted on schedule, and the metrics reach the sinks, at the
            step they belong to, from a later ``step()`` (or ``flush()``/``close()``). At most
            one log is in flight; a second waits for the first. ``None`` (default): in the
            background when the model is on an accelerator, inline on CPU, where a thread
            would only compete with training for the same cores. ``log()`` is always inline.
        reservoir_size: Also keep a bounded uniform sample of this many activation values per
            (layer, phase) (``ReservoirSample``, pooled coordinates of the same rows
            the statistics see, over the whole run: log windows do not reset it, ``reset()``
            does), for the distribution analyses; read it with ``sample(layer, phase)``.
            ``None`` (default): no sample. Per-rank samples are not merged across processes.

    Raises:
        ValueError: an unknown layer or metric name, an empty/duplicate/nested selection, a
            non-positive interval, an unknown window, phase or sink, or a configuration whose
            state exceeds ``max_state_bytes``.
        TypeError: an argument of the wrong type.

    Example::

        monitor = GSAMMonitor(model, every_n_steps=100, sinks=[TensorBoardSink("runs/gsam")])
        with monitor:
            for batch in loader:
                loss = model(**batch).loss
                loss.backward(); optimizer.step(); optimizer.zero_grad()
                monitor.step()          # logs "gsam/encoder.layer.0", ... every 100 steps
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec | Iterable[LayerSpec] = "auto",
        *,
        ignore: LayerSpec | Iterable[LayerSpec] | None = None,
        every_n_steps: int = 100,
        window: Literal["interval", "cumulative", "ema"] = "interval",
        ema_half_life: float | None = None,
        collect_steps: int | Literal["auto"] | None = "auto",
        max_tokens_per_layer: int | None = 2048,
        metrics: str | Iterable[str] = "default",
        sinks: Iterable[Any] | Any = (),
        state_dtype: torch.dtype = torch.float64,
        product_dtype: torch.dtype | str | None = None,
        phases: str | Sequence[str] = _PHASES,
        seed: int = 0,
        max_state_bytes: int | None = DEFAULT_MAX_STATE_BYTES,
        spectrum_every_n_logs: int | None = 10,
        process_group: Any = None,
        background: bool | None = None,
        reservoir_size: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        self.every_n_steps = _positive_int(every_n_steps, "every_n_steps", "e.g. every_n_steps=100")
        if window not in _WINDOWS:
            raise ValueError(f"window must be one of {_WINDOWS}; got {window!r}.")
        self.window = window
        if ema_half_life is not None and window != "ema":
            raise ValueError(f"ema_half_life only applies to window='ema'; got window={window!r}. Drop ema_half_life.")
        if ema_half_life is None:
            ema_half_life = float(self.every_n_steps)
        if isinstance(ema_half_life, bool) or not isinstance(ema_half_life, (int, float)) or not ema_half_life > 0:
            raise ValueError(f"ema_half_life must be a positive number of steps; got {ema_half_life!r}.")
        self.ema_half_life = float(ema_half_life)
        # "auto" parks the hooks only once training steps are counted: an inference script that
        # never calls step() sees every forward.
        self._auto_collect = collect_steps == "auto"
        if collect_steps == "auto":
            collect_steps = min(self.every_n_steps, max(10, self.every_n_steps // 10))
        if collect_steps is not None:
            collect_steps = _positive_int(collect_steps, "collect_steps", "or None to collect on every step")
            if collect_steps > self.every_n_steps:
                raise ValueError(
                    f"collect_steps={collect_steps} exceeds every_n_steps={self.every_n_steps}; it must be at most "
                    f"the interval (or None to collect on every step)."
                )
        self.collect_steps = collect_steps
        if max_tokens_per_layer is not None:
            max_tokens_per_layer = _positive_int(
                max_tokens_per_layer, "max_tokens_per_layer", "or None for every token"
            )
        self.max_tokens_per_layer = max_tokens_per_layer
        self.metric_names = _metrics.validate_names(metrics)
        self.heldout = "heldout_loglik" in self.metric_names
        self.higher_moments = bool(_metrics.HIGHER_MOMENT_METRICS & set(self.metric_names))
        if isinstance(phases, str):
            phases = (phases,)
        phases = tuple(phases)
        bad = [p for p in phases if p not in _PHASES]
        if bad or not phases or len(set(phases)) != len(phases):
            raise ValueError(f"phases must be a non-empty selection of {_PHASES} without repeats; got {phases!r}.")
        self.phases = phases
        if not isinstance(state_dtype, torch.dtype) or not state_dtype.is_floating_point:
            raise TypeError(
                f"state_dtype must be a floating torch dtype (torch.float64 or float32); got {state_dtype!r}."
            )
        self.state_dtype = state_dtype
        self.product_dtype = product_dtype
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int; got {type(seed).__name__}.")
        if max_state_bytes is not None:
            max_state_bytes = _positive_int(max_state_bytes, "max_state_bytes", "or None for no limit")
        self.max_state_bytes = max_state_bytes
        if spectrum_every_n_logs is not None and spectrum_every_n_logs != 0:
            spectrum_every_n_logs = _positive_int(spectrum_every_n_logs, "spectrum_every_n_logs", "or None to disable")
        self.spectrum_every_n_logs = spectrum_every_n_logs or None
        self.process_group = process_group
        if background is not None and not isinstance(background, bool):
            raise TypeError(f"background must be True, False or None (automatic); got {background!r}.")
        if background is None:
            param = next(model.parameters(), None)
            background = param is not None and param.device.type != "cpu"
        self.background = background
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[_LogResult] | None = None
        if reservoir_size is not None:
            reservoir_size = _positive_int(reservoir_size, "reservoir_size", "or None for no sample")
        self.reservoir_size = reservoir_size

        self.model = model
        self.targets: list[LayerTarget] = resolve_layers(model, layers, ignore)
        dist = _dist()
        distributed = dist is not None and dist.get_world_size(process_group) > 1
        # Copies a log holds while its metrics are computed (see state_bytes_per_layer).
        self._log_copies = 1 if background or (window != "interval" and (self.heldout or distributed)) else 0
        self._check_budget()
        if isinstance(sinks, (str, Sink)) or callable(sinks):
            sinks = [sinks]
        self.sinks: list[Sink] = [make_sink(s) for s in sinks]

        if self.every_n_steps < 10:
            warnings.warn(
                f"GSAMMonitor(every_n_steps={self.every_n_steps}): each log runs one eigendecomposition per layer "
                f"and reads the statistics back to the host; logging more often than every 10 steps slows "
                f"training. Use every_n_steps >= 10 (or collect_steps=) outside of tests.",
                UserWarning,
                stacklevel=2,
            )

        rank = dist.get_rank() if dist is not None else 0
        self.seed = seed
        self._sampler = TokenSampler(seed + rank)
        self._mask_position = attention_mask_position(unwrap_model(model))
        self._context: ForwardContext = ThreadForwardContext()
        self._traced_context = ForwardContext()  # written by root hooks that torch.compile traces
        self._handles = HookHandles()
        self._stats: dict[tuple[str, str], LayerStats] = {}
        self._reference: dict[tuple[str, str], LayerStats] = {}
        self._samples: dict[tuple[str, str], Any] = {}  # (layer, phase) -> ReservoirSample
        # nn.DataParallel runs each layer's hook from several threads at once: one lock per
        # window serialises its updates (uncontended, it costs a few hundred nanoseconds).
        self._locks = {(t.name, p): threading.Lock() for t in self.targets for p in _PHASES}
        self._disabled_layers: set[str] = set()
        self._disabled_sinks: set[int] = set()
        self._warned: set[str] = set()
        self._attached = False
        self._forced = 0
        self._unreadable: set[str] = set()  # layers whose traced output held no hidden state
        # torch.compile: whether compiled graphs have traced the hooks (then they stay registered,
        # switched by _collecting), and the key under which the traced hooks reach this monitor.
        self._collecting = False
        self._compiled = False
        self._attach_pending = False
        self._observer_key = add_observer(self._observe_traced)
        weakref.finalize(self, remove_observer, self._observer_key)
        self._streams: dict[int, Any] = {}  # CUDA device index -> the background logs' stream
        self.step_count = 0
        self._stepped = False
        self._last_log_step = 0
        self.n_logs = 0
        self.errors = 0
        self.missing_layers: list[str] = []
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ setup helpers
    def _check_budget(self) -> None:
        if self.max_state_bytes is None:
            return
        per_layer = [
            (
                t.name,
                t.dim,
                state_bytes_per_layer(
                    t.dim,
                    state_dtype=self.state_dtype,
                    phases=self.phases,
                    heldout=self.heldout,
                    log_copies=self._log_copies,
                ),
            )
            for t in self.targets
            if t.dim is not None
        ]
        total = sum(b for _, _, b in per_layer)
        if total <= self.max_state_bytes:
            return
        dims = sorted({d for _, d, _ in per_layer})
        parts = ["1"] + (["1 held-out fit"] if self.heldout else []) + (["1 log copy"] if self._log_copies else [])
        copies = f"{len(parts)} ({' + '.join(parts)})" if len(parts) > 1 else "1"
        raise ValueError(
            f"max_state_bytes: the monitor's statistics would need {_gib(total)} ({len(per_layer)} layers of "
            f"d = {', '.join(map(str, dims))}; {len(self.phases)} phase(s) x {copies} "
            f"x {str(self.state_dtype).replace('torch.', '')} d^2 state each), over max_state_bytes = "
            f"{_gib(self.max_state_bytes)}. Fix: monitor fewer layers (layers= / ignore=), use "
            f"state_dtype=torch.float32 (halves it), drop 'heldout_loglik' from metrics= or a phase from "
            f"phases=, or raise max_state_bytes."
        )

    @property
    def layer_names(self) -> list[str]:
        """The monitored layers' keys, in selection order."""
        return [t.name for t in self.targets]

    # ------------------------------------------------------------------ attach / detach
    @property
    def attached(self) -> bool:
        """Whether the monitor is attached (its hooks may still be parked by ``collect_steps``)."""
        return self._attached

    @property
    def hooks_registered(self) -> bool:
        """Whether hooks are on the model right now (once a compiled graph has traced them,
        they stay registered while attached; ``collect_steps`` then switches a flag)."""
        return len(self._handles) > 0

    def attach(self) -> GSAMMonitor:
        """Start monitoring: register the hooks (now, or when ``collect_steps`` says so).

        A model already run under ``torch.compile`` (a warm-up, a resumed run) has compiled
        code that does not call hooks added later: Dynamo's compiled code is then dropped once,
        so that the next call recompiles with the hooks.
        """
        if not self._attached:
            self._attach_pending = True
        self._attached = True
        self._sync_hooks()
        return self

    def detach(self) -> None:
        """Stop monitoring and remove every hook (idempotent). The statistics are kept, so
        that a later ``attach()`` continues the windows; ``close()`` frees them."""
        self._attached = False
        self._handles.remove()
        self._collecting = False
        self._context.clear()
        self._traced_context.clear()

    def close(self, *, free: bool = True) -> None:
        """Detach, write a log still being computed, close the sinks (flushing TensorBoard
        files) and free the statistics (idempotent).

        Args:
            free: Free the statistics, held-out fits and reservoir samples (default). Leaving
                ``with monitor:`` closes with ``free=False``, so that ``compute()``, ``stats()``
                and ``sample()`` still read the run's windows after the block; the memory goes
                with the monitor object, or at ``close()``. ``last_metrics`` is always kept.
        """
        self.detach()
        self.flush()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._streams.clear()
        for i, sink in enumerate(self.sinks):
            if i in self._disabled_sinks:
                continue
            close = getattr(sink, "close", None)
            if close is None:
                continue
            try:
                close()
            except Exception as err:
                self._sink_failed(i, sink, err)
        if free:
            self._stats.clear()
            self._reference.clear()
            self._samples.clear()

    def __enter__(self) -> GSAMMonitor:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.close(free=False)

    @contextlib.contextmanager
    def collect(self) -> Iterator[GSAMMonitor]:
        """Keep the hooks registered for the body, whatever ``collect_steps`` says (e.g. for an
        evaluation loop between two logs)."""
        self._forced += 1
        self._sync_hooks()
        try:
            yield self
        finally:
            self._forced -= 1
            self._sync_hooks()

    def _want_hooks(self) -> bool:
        if self._forced > 0:
            return True
        if not self._attached:
            return False
        if self.collect_steps is None or (self._auto_collect and self.step_count == 0 and not self._stepped):
            return True
        # The next forward belongs to step step_count + 1; collect on the last k of each interval.
        return self.step_count % self.every_n_steps >= self.every_n_steps - self.collect_steps

    def _sync_hooks(self) -> None:
        want = self._want_hooks()
        self._collecting = want
        # Hooks that compiled graphs have traced stay registered while attached, switched by
        # _collecting: removing them would recompile the graphs, and a graph compiled without
        # them would never notice them coming back (Dynamo guards on no empty hook dict).
        keep = want or (self._compiled and self._attached)
        if keep and not self.hooks_registered:
            self._register()
        elif not keep and self.hooks_registered:
            self._handles.remove()
            self._context.clear()
            self._traced_context.clear()

    def _register(self) -> None:
        for handle in register_context_hooks(
            _context_root(self.model), self._context, self._mask_position, self._hook_error, self._traced_context
        ):
            self._handles.add(handle)
        for index, target in enumerate(self.targets):
            self._handles.add(register_layer_hook(target.module, target.kind, self._make_callback(index, target)))
        first, self._attach_pending = self._attach_pending, False
        if first or self._compiled or _has_compiled_code(unwrap_model(self.model)):
            self._drop_compiled_code()

    def _drop_compiled_code(self) -> None:
        """Drop the code torch.compile has compiled so far, so that its next call traces the
        hooks just registered (compiled code never re-checks an empty hook dict)."""
        try:
            from torch._dynamo import convert_frame
            from torch._dynamo.eval_frame import _debug_get_cache_entry_list, remove_from_cache

            seen = [*convert_frame.input_codes.seen, *convert_frame.output_codes.seen]
            codes = {id(c): c for c in (ref() for ref in seen) if c is not None and _debug_get_cache_entry_list(c)}
            for code in codes.values():
                remove_from_cache(code)
        except Exception as err:  # Dynamo internals moved: say what to do instead
            self._warn_once(
                "compile-reset",
                f"GSAMMonitor: could not make torch.compile'd code trace the hooks attached now "
                f"({type(err).__name__}: {err}); a model compiled and run before attach() may log nothing. "
                f"Attach the monitor before the first compiled call, or call torch._dynamo.reset() after attach().",
            )
            return
        if codes:
            log.info(
                "GSAMMonitor: dropped the compiled code of %d function(s) so that their next call compiles them "
                "with the monitor's hooks (a model compiled and run before attach()).",
                len(codes),
            )

    def _make_callback(self, index: int, target: LayerTarget) -> Any:
        def callback(module: nn.Module, value: Any) -> None:
            # Read while torch.compile traces, too: the compiled graph is specialised on it (a
            # guard), so a switched-off hook costs the graph nothing.
            if not self._collecting:
                return
            if torch.compiler.is_compiling():
                self._trace_activation(index, target, module, value)
            else:
                self._on_activation(target, module, value)

        return callback

    # ------------------------------------------------------------------ the hook path
    def _trace_activation(self, index: int, target: LayerTarget, module: nn.Module, value: Any) -> None:
        """The hook inside a torch.compile trace: put one ``observe`` call into the graph. The
        phase and the mask are those of the forward being traced (the graph is specialised on
        the phase: grad mode, ``training`` and the context are guarded)."""
        hidden = extract_hidden(value)
        if hidden is None:
            # Nothing to observe. No warning from inside the graph (a graph break, which
            # fullgraph=True forbids): step() warns.
            self._unreadable.add(target.name)
            return
        # The root's hooks ran in this trace (a compiled model or training step), or eagerly
        # before it (torch.compile(model): OptimizedModule calls them outside the graph).
        context = self._traced_context if self._traced_context.active else self._context
        phase = context.phase if context.active and context.phase else infer_phase(module)
        if phase not in self.phases:
            return
        observe(hidden, context.mask if context.active else None, self._observer_key, index, phase)

    def _observe_traced(self, index: int, hidden: torch.Tensor, mask: torch.Tensor | None, phase: str) -> None:
        """Run by the compiled graph's ``observe`` call, eagerly, with real tensors."""
        self._compiled = True
        target = self.targets[index]
        try:
            self._collect(target, target.module, hidden, phase, mask)
        except Exception as err:  # never let monitoring stop the model
            self._hook_error(err, target.name)

    def _on_activation(self, target: LayerTarget, module: nn.Module, value: Any) -> None:
        try:
            if in_backward():
                return  # a gradient-checkpointing recomputation: these tokens were counted
            context = self._context
            phase = context.phase if context.active and context.phase else infer_phase(module)
            if phase not in self.phases:
                return
            hidden = extract_hidden(value)
            if hidden is None:
                self._warn_unreadable(target.name, type(value).__name__)
                return
            self._collect(target, module, hidden, phase, context.mask if context.active else None)
        except Exception as err:  # never let monitoring stop the model
            self._hook_error(err, target.name)

    def _collect(
        self, target: LayerTarget, module: nn.Module, hidden: torch.Tensor, phase: str, root_mask: torch.Tensor | None
    ) -> None:
        """Feed one activation of ``target`` to its window (padding dropped, tokens sampled)."""
        if target.name in self._disabled_layers:
            return
        x, channels_first = to_rows(hidden.detach(), module)  # (..., d)
        mask = None
        if root_mask is not None and not channels_first:
            aligned = align_mask(root_mask, tuple(x.shape[:-1]))  # (B, T), or the newest t of a KV cache
            if aligned is not None:
                mask = aligned.to(x.device, non_blocking=True) != 0
            elif x.dim() == 3:
                self._warn_once(
                    "mask-shape",
                    f"GSAMMonitor: the attention_mask has shape {tuple(root_mask.shape)} but layer "
                    f"{target.name!r} outputs {tuple(x.shape)}; its padding cannot be dropped, so every "
                    f"position is counted.",
                )
        d = x.shape[-1]
        rows = x.reshape(-1, d)  # (B*T, d)
        keep = mask.reshape(-1) if mask is not None else None
        rows, keep = self._sampler.sample(rows, keep, self.max_tokens_per_layer)
        with self._locks[(target.name, phase)]:
            stats = self._stats_for(target, module, phase, d, rows.device)
            if stats is not None:
                stats.update(rows, mask=keep)
            if self.reservoir_size is not None:
                self._sample_for(target.name, phase, rows.device).update(rows, mask=keep)

    def _stats_for(
        self, target: LayerTarget, module: nn.Module, phase: str, dim: int, device: torch.device
    ) -> LayerStats | None:
        key = (target.name, phase)
        stats = self._stats.get(key)
        # An nn.DataParallel replica (another module object, on another device) feeds the
        # statistics where the model lives; the statistics follow only the model itself.
        replica = module is not target.module
        if replica:
            device = _home_device(target.module, device)
        if stats is None:
            if self.max_state_bytes is not None:
                live = [s.nbytes for s in self._stats.values()]
                held = sum(live) + sum(s.nbytes for s in self._reference.values()) + self._log_copies * sum(live)
                # This window, the fit to be kept from it, and what a log copies of it.
                copies = 1 + (1 if self.heldout and key not in self._reference else 0) + self._log_copies
                need = LayerStats.state_bytes(dim, self.state_dtype) * copies
                if held + need > self.max_state_bytes:
                    self._disabled_layers.add(target.name)
                    self._warn_once(
                        f"budget:{target.name}",
                        f"GSAMMonitor: layer {target.name!r} (d = {dim}) would take the statistics to "
                        f"{_gib(held + need)}, over max_state_bytes = {_gib(self.max_state_bytes)}; it is not "
                        f"monitored. Monitor fewer layers, use state_dtype=torch.float32, or raise max_state_bytes.",
                    )
                    return None
            stats = self._new_stats(dim, device)
            self._stats[key] = stats
        elif stats.device != device and not replica:  # the model moved after attach: follow it
            with torch.inference_mode(False):  # moved copies must stay ordinary tensors
                stats.to(device)
                ref = self._reference.get(key)
                if ref is not None:
                    ref.to(device)
        if stats.dim != dim:
            raise ValueError(
                f"layer {target.name!r} changed its feature size from {stats.dim} to {dim}; its statistics cannot "
                f"continue. Call monitor.reset() after changing the model."
            )
        return stats

    def _sample_for(self, layer: str, phase: str, device: torch.device) -> Any:
        sample = self._samples.get((layer, phase))
        if sample is None:
            # A distinct, deterministic stream per (layer, phase) and rank.
            dist = _dist()
            rank = dist.get_rank() if dist is not None else 0
            offset = self.layer_names.index(layer) * len(_PHASES) + _PHASES.index(phase)
            with torch.inference_mode(False):  # an ordinary tensor, also under an inference-mode forward
                sample = ReservoirSample(self.reservoir_size, seed=self.seed + rank + 7919 * offset, device=device)
            self._samples[(layer, phase)] = sample
        return sample

    def sample(self, layer: str, phase: str = "train") -> Any:
        """The ``ReservoirSample`` of ``layer`` in ``phase`` (``reservoir_size=`` must be set);
        ``None`` before its first activation. ``.values()`` gives the values as numpy fp64.

        Raises:
            ValueError: if the monitor was built without ``reservoir_size``.
        """
        if self.reservoir_size is None:
            raise ValueError(
                "sample: this monitor collects no reservoir sample; construct it with "
                "GSAMMonitor(..., reservoir_size=200_000)."
            )
        return self._samples.get((layer, phase))

    def _new_stats(self, dim: int, device: torch.device | str) -> LayerStats:
        # Ordinary tensors even when the first activation comes from an inference-mode forward:
        # an inference tensor could not be updated in place by a later training step.
        with torch.inference_mode(False):
            return LayerStats(
                dim,
                device=device,
                state_dtype=self.state_dtype,
                product_dtype=self.product_dtype,
                higher_moments=self.higher_moments,
            )

    def _all_stats(self) -> Iterator[LayerStats]:
        yield from self._stats.values()
        yield from self._reference.values()

    # ------------------------------------------------------------------ errors
    def _warn_unreadable(self, layer: str, kind: str = "an output") -> None:
        self._warn_once(
            f"unpack:{layer}",
            f"GSAMMonitor: layer {layer!r} produced {kind} with no floating tensor of shape (..., d); it is not "
            f"monitored. Select a sub-module that returns the hidden states.",
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            log.debug(message)
            return
        self._warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _hook_error(self, err: BaseException, where: str = "model") -> None:
        self.errors += 1
        self._warn_once(
            "hook-error",
            f"GSAMMonitor: an error in the hook of {where!r} was caught and skipped ({type(err).__name__}: {err}); "
            f"training goes on. Further errors are counted in '{META_PREFIX}/errors'.",
        )

    def _sink_failed(self, index: int, sink: Any, err: BaseException) -> None:
        self.errors += 1
        self._disabled_sinks.add(index)
        self._warn_once(
            f"sink:{index}",
            f"GSAMMonitor: sink {sink!r} raised {type(err).__name__}: {err}; it is disabled and training goes on.",
        )

    # ------------------------------------------------------------------ schedule
    @torch.inference_mode(False)  # windows cloned or created here must stay ordinary tensors
    def step(self, global_step: int | None = None) -> dict[str, float] | None:
        """Count one optimizer step; on schedule compute, sync, log and start a new window.

        Args:
            global_step: The trainer's step count, when it keeps one (resumed runs, gradient
                accumulation); ``None`` adds one to the monitor's own count.

        Returns:
            The metrics written to the sinks during this call (``{"gsam/encoder.layer.0": ...}``):
            on a logging step, or with ``background=True`` when an earlier log's computation
            finished; else None. Under ``torch.distributed`` the metrics are computed and
            written on the process group's rank zero only; the other ranks sync their windows
            and get ``{}`` on a logging step.
        """
        self._stepped = True
        for layer in sorted(self._unreadable):  # seen by compiled graphs, which cannot warn
            self._warn_unreadable(layer)
        if global_step is None:
            self.step_count += 1
        else:
            if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
                raise ValueError(f"global_step must be a non-negative int or None; got {global_step!r}.")
            self.step_count = int(global_step)
        result = self._drain(wait=False)
        if self.step_count // self.every_n_steps > self._last_log_step // self.every_n_steps:
            if self.background:
                drained = self.flush()  # at most one log in flight: wait for the previous one
                if drained:
                    result = {**(result or {}), **drained}
                self._submit_log()
            else:
                result = {**(result or {}), **self.log()}
        if self.window == "ema":
            # After the log, so the newest step's data enters the next log with weight 1.
            factor = 0.5 ** (1.0 / self.ema_half_life)
            for stats in self._stats.values():
                stats.decay_(factor)
        self._sync_hooks()
        return result

    @torch.inference_mode(False)
    def log(self, global_step: int | None = None, *, phases: Sequence[str] | None = None) -> dict[str, float]:
        """Compute, sync, write to the sinks and advance the window now, off schedule.

        Args:
            global_step: The step to log at (default: the monitor's step count).
            phases: Only these phases (default: all monitored phases).

        Returns:
            The flat metrics written (finite values only), ``{}`` when nothing was collected
            or on a rank that does not write (see ``step``).
        """
        step = self.step_count if global_step is None else int(global_step)
        phases = self._check_phases(phases)
        self.flush()  # an earlier background log reaches the sinks first
        try:
            windows = self._synced_windows(phases, in_place=self.window == "interval")
            if self._is_writer():
                refs = {key: self._reference.get(key) for key in windows}
                result = self._metrics_of(windows, refs, step, self.n_logs)
            else:  # the metrics are computed where they are written
                result = _LogResult(step)
            self._advance(windows)
        except Exception as err:
            result = _LogResult(step, errors=[(err, "log")])
        self._last_log_step = self.step_count
        self.n_logs += 1
        return self._publish(result)

    def flush(self) -> dict[str, float]:
        """Wait for a log being computed in the background and write it; ``{}`` if none."""
        return self._drain(wait=True) or {}

    def _submit_log(self) -> None:
        """Sync the windows now, advance them, and compute the metrics on the background
        thread (the caller has written the previous log).

        Nothing is copied for interval windows: the worker takes the synced windows
        themselves and fresh ones start at the next activation. Cumulative and EMA windows go
        on, so the worker gets a copy (the one the sync made, under torch.distributed). The
        held-out fits are replaced, never modified, so the worker reads them as they are.
        """
        step = self.step_count
        snapshot = None
        try:
            windows = self._synced_windows(self.phases, in_place=self.window == "interval")
            if self._is_writer():
                if self.window == "interval":
                    snapshot = dict(windows)
                else:
                    snapshot = {k: w.clone() if w is self._stats.get(k) else w for k, w in windows.items()}
                refs = {key: self._reference.get(key) for key in snapshot}
                self._advance(snapshot, handed_off=True)
            else:  # the metrics are computed where they are written
                self._advance(windows)
        except Exception as err:
            self._hook_error(err, "log")
            snapshot = None
        self._last_log_step = self.step_count
        n_logs = self.n_logs
        self.n_logs += 1
        if snapshot is None:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gsam-monitor")
        ready = None
        devices = {stats.device for stats in snapshot.values()}
        cuda = next((d for d in devices if d.type == "cuda"), None)
        if cuda is not None:  # the worker's stream must see the synced windows complete
            if cuda.index is None:
                cuda = torch.device("cuda", torch.cuda.current_device())
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(cuda))

        def job() -> _LogResult:
            try:
                if cuda is None:
                    return self._metrics_of(snapshot, refs, step, n_logs)
                # The worker thread's current device is the statistics' one: a thread starts on
                # device 0, where it would create a stray context on every other rank's GPU.
                torch.cuda.set_device(cuda)
                stream = self._worker_stream(cuda)
                with torch.cuda.stream(stream):
                    stream.wait_event(ready)
                    result = self._metrics_of(snapshot, refs, step, n_logs)
                # The snapshot's memory returns to the training stream's allocator when the job
                # drops it: the side stream must be done with it first.
                stream.synchronize()
                return result
            except Exception as err:
                return _LogResult(step, errors=[(err, "log")])

        self._pending = self._executor.submit(job)

    def _worker_stream(self, device: torch.device) -> Any:
        """One CUDA stream per device for this monitor's background logs (created once)."""
        stream = self._streams.get(device.index)
        if stream is None:
            stream = self._streams[device.index] = torch.cuda.Stream(device)
        return stream

    def _drain(self, *, wait: bool) -> dict[str, float] | None:
        """Write the background log's result if it is ready (or, with ``wait``, once it is)."""
        pending = self._pending
        if pending is None or (not wait and not pending.done()):
            return None
        self._pending = None
        return self._publish(pending.result())

    def _publish(self, result: _LogResult) -> dict[str, float]:
        for err, where in result.errors:
            self._hook_error(err, where)
        flat = result.flat
        if flat:
            flat[f"{META_PREFIX}/errors"] = float(self.errors)
        self.missing_layers = result.missing
        self.last_metrics = flat
        if flat:
            self._write(flat, result.spectra, result.step)
        return flat

    @torch.inference_mode(False)
    def compute(self, phase: str | None = None) -> dict[str, dict[str, float]]:
        """The current window's metrics per layer, without logging or resetting.

        Args:
            phase: ``"train"`` or ``"eval"`` for that phase's layers under their plain names;
                ``None`` for every phase with data, eval layers keyed ``"{layer}/eval"``.

        Returns:
            ``{layer: {metric: value}}`` for the layers that saw data (NaN where undefined).
        """
        phases = self._check_phases(None if phase is None else [phase])
        windows = self._synced_windows(phases, in_place=False)
        out: dict[str, dict[str, float]] = {}
        for (name, ph), stats in windows.items():
            if float(stats.count) <= 0:
                continue
            values = _metrics.compute(stats, self._reference.get((name, ph)), names=self.metric_names)
            out[name if phase is not None else layer_key(name, ph)] = values
        return out

    def _check_phases(self, phases: Sequence[str] | None) -> tuple[str, ...]:
        if phases is None:
            return self.phases
        if isinstance(phases, str):
            phases = (phases,)
        bad = [p for p in phases if p not in self.phases]
        if bad:
            raise ValueError(f"phase must be one of the monitored phases {self.phases}; got {bad[0]!r}.")
        return tuple(phases)

    # ------------------------------------------------------------------ window machinery
    def _synced_windows(self, phases: Sequence[str], *, in_place: bool) -> dict[tuple[str, str], LayerStats]:
        """Each (layer, phase) window, summed over ranks under torch.distributed.

        ``in_place`` reduces the live statistics (they are reset right after, interval windows);
        otherwise clones are reduced so that the local state stays local.
        """
        keys = [(t.name, p) for p in phases for t in self.targets if t.name not in self._disabled_layers]
        dist = _dist()
        if dist is None or dist.get_world_size(self.process_group) == 1:
            return {k: self._stats[k] for k in keys if k in self._stats}
        # Ranks must reduce the same tensors in the same order: agree first on which windows
        # exist anywhere (and their sizes), creating empty ones where a rank saw no data.
        device = self._comm_device(dist)
        dims = torch.tensor(
            [self._stats[k].dim if k in self._stats else 0 for k in keys], dtype=torch.int64, device=device
        )
        dist.all_reduce(dims, op=dist.ReduceOp.MAX, group=self.process_group)
        out: dict[tuple[str, str], LayerStats] = {}
        for key, dim in zip(keys, dims.tolist(), strict=True):
            if dim == 0:
                continue
            stats = self._stats.get(key)
            if stats is None:
                stats = self._stats[key] = self._new_stats(int(dim), device)
            synced = stats if in_place else stats.clone()
            synced.all_reduce_(self.process_group)
            out[key] = synced
        return out

    def _comm_device(self, dist: Any) -> torch.device:
        for stats in self._stats.values():
            return stats.device
        if dist.get_backend(self.process_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _metrics_of(
        self,
        windows: Mapping[tuple[str, str], LayerStats],
        refs: Mapping[tuple[str, str], LayerStats | None],
        step: int,
        n_logs: int,
    ) -> _LogResult:
        """Every metric of the windows (pure: reads only its arguments and the configuration,
        so that it can run on the background thread)."""
        result = _LogResult(step)
        counts = {key: float(stats.count) for key, stats in windows.items()}
        # Rows dropped for NaN/Inf, read here at log time (the hook path never syncs).
        nonfinite = {key: int(stats.nonfinite) for key, stats in windows.items()}
        active_phases = {ph for (_, ph), n in counts.items() if n > 0}
        active_phases |= {ph for (_, ph), k in nonfinite.items() if k > 0}
        if not active_phases:
            self._warn_once(
                "empty-window",
                f"GSAMMonitor: no activations were captured in the window ending at step {step} (none "
                f"reached the monitored layers, or every token was padding); is the model called between steps, "
                f"and is the monitor attached (attach() or `with monitor:`)?",
            )
            return result
        want_spectrum = self.spectrum_every_n_logs is not None and n_logs % self.spectrum_every_n_logs == 0
        flat: dict[str, float] = {}
        spectra: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        for phase in self.phases:
            if phase not in active_phases:
                continue
            n_missing = 0
            for target in self.targets:
                key = (target.name, phase)
                if target.name in self._disabled_layers:
                    continue
                if counts.get(key, 0.0) <= 0 and nonfinite.get(key, 0) > 0:
                    # The layer fired, but every row held NaN/Inf: report that, not "missing".
                    flat[metric_key("n", target.name, phase)] = 0.0
                    flat[metric_key("nonfinite", target.name, phase)] = float(nonfinite[key])
                    continue
                if counts.get(key, 0.0) <= 0:
                    n_missing += 1
                    missing.append(layer_key(target.name, phase))
                    continue
                try:
                    values, evals = _metrics.compute(
                        windows[key], refs.get(key), names=self.metric_names, return_spectrum=True
                    )
                except Exception as err:
                    result.errors.append((err, f"metrics of {target.name}"))
                    continue
                for metric, value in values.items():
                    value = float(value)
                    if math.isfinite(value):  # NaN/inf never reach a sink
                        flat[metric_key(metric, target.name, phase)] = value
                if want_spectrum and evals is not None:
                    spectra[layer_key(target.name, phase)] = evals
            flat[metric_key(META_PREFIX, "missing_layers", phase)] = float(n_missing)
        if missing:
            self._warn_once(
                "missing:" + ",".join(missing),
                f"GSAMMonitor: no activations reached {', '.join(missing)} in the window ending at step "
                f"{step}; reported as missing ('{META_PREFIX}/missing_layers'), nothing logged for them.",
            )
        dropped = [
            f"{layer_key(name, ph)}: {k}"
            for (name, ph), k in nonfinite.items()
            if k > 0 and name not in self._disabled_layers
        ]
        if dropped:
            self._warn_once(
                "nonfinite",
                f"GSAMMonitor: rows holding NaN/Inf activations were dropped in the window ending at step "
                f"{step} ({', '.join(dropped)}); they are left out of every metric and counted in "
                f"'nonfinite/{{layer}}'. Training goes on; later ones are only counted.",
            )
        result.flat, result.spectra, result.missing = flat, spectra, missing
        return result

    @torch.no_grad()
    def _advance(self, windows: Mapping[tuple[str, str], LayerStats], *, handed_off: bool = False) -> None:
        """Start the next windows after a log and keep the held-out fits.

        ``handed_off``: a background log owns ``windows`` (the synced interval windows
        themselves, or copies of the cumulative/EMA ones): they are never reset or reused.
        """
        for key, synced in windows.items():
            has_data = float(synced.count) > 0
            if self.window == "interval" and handed_off:
                self._stats.pop(key, None)  # the worker's now; a fresh window starts at the next activation
                if self.heldout and has_data:
                    self._reference[key] = synced
            elif self.window == "interval":
                if self.heldout and has_data:
                    old = self._reference.get(key)
                    self._reference[key] = synced  # the synced live state, summed over ranks
                    if old is not None:
                        old.reset()
                        self._stats[key] = old
                    else:
                        del self._stats[key]  # re-created at the next activation
                else:
                    self._stats[key].reset()
            elif self.heldout and has_data:
                self._reference[key] = synced if synced is not self._stats.get(key) else synced.clone()
            if self.window != "interval" and key in self._stats:  # never reset: re-centre (exact)
                self._stats[key].reshift_()

    # ------------------------------------------------------------------ output
    def _is_writer(self) -> bool:
        """Rank zero of the monitor's process group (its group rank: group [1, 2] writes on
        global rank 1) computes the metrics and writes them; every process outside
        ``torch.distributed`` does."""
        dist = _dist()
        return dist is None or dist.get_rank(self.process_group) == 0

    def _write(self, flat: Mapping[str, float], spectra: Mapping[str, torch.Tensor], step: int) -> None:
        if not self._is_writer():
            return
        for i, sink in enumerate(self.sinks):
            if i in self._disabled_sinks:
                continue
            try:
                sink.write(dict(flat), step)
                if spectra and hasattr(sink, "write_spectrum"):
                    sink.write_spectrum(dict(spectra), step)
            except Exception as err:
                self._sink_failed(i, sink, err)

    # ------------------------------------------------------------------ state
    def stats(self, layer: str, phase: str = "train") -> LayerStats | None:
        """The live statistics of ``layer`` in ``phase`` (``None`` before its first activation)."""
        return self._stats.get((layer, phase))

    @torch.inference_mode(False)
    def reset(self) -> None:
        """Drop the statistics of every window and the held-out fits (the step count stays)."""
        for stats in self._stats.values():
            stats.reset()
        self._reference.clear()
        for sample in self._samples.values():
            sample.reset()

    @torch.inference_mode(False)
    def state_dict(self) -> dict[str, Any]:
        """The monitor's state: tensors and plain values only, so that
        ``torch.load(path, weights_only=True)`` can read it back. A log still being computed
        in the background is waited for and written first."""

        self.flush()  # a log still being computed reaches the sinks before the checkpoint

        def pack(table: Mapping[tuple[str, str], Any]) -> dict[str, dict[str, Any]]:
            out: dict[str, dict[str, Any]] = {}
            for (name, phase), stats in table.items():
                # To the host layer by layer: a device copy of every window at once would need
                # as much free accelerator memory again as the statistics themselves.
                out.setdefault(phase, {})[name] = _to_cpu(stats.state_dict())
            return out

        return {
            "format": "gsam_monitor.GSAMMonitor",
            "version": 1,
            "layers": self.layer_names,
            "window": self.window,
            "step_count": self.step_count,
            "last_log_step": self._last_log_step,
            "n_logs": self.n_logs,
            "errors": self.errors,
            "stats": pack(self._stats),
            "reference": pack(self._reference),
            "sampler": self._sampler.state_dict(),
            "samples": pack(self._samples),
        }

    @torch.inference_mode(False)
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` output (e.g. from a checkpoint) to continue the windows.

        Raises:
            ValueError: if it is not a monitor state, or was saved for other layers.
        """
        if state_dict.get("format") != "gsam_monitor.GSAMMonitor":
            raise ValueError(
                "load_state_dict: not a GSAMMonitor state (no format 'gsam_monitor.GSAMMonitor'); pass the dict that "
                "monitor.state_dict() returned."
            )
        saved = list(state_dict["layers"])
        if saved != self.layer_names:
            raise ValueError(
                f"load_state_dict: the state is for layers {saved}, this monitor watches {self.layer_names}; construct "
                f"the monitor with the same layers= and ignore= as the run that saved it."
            )

        def unpack(table: Mapping[str, Mapping[str, Any]]) -> dict[tuple[str, str], LayerStats]:
            out: dict[tuple[str, str], LayerStats] = {}
            for phase, layers in table.items():
                for name, sd in layers.items():
                    device = self._device_of(name)
                    out[(name, phase)] = LayerStats.from_state_dict(sd, device=device, product_dtype=self.product_dtype)
            return out

        self._stats = unpack(state_dict["stats"])
        self._reference = unpack(state_dict["reference"])
        self.step_count = int(state_dict["step_count"])
        self._last_log_step = int(state_dict["last_log_step"])
        self.n_logs = int(state_dict["n_logs"])
        self.errors = int(state_dict["errors"])
        self._sampler.load_state_dict(state_dict["sampler"])
        self._samples = {}
        if self.reservoir_size is not None:
            for phase, layers in state_dict.get("samples", {}).items():
                for name, sd in layers.items():
                    if int(sd["capacity"]) != self.reservoir_size:
                        raise ValueError(
                            f"load_state_dict: the state's reservoir samples hold {int(sd['capacity'])} values, "
                            f"this monitor has reservoir_size={self.reservoir_size}; construct it with "
                            f"reservoir_size={int(sd['capacity'])}."
                        )
                    sample = ReservoirSample(self.reservoir_size)  # CPU: the saved generator state is a CPU one
                    sample.load_state_dict(sd)
                    self._samples[(name, phase)] = sample.to(self._device_of(name))
        self._sync_hooks()

    def _device_of(self, layer: str) -> torch.device:
        for target in self.targets:
            if target.name == layer:
                param = next(target.module.parameters(), None)
                if param is not None:
                    return param.device
        return torch.device("cpu")

    def __repr__(self) -> str:
        return (
            f"GSAMMonitor(layers={len(self.targets)}, every_n_steps={self.every_n_steps}, window={self.window!r}, "
            f"phases={self.phases}, step={self.step_count}, attached={self._attached})"
        )


def _to_cpu(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.to("cpu") if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _context_root(model: nn.Module) -> nn.Module:
    """Where the forward-context hooks go: the model, or the module inside an
    ``nn.DataParallel`` (its replicas share that module's hooks and run them in their own
    threads with their own slice of the batch, attention mask included)."""
    module: nn.Module = model
    for _ in range(8):  # wrappers nest a few levels at most (compile, DataParallel)
        if isinstance(module, nn.DataParallel):
            return module.module
        inner = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
        if not isinstance(inner, nn.Module):
            break
        module = inner
    return model


def _home_device(module: nn.Module, fallback: torch.device) -> torch.device:
    """The device of ``module``'s first parameter or buffer, else ``fallback``."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return fallback


def _has_compiled_code(model: nn.Module) -> bool:
    """Whether torch.compile holds compiled code for ``model``'s forward (``torch.compile(model)``
    and ``model.compile()`` compile it; a compiled training-step function is not seen here)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return bool(_debug_get_cache_entry_list(type(model).forward.__code__))
    except Exception:
        return False


def _positive_int(value: Any, name: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int ({hint}); got {value!r}.")
    return int(value)
