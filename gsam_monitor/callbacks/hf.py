"""GSAMTrainerCallback: GSAM monitoring for the Hugging Face ``transformers.Trainer``.

One line in a Trainer setup::

    trainer = Trainer(model, args, ..., callbacks=[GSAMTrainerCallback()])

What happens, hook by hook (transformers v5):

* ``on_train_begin``: a ``GSAMMonitor`` is built on the model the Trainer passes to its
  callbacks and attached. Its interval is ``every_n_steps`` or else the Trainer's
  ``logging_steps``. Its sinks are the Trainer's own: the ``TensorBoardCallback``'s
  ``tb_writer`` (the run in ``TENSORBOARD_LOGGING_DIR`` or ``output_dir/runs/<date>``; v5 has
  no ``args.logging_dir``) and the active W&B run, against the Trainer's
  ``train/global_step`` axis. Only world process zero gets sinks; every rank steps the
  monitor, because the statistics are summed over ranks at each log. When the run resumes
  from a checkpoint holding ``gsam_monitor_state.pt``, the monitor's windows and counters
  are restored from it (``torch.load(weights_only=True)``).
* ``on_step_end``: ``monitor.step(state.global_step)``, so windows count optimizer steps
  (not micro-batches under gradient accumulation) and a resumed run continues the count. When
  the step brought a new geometry alert, ``on_alert="save"`` sets ``control.should_save``
  (the Trainer writes a checkpoint at this step, with the monitor's state) and
  ``on_alert="stop"`` sets ``control.should_training_stop`` (on every rank alike).
* ``on_evaluate``: the evaluation forwards (``model.eval()`` under ``no_grad``) went into the
  monitor's ``"eval"`` phase; they are logged now (``"{metric}/{layer}/eval"``) at the global
  step of the evaluation, and that window restarts.
* ``on_save``: ``monitor.state_dict()`` is written with ``torch.save`` into the checkpoint
  folder (``gsam_monitor_state.pt``; ``gsam_monitor_state_rank{r}.pt`` for other ranks).
* ``on_train_end``: the monitor detaches (its hooks leave the model) and closes its sinks.

When training raises, the Trainer calls no callback. The callback therefore wraps the
``train`` method of the Trainer it belongs to (found once, from the call stack, when the
Trainer first calls it) so that an exception escaping ``trainer.train()`` detaches the
monitor before it propagates. Two more nets: ``with GSAMTrainerCallback(...) as cb:`` detaches
on exit, and the hooks are removed when the callback is garbage-collected (e.g. a failed
Trainer dropped in a notebook).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gsam_monitor._compat import find_caller_self, trainer_default_logdir
from gsam_monitor._validate import positive_int
from gsam_monitor.callbacks.core import MonitorCallback, close_quietly
from gsam_monitor.sinks import TensorBoardSink, WandbSink

__all__ = ["STATE_FILE", "GSAMTrainerCallback"]

log = logging.getLogger(__name__)

STATE_FILE = "gsam_monitor_state.pt"
"""The monitor's state in a Trainer checkpoint folder (rank 0; ``..._rank{r}.pt`` for others)."""

TRAINER_STEP_METRIC = "train/global_step"
"""The x-axis the Trainer's WandbCallback declares; our W&B points use it too."""

_STACK_DEPTH = 12  # frames from a callback hook up to the Trainer method that called the handler


def _find_trainer(max_depth: int = _STACK_DEPTH) -> tuple[Any | None, str | None, bool]:
    """The ``Trainer`` whose method is calling the callbacks, from the call stack.

    Trainer hooks receive no reference to the Trainer; its ``callback_handler.on_*`` is
    called from a Trainer method, a few frames up. Returns ``(trainer, resume_from_checkpoint,
    found_resume)``; the second is read from ``_inner_training_loop``'s local of that name.
    """
    from transformers import Trainer

    trainer, resume, found = find_caller_self(Trainer, max_depth, "resume_from_checkpoint")
    return trainer, resume if isinstance(resume, (str, os.PathLike)) else None, found


