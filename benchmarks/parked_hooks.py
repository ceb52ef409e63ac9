"""What a forward pays between collection windows, now that evaluation forwards are collected
whenever they happen.

Between windows (``collect_steps``) the layer hooks are off; with the eval phase monitored
(the default) the model's root keeps two context hooks, so that an evaluation forward can open
the layer hooks for itself. This measures the added time per training forward on a small
model (so that the hooks' cost is not lost in the model's), in four settings, interleaved:

* ``bare``: no monitor;
* ``train only, parked``: ``GSAMMonitor(phases="train")`` between windows: nothing on the model;
* ``default, parked``: ``GSAMMonitor(model)`` between windows: the two root hooks;
* ``collecting``: inside a window (every layer hook on, rows fed to the statistics).

and the cost of one evaluation forward between windows that opens and closes the layer hooks.

Usage::

    python benchmarks/parked_hooks.py [--forwards 2000] [--reps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json

from gsam_monitor import CollectOptions, GSAMMonitor

D, DEPTH, ROWS = 64, 6, 32


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(D, D) for _ in range(DEPTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _per_forward_us(model: nn.Module, x: torch.Tensor, n: int, *, grad: bool) -> float:
    with torch.set_grad_enabled(grad):
        t0 = time.perf_counter()
        for _ in range(n):
            model(x)
        return (time.perf_counter() - t0) / n * 1e6


def _monitor(model: nn.Module, phases: tuple[str, ...] = ("train", "eval")) -> GSAMMonitor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GSAMMonitor(model, every_n_steps=100, collection=CollectOptions(steps=10, phases=phases), sinks=[])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forwards", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(ROWS, D)
    train_only, default = _monitor(model, ("train",)), _monitor(model)
    settings = {"bare": None, "train only, parked": train_only, "default, parked": default, "collecting": default}
    times: dict[str, list[float]] = {name: [] for name in settings}
    eval_times: list[float] = []
    for rep in range(args.reps):
        names = list(settings)
        names = names[rep % len(names) :] + names[: rep % len(names)]  # rotate the order
        for name in names:
            monitor = settings[name]
            if monitor is not None:
                monitor.attach()
                monitor.step(95 if name == "collecting" else 5)  # inside the last 10 steps, or parked
            times[name].append(_per_forward_us(model, x, args.forwards, grad=True))
            if name == "default, parked":
                eval_times.append(_per_forward_us(model, x, args.forwards // 4, grad=False))
            if monitor is not None:
                monitor.detach()
    bare = statistics.median(times["bare"])
    print(f"# {DEPTH} Linear({D}, {D}) blocks, {ROWS} rows, training forwards (grad on); "
          f"median of {args.reps} interleaved reps of {args.forwards} forwards; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    out = {}
    for name, values in times.items():
        med = statistics.median(values)
        out[name] = med
        print(f"{name:20s} {med:8.2f} us/forward  ({med - bare:+7.2f} us vs bare)")
    ev = statistics.median(eval_times)
    out["eval forward, opening the hooks"] = ev
    print(f"{'eval forward between windows (no_grad, hooks opened and closed)':s}: {ev:.2f} us/forward")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
