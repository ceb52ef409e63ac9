"""A distributed log's cost: every window all-reduced to every rank and computed on the
writer (``all_reduce``) against each window reduced onto its owner rank, owners round robin,
computed there and the scalars gathered to the writer (``owner``, what ``GSAMMonitor`` does).

``--world`` gloo processes on this machine each fill ``--layers`` windows of ``--dim`` with
their own rows; a log of each kind is timed (median of ``--reps``) as the slowest rank's
wall time, split into communication (the reductions and the gather) and metrics (the
default metrics against a kept ``GaussianFit``, making the next fit). The bytes each rank
sends are the model's (see RESULTS.md): gloo's own traffic is not instrumented.

Usage::

    python benchmarks/distributed_log.py --world 2 4 --layers 8 --dim 512
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import write_json


def _worker(rank: int, world: int, init_file: str, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist

    from gsam_monitor import LayerStats, metrics
    from gsam_monitor.monitor import ranks

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(rank)
    windows = []
    for _ in range(args.layers):
        s = LayerStats(args.dim)
        s.update(torch.randn(2 * args.dim // world + 8, args.dim, dtype=torch.float64, generator=gen))
        windows.append(s)
    fits = [metrics.compute(s, names=["n"], with_fit=True).fit for s in windows]  # references kept
    rows: dict[str, list[tuple[float, float]]] = {"all_reduce": [], "owner": []}
    for _ in range(args.reps):
        for kind in rows:
            dist.barrier()
            t0 = time.perf_counter()
            if kind == "all_reduce":
                synced = [w.clone().all_reduce_() for w in windows]
                t1 = time.perf_counter()
                if rank == 0:
                    for s, fit in zip(synced, fits, strict=True):
                        metrics.compute(s, fit, with_fit=True)
                t2 = time.perf_counter()
            else:
                owned = []
                for i, w in enumerate(windows):
                    s = w.clone().reduce_(ranks.owner(i))
                    if ranks.owner(i) == rank:
                        owned.append((s, fits[i]))
                t1 = time.perf_counter()
                shares = [metrics.compute(s, fit, with_fit=True) for s, fit in owned]
                t2 = time.perf_counter()
                ranks.gather_to_writer(shares)
            t3 = time.perf_counter()
            rows[kind].append((t1 - t0 + t3 - t2, t2 - t1))
    med = statistics.median
    times = torch.tensor([[med([c for c, _ in v]), med([m for _, m in v])] for v in rows.values()])
    gathered = [torch.zeros_like(times) for _ in range(world)] if rank == 0 else None
    dist.gather(times, gathered, dst=0)
    if rank == 0:
        torch.save(torch.stack(gathered), out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import torch.multiprocessing as mp

    state = 8 * (args.dim**2 + 5 * args.dim)
    print(f"# {platform.machine()}, torch {torch.__version__}, gloo, load {os.getloadavg()[0]:.2f}; "
          f"{args.layers} windows of d = {args.dim} ({state / 2**20:.1f} MiB each)")  # fmt: skip
    results = []
    for world in args.world:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "times.pt")
            mp.start_processes(
                _worker, args=(world, os.path.join(tmp, "init"), args, out), nprocs=world, start_method="spawn"
            )
            times = torch.load(out)  # (rank, kind, [comm, metrics])
        for k, kind in enumerate(("all_reduce", "owner")):
            comm, comp = times[:, k, 0], times[:, k, 1]
            wall = float((comm + comp).max())
            # Bytes each rank sends per log under a ring schedule (the model in RESULTS.md).
            factor = 2 * (world - 1) / world if kind == "all_reduce" else (world - 1) / world
            sent = factor * state * args.layers
            results.append({"world": world, "kind": kind, "wall_s": wall, "comm_s": comm.tolist(),
                            "metrics_s": comp.tolist(), "model_bytes_sent_per_rank": sent})  # fmt: skip
            print(f"world {world}  {kind:10s}  log {wall:7.3f} s   comm per rank "
                  + " ".join(f"{c:6.3f}" for c in comm.tolist()) + "   metrics per rank "
                  + " ".join(f"{c:6.3f}" for c in comp.tolist())
                  + f"   model: {sent / 2**20:7.1f} MiB sent per rank", flush=True)  # fmt: skip
    print(f"# load after {os.getloadavg()[0]:.2f}")
    write_json(args.json, {"layers": args.layers, "dim": args.dim, "rows": results})


if __name__ == "__main__":
    main()
