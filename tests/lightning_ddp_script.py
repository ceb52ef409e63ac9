"""Run by test_callbacks_lightning.py::test_ddp_two_processes: GSAMCallback under Lightning's
DDP strategy on CPU (2 processes, gloo). Usage: python lightning_ddp_script.py OUT_DIR.

Each rank saves the block outputs of the last window, recorded by independent hooks
(``rank{r}.npz``); rank 0 also saves what the callback logged (``logged.json``)."""

from __future__ import annotations

import gc
import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from gsam_monitor import CollectOptions
from gsam_monitor.callbacks import GSAMCallback
from tests.lightning_tiny import LAYERS, Recorder, TinyLM, token_loader

EVERY, MAX_STEPS = 2, 4


def main(out: Path) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    lit = TinyLM()
    recorder = Recorder(lit)
    callback = GSAMCallback(
        every_n_steps=EVERY, module="model", collection=CollectOptions(max_tokens_per_layer=None, phases="train")
    )
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_steps=MAX_STEPS,
        logger=CSVLogger(out, name="csv"),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=1,
    )
    trainer.fit(lit, token_loader())
    rank = trainer.global_rank
    window = {name: recorder.window(name, MAX_STEPS - EVERY + 1, MAX_STEPS) for name in LAYERS}
    np.savez(out / f"rank{rank}.npz", **window)
    if rank == 0:
        logged = {"last_metrics": callback.last_metrics, "last_steps": callback.last_steps,
                  "world_size": trainer.world_size, "attached": callback.monitor.attached}
        (out / "logged.json").write_text(json.dumps(logged))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        main(Path(sys.argv[1]))
    finally:  # Lightning leaves the process group up; a backend left to interpreter exit aborts now and then
        gc.collect()  # the DDP model holds the backend too (tests/gloo_worker.py)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