class _TrainerTensorBoardSink:
    """Writes into the Trainer's ``TensorBoardCallback`` writer, whichever one it holds now.

    The TensorBoardCallback creates its writer in ``on_train_begin``, closes it (and sets it to
    ``None``) in ``on_train_end`` and creates another lazily at its next log, all in one
    directory. Looking the writer up at every write follows those changes; when there is none,
    the sink opens its own writer in the same directory, so TensorBoard shows one run.
    """

    def __init__(self, tb_callback: Any, fallback_dir: str | os.PathLike[str]) -> None:
        self._tb = tb_callback
        self._fallback_dir = str(fallback_dir)
        self._own: TensorBoardSink | None = None
        self._borrowed: TensorBoardSink | None = None

    @property
    def log_dir(self) -> str:
        return str(getattr(self._tb, "logging_dir", None) or self._fallback_dir)

    def _sink(self) -> TensorBoardSink:
        writer = getattr(self._tb, "tb_writer", None)
        if writer is not None:
            if self._borrowed is None or self._borrowed.writer is not writer:
                self._borrowed = TensorBoardSink(writer)  # borrowed: never closed here
            return self._borrowed
        if self._own is None:
            self._own = TensorBoardSink(self.log_dir)
        return self._own

    def write(self, metrics: Mapping[str, float], step: int) -> None:
        self._sink().write(metrics, step)

    def write_spectrum(self, spectra: Mapping[str, torch.Tensor], step: int) -> None:
        self._sink().write_spectrum(spectra, step)

    def write_alerts(self, alerts: list[Mapping[str, Any]], step: int) -> None:
        self._sink().write_alerts(alerts, step)

    def write_outliers(self, outliers: Mapping[str, list[int]], step: int) -> None:
        self._sink().write_outliers(outliers, step)

    def write_quantization(self, summary: Mapping[str, Mapping[str, Any]], step: int) -> None:
        if getattr(self._tb, "tb_writer", None) is None and self._own is None:
            # The Trainer closed its writer at train end: a new events file for one text entry
            # would split the run's folder; the summary still reaches the other sinks.
            return
        self._sink().write_quantization(summary, step)

    def close(self) -> None:
        if self._own is not None:
            self._own.close()
            self._own = None

    def __repr__(self) -> str:
        return f"TrainerTensorBoardSink({self.log_dir!r})"


