"""HF ``Trainer(bf16=True, use_cpu=True)`` end to end: the forward runs under CPU bf16
autocast (accelerate's), so the monitor's hooks do too. The logged values equal fp64 numpy on
the bf16 activations the model produced (recorded by independent hooks); with
``product_dtype=torch.float32`` they stay within the fp32 error model."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

tr = pytest.importorskip("transformers")

from gsam_monitor.callbacks import GSAMTrainerCallback  # noqa: E402
from tests.bf16_probe import (  # noqa: E402
    BATCH,
    EVERY,
    LAYERS,
    STEPS,
    ProbedLM,
    Recorder,
    check_bf16_run,
    dataset,
    xfail_fp32_autocast,
)


def run_trainer(tmp_path: Path, **monitor_kwargs) -> tuple[list, Recorder]:
    model = ProbedLM()
    records: list = []
    callback = GSAMTrainerCallback(
        list(LAYERS), every_n_steps=EVERY, max_tokens_per_layer=None, phases="train",
        sinks=[lambda metrics, step: records.append((step, dict(metrics)))], **monitor_kwargs,
    )
    args = tr.TrainingArguments(
        output_dir=str(tmp_path), bf16=True, use_cpu=True, max_steps=STEPS, per_device_train_batch_size=BATCH,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=0, learning_rate=1e-2,
    )
    trainer = tr.Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[callback])
    recorder = Recorder(model, LAYERS, lambda: trainer.state.global_step + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every_n_steps < 10
        trainer.train()
    recorder.remove()
    assert trainer.args.mixed_precision == "bf16"
    return records, recorder


def test_trainer_bf16_logs_equal_fp64_numpy_on_the_bf16_activations(tmp_path: Path) -> None:
    records, recorder = run_trainer(tmp_path)
    check_bf16_run(records, recorder, fp32_products=False)


@xfail_fp32_autocast
def test_trainer_bf16_with_fp32_products_stays_within_the_error_model(tmp_path: Path) -> None:
    records, recorder = run_trainer(tmp_path, product_dtype=torch.float32)
    check_bf16_run(records, recorder, fp32_products=True)
