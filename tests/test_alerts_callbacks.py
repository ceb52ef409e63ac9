"""The callbacks act on geometry alerts: ``on_alert="stop"`` ends a real ``transformers.Trainer``
/ Lightning run at the step of the alert, ``"save"`` writes a checkpoint there and training
goes on, ``None`` only records it. The alert is made deterministic by turning the monitored
block's output non-finite from optimizer step 3 on (a ``nonfinite_rows`` alert at the log of
step 4; logs every 2 steps)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

tr = pytest.importorskip("transformers")
pl = pytest.importorskip("pytorch_lightning")

from gsam_monitor import CollectOptions  # noqa: E402
from gsam_monitor.callbacks import GSAMCallback, GSAMTrainerCallback  # noqa: E402
from gsam_monitor.callbacks.hf import STATE_FILE  # noqa: E402
from tests.lightning_tiny import LAYERS as LIGHTNING_LAYERS  # noqa: E402
from tests.lightning_tiny import TinyLM, token_loader  # noqa: E402
from tests.test_callbacks_hf import LAYERS as HF_LAYERS  # noqa: E402
from tests.test_callbacks_hf import dataset, tiny_bert, train, training_args  # noqa: E402
from tests.test_callbacks_lightning import _quiet_fit, _trainer  # noqa: E402

POISON_FROM_CALL = 2  # 0-based training forward: the third optimizer step (global_step 2 -> 3)
ALERT_STEP = 4  # the first log whose window holds a poisoned step


def _poison(module: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """From the ``POISON_FROM_CALL``-th training forward on, the block's first row is NaN."""
    calls = {"n": 0}

    def hook(mod, args, output):
        if not (torch.is_grad_enabled() and mod.training):
            return None
        calls["n"] += 1
        if calls["n"] <= POISON_FROM_CALL:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[0] = math.nan
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return module.register_forward_hook(hook)


# ------------------------------------------------------------------ transformers.Trainer
def _hf_run(tmp_path: Path, on_alert):
    model = tiny_bert()
    _poison(dict(model.named_modules())[HF_LAYERS[0]])
    callback = GSAMTrainerCallback(
        collection=CollectOptions(phases="train", max_tokens_per_layer=None), on_alert=on_alert
    )
    trainer = tr.Trainer(model=model, args=training_args(tmp_path / "out", max_steps=8), train_dataset=dataset(),
                         callbacks=[callback])
    train(trainer)
    return trainer, callback


@pytest.mark.parametrize("on_alert", [None, "save", "stop"])
def test_trainer_callback_acts_on_an_alert(tmp_path: Path, on_alert) -> None:
    trainer, callback = _hf_run(tmp_path, on_alert)
    first = callback.monitor.alerts[0]
    assert (first["step"], first["kind"], first["layer"]) == (ALERT_STEP, "nonfinite_rows", HF_LAYERS[0])
    checkpoints = sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*"))
    if on_alert == "stop":
        assert trainer.state.global_step == ALERT_STEP  # control.should_training_stop at the alert
        assert checkpoints == []
    else:
        assert trainer.state.global_step == 8
        # "save": control.should_save at the alert's step, with the monitor's state (save_strategy="no"
        # otherwise; the nonfinite rule's cool-down keeps later logs quiet).
        assert checkpoints == (["checkpoint-4"] if on_alert == "save" else [])
    if on_alert == "save":
        state = torch.load(tmp_path / "out" / "checkpoint-4" / STATE_FILE, weights_only=True)
        assert state["step_count"] == ALERT_STEP


def test_trainer_callback_resumed_does_not_act_on_restored_alerts(tmp_path: Path) -> None:
    """A run resumed from the alert's checkpoint restores the alert (and its cool-down): it is
    old news, so ``on_alert="stop"`` does not stop the resumed run."""
    _hf_run(tmp_path, "save")
    model = tiny_bert()
    _poison(dict(model.named_modules())[HF_LAYERS[0]])
    callback = GSAMTrainerCallback(
        collection=CollectOptions(phases="train", max_tokens_per_layer=None), on_alert="stop"
    )
    trainer = tr.Trainer(model=model, args=training_args(tmp_path / "out", max_steps=8), train_dataset=dataset(),
                         callbacks=[callback])
    train(trainer, resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    assert [a["step"] for a in callback.monitor.alerts][:1] == [ALERT_STEP]
    assert trainer.state.global_step == 8


def test_on_alert_errors() -> None:
    with pytest.raises(ValueError, match=r"GSAMTrainerCallback\(on_alert=\) must be None, 'save' or 'stop'; got 'ha"):
        GSAMTrainerCallback(on_alert="halt")
    with pytest.raises(ValueError, match=r"GSAMCallback\(on_alert='stop'\) acts on geometry alerts, but alerts=None"):
        GSAMCallback(on_alert="stop", alerts=None)


# ------------------------------------------------------------------ Lightning
@pytest.mark.parametrize("on_alert", ["save", "stop"])
def test_lightning_callback_acts_on_an_alert(tmp_path: Path, on_alert) -> None:
    lit = TinyLM()
    _poison(dict(lit.model.named_modules())[LIGHTNING_LAYERS[0]])
    callback = GSAMCallback(
        every_n_steps=2,
        module="model",
        collection=CollectOptions(phases="train", max_tokens_per_layer=None),
        on_alert=on_alert,
    )
    trainer = _trainer(tmp_path, callback, max_steps=8, limit_val_batches=0)
    _quiet_fit(trainer, lit, token_loader())
    first = callback.monitor.alerts[0]
    assert (first["step"], first["kind"], first["layer"]) == (ALERT_STEP, "nonfinite_rows", LIGHTNING_LAYERS[0])
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    if on_alert == "stop":
        assert trainer.global_step == ALERT_STEP  # trainer.should_stop at the alert
        assert saved == []
    else:
        assert trainer.global_step == 8
        assert saved == [f"gsam-alert-step={ALERT_STEP}.ckpt"]
        ckpt = torch.load(tmp_path / "checkpoints" / saved[0], weights_only=False)
        assert ckpt["global_step"] == ALERT_STEP