class GSAMTrainerCallback(MonitorCallback, TrainerCallback):
    """Monitor GSAM and activation geometry during ``Trainer.train()``.

    Args:
        layers: Which layers to watch (``GSAMMonitor``'s ``layers=``; default: every block of
            the model's repeated stack).
        every_n_steps: Log every this many optimizer steps; ``None`` follows the Trainer's
            ``logging_steps`` (so the GSAM curves and the loss share their x values).
        tensorboard: ``None`` writes into the Trainer's TensorBoard run when its
            ``TensorBoardCallback`` is active (``report_to`` includes ``"tensorboard"``);
            ``True`` also opens one in the Trainer's default place (``TENSORBOARD_LOGGING_DIR``,
            else ``output_dir/runs/<date>_<host>``) when it is not; ``False`` never writes there.
        wandb: ``None`` logs into the W&B run when the Trainer's ``WandbCallback`` is active or a
            run is open at train begin; ``True`` requires a run at the first log; ``False`` never.
        sinks: Extra sinks (objects, callables ``(metrics, step)`` or names), as ``GSAMMonitor``.
        on_alert: What a new geometry alert (``GSAMMonitor(alerts=)``) does: ``None`` (default)
            nothing beyond logging it, ``"save"`` a checkpoint at that step
            (``control.should_save``), ``"stop"`` end training (``control.should_training_stop``).
        **monitor_kwargs: Every other ``GSAMMonitor`` argument (``metrics``, ``collection``,
            ``windows``, ``compute``, ``alerts``, ``log_dir``, ``strict``, ...), checked now.

    Attributes:
        monitor: The ``GSAMMonitor`` (``None`` before train begins).
        last_metrics: The last values logged per phase: ``{"train": {...}, "eval": {...}}``.
        last_steps: The global step of each phase's last log.

    Raises:
        TypeError: a keyword argument that ``GSAMMonitor`` does not take, or a non-bool
            ``tensorboard``/``wandb``.
        ValueError: an unknown ``on_alert`` (or one with ``alerts=None``); (at train begin)
            what ``GSAMMonitor`` refuses: unknown layers, metrics, alert rules, ...

    Example::

        from gsam_monitor.callbacks import GSAMTrainerCallback

        args = TrainingArguments("out", logging_steps=50, report_to=["tensorboard"])
        trainer = Trainer(model, args, train_dataset=ds, callbacks=[GSAMTrainerCallback()])
        trainer.train()          # "gsam/bert.encoder.layer.0", ... beside the loss in TensorBoard
    """

    def __init__(
        self,
        layers: Any = "auto",
        *,
        every_n_steps: int | None = None,
        tensorboard: bool | None = None,
        wandb: bool | None = None,
        sinks: Iterable[Any] | Any = (),
        on_alert: Literal["save", "stop"] | None = None,
        **monitor_kwargs: Any,
    ) -> None:
        self._init_monitor_callback(layers, sinks, monitor_kwargs, on_alert)
        for name, value in (("tensorboard", tensorboard), ("wandb", wandb)):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{type(self).__name__}({name}=) must be None, True or False; got {value!r}.")
        if every_n_steps is not None:
            name = f"{type(self).__name__}(every_n_steps=)"
            positive_int(every_n_steps, name, ", or None to follow TrainingArguments.logging_steps")
        self.every_n_steps = every_n_steps
        self.tensorboard = tensorboard
        self.wandb = wandb
        self._sinks: list[Any] = []
        self._guarded: weakref.WeakSet[Any] = weakref.WeakSet()
        self._finalizer: weakref.finalize | None = None
        self._pending_checkpoint: str | None = None
        self._trainer: weakref.ref[Any] | None = None  # the Trainer attach() or the call stack gave
        self._train_call: tuple[str | None] | None = None  # the resume folder of the guarded train() call

    # ------------------------------------------------------------------ public helpers
    def attach(self, trainer: Any) -> GSAMTrainerCallback:
        """Join ``trainer`` explicitly, without reading the call stack: add this callback to it
        (``trainer.add_callback``) if it does not hold it yet, and watch its ``train()`` calls, so
        that the checkpoint passed as ``resume_from_checkpoint`` (a folder, or ``True`` for the
        last one in ``output_dir``) restores the monitor and an exception escaping ``train()``
        detaches it. Returns the callback.

        ``Trainer(callbacks=[GSAMTrainerCallback()])`` works without it: the callback then finds
        the Trainer that builds it on the call stack (``gsam_monitor._compat.find_caller_self``),
        a fallback for frameworks that pass callbacks no reference to their trainer.

        Raises:
            TypeError: ``trainer`` is not a ``transformers.Trainer``.
        """
        from transformers import Trainer

        if not isinstance(trainer, Trainer):
            raise TypeError(
                f"GSAMTrainerCallback.attach: expected a transformers.Trainer; got {type(trainer).__name__}."
            )
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._guard(trainer)
        return self

    def load_checkpoint(self, checkpoint_dir: str | os.PathLike[str]) -> None:
        """Restore the monitor from ``checkpoint_dir`` at the next train begin.

        Only needed when the Trainer cannot be found on the call stack (an unusual Trainer
        subclass): normally the folder passed to ``trainer.train(resume_from_checkpoint=...)``
        is used.
        """
        self._pending_checkpoint = os.fspath(checkpoint_dir)

    def close(self) -> None:
        """Detach the monitor from the model and close its sinks (idempotent)."""
        self._close_monitor()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def __enter__(self) -> GSAMTrainerCallback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ Trainer hooks
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._trainer is None:
            trainer, _, _ = _find_trainer()
            if trainer is not None:
                self._guard(trainer)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is not None and self._train_call is not None:
            (resume,), found_resume = self._train_call, True  # what train() was given: public
        else:
            trainer, resume, found_resume = _find_trainer()  # fallback: the call stack
            if trainer is not None:
                self._guard(trainer)
        self._train_call = None
        if model is None:
            raise ValueError(
                "GSAMTrainerCallback: the Trainer passed no model to on_train_begin; construct the Trainer with "
                "model=... (model_init= models are passed too)."
            )
        if self.monitor is not None and self.monitor.model is not model:
            self.close()  # a new model (hyper-parameter search, model_init): start afresh
            self.monitor = None
        if self.monitor is None:
            every = self.every_n_steps if self.every_n_steps is not None else max(1, int(state.logging_steps))
            self._sinks = self._trainer_sinks(trainer, args, state) if state.is_world_process_zero else []
            self.monitor = self._build_monitor(model, every, self._sinks)
        checkpoint = self._pending_checkpoint or resume
        if checkpoint is None and not found_resume and state.global_step > 0:
            # Trainer not found on the stack: the checkpoint the Trainer resumed from is, by its
            # naming rule, output_dir/checkpoint-<global_step>.
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        self._pending_checkpoint = None
        if checkpoint is not None:
            self._restore(checkpoint, args, state)
        self._mark_alerts_seen()
        self.monitor.attach()
        if self._finalizer is None:
            # Last resort for a run that raised where the Trainer was not found: the hooks leave
            # the model when this callback (held by the Trainer) is garbage-collected.
            self._finalizer = weakref.finalize(self, close_quietly, self.monitor, type(self).__name__)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        monitor = self.monitor
        if monitor is None or not monitor.attached:
            return
        self._train_step(state.global_step)
        self._act_on_alert(control)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics: Any = None, **kwargs: Any
    ) -> None:
        self._log_eval(state.global_step)
        self._act_on_alert(control)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            warnings.warn(
                f"GSAMTrainerCallback: checkpoint folder {str(folder)!r} not found; the monitor's state is not "
                f"saved with this checkpoint (a resumed run restarts its windows).",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        torch.save(self.monitor.state_dict(), folder / _state_file(args.process_index))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _act_on_alert(self, control: TrainerControl) -> None:
        if self._alert_due():
            if self.on_alert == "stop":
                control.should_training_stop = True
            else:
                control.should_save = True

    def _guard(self, trainer: Any) -> None:
        """Wrap ``trainer.train`` so that each call records its ``resume_from_checkpoint`` (the
        folder the monitor restores from) and an exception escaping it detaches the monitor."""
        self._trainer = weakref.ref(trainer)
        if trainer in self._guarded:
            return
        self._guarded.add(trainer)
        original = trainer.train
        ref = weakref.ref(self)

        def train(*args: Any, **kwargs: Any) -> Any:
            callback = ref()
            if callback is not None:
                resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
                callback._train_call = (_resume_folder(resume, trainer.args.output_dir),)
            try:
                return original(*args, **kwargs)
            except BaseException:
                callback = ref()
                if callback is not None:
                    log.info("GSAMTrainerCallback: training raised; detaching the monitor.")
                    callback.close()
                raise

        train.__wrapped__ = original  # type: ignore[attr-defined]
        train.__doc__ = original.__doc__
        trainer.train = train

    def _trainer_sinks(self, trainer: Any, args: TrainingArguments, state: TrainerState) -> list[Any]:
        callbacks = list(trainer.callback_handler.callbacks) if trainer is not None else []
        sinks: list[Any] = []
        if self.tensorboard is not False:
            tb = next((cb for cb in callbacks if type(cb).__name__ == "TensorBoardCallback"), None)
            if tb is None and trainer is None and "tensorboard" in (args.report_to or []):
                tb = _DefaultTensorBoardPlace()
            if tb is None and self.tensorboard:
                tb = _DefaultTensorBoardPlace()
            if tb is not None:
                sinks.append(_TrainerTensorBoardSink(tb, _default_tb_dir(args)))
        if self.wandb is not False:
            has_callback = any(type(cb).__name__ == "WandbCallback" for cb in callbacks)
            wandb_module = sys.modules.get("wandb")
            has_run = wandb_module is not None and getattr(wandb_module, "run", None) is not None
            if self.wandb or has_callback or has_run or (trainer is None and "wandb" in (args.report_to or [])):
                sinks.append(WandbSink(step_metric=TRAINER_STEP_METRIC, commit=True))
        return sinks

    def _restore(self, checkpoint: str | os.PathLike[str], args: TrainingArguments, state: TrainerState) -> None:
        assert self.monitor is not None
        rank = int(args.process_index)
        path = Path(checkpoint) / _state_file(rank)
        drop_window = False
        if not path.is_file() and rank > 0 and (Path(checkpoint) / STATE_FILE).is_file():
            # Rank 0's file only: take its counters and held-out fits, not its window, which
            # the sum over ranks would otherwise count once per rank.
            path, drop_window = Path(checkpoint) / STATE_FILE, True
        if not path.is_file():
            warnings.warn(
                f"GSAMTrainerCallback: resuming from {os.fspath(checkpoint)!r}, which holds no {STATE_FILE}; the "
                f"monitor's windows restart at global step {state.global_step}.",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        self._load_state(torch.load(path, map_location="cpu", weights_only=True), drop_window=drop_window)
        log.info("GSAMTrainerCallback: monitor state restored from %s (step %d).", path, self.monitor.step_count)


def _resume_folder(resume: Any, output_dir: str) -> str | None:
    """The checkpoint folder ``Trainer.train(resume_from_checkpoint=resume)`` resumes from:
    the folder given, the last ``checkpoint-*`` in ``output_dir`` for ``True``, else ``None``."""
    if isinstance(resume, (str, os.PathLike)):
        return os.fspath(resume)
    if resume is True:
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(output_dir) if output_dir and os.path.isdir(output_dir) else None
    return None


class _DefaultTensorBoardPlace:
    """Stands in for a TensorBoardCallback that is not there: no writer, the default folder."""

    tb_writer = None
    logging_dir = None


def _default_tb_dir(args: TrainingArguments) -> str:
    """Where the Trainer's TensorBoardCallback writes: ``TENSORBOARD_LOGGING_DIR`` or ``output_dir/runs/...``."""
    env = os.getenv("TENSORBOARD_LOGGING_DIR")
    if env:
        return os.path.expanduser(env)
    return os.path.join(args.output_dir, trainer_default_logdir())


def _state_file(rank: int) -> str:
    return STATE_FILE if rank == 0 else STATE_FILE.replace(".pt", f"_rank{rank}.pt")
