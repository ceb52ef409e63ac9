"""``ComputeOptions(shard_layers=True)``: under DDP (gloo, CPU; 2 and 4 processes) each rank
collects only the layers it owns, from its own rows; rank zero writes each layer's metrics, equal
to scipy on its owner rank's rows; each rank allocated buffers and totals for its own layers
only; the plan per rank falls with the world size. Outside torch.distributed one process owns
every layer, which is said once."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch

import gsam_monitor.monitor.ranks as ranks_module
from gsam_monitor import CollectOptions, ComputeOptions, GSAMMonitor, memory_report
from gsam_monitor.monitor.ranks import layer_owners
from tests.gloo_worker import run_gloo_worker
from tests.reference import gsam_pdet
from tests.tiny_models import Stack, llama_7b_on_meta, tiny_config

D = 4
DEPTH = 3  # and two spare layers: over 2 ranks each owns one; over 4 ranks 0 and 3 (which owns nothing else)
STEPS = 4


def _batch(rank: int, step: int) -> torch.Tensor:
    rng = np.random.default_rng(100 * rank + step)
    return torch.from_numpy(rng.standard_normal((7 + rank + step % 2, D)) * (1 + rank) + rank)


def _worker(rank: int, world: int, init_file: str, out_dir: str, background: bool) -> None:
    run_gloo_worker(rank, world, init_file, _train, out_dir, background)


def _train(rank: int, world: int, out_dir: str, background: bool) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from gsam_monitor.sinks import JsonlSink

    model = Stack(dim=D, depth=DEPTH)
    model.spare = torch.nn.ModuleList(torch.nn.Linear(D, D) for _ in range(2))  # monitored, never called
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    rows: dict[str, list[list[float]]] = {f"blocks.{i}": [] for i in range(DEPTH)}

    def recorder(name):  # independent hooks: every row each block outputs on this rank
        def hook(module, args, output):
            rows[name].extend(output.detach().double().tolist())

        return hook

    for i, block in enumerate(model.blocks):
        block.register_forward_hook(recorder(f"blocks.{i}"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # every_n_steps < 10
        monitor = GSAMMonitor(
            ddp, ["blocks.*", "spare.*"], every_n_steps=STEPS, metrics=["n", "gsam"],
            collection=CollectOptions(steps=None, max_tokens_per_layer=None, phases="train"),
            compute=ComputeOptions(shard_layers=True, background=background),
            sinks=[JsonlSink(os.path.join(out_dir, f"rank{rank}.jsonl"))],
        )  # fmt: skip
    outs = []
    with monitor:
        for step in range(1, STEPS + 1):
            ddp(_batch(rank, step)).sum().backward()
            if step == STEPS:  # before the log: the accumulation buffers this rank allocated
                buffers = sorted(layer for layer, _ in monitor._windows.buffers)
            outs.append(monitor.step())
        # The totals this rank holds: its own windows, or (background) the log's snapshot of them.
        totals = sorted(layer for layer, _ in monitor._windows.live) if not background else buffers
        plan = monitor.memory_report()
    # Leaving the block wrote a background log, gathered from every rank on the writer.
    with open(os.path.join(out_dir, f"out{rank}.json"), "w") as f:
        json.dump(
            {"outs": outs, "rows": rows, "buffers": buffers, "totals": totals, "owners": monitor.owners,
             "plan_layers": sorted(plan["layers"]), "last": monitor.last_metrics},
            f,
        )  # fmt: skip


@pytest.mark.distributed
@pytest.mark.parametrize(("world", "background"), [(2, False), (4, False), (4, True)])
def test_each_rank_collects_its_own_layers_and_rank_zero_writes_them_all(
    tmp_path, world: int, background: bool
) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(
        _worker, args=(world, str(tmp_path / "init"), str(tmp_path), background), nprocs=world, start_method="spawn"
    )
    per_rank = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(world)]
    names = [*(f"blocks.{i}" for i in range(DEPTH)), "spare.0", "spare.1"]
    owner = {name: i % world for i, name in enumerate(names)}  # equal layers: round robin
    for r, got in enumerate(per_rank):
        assert got["owners"] == owner
        mine = sorted(name for name, o in owner.items() if o == r)
        assert got["plan_layers"] == mine
        fired = [name for name in mine if name.startswith("blocks.")]  # the spares never fire
        assert got["buffers"] == fired and got["totals"] == fired
    logged = per_rank[0]["last"]
    # Inline, the log step returned the metrics; in the background, the log was only submitted
    # there and reached the writer when the monitor closed.
    assert per_rank[0]["outs"][-1] == (None if background else logged)
    for name, r in owner.items():
        if name.startswith("spare."):
            continue
        x = np.array(per_rank[r]["rows"][name])  # the owner's own rows: every step of the window
        assert len(x) == sum(len(_batch(r, s)) for s in range(1, STEPS + 1))
        assert logged[f"n/{name}"] == len(x)
        assert logged[f"gsam/{name}"] == pytest.approx(gsam_pdet(x)[0], rel=1e-9)
    # Each owner reports its own spare as missing: over 2 ranks one each, summed on the writer.
    assert logged["gsam_monitor/missing_layers"] == 2
    assert not any(key.endswith(("/spare.0", "/spare.1")) for key in logged)
    # Only rank zero writes: the others get {} from an inline log step, and nothing at all later.
    assert all(got["outs"][-1] == (None if background else {}) and got["last"] == {} for got in per_rank[1:])
    assert not any((tmp_path / f"rank{r}.jsonl").exists() for r in range(1, world))


def test_owners_are_balanced_by_bytes_and_deterministic() -> None:
    assert layer_owners([(f"l{i}", 10) for i in range(7)], 3) == {f"l{i}": i % 3 for i in range(7)}
    # A wide layer first: the next ones fill the other ranks before any joins it.
    assert layer_owners([("wide", 40), ("a", 10), ("b", 10), ("c", 10), ("d", 10), ("e", 10)], 2) == {
        "wide": 0, "a": 1, "b": 1, "c": 1, "d": 1, "e": 0,
    }


def test_the_plan_per_rank_falls_with_the_world_when_sharded() -> None:
    pytest.importorskip("transformers")
    model = llama_7b_on_meta()
    buffer = 8 * (4096**2 + 6 * 4096) + 16
    workspace = 2 * 1024 * 4096 * 8
    plan = memory_report(model, 8, compute={"shard_layers": True}, ranks_per_node=8)
    assert len(plan["layers"]) == 4 and plan["device_bytes"] == 4 * buffer + workspace
    assert plan["device_bytes"] <= 0.6 * 2**30
    # Host: 4 layers x 2 phases x (totals + reference + the background log's copy).
    assert plan["host_bytes"] == 4 * 2 * 3 * buffer and plan["host_bytes_per_node"] == 8 * plan["host_bytes"]
    assert sorted(plan["owners"].values()) == sorted(list(range(8)) * 4)


def test_sharding_without_torch_distributed_owns_every_layer_and_says_so() -> None:
    model = Stack(dim=D, depth=2)
    with pytest.warns(UserWarning, match=r"shard_layers=True\) in a process without torch\.distributed") as record:
        monitor = GSAMMonitor(model, "auto", sinks=[], compute=ComputeOptions(shard_layers=True))
    assert [w.filename for w in record] == [__file__]  # said once, at the caller's line
    assert monitor.owners == {"blocks.0": 0, "blocks.1": 0} and monitor.background is False  # a CPU model
    x = np.random.default_rng(0).standard_normal((20, D))
    with monitor, torch.no_grad():
        model(torch.from_numpy(x))
        out = monitor.log()
    assert out["gsam/blocks.1/eval"] == pytest.approx(gsam_pdet(x)[0], rel=1e-9)  # identity blocks


class _Rank:
    """``torch.distributed`` as one rank of ``world`` sees it at construction (no collectives)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def get_rank(self, group: object = None) -> int:
        return self.rank

    def get_world_size(self, group: object = None) -> int:
        return self.world


