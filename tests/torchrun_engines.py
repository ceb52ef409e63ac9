"""Run under ``torchrun`` (2 processes, gloo, CPU) by test_distributed_engines.py: a real
distributed engine trains a tiny model for a few steps with a ``GSAMMonitor`` attached.

Usage::

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/torchrun_engines.py ENGINES OUT_DIR

ENGINES is ``fsdp2`` (``torch.distributed.fsdp.fully_shard``), ``fsdp1``
(``FullyShardedDataParallel``), ``fsdp2_sharded`` (FSDP2 with ``ComputeOptions(shard_layers=True)``),
several of them (``fsdp2,fsdp1``: one launch, one process group), or
``hf_ddp`` (``transformers.Trainer`` under DDP with ``GSAMTrainerCallback``). Each rank
writes, into ``OUT_DIR/ENGINE``:

* ``rank{r}.npz``: the monitored layers' activations of every training forward, recorded by
  independent forward hooks (no gsam_monitor code), keyed ``"{layer}@{step}"`` (the 1-based
  optimizer step the forward belongs to), padding dropped;
* ``meta{r}.json``: the monitor's layer names (and, for the Trainer, its model wrapper);
* ``gsam{r}.jsonl``: the monitor's JSONL sink (only rank 0's may exist: only it writes).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import torch
import torch.distributed as dist
from torch import nn

from gsam_monitor import CollectOptions, ComputeOptions, GSAMMonitor
from gsam_monitor.sinks import JsonlSink
from tests.activation_recorder import Recorder

D, T, B, STEPS, EVERY = 8, 6, 3, 4, 2
LAYERS = ("blocks.0", "blocks.1", "blocks.2")
HF_LAYERS = ("gpt_neox.layers.0", "gpt_neox.layers.1")


class Block(nn.Module):
    """A pre-norm residual MLP block: the shape of a transformer block without attention."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, d: int = D, depth: int = len(LAYERS)) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def batch(rank: int, step: int) -> torch.Tensor:
    """Each rank's own data: a different distribution per rank, so the union differs from either."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(B, T, D, generator=g) * (1.0 + rank) + 0.5 * rank  # (B, T, d)


def run_fsdp(version: int, out: Path, rank: int, *, shard: bool = False) -> None:
    torch.manual_seed(0)  # the same initial weights on both ranks
    net = Net()
    recorder = Recorder(net, LAYERS, lambda: step + 1)  # before wrapping: on the real modules
    if version == 2:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in net.blocks:
            fully_shard(block, mesh=mesh)
        model = fully_shard(net, mesh=mesh)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        model = FullyShardedDataParallel(net, auto_wrap_policy=ModuleWrapPolicy({Block}), device_id=torch.device("cpu"))
        assert any("_fsdp_wrapped_module" in name for name, _ in model.named_modules())  # really wrapped
    step = 0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GSAMMonitor(
        model,
        "auto",
        every_n_steps=EVERY,
        collection=CollectOptions(max_tokens_per_layer=None),
        compute=ComputeOptions(shard_layers=shard),
        sinks=[JsonlSink(out / f"gsam{rank}.jsonl")],
    )
    meta: dict = {"layer_names": monitor.layer_names}
    with monitor:
        for step in range(STEPS):
            loss = model(batch(rank, step + 1)).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if shard and step + 1 == STEPS:  # before the last log frees them: the buffers this rank holds
                meta["buffers"] = sorted(layer for layer, _ in monitor._windows.buffers)
                meta["owners"] = monitor.owners
            monitor.step()
    (out / f"meta{rank}.json").write_text(json.dumps(meta))
    recorder.save(out / f"rank{rank}.npz")


def run_hf_ddp(out: Path, rank: int) -> None:
    import transformers as tr

    from gsam_monitor.callbacks import GSAMTrainerCallback
    from tests.bf16_probe import dataset
    from tests.tiny_models import tiny_config

    torch.manual_seed(0)
    model = tr.GPTNeoXForCausalLM(tiny_config("gptneox"))  # pre-norm: the block outputs are the residual stream
    data = dataset()  # padded causal-LM rows, as the bf16 end-to-end tests use
    args = tr.TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=STEPS, per_device_train_batch_size=B, logging_steps=EVERY,
        save_strategy="no", report_to="none", use_cpu=True, ddp_backend="gloo", disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )
    callback = GSAMTrainerCallback(
        every_n_steps=EVERY, collection=CollectOptions(max_tokens_per_layer=None),
        sinks=[JsonlSink(out / f"gsam{rank}.jsonl")],
    )
    trainer = tr.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    assert trainer.args.world_size == 2 and trainer.args.parallel_mode.name == "DISTRIBUTED"
    recorder = Recorder(model, HF_LAYERS, lambda: trainer.state.global_step + 1)
    trainer.train()
    meta = {"layer_names": callback.monitor.layer_names, "wrapped": type(trainer.model_wrapped).__name__}
    (out / f"meta{rank}.json").write_text(json.dumps(meta))
    recorder.save(out / f"rank{rank}.npz")


def main(engines: str, out: Path) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if engines == "hf_ddp":  # the Trainer initialises the process group itself
        (out / engines).mkdir(exist_ok=True)
        try:
            run_hf_ddp(out / engines, int(os.environ["RANK"]))
            dist.barrier()
        finally:  # nothing else destroys it: a backend left to interpreter exit aborts now and then
            gc.collect()  # the Trainer's DDP model holds the backend too
            if dist.is_initialized():
                dist.destroy_process_group()
        return
    dist.init_process_group("gloo")
    try:
        for engine in engines.split(","):
            (out / engine).mkdir(exist_ok=True)
            version = {"fsdp2": 2, "fsdp1": 1, "fsdp2_sharded": 2}[engine]
            run_fsdp(version, out / engine, dist.get_rank(), shard=engine == "fsdp2_sharded")
            dist.barrier()
    finally:
        gc.collect()  # the FSDP models hold the backend too (tests/gloo_worker.py)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
