"""Two and four processes (gloo, CPU) under DDP: the metrics, each layer reduced to and
computed on its owner rank and gathered to rank zero, equal one process fed the union."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch

from gsam_monitor import CollectOptions, ComputeOptions, WindowOptions
from tests.gloo_worker import run_gloo_worker

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
                windows=WindowOptions(kind=window), collection=CollectOptions(max_tokens_per_layer=None),
                metrics=METRICS,
                sinks=sinks_for_first if i == 0 else (),
            )
            for i, window in enumerate(WINDOWS)
        ]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    run_gloo_worker(rank, world, init_file, _train, out_dir)


def _train(rank: int, world: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from gsam_monitor.sinks import JsonlSink
    from tests.tiny_models import Stack

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
        w: sorted("/".join(k) for k in m._windows.references) for w, m in zip(WINDOWS, monitors, strict=True)
    }
    for m in monitors:
        m.close()
    with open(os.path.join(out_dir, f"out{rank}.json"), "w") as f:
        json.dump(outs, f)


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


def _close_mid_log(rank: int, world: int, out_dir: str) -> None:
    """A background log is submitted at step 2 and the run ends at once: close() waits for it,
    writes it and stops the worker thread."""
    from torch.nn.parallel import DistributedDataParallel

    from gsam_monitor import GSAMMonitor
    from gsam_monitor.sinks import JsonlSink
    from tests.tiny_models import Stack

    ddp = DistributedDataParallel(Stack(dim=D, depth=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        monitor = GSAMMonitor(
            ddp, every_n_steps=2, compute=ComputeOptions(background=True),
            collection=CollectOptions(max_tokens_per_layer=None, phases="train"), metrics=["n", "gsam"],
            sinks=[JsonlSink(os.path.join(out_dir, f"close{rank}.jsonl"))],
        )  # fmt: skip
    with monitor:
        for step in (1, 2):
            ddp(_batch(rank, step)).sum().backward()
            assert monitor.step() in (None, {})  # step 2 hands the log to the background thread
    assert monitor._logs._background._executor is None  # the worker thread is stopped


def _close_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    run_gloo_worker(rank, world, init_file, _close_mid_log, out_dir)


@pytest.mark.distributed
def test_closing_right_after_a_background_log_writes_it_and_exits_cleanly(tmp_path) -> None:
    import torch.multiprocessing as mp

    from tests.reference import gsam_pdet

    mp.start_processes(
        _close_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    (record,) = [json.loads(line) for line in (tmp_path / "close0.jsonl").read_text().splitlines()
                 if '"gsam/blocks.0"' in line]
    union = np.concatenate([_batch(r, s).numpy() for r in range(2) for s in (1, 2)])
    assert record["step"] == 2 and record["n/blocks.0"] == len(union)
    assert record["gsam/blocks.0"] == pytest.approx(gsam_pdet(union)[0], rel=1e-9)
    assert not (tmp_path / "close1.jsonl").exists()
