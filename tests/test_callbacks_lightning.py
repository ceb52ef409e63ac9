"""GSAMCallback with real Lightning runs: what arrives in TensorBoard event files, a CSVLogger
and an offline W&B run; gradient accumulation; checkpoint resume; exceptions; DDP on CPU."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")
pytest.importorskip("transformers")

from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from gsam_monitor import CollectOptions  # noqa: E402
from gsam_monitor.callbacks import GSAMCallback  # noqa: E402
from gsam_monitor.callbacks.lightning import LoggersSink  # noqa: E402
from tests.lightning_tiny import BATCH, LAYERS, SEQ, Recorder, TinyLM, hook_count, token_loader  # noqa: E402
from tests.reference import gsam_pdet  # noqa: E402
from tests.wandb_records import read_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _trainer(tmp_path: Path, callback: GSAMCallback, *, loggers=None, **kwargs) -> pl.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": loggers if loggers is not None else False,
        "callbacks": [callback],
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "default_root_dir": str(tmp_path),
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def _quiet_fit(trainer: pl.Trainer, lit: TinyLM, *args, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the monitor's every_n_steps < 10 cost warning, Lightning tips
        trainer.fit(lit, *args, **kwargs)


def test_logs_reach_tensorboard_csv_and_wandb_with_accumulation(tmp_path: Path, monkeypatch) -> None:
    """max_steps=6, accumulate_grad_batches=2, every_n_steps=2: three train logs, after
    optimizer steps 2, 4, 6 (Lightning's logging steps 1, 3, 5), each a window of 2 optimizer
    steps = 4 micro-batches; the values equal scipy's on the recorded activations."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    import wandb

    lit = TinyLM()
    recorder = Recorder(lit)
    callback = GSAMCallback(
        every_n_steps=2, module="model", collection=CollectOptions(max_tokens_per_layer=None, phases="train")
    )
    loggers = [
        TensorBoardLogger(tmp_path, name="tb"),
        CSVLogger(tmp_path, name="csv"),
        WandbLogger(save_dir=str(tmp_path), offline=True, project="gsam-test"),
    ]
    trainer = _trainer(tmp_path, callback, loggers=loggers, max_steps=6, accumulate_grad_batches=2, limit_val_batches=0)
    try:
        _quiet_fit(trainer, lit, token_loader())
    finally:
        wandb.finish()
    recorder.remove()

    logged_at = [1, 3, 5]  # Lightning's step after optimizer steps 2, 4, 6
    # The reference: scipy/numpy on the rows the independent hooks saw in the last window.
    expected = {}
    for layer in LAYERS:
        x = recorder.window(layer, 5, 6)  # optimizer steps 5..6
        assert x.shape[0] == 2 * 2 * BATCH * SEQ  # 2 steps x 2 micro-batches x (B x T) tokens
        expected[layer] = gsam_pdet(x)[0]
    last = callback.last_metrics["train"]
    for layer in LAYERS:
        assert last[f"n/{layer}"] == 2 * 2 * BATCH * SEQ
        assert last[f"gsam/{layer}"] == pytest.approx(expected[layer], rel=1e-9)

    # TensorBoard: real event files, read back.
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    acc.Reload()
    for layer in LAYERS:
        for metric in ("gsam", "rank", "effective_rank", "anisotropy", "n"):
            events = acc.Scalars(f"{metric}/{layer}")
            assert [e.step for e in events] == logged_at
        gsam_events = acc.Scalars(f"gsam/{layer}")
        assert gsam_events[-1].value == pytest.approx(expected[layer], rel=1e-6)  # stored as float32
        assert all(e.value == 2 * 2 * BATCH * SEQ for e in acc.Scalars(f"n/{layer}"))
    assert "loss" in acc.Tags()["scalars"]  # one run: the module's own curves are there too

    # CSVLogger: one row per log step with every layer's columns.
    with open(tmp_path / "csv" / "version_0" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get(f"gsam/{LAYERS[0]}")]
    assert [int(r["step"]) for r in rows] == logged_at
    assert float(rows[-1][f"gsam/{LAYERS[1]}"]) == pytest.approx(expected[LAYERS[1]], rel=1e-9)

    # W&B offline run: history rows read back from the run file.
    history = [h for h in read_run(tmp_path)[0] if f"gsam/{LAYERS[0]}" in h]
    assert [h["trainer/global_step"] for h in history] == logged_at
    assert history[-1][f"gsam/{LAYERS[0]}"] == pytest.approx(expected[LAYERS[0]], rel=1e-12)


def test_validation_is_logged_as_eval_phase(tmp_path: Path) -> None:
    lit = TinyLM()
    callback = GSAMCallback(every_n_steps=2, module="model", collection=CollectOptions(max_tokens_per_layer=None))
    logger = CSVLogger(tmp_path, name="csv")
    trainer = _trainer(tmp_path, callback, loggers=[logger], max_steps=4, val_check_interval=2, limit_val_batches=3,
                       num_sanity_val_steps=2)
    _quiet_fit(trainer, lit, token_loader(), token_loader(seed=1, n=12))
    eval_metrics = callback.last_metrics["eval"]
    for layer in LAYERS:
        # 3 validation batches (the 2 sanity-check batches are not monitored)
        assert eval_metrics[f"n/{layer}/eval"] == 3 * BATCH * SEQ
    assert callback.last_steps["eval"] == 4
    with open(tmp_path / "csv" / "version_0" / "metrics.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get(f"gsam/{LAYERS[0]}/eval")]
    assert steps == [1, 3]  # after optimizer steps 2 and 4, beside Lightning's val_loss


def test_default_schedule_collects_validation_between_the_training_windows(tmp_path: Path) -> None:
    """Default collect_steps (every_n_steps=20: the last 10 steps collected): the validations
    after steps 5 and 10, where the training hooks are parked, are collected in full."""
    lit = TinyLM()
    logged: dict[int, dict[str, float]] = {}
    callback = GSAMCallback(every_n_steps=20, module="model", collection=CollectOptions(max_tokens_per_layer=None),
                            sinks=[lambda m, step: logged.setdefault(step, {}).update(m)])
    evaluated: list[np.ndarray] = []

    def keep(module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output  # (B, T, d)
        if not torch.is_grad_enabled():
            evaluated.append(hidden.detach().double().reshape(-1, hidden.shape[-1]).numpy().copy())

    handle = dict(lit.model.named_modules())[LAYERS[0]].register_forward_hook(keep)
    trainer = _trainer(tmp_path, callback, max_steps=20, val_check_interval=5, limit_val_batches=3)
    _quiet_fit(trainer, lit, token_loader(n=160), token_loader(seed=1, n=12))
    handle.remove()
    assert callback.monitor.collect_steps == 10
    assert len(evaluated) == 4 * 3  # four validations of three batches
    for i, step in enumerate((5, 10)):
        rows = np.concatenate(evaluated[3 * i : 3 * i + 3])
        assert logged[step][f"n/{LAYERS[0]}/eval"] == len(rows) == 3 * BATCH * SEQ
        assert logged[step][f"gsam/{LAYERS[0]}/eval"] == pytest.approx(gsam_pdet(rows)[0], rel=1e-6)


def test_resume_from_checkpoint_continues_windows_and_steps(tmp_path: Path) -> None:
    """A checkpoint at step 3 falls inside the window 3..4; the resumed run's logs at steps 4
    and 6 hold the restored step's tokens and equal, metric by metric, those of one
    uninterrupted run. (3 batches per epoch: the checkpoint ends an epoch, so the resumed run
    sees the same batches as the uninterrupted one; Lightning does not skip into an epoch.)"""

    def callback(into: list[tuple[int, dict[str, float]]]) -> GSAMCallback:
        cb = GSAMCallback(
            every_n_steps=2, module="model", collection=CollectOptions(max_tokens_per_layer=None, phases="train")
        )
        cb.extra_sinks = [lambda metrics, step: into.append((step, dict(metrics)))]
        return cb

    def loader():
        return token_loader(n=3 * BATCH)

    uninterrupted: list[tuple[int, dict[str, float]]] = []
    _quiet_fit(_trainer(tmp_path / "whole", callback(uninterrupted), max_steps=6, limit_val_batches=0),
               TinyLM(), loader())
    assert [step for step, _ in uninterrupted] == [2, 4, 6]

    ckpt_dir = tmp_path / "ckpt"
    first = callback([])
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1)
    trainer = _trainer(tmp_path, first, max_steps=3, limit_val_batches=0, enable_checkpointing=True,
                       callbacks=[first, saver])
    _quiet_fit(trainer, TinyLM(), loader())
    (ckpt,) = ckpt_dir.glob("*step=3.ckpt")
    saved = torch.load(ckpt, weights_only=False)["callbacks"][first.state_key]
    assert saved["step_count"] == 3
    assert not first.monitor.attached and hook_count(trainer.lightning_module) == 0

    resumed: list[tuple[int, dict[str, float]]] = []
    second = callback(resumed)
    assert second.state_key == first.state_key
    trainer = _trainer(tmp_path, second, max_steps=6, limit_val_batches=0)
    _quiet_fit(trainer, TinyLM(), loader(), ckpt_path=str(ckpt))
    assert second.monitor.step_count == 6
    tokens = BATCH * SEQ
    assert [(step, m[f"n/{LAYERS[0]}"]) for step, m in resumed] == [(4, 2 * tokens), (6, 2 * tokens)]
    for (step, got), (_, want) in zip(resumed, uninterrupted[1:], strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (step, key)


def test_detaches_when_training_raises(tmp_path: Path) -> None:
    lit = TinyLM(fail_at_step=3)
    callback = GSAMCallback(every_n_steps=2, module="model")
    trainer = _trainer(tmp_path, callback, max_steps=6, limit_val_batches=0)
    with pytest.raises(RuntimeError, match="planned failure at global step 3"):
        _quiet_fit(trainer, lit, token_loader())
    assert callback.monitor is not None and not callback.monitor.attached
    assert hook_count(lit) == 0
    assert callback.last_steps == {"train": 2}


def test_argument_errors(tmp_path: Path) -> None:
    typo = (
        r"unknown keyword argument\(s\) 'max_token_per_layer' "
        r"\(did you mean collection=CollectOptions\(max_tokens_per_layer=\.\.\.\)\?\)"
    )
    with pytest.raises(TypeError, match=typo):
        GSAMCallback(max_token_per_layer=5)
    for typo, meant in (("modul", "module"), ("log_validaton", "log_validation"), ("on_alrt", "on_alert")):
        with pytest.raises(TypeError, match=rf"'{typo}' \(did you mean '{meant}'\?\); it takes .*log_validation"):
            GSAMCallback(**{typo: "model"})  # its own keywords, not only the monitor's
    with pytest.raises(TypeError, match=r"'tensorboard'; it takes"):  # the Trainer callback's, not this one's
        GSAMCallback(tensorboard=True)
    with pytest.raises(ValueError, match=r"every_n_steps=\) must be a positive int; got 0"):
        GSAMCallback(every_n_steps=0)
    with pytest.raises(TypeError, match=r"module=\) must be a dotted attribute path"):
        GSAMCallback(module=torch.nn.Linear(2, 2))
    callback = GSAMCallback(every_n_steps=2, module="encoder")
    trainer = _trainer(tmp_path, callback, max_steps=1, limit_val_batches=0)
    misconfigured = pl.utilities.exceptions.MisconfigurationException
    with pytest.raises(misconfigured, match=r"has no sub-module 'encoder' \(its children: model\)"):
        _quiet_fit(trainer, TinyLM(), token_loader())
    callback = GSAMCallback(every_n_steps=2, module="fail_at_step")  # an attribute, but None
    trainer = _trainer(tmp_path, callback, max_steps=1, limit_val_batches=0)
    with pytest.raises(misconfigured, match=r"module='fail_at_step'\) is a NoneType, not a torch.nn.Module"):
        _quiet_fit(trainer, TinyLM(), token_loader())


def test_state_dict_before_setup_is_applied_at_setup(tmp_path: Path) -> None:
    run = GSAMCallback(every_n_steps=2, module="model", collection=CollectOptions(phases="train"))
    _quiet_fit(_trainer(tmp_path, run, max_steps=3, limit_val_batches=0), TinyLM(), token_loader())
    state = run.state_dict()
    fresh = GSAMCallback(every_n_steps=2, module="model", collection=CollectOptions(phases="train"))
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state  # held until setup
    with pytest.warns(UserWarning, match="logging more often than every 10 steps"):
        fresh.setup(_trainer(tmp_path, fresh), TinyLM(), "fit")
    assert fresh.monitor.step_count == 3 and fresh.monitor.attached
    fresh.teardown(None, None, "fit")
    assert not fresh.monitor.attached


def test_loggers_sink_uses_lightning_logging_step() -> None:
    class Loop:
        _batches_that_stepped = 7

    class FakeTrainer:
        fit_loop = type("FitLoop", (), {"epoch_loop": Loop()})()

    received = []

    class Logger:
        def log_metrics(self, metrics, step):
            received.append((dict(metrics), step))

    trainer = FakeTrainer()
    trainer.loggers = [Logger(), Logger()]
    LoggersSink(trainer).write({"gsam/x": 1.0}, 8)
    assert received == [({"gsam/x": 1.0}, 7)] * 2


@pytest.mark.distributed
def test_ddp_two_processes_logs_the_union(tmp_path: Path) -> None:
    """Lightning strategy="ddp", 2 CPU processes (gloo): rank 0 logs the metrics of the union
    of both ranks' activations, equal to scipy on the union recorded by independent hooks."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "lightning_ddp_script.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = json.loads((tmp_path / "logged.json").read_text())
    assert logged["world_size"] == 2 and logged["last_steps"] == {"train": 4}
    assert logged["attached"] is False
    metrics = logged["last_metrics"]["train"]
    for layer in LAYERS:
        parts = [np.load(tmp_path / f"rank{r}.npz")[layer] for r in (0, 1)]
        assert parts[0].shape == parts[1].shape == (2 * BATCH * SEQ, 16)
        assert not np.allclose(parts[0], parts[1])  # DistributedSampler: different data per rank
        union = np.concatenate(parts)
        assert metrics[f"n/{layer}"] == union.shape[0]
        assert metrics[f"gsam/{layer}"] == pytest.approx(gsam_pdet(union)[0], rel=1e-9)
        assert math.isfinite(metrics[f"effective_rank/{layer}"])
    # Only rank 0 wrote: one CSV run, with the union's values.
    (csv_file,) = (tmp_path / "csv").glob("version_*/metrics.csv")
    with open(csv_file, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get(f"gsam/{LAYERS[0]}")]
    assert [int(r["step"]) for r in rows] == [1, 3]
    assert float(rows[-1][f"gsam/{LAYERS[0]}"]) == pytest.approx(metrics[f"gsam/{LAYERS[0]}"], rel=1e-12)
