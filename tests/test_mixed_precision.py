"""bf16 mixed precision end to end, on CPU: HF ``Trainer(bf16=True, use_cpu=True)`` (accelerate's
autocast) and Lightning ``precision="bf16-mixed"``. The forward runs under CPU bf16 autocast,
and so do the monitor's hooks. The logged values equal fp64 numpy on the activations as the
model produced them (recorded by independent hooks); with ``product_dtype=torch.float32``
they stay within the fp32 product's error model (``tests/bf16_probe.py``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from gsam_monitor import CollectOptions, ComputeOptions
from tests.bf16_probe import (
    BATCH,
    EVERY,
    LAYERS,
    STEPS,
    ProbedLM,
    Recorder,
    check_bf16_run,
    dataset,
)

Records = list[tuple[int, dict[str, float]]]


def run_trainer(tmp_path: Path, **monitor_kwargs) -> tuple[Records, Recorder]:
    import transformers as tr

    from gsam_monitor.callbacks import GSAMTrainerCallback

    model = ProbedLM()
    records: Records = []
    callback = GSAMTrainerCallback(
        list(LAYERS), every_n_steps=EVERY, collection=CollectOptions(max_tokens_per_layer=None, phases="train"),
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


def run_lightning(tmp_path: Path, **monitor_kwargs) -> tuple[Records, Recorder]:
    pl = pytest.importorskip("pytorch_lightning")

    from gsam_monitor.callbacks import GSAMCallback

    class ProbedLit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = ProbedLM()

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.model(**batch)["loss"]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    lit = ProbedLit()
    records: Records = []
    callback = GSAMCallback(
        list(LAYERS),
        module="model",
        every_n_steps=EVERY,
        collection=CollectOptions(max_tokens_per_layer=None, phases="train"),
        sinks=[lambda metrics, step: records.append((step, dict(metrics)))],
        **monitor_kwargs,
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=STEPS, logger=False, callbacks=[callback],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=str(tmp_path),
    )
    recorder = Recorder(lit.model, LAYERS, lambda: trainer.global_step + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every_n_steps < 10, Lightning's tips
        trainer.fit(lit, torch.utils.data.DataLoader(dataset(), batch_size=BATCH))
    recorder.remove()
    return records, recorder


RUNS = {"hf_trainer": run_trainer, "lightning": run_lightning}


@pytest.mark.parametrize("framework", list(RUNS))
def test_bf16_logs_equal_fp64_numpy_on_the_bf16_activations(framework: str, tmp_path: Path) -> None:
    records, recorder = RUNS[framework](tmp_path)
    check_bf16_run(records, recorder, fp32_products=False)


@pytest.mark.parametrize("framework", list(RUNS))
def test_bf16_with_fp32_products_stays_within_the_error_model(framework: str, tmp_path: Path) -> None:
    records, recorder = RUNS[framework](tmp_path, compute=ComputeOptions(product_dtype=torch.float32))
    check_bf16_run(records, recorder, fp32_products=True)
