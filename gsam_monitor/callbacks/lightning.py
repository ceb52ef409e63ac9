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
  steps holds ``n·k`` micro-batches. When the step brought a new geometry alert,
  ``on_alert="stop"`` sets ``trainer.should_stop`` and ``on_alert="save"`` writes a checkpoint
  (``trainer.save_checkpoint``, in the ``ModelCheckpoint``'s folder or
  ``default_root_dir/checkpoints``, named ``gsam-alert-step={step}.ckpt``), the decision agreed
  over the ranks (``strategy.reduce_boolean_decision``).
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

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

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

from gsam_monitor._validate import positive_int
from gsam_monitor.callbacks.core import MonitorCallback
from gsam_monitor.monitor import ranks

__all__ = ["GSAMCallback", "LoggersSink"]


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


class GSAMCallback(MonitorCallback, Callback):
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
        on_alert: What a new geometry alert (``GSAMMonitor(alerts=)``) does: ``None`` (default)
            nothing beyond logging it, ``"save"`` a checkpoint at that step, ``"stop"`` end
            training (``trainer.should_stop``).
        **monitor_kwargs: Every other ``GSAMMonitor`` argument (``metrics``, ``collection``,
            ``windows``, ``compute``, ``alerts``, ``log_dir``, ``strict``, ...), checked now.

    Attributes:
        monitor: The ``GSAMMonitor`` (``None`` before ``setup("fit")``).
        last_metrics: The last values logged per phase: ``{"train": {...}, "eval": {...}}``.
        last_steps: The global step of each phase's last log.

    Raises:
        TypeError: a keyword argument that ``GSAMMonitor`` does not take.
        ValueError: a non-positive ``every_n_steps``, an unknown ``on_alert`` (or one with
            ``alerts=None``).
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
        on_alert: Literal["save", "stop"] | None = None,
        **monitor_kwargs: Any,
    ) -> None:
        self._init_monitor_callback(layers, sinks, monitor_kwargs, on_alert)
        positive_int(every_n_steps, "GSAMCallback(every_n_steps=)")
        if module is not None and not isinstance(module, str):
            raise TypeError(
                f"GSAMCallback(module=) must be a dotted attribute path such as 'model', or None; "
                f"got {type(module).__name__}."
            )
        self.module = module
        self.every_n_steps = every_n_steps
        self.log_validation = bool(log_validation)
        self._pending_state: dict[str, Any] | None = None
        self._seen_step: int | None = None

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
            self._close_monitor()
            self.monitor = None
        if self.monitor is None:
            sinks = [LoggersSink(trainer)] if trainer.is_global_zero else []
            self.monitor = self._build_monitor(target, self.every_n_steps, sinks)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            # Lightning saves rank 0's callback state and loads it on every rank.
            self._load_state(state, drop_window=trainer.global_rank > 0)
        self._mark_alerts_seen()
        self.monitor.attach()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close_monitor()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls on_exception, not teardown, when fit raises.
        self._close_monitor()

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
        self._train_step(step)
        self._act_on_alert(trainer, step)

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
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The validation forwards were collected whatever collect_steps says (the eval phase's rule).
        if trainer.sanity_checking or not self.log_validation:
            return
        self._log_eval(trainer.global_step)
        self._act_on_alert(trainer, trainer.global_step)

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
        self._load_state(state_dict, drop_window=ranks.global_rank() > 0)
        self._mark_alerts_seen()

    # ------------------------------------------------------------------ internals
    def _act_on_alert(self, trainer: pl.Trainer, step: int) -> None:
        if not self._alert_due(lambda flag: trainer.strategy.reduce_boolean_decision(flag, all=False)):
            return
        if self.on_alert == "stop":
            trainer.should_stop = True
            return
        checkpoint = getattr(trainer, "checkpoint_callback", None)
        folder = getattr(checkpoint, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        trainer.save_checkpoint(os.path.join(folder, f"gsam-alert-step={step}.ckpt"))

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

