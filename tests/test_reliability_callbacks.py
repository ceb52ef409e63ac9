"""Reliability of the callbacks (issue 9, item 3): a KeyboardInterrupt in the middle of a
Hugging Face or Lightning training run leaves no hook on any module.

The exception case (a RuntimeError in the training step) is pinned by
``test_callbacks_hf.py`` and ``test_callbacks_lightning.py``; Ctrl-C takes other paths (it is
not an ``Exception``, and Lightning turns it into a graceful shutdown and ``SystemExit``).
"""

from __future__ import annotations

import signal
import warnings
from pathlib import Path

import pytest
import torch

from gsam_monitor import CollectOptions

tr = pytest.importorskip("transformers")


def _hooks(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs) for m in model.modules()
    )


def test_hf_trainer_interrupted_by_ctrl_c_detaches(tmp_path: Path) -> None:
    from gsam_monitor.callbacks import GSAMTrainerCallback
    from tests.test_callbacks_hf import dataset, tiny_bert, training_args

    class CtrlC(tr.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    model = tiny_bert()
    callback = GSAMTrainerCallback(collection=CollectOptions(phases="train"), every_n_steps=2)
    trainer = tr.Trainer(model=model, args=training_args(tmp_path / "out"), train_dataset=dataset(),
                         callbacks=[callback, CtrlC()])
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert not callback.monitor.attached
    assert _hooks(model) == 0
    assert callback.last_steps == {"train": 2}  # the log before the interrupt went out


def test_lightning_fit_interrupted_by_ctrl_c_detaches(tmp_path: Path) -> None:
    pl = pytest.importorskip("pytorch_lightning")
    from gsam_monitor.callbacks import GSAMCallback
    from tests.lightning_tiny import TinyLM, token_loader

    class Interrupted(TinyLM):
        def training_step(self, batch, batch_idx):
            if self.global_step >= 3:
                raise KeyboardInterrupt
            return super().training_step(batch, batch_idx)

    lit = Interrupted()
    callback = GSAMCallback(every_n_steps=2, module="model")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[callback], max_steps=6,
                         limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    sigint = signal.getsignal(signal.SIGINT)
    try:
        # Lightning shuts down gracefully and exits (SystemExit), or re-raises, by version.
        with pytest.raises((KeyboardInterrupt, SystemExit)), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(lit, token_loader())
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores Ctrl-C while it shuts down
    assert callback.monitor is not None and not callback.monitor.attached
    assert _hooks(lit) == 0
    assert callback.last_steps == {"train": 2}
