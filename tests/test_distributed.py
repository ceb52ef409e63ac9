"""Two and four processes (gloo, CPU) under DDP: the metrics, each layer reduced to and
computed on its owner rank and gathered to rank zero, equal one process fed the union."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch

D = 3
DEPTH = 3  # 3 train + 3 eval windows: owners round robin over 2 or 4 ranks
STEPS = 4
WINDOWS = ("interval", "cumulative")
METRICS = ["n", "gsam", "rank", "gsam_oas", "effective_rank", "heldout_loglik", "anisotropy", "mean_kurtosis"]


def _batch(rank: int, step: int) -> torch.Tensor:
    rng = np.random.default_rng(100 * rank + step)
    return torch.from_numpy(rng.standard_normal((5 + rank + step % 2, D)) * (1 + rank) + rank)


def _eval_batch() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(999).standard_normal((6, D)))


def _monitors(model, sinks_for_first=()):
    from gsam_monitor import GSAMMonitor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return [
            GSAMMonitor(
                model,
                "auto",
                every_n_steps=2,
                window=window,
                metrics=METRICS,
                max_tokens_per_layer=None,
                sinks=sinks_for_first if i == 0 else (),
            )
            for i, window in enumerate(WINDOWS)
        ]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from gsam_monitor.sinks import JsonlSink
    from tests.tiny_models import Stack

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ddp = DistributedDataParallel(Stack(dim=D, depth=DEPTH))
        monitors = _monitors(ddp, [JsonlSink(os.path.join(out_dir, f"rank{rank}.jsonl"))])
        assert monitors[0].layer_names == [f"blocks.{i}" for i in range(DEPTH)]  # no "module." prefix
        outs = {w: [] for w in WINDOWS}
        for m in monitors:
            m.attach()
        for step in range(1, STEPS + 1):
            ddp(_batch(rank, step)).sum().backward()
            if rank == 0 and step == 3:  # only rank 0 evaluates: rank 1 has no eval window
                with torch.no_grad():
                    ddp(_eval_batch())
            for window, m in zip(WINDOWS, monitors, strict=True):
                out = m.step()
                if out is not None:
                    outs[window].append(out)
        # The held-out references each rank keeps: those of the windows it owns.
        outs["references"] = {
            w: sorted("/".join(k) for k in m._windows.reference) for w, m in zip(WINDOWS, monitors, strict=True)
        }
        with open(os.path.join(out_dir, f"out{rank}.json"), "w") as f:
            json.dump(outs, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_owner_computed_logs_equal_one_process_on_the_union(tmp_path, world: int) -> None:
    import torch.multiprocessing as mp

    from tests.tiny_models import Stack

    mp.start_processes(
        _worker,
        args=(world, str(tmp_path / "init"), str(tmp_path)),
        nprocs=world,
        start_method="spawn",
    )
    per_rank = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(world)]

    model = Stack(dim=D, depth=DEPTH)
    single = _monitors(model)
    expected = {w: [] for w in WINDOWS}
    for m in single:
        m.attach()
    for step in range(1, STEPS + 1):
        model(torch.cat([_batch(r, step) for r in range(world)])).sum().backward()
        if step == 3:
            with torch.no_grad():
                model(_eval_batch())
        for window, m in zip(WINDOWS, single, strict=True):
            out = m.step()
            if out is not None:
                expected[window].append(out)

    for window in WINDOWS:
        assert len(expected[window]) == 2
        assert "gsam/blocks.1/eval" in expected[window][1] and "heldout_loglik/blocks.0" in expected[window][1]
        # The metrics are written on rank zero only: the other ranks compute their share and
        # get {} on each logging step.
        for outs in per_rank[1:]:
            assert outs[window] == [{}, {}]
        for outs in per_rank[:1]:
            for got, want in zip(outs[window], expected[window], strict=True):
                assert got.keys() == want.keys()
                for key in want:
                    assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (window, key)
        # Owners round robin over the log's windows (train layers, then eval layers): each
        # rank keeps the references of its own windows only.
        keys = [f"blocks.{i}/{phase}" for phase in ("train", "eval") for i in range(DEPTH)]
        for r in range(world):
            assert per_rank[r]["references"][window] == sorted(k for i, k in enumerate(keys) if i % world == r)
    # Only global rank zero writes.
    assert (tmp_path / "rank0.jsonl").exists()
    assert not any((tmp_path / f"rank{r}.jsonl").exists() for r in range(1, world))
    lines = (tmp_path / "rank0.jsonl").read_text().splitlines()
    assert len([line for line in lines if '"quantization"' not in line and '"outliers"' not in line]) == 2