def _llama(layers: int = 2) -> torch.nn.Module:
    import transformers as tr

    torch.manual_seed(0)
    config = tiny_config("llama")
    config.num_hidden_layers = layers
    return tr.AutoModel.from_config(config, attn_implementation="eager").eval()


def _entropy_monitor(model: torch.nn.Module, layers, **kwargs) -> GSAMMonitor:
    return GSAMMonitor(
        model, layers, metrics=["n"],
        collection=CollectOptions(attention_entropy=True, max_tokens_per_layer=None, phases="eval"),
        compute=ComputeOptions(shard_layers=True, background=False), **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("layers", "world", "blockless"),
    [(["embeddings", "auto", "final_norm"], 4, {0, 3}), ("auto", 3, {2})],  # ranks owning only those; too many ranks
)
def test_attention_entropy_is_checked_on_the_whole_selection_so_every_rank_agrees(
    monkeypatch, layers, world: int, blockless: set[int]
) -> None:
    pytest.importorskip("transformers")
    model = _llama()
    for rank in range(world):
        monkeypatch.setattr(ranks_module, "active_dist", lambda rank=rank: _Rank(rank, world))
        monitor = _entropy_monitor(model, layers, sinks=[])  # every rank builds
        own = sorted(name for name, r in monitor.owners.items() if r == rank and name.startswith("layers."))
        assert (own == []) == (rank in blockless)
        assert [site.layer for site in monitor._capture._attention.sites] == own  # a blockless rank measures nothing
    # The selection itself holds no attention module: refused on every rank alike.
    for rank in range(world):
        monkeypatch.setattr(ranks_module, "active_dist", lambda rank=rank: _Rank(rank, world))
        with pytest.raises(ValueError, match="none of the monitored layers holds an attention module"):
            _entropy_monitor(model, ["embeddings", "final_norm"], sinks=[])


