"""Lightning ``precision="bf16-mixed"`` on CPU end to end: the training step runs under CPU
bf16 autocast, and so do the monitor's hooks. The logged values equal fp64 numpy on the bf16
activations the model produced (recorded by independent hooks); with
``product_dtype=torch.float32`` they stay within the fp32 error model."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")
pytest.importorskip("transformers")

from gsam_monitor.callbacks import GSAMCallback  # noqa: E402
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


class ProbedLit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = ProbedLM()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch)["loss"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def run_lightning(tmp_path: Path, **monitor_kwargs) -> tuple[list, Recorder]:
    lit = ProbedLit()
    records: list = []
    callback = GSAMCallback(
        list(LAYERS), module="model", every_n_steps=EVERY, max_tokens_per_layer=None, phases="train",
        sinks=[lambda metrics, step: records.append((step, dict(metrics)))], **monitor_kwargs,
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=STEPS, logger=False, callbacks=[callback],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=str(tmp_path),
    )
    recorder = Recorder(lit.model, LAYERS, lambda: trainer.global_step + 1)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every_n_steps < 10, Lightning's tips
        trainer.fit(lit, loader)
    recorder.remove()
    return records, recorder


def test_lightning_bf16_mixed_logs_equal_fp64_numpy_on_the_bf16_activations(tmp_path: Path) -> None:
    records, recorder = run_lightning(tmp_path)
    check_bf16_run(records, recorder, fp32_products=False)


@xfail_fp32_autocast
def test_lightning_bf16_mixed_with_fp32_products_stays_within_the_error_model(tmp_path: Path) -> None:
    records, recorder = run_lightning(tmp_path, product_dtype=torch.float32)
    check_bf16_run(records, recorder, fp32_products=True)
