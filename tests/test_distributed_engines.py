"""Real distributed engines under ``torchrun`` (2 processes, gloo, CPU; 4 for FSDP2 with sharded
layers), no stand-ins: FSDP2 (``fully_shard``), FSDP1 (``FullyShardedDataParallel``) and the HF
``Trainer`` under DDP.

Each rank records its own activations with independent forward hooks
(``tests/torchrun_engines.py``); here, in the test process, every metric rank 0's JSONL sink
logged is recomputed with numpy/scipy in fp64 on the union of both ranks' rows (rtol 1e-9).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.reference_metrics import assert_logged_equal

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
pytestmark = pytest.mark.distributed


def torchrun(engines: str, out: Path, world: int = WORLD) -> None:
    """``python -m torch.distributed.run --standalone`` (a free port of its own) with ``world`` workers."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a test run inside another launcher must not inherit its rendezvous
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
         str(REPO / "tests" / "torchrun_engines.py"), engines, str(out)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def check_logs_against_the_union(out: Path, layers: list[str], every: int, steps: int) -> None:
    """rank 0's JSONL records equal the reference on both ranks' rows of each window, and the
    held-out score rates each window under the previous one's fit."""
    assert not (out / "gsam1.jsonl").exists()  # only rank 0 writes
    records = [json.loads(line) for line in (out / "gsam0.jsonl").read_text().splitlines()]
    records = [r for r in records if "quantization" not in r and "alerts" not in r and "outliers" not in r]
    assert [r["step"] for r in records] == list(range(every, steps + 1, every))
    rows = [np.load(out / f"rank{r}.npz") for r in range(WORLD)]

    def window(layer: str, last: int) -> np.ndarray:
        return np.concatenate([part[f"{layer}@{s}"] for part in rows for s in range(last - every + 1, last + 1)])

    for layer in layers:
        first = {part[f"{layer}@1"].tobytes() for part in rows}
        assert len(first) == WORLD  # each rank saw its own data
    for record in records:
        for layer in layers:
            step = record["step"]
            previous = window(layer, step - every) if step > every else None
            union = window(layer, step)
            assert record[f"n/{layer}"] == union.shape[0] == sum(
                part[f"{layer}@{s}"].shape[0] for part in rows for s in range(step - every + 1, step + 1)
            )
            assert_logged_equal(record, layer, union, previous, rtol=1e-9)


def unwrapped_layer_names(model) -> list[str]:
    from gsam_monitor import GSAMMonitor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # every_n_steps < 10
        return GSAMMonitor(model, "auto", every_n_steps=2).layer_names


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> Path:
    """FSDP2, FSDP1, then FSDP2 with sharded layers in one torchrun launch (one process start-up)."""
    out = tmp_path_factory.mktemp("fsdp")
    torchrun("fsdp2,fsdp1,fsdp2_sharded", out)
    return out


@pytest.mark.parametrize("engine", ["fsdp2", "fsdp1"])
def test_fsdp_logs_equal_scipy_on_the_union_of_both_ranks(engine: str, fsdp_runs: Path) -> None:
    """A 3-block residual MLP sharded over 2 ranks (every block its own FSDP unit), 4 SGD steps,
    every_n_steps=2: both logged windows equal fp64 numpy/scipy on the union of the two ranks'
    block outputs, and the layers carry the unwrapped model's names."""
    from tests.torchrun_engines import EVERY, LAYERS, STEPS, Net

    out = fsdp_runs / engine
    names = unwrapped_layer_names(Net())
    assert names == list(LAYERS)
    for rank in range(WORLD):
        assert json.loads((out / f"meta{rank}.json").read_text())["layer_names"] == names
    check_logs_against_the_union(out, names, EVERY, STEPS)


@pytest.fixture(scope="module")
def fsdp2_sharded_on_4(tmp_path_factory) -> Path:
    """FSDP2 with sharded layers over 4 processes (the 3 blocks: rank 3 owns none)."""
    out = tmp_path_factory.mktemp("fsdp4")
    torchrun("fsdp2_sharded", out, world=4)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_with_sharded_layers_logs_each_layer_from_its_owner_rank(
    world: int, fsdp_runs: Path, fsdp2_sharded_on_4: Path
) -> None:
    """``ComputeOptions(shard_layers=True)`` under FSDP2 over 2 and 4 processes: each rank holds
    buffers for its own layers only (round robin), and rank 0 writes every layer's metrics, equal
    to fp64 numpy/scipy on the owner rank's rows of each window (the held-out score under the
    owner's previous window)."""
    from tests.torchrun_engines import EVERY, LAYERS, STEPS

    out = (fsdp_runs if world == 2 else fsdp2_sharded_on_4) / "fsdp2_sharded"
    owner = {name: i % world for i, name in enumerate(LAYERS)}
    for rank in range(world):
        meta = json.loads((out / f"meta{rank}.json").read_text())
        assert meta["owners"] == owner
        assert meta["buffers"] == sorted(name for name, r in owner.items() if r == rank)
    assert not any((out / f"gsam{r}.jsonl").exists() for r in range(1, world))
    records = [json.loads(line) for line in (out / "gsam0.jsonl").read_text().splitlines()]
    records = [r for r in records if "quantization" not in r and "alerts" not in r and "outliers" not in r]
    assert [r["step"] for r in records] == list(range(EVERY, STEPS + 1, EVERY))
    rows = [np.load(out / f"rank{r}.npz") for r in range(world)]
    for record in records:
        step = record["step"]
        for layer in LAYERS:
            mine = rows[owner[layer]]

            def window(last: int, part=mine, layer=layer) -> np.ndarray:
                return np.concatenate([part[f"{layer}@{s}"] for s in range(last - EVERY + 1, last + 1)])

            previous = window(step - EVERY) if step > EVERY else None
            assert record[f"n/{layer}"] == window(step).shape[0]
            assert_logged_equal(record, layer, window(step), previous, rtol=1e-9)


def test_hf_trainer_ddp_logs_equal_scipy_on_the_union_of_both_ranks(tmp_path: Path) -> None:
    """transformers.Trainer(use_cpu=True, ddp_backend="gloo") under torchrun with
    GSAMTrainerCallback on a tiny GPT-NeoX, padded batches, 4 steps, every_n_steps=2: the
    Trainer really wraps the model in DDP, and rank 0's logs equal scipy on the unpadded rows
    of both ranks."""
    pytest.importorskip("transformers")
    import transformers as tr

    from tests.tiny_models import tiny_config
    from tests.torchrun_engines import EVERY, HF_LAYERS, STEPS

    torchrun("hf_ddp", tmp_path)
    out = tmp_path / "hf_ddp"
    names = unwrapped_layer_names(tr.GPTNeoXForCausalLM(tiny_config("gptneox")))
    assert names == list(HF_LAYERS)
    for rank in range(WORLD):
        meta = json.loads((out / f"meta{rank}.json").read_text())
        assert meta == {"layer_names": names, "wrapped": "DistributedDataParallel"}
    check_logs_against_the_union(out, names, EVERY, STEPS)
