"""GSAMCallback: GSAM monitoring for a Lightning ``Trainer``.

One line in a Lightning setup::

    trainer = pl.Trainer(..., callbacks=[GSAMCallback(every_n_steps=50)])

What happens, hook by hook:

* ``setup("fit")``: a ``GSAMMonitor`` is built on the LightningModule (or on one of its
  sub-modules, ``module="model"``) and attached. Its only sink sends each log to every logger
  in ``trainer.loggers`` with ``logger.log_metrics(metrics, step)``, so TensorBoardLogger,
  WandbLogger, CSVLogger and the rest all receive ``"{metric}/{layer}"`` at Lightning's
  logging step (``global_step - 1`` after the optimizer step, where Lightning also puts the
  loss that ``self.log`` recorded in that step). Only global rank zero writes; every rank steps the monitor, because the
  statistics are summed over ranks (one ``all_reduce``) at each log under DDP.
* ``on_train_batch_end``: ``monitor.step(trainer.global_step)`` whenever the global step has
  moved, i.e. once per optimizer step: with ``accumulate_grad_batches=k`` a window of ``n``
  steps holds ``n·k`` micro-batches.
* ``on_validation_start`` / ``on_validation_end``: validation forwards (no grad, eval mode)
  go into the monitor's ``"eval"`` phase and are logged (``"{metric}/{layer}/eval"``) when
  validation ends. The sanity check is not monitored.
* ``state_dict`` / ``load_state_dict``: the monitor's state goes into Lightning checkpoints
  (under ``state_key``), so ``fit(ckpt_path=...)`` continues windows and counters.
* ``teardown("fit")`` and ``on_exception``: the monitor detaches (its hooks leave the model)
  and closes its sinks.

This module uses ``pytorch_lightning`` when installed, else ``lightning.pytorch``. Lightning
calls callback hooks by name, so the callback works with either package's ``Trainer``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

try:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback
    from pytorch_lightning.utilities.exceptions import MisconfigurationException
except ImportError:  # the unified "lightning" package only
    import lightning.pytorch as pl  # type: ignore[no-redef]
    from lightning.pytorch.callbacks import Callback  # type: ignore[no-redef]
    from lightning.pytorch.utilities.exceptions import MisconfigurationException  # type: ignore[no-redef]

from typing_extensions import override

from gsam_monitor.callbacks._common import check_monitor_kwargs
from gsam_monitor.monitor import GSAMMonitor

__all__ = ["GSAMCallback", "LoggersSink"]

log = logging.getLogger(__name__)


class LoggersSink:
    """Sends the monitor's scalars to every logger of a Lightning ``Trainer``.

    Points go in at Lightning's own logging step, ``fit_loop.epoch_loop._batches_that_stepped``
    (as Lightning's ``LearningRateMonitor`` and ``DeviceStatsMonitor`` do): a log made after
    optimizer step ``k`` lands at ``x = k - 1``, where Lightning puts the loss that
    ``self.log`` recorded in that same step, so the curves line up. The trainer's ``loggers``
    list is read at each write; loggers flush on their own schedule (``save()``/``finalize``).
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer

    def logging_step(self, step: int) -> int:
        """Lightning's logging step now; ``step - 1`` if this Lightning version has no such counter."""
        loop = getattr(getattr(self.trainer, "fit_loop", None), "epoch_loop", None)
        stepped = getattr(loop, "_batches_that_stepped", None)
        return int(stepped) if isinstance(stepped, int) else max(0, int(step) - 1)

    def write(self, metrics: Mapping[str, float], step: int) -> None:
        at = self.logging_step(step)
        for logger in self.trainer.loggers:
            logger.log_metrics(dict(metrics), at)

    def close(self) -> None:
        return None  # the loggers belong to the Trainer

    def __repr__(self) -> str:
        return f"LoggersSink({[type(lg).__name__ for lg in self.trainer.loggers]})"


def _spec_key(spec: Any) -> str:
    """A run-independent text for a ``layers=`` spec (used in ``state_key``)."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, re.Pattern):
        return f"re:{spec.pattern}"
    if isinstance(spec, type):
        return spec.__qualname__
    if isinstance(spec, nn.Module):
        return type(spec).__qualname__
    if isinstance(spec, Iterable):
        return "[" + ",".join(_spec_key(s) for s in spec) + "]"
    return type(spec).__qualname__


class GSAMCallback(Callback):
    """Monitor GSAM and activation geometry during ``Trainer.fit``.

    Args:
        layers: Which layers to watch (``GSAMMonitor``'s ``layers=``, names relative to the
            monitored module; default: every block of its repeated stack).
        module: Dotted attribute path of the sub-module to monitor (``"model"`` for a Hugging
            Face model held as ``self.model``), so that the ``attention_mask`` it is called with
            is seen and padding dropped; ``None`` monitors the LightningModule itself.
        every_n_steps: Log every this many optimizer steps (``trainer.global_step``).
        log_validation: Log the ``"eval"`` phase when each validation run ends.
        sinks: Extra sinks besides ``trainer.loggers`` (objects, callables, names).
        **monitor_kwargs: Every other ``GSAMMonitor`` argument (``max_tokens_per_layer``,
            ``window``, ``collect_steps``, ``metrics``, ``phases``, ``state_dtype``, ...).

    Attributes:
        monitor: The ``GSAMMonitor`` (``None`` before ``setup("fit")``).
        last_metrics: The last values logged per phase: ``{"train": {...}, "eval": {...}}``.
        last_steps: The global step of each phase's last log.

    Raises:
        TypeError: a keyword argument that ``GSAMMonitor`` does not take.
        ValueError: a non-positive ``every_n_steps``.
        MisconfigurationException: (in ``setup``) ``module`` names no sub-module.

    Example::

        from gsam_monitor.callbacks import GSAMCallback

        trainer = pl.Trainer(max_steps=1000, logger=TensorBoardLogger("runs"),
                             callbacks=[GSAMCallback(every_n_steps=50, module="model")])
        trainer.fit(lit_module)      # "gsam/gpt_neox.layers.0", ... beside the loss
    """

    def __init__(
        self,
        layers: Any = "auto",
        *,
        module: str | None = None,
        every_n_steps: int = 50,
        log_validation: bool = True,
        sinks: Iterable[Any] | Any = (),
        **monitor_kwargs: Any,
    ) -> None:
        check_monitor_kwargs(monitor_kwargs, type(self).__name__)
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"GSAMCallback(every_n_steps=) must be a positive int; got {every_n_steps!r}.")
        if module is not None and not isinstance(module, str):
            raise TypeError(
                f"GSAMCallback(module=) must be a dotted attribute path such as 'model', or None; "
                f"got {type(module).__name__}."
            )
        self.layers = layers
        self.module = module
        self.every_n_steps = every_n_steps
        self.log_validation = bool(log_validation)
        self.extra_sinks = sinks
        self.monitor_kwargs = dict(monitor_kwargs)
        self.monitor: GSAMMonitor | None = None
        self.last_metrics: dict[str, dict[str, float]] = {}
        self.last_steps: dict[str, int] = {}
        self._pending_state: dict[str, Any] | None = None
        self._seen_step: int | None = None
        self._val_collect: Any = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module, layers=_spec_key(self.layers))

    # ------------------------------------------------------------------ setup / teardown
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        target = self._target(pl_module)
        if self.monitor is not None and self.monitor.model is not target:
            self._close()
            self.monitor = None
        if self.monitor is None:
            extra = self.extra_sinks
            if isinstance(extra, str) or callable(extra) or hasattr(extra, "write"):
                extra = [extra]
            sinks = [LoggersSink(trainer)] if trainer.is_global_zero else []
            self.monitor = GSAMMonitor(
                target, self.layers, every_n_steps=self.every_n_steps, sinks=[*sinks, *extra], **self.monitor_kwargs
            )
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._load(state, trainer.global_rank)
        self.monitor.attach()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls on_exception, not teardown, when fit raises.
        self._close()

    # ------------------------------------------------------------------ training
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_step = trainer.global_step  # after a checkpoint restore: the resumed step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        monitor = self.monitor
        step = trainer.global_step
        if monitor is None or not monitor.attached or (self._seen_step is not None and step <= self._seen_step):
            return  # a micro-batch inside gradient accumulation: the optimizer has not stepped
        self._seen_step = step
        result = monitor.step(int(step))
        if result:
            self._record("train", result, step)

    # ------------------------------------------------------------------ validation
    @override
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.detach()  # a few batches before any training: not an evaluation window

    @override
    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.attach()

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        monitor = self.monitor
        if trainer.sanity_checking or monitor is None or not monitor.attached or "eval" not in monitor.phases:
            return
        if self._val_collect is None:  # collect_steps may have parked the hooks
            self._val_collect = monitor.collect()
            self._val_collect.__enter__()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_val_collect()
        monitor = self.monitor
        if (
            trainer.sanity_checking
            or not self.log_validation
            or monitor is None
            or not monitor.attached
            or "eval" not in monitor.phases
        ):
            return
        result = monitor.log(int(trainer.global_step), phases=["eval"])
        if result:
            self._record("eval", result, trainer.global_step)

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.monitor is None:
            return dict(self._pending_state or {})
        return self.monitor.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.monitor is None:
            self._pending_state = dict(state_dict)  # applied in setup("fit")
            return
        self._load(state_dict, _global_rank())

    # ------------------------------------------------------------------ internals
    def _load(self, state: Mapping[str, Any], rank: int) -> None:
        assert self.monitor is not None
        if rank > 0:
            # Lightning saves rank 0's callback state and loads it on every rank: take its
            # counters and held-out fits (identical on every rank), not its window in progress,
            # which the sum over ranks at the next log would count once per rank.
            state = {**state, "stats": {}}
        self.monitor.load_state_dict(state)

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.module is None:
            return pl_module
        target: Any = pl_module
        for part in self.module.split("."):
            if not hasattr(target, part):
                children = [name for name, _ in pl_module.named_children()]
                raise MisconfigurationException(
                    f"GSAMCallback(module={self.module!r}): {type(pl_module).__name__} has no sub-module "
                    f"{self.module!r} (its children: {', '.join(children) or 'none'}). Pass the attribute that holds "
                    f"the model, or module=None to monitor the LightningModule itself."
                )
            target = getattr(target, part)
        if not isinstance(target, nn.Module):
            raise MisconfigurationException(
                f"GSAMCallback(module={self.module!r}) is a {type(target).__name__}, not a torch.nn.Module."
            )
        return target

    def _record(self, phase: str, values: Mapping[str, float], step: int) -> None:
        self.last_metrics[phase] = dict(values)
        self.last_steps[phase] = int(step)

    def _end_val_collect(self) -> None:
        if self._val_collect is not None:
            ctx, self._val_collect = self._val_collect, None
            ctx.__exit__(None, None, None)

    def _close(self) -> None:
        self._end_val_collect()
        if self.monitor is not None:
            try:
                self.monitor.close()
            except Exception as err:  # never mask the exception being handled
                log.warning("GSAMCallback: closing the monitor raised %r", err)


def _global_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0