def _entropy_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    run_gloo_worker(rank, world, init_file, _entropy_train, out_dir)


def _entropy_train(rank: int, world: int, out_dir: str) -> None:
    from gsam_monitor.sinks import JsonlSink

    model = _llama(layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # every_n_steps < 10
        monitor = _entropy_monitor(
            model, ["embeddings", "auto"], every_n_steps=2, sinks=[JsonlSink(os.path.join(out_dir, f"e{rank}.jsonl"))]
        )  # rank 0 owns the embeddings only, rank 1 the block
    probs = []
    with monitor, torch.no_grad():
        for step in range(2):
            ids = torch.from_numpy(np.random.default_rng(10 * rank + step).integers(0, 64, (2, 5)))
            probs.append(model(input_ids=ids, output_attentions=True).attentions[0].double().tolist())
            monitor.step()
    with open(os.path.join(out_dir, f"e{rank}.json"), "w") as f:
        json.dump({"owners": monitor.owners, "probs": probs, "last": monitor.last_metrics, "errors": monitor.errors}, f)


@pytest.mark.distributed
def test_a_rank_without_an_attention_layer_of_its_own_measures_nothing_and_the_owner_logs_it(tmp_path) -> None:
    pytest.importorskip("transformers")
    import torch.multiprocessing as mp

    world = 2
    mp.start_processes(
        _entropy_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, start_method="spawn"
    )
    per_rank = [json.loads((tmp_path / f"e{r}.json").read_text()) for r in range(world)]
    assert all(got["owners"] == {"embeddings": 0, "layers.0": 1} and got["errors"] == 0 for got in per_rank)
    p = np.array(per_rank[1]["probs"])  # the owner's forwards: (steps, B, H, Tq, Tk), no padding
    expected = (-(p * np.log(p, where=p > 0, out=np.zeros_like(p))).sum(-1)).mean((0, 1, 3))  # per head
    logged = per_rank[0]["last"]  # written by rank 0, which has no attention module of its own
    for h, value in enumerate(expected):
        assert logged[f"attn_entropy/layers.0/h{h}/eval"] == pytest.approx(value, rel=2e-6)  # fp32 probabilities
    assert logged["attn_entropy/layers.0/eval"] == pytest.approx(expected.mean(), rel=2e-6)
    assert not any(key.startswith("attn_entropy/embeddings") for key in logged)
