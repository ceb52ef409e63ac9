"""The peers side by side: gsam_monitor, Delve and wandb.watch on one MiniLM training step.

The workload is ``overhead.py``'s MiniLM step (all-MiniLM-L6-v2 with a 2-class head, AdamW,
padded batches) on the bundled SST-2 train sentences. Every tool watches the same six layers,
``bert.encoder.layer.{i}.output.dense``: Delve hooks only Linear/Conv2d/LSTM modules, and these
Linear layers (the blocks' last projection, before dropout, residual and LayerNorm) serve both.

Two phases:

* **Accuracy**: one model with every covariance tool attached at once and the benchmark's own
  hooks recording each layer's outputs in fp64, for ``--acc-steps`` training steps. Each tool's
  covariance is compared with ``np.cov(bias=True)`` of the layer's non-padding tokens over the
  same steps (relative Frobenius error); the rows each tool really used are read from it.
* **Timing**: one identical model copy per setting (same weights, same batches in the same
  order, own optimizer), the settings interleaved step by step (the order rotates every step,
  so drift and the machine's load hit all alike), ``--interval`` steps per repetition = one
  log of every tool, after ``--warmup`` untimed steps. Per repetition, each setting's mean
  step time (its logging step included) over the baseline's; the median over ``--reps``
  repetitions is reported, with the median of per-step ratios (the logs excluded), and each
  tool's own cost: the thread CPU time inside its forward hooks on the six layers
  (``HookTimer``) plus its log step spread over the interval, less exposed to a shared
  machine's load than the step ratios.

Settings:

* ``baseline``: no monitor.
* ``gsam_defaults``: ``GSAMMonitor(model, layers, every_n_steps=interval)``, every default (the
  last ``max(10, interval // 10)`` steps of every interval, at most 2048 tokens per forward).
* ``gsam_full``: every non-padding token of every step (``collect_steps=None,
  max_tokens_per_layer=None``).
* ``gsam_capped``: every step, ``max_tokens_per_layer`` = the batch size = Delve's rows per
  forward (equal collection).
* ``delve``: ``delve.CheckLayerSat`` (``SaturationTracker``) with its defaults (``stats=["lsat"]``,
  a CSV writer), ``add_saturations()`` once per interval.
* ``wandb``: ``wandb.watch(model, log="all", log_freq=interval)`` in an offline run, one
  ``run.log`` per interval (context: it logs no activations).

Usage::

    python benchmarks/peers.py                           # 100-step intervals, 3 reps
    OMP_NUM_THREADS=1 python benchmarks/peers.py --interval 25 --json results/peers.json
    python benchmarks/peers.py --quick                   # a 10-step smoke run

One thread is the steadier measure on a shared machine: two OpenMP threads on two busy cores
wait for each other at every parallel region.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import numpy as np
import torch
from _common import write_json
from overhead import minilm_workload

from gsam_monitor import CollectOptions, GSAMMonitor

SETTINGS = ("baseline", "gsam_defaults", "gsam_full", "gsam_capped", "delve", "wandb")
LAYERS = tuple(f"bert.encoder.layer.{i}.output.dense" for i in range(6))
CORPUS = "sst2_train"
COV_KEY = "train-covariance-matrix"  # Delve's table of training-mode covariances


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, Callable[[], None]]:
    """One fresh model and its training step: identical weights and batch order on every call."""
    return minilm_workload(torch.device("cpu"), args.batch_size, args.seed, corpus=CORPUS, max_batches=args.n_batches)


def delve_name(layer: str) -> str:
    """Delve names a module by its path joined with dashes."""
    return layer.replace(".", "-")


def make_delve(model: torch.nn.Module, layers: Sequence[str], savedir: str) -> Any:
    """Delve's ``CheckLayerSat`` on ``layers`` only, with its default stats and a CSV writer."""
    from delve.torchcallback import CheckLayerSat

    # Set after the import, which sets INFO: Delve logs every module it adds or skips.
    logging.getLogger("delve.logger").setLevel(logging.WARNING)

    wanted = {delve_name(n) for n in layers}
    # The CSV writer writes `savefile + ".csv"`, beside the folder it creates.
    tracker = CheckLayerSat(
        os.path.join(savedir, "delve"),
        "csv",
        model,
        layer_filter=lambda found: {k: v for k, v in found.items() if k in wanted},
        device="cpu",
    )
    if set(tracker.layers) != wanted:
        raise RuntimeError(f"Delve hooked {sorted(tracker.layers)}, expected {sorted(wanted)}")
    return tracker


class TokenRecorder:
    """fp64 copies of each layer's outputs: the non-padding tokens of every forward, and the
    last position of every sequence (the rows Delve takes from a 3-D output)."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[str]) -> None:
        self.mask: torch.Tensor | None = None
        self.tokens: dict[str, list[np.ndarray]] = {n: [] for n in layers}
        self.last: dict[str, list[np.ndarray]] = {n: [] for n in layers}
        self.last_is_padding: list[float] = []
        self.handles = [model.register_forward_pre_hook(self._capture_mask, with_kwargs=True)]
        self.handles += [model.get_submodule(n).register_forward_hook(partial(self._record, n)) for n in layers]

    def _capture_mask(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.mask = kwargs["attention_mask"].bool()
        self.last_is_padding.append(float((~self.mask[:, -1]).float().mean()))

    def _record(self, name: str, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = output.detach().to(torch.float64)
        self.tokens[name].append(x[self.mask].cpu().numpy())
        self.last[name].append(x[:, -1].cpu().numpy())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def rel_error(cov: np.ndarray, ref: np.ndarray) -> float:
    """Relative Frobenius error ``||cov - ref||_F / ||ref||_F``."""
    return float(np.linalg.norm(cov - ref) / np.linalg.norm(ref))


def measure_accuracy(args: argparse.Namespace, layers: Sequence[str]) -> dict[str, Any]:
    """Every covariance tool on one model for ``args.acc_steps`` steps against fp64 ``np.cov``."""
    from delve.metrics import compute_saturation

    model, step = build(args)
    full = GSAMMonitor(
        model,
        layers=list(layers),
        every_n_steps=10**9,
        collection=CollectOptions(steps=None, max_tokens_per_layer=None),
    )
    capped = GSAMMonitor(
        model,
        layers=list(layers),
        every_n_steps=10**9,
        collection=CollectOptions(steps=None, max_tokens_per_layer=args.batch_size),
    )
    with tempfile.TemporaryDirectory() as savedir:
        tracker = make_delve(model, layers, savedir)
        recorder = TokenRecorder(model, layers)
        full.attach()
        capped.attach()
        for _ in range(args.acc_steps):
            step()
            full.step()
            capped.step()
        recorder.remove()
        rng = np.random.default_rng(args.seed)
        rows: dict[str, list[float]] = {k: [] for k in ("tokens", "gsam_full", "gsam_capped", "delve")}
        per_layer = {}
        for name in layers:
            tokens = np.concatenate(recorder.tokens[name])
            ref = np.cov(tokens.T, bias=True)
            # A uniform subsample of the capped size per forward, drawn here: the sampling error
            # that gsam_capped should show and no more.
            sub = np.concatenate(
                [t[rng.choice(len(t), min(len(t), args.batch_size), replace=False)] for t in recorder.tokens[name]]
            )
            entry = tracker.logs[COV_KEY][delve_name(name)]
            covs = {
                "gsam_full": full.stats(name, "train").covariance(ddof=0).cpu().numpy(),
                "gsam_capped": capped.stats(name, "train").covariance(ddof=0).cpu().numpy(),
                "delve": entry.fix().cpu().numpy(),
            }
            rows["tokens"].append(len(tokens))
            rows["gsam_full"].append(float(full.stats(name, "train").count))
            rows["gsam_capped"].append(float(capped.stats(name, "train").count))
            rows["delve"].append(float(entry._tlen))
            per_layer[name] = {
                "error": {k: rel_error(c, ref) for k, c in covs.items()},
                # Delve's matrix against the rows it holds (the last position of the last
                # forward): its arithmetic alone.
                "delve_vs_its_rows": rel_error(covs["delve"], np.cov(recorder.last[name][-1].T, bias=True)),
                # Had Delve accumulated its rows over every step, as its docs describe.
                "delve_accumulated_last_position": rel_error(
                    np.cov(np.concatenate(recorder.last[name]).T, bias=True), ref
                ),
                "uniform_subsample": rel_error(np.cov(sub.T, bias=True), ref),
                "saturation": {
                    k: float(compute_saturation(torch.from_numpy(c), thresh=0.99))
                    for k, c in {"tokens": ref, **covs}.items()
                },
            }
        tracker.close()
    full.close()
    capped.close()
    return {
        "steps": args.acc_steps,
        "rows_per_layer": {k: statistics.median(v) for k, v in rows.items()},
        "last_position_padding_fraction": statistics.mean(recorder.last_is_padding),
        "layers": per_layer,
    }


class HookTimer:
    """The thread CPU time spent in the forward hooks that a tool put on ``layers``.

    A hook registered first (``prepend=True``) and one registered last bracket every other
    forward hook of the layer, so the difference is the tool's hook path alone: less exposed
    to the machine's load than step times, which it complements. The baseline's value is the
    bracket's own cost.
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[str]) -> None:
        self.total = 0.0
        self._t0 = 0.0
        self.handles = []
        for n in layers:
            module = model.get_submodule(n)
            self.handles.append(module.register_forward_hook(self._start, prepend=True))
            self.handles.append(module.register_forward_hook(self._stop))

    def _start(self, *_: Any) -> None:
        self._t0 = time.thread_time()

    def _stop(self, *_: Any) -> None:
        self.total += time.thread_time() - self._t0

    def take(self) -> float:
        """The time accumulated since the last call."""
        total, self.total = self.total, 0.0
        return total


@dataclass
class Runner:
    """One setting's model and step, and what its tool does after each optimizer step."""

    model: torch.nn.Module
    step: Callable[[], None]
    after: Callable[[int], None] | None = None  # called with the 1-based step count
    close: Callable[[], None] | None = None
    hooks: HookTimer | None = None
    times: list[float] = field(default_factory=list)
    log_times: list[float] = field(default_factory=list)
    hook_times: list[float] = field(default_factory=list)
    count: int = 0

    def run(self, interval: int, timed: bool) -> None:
        t0 = time.perf_counter()
        self.step()
        self.count += 1
        t1 = time.perf_counter()
        if self.after is not None:
            self.after(self.count)
        t2 = time.perf_counter()
        hook_time = self.hooks.take() if self.hooks is not None else 0.0
        if timed:
            self.times.append(t2 - t0)
            self.hook_times.append(hook_time)
            if self.count % interval == 0:
                self.log_times.append(t2 - t1)


def make_runner(setting: str, args: argparse.Namespace, layers: Sequence[str], savedir: str) -> Runner:
    """One setting's model copy with its tool attached, and a HookTimer around the tool's hooks."""
    runner = _make_runner(setting, args, layers, savedir)
    runner.hooks = HookTimer(runner.model, layers)
    return runner


def _make_runner(setting: str, args: argparse.Namespace, layers: Sequence[str], savedir: str) -> Runner:
    model, step = build(args)
    interval = args.interval
    if setting == "baseline":
        return Runner(model, step)
    if setting.startswith("gsam"):
        options = {
            "gsam_defaults": {},
            "gsam_full": {"collection": CollectOptions(steps=None, max_tokens_per_layer=None)},
            "gsam_capped": {"collection": CollectOptions(steps=None, max_tokens_per_layer=args.batch_size)},
        }[setting]
        monitor = GSAMMonitor(model, layers=list(layers), every_n_steps=interval, **options).attach()
        return Runner(model, step, lambda _: monitor.step(), monitor.close)
    if setting == "delve":
        tracker = make_delve(model, layers, savedir)

        def delve_after(count: int) -> None:
            if count % interval == 0:
                tracker.add_saturations()

        return Runner(model, step, delve_after, tracker.close)
    import wandb

    run = wandb.init(
        mode="offline", dir=savedir, project="gsam-peers", settings=wandb.Settings(console="off", silent=True)
    )
    run.watch(model, log="all", log_freq=interval)

    def wandb_after(count: int) -> None:
        if count % interval == 0:
            run.log({"step": count})  # commits the histograms watch queued

    return Runner(model, step, wandb_after, run.finish)


def load() -> str:
    """The machine's load as ``uptime`` prints it."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def measure_timing(args: argparse.Namespace, layers: Sequence[str], savedir: str) -> dict[str, Any]:
    """Interleave the settings step by step; ratios of mean step times to the baseline's."""
    settings = ["baseline", *[s for s in args.settings if s != "baseline"]]
    runners = {s: make_runner(s, args, layers, savedir) for s in settings}
    n = len(settings)
    blocks: dict[str, list[dict[str, list[float]]]] = {s: [] for s in settings}
    # Repetition 0 is the warm-up. Any `interval` consecutive steps hold one log of each tool
    # (at step counts divisible by it) and, for gsam_defaults, one collection window.
    for rep in range(args.reps + 1):
        for i in range(args.interval if rep else args.warmup):
            k = i % n
            for s in settings[k:] + settings[:k]:
                runners[s].run(args.interval, timed=rep > 0)
        print(f"# {f'repetition {rep}/{args.reps}' if rep else 'warm-up'} done; {load()}", flush=True)
        if rep > 0:
            for s, r in runners.items():
                blocks[s].append({"times": r.times, "log_times": r.log_times, "hook_times": r.hook_times})
                r.times, r.log_times, r.hook_times = [], [], []
    for r in runners.values():
        if r.close is not None:
            r.close()

    base = blocks["baseline"]
    out: dict[str, Any] = {
        "baseline_step_ms": statistics.median(statistics.mean(b["times"]) for b in base) * 1e3,
        "baseline_hook_ms": statistics.median(t for b in base for t in b["hook_times"]) * 1e3,
    }
    interval = args.interval
    for s in settings[1:]:
        pairs = list(zip(blocks[s], base, strict=True))
        ratios = [statistics.mean(b["times"]) / statistics.mean(r["times"]) for b, r in pairs]
        step_ratios = [statistics.median(b["times"]) / statistics.median(r["times"]) for b, r in pairs]
        logs = [t for b in blocks[s] for t in b["log_times"]]
        out[s] = {
            "ratio_median": statistics.median(ratios),
            "ratios": ratios,
            "median_step_ratio_median": statistics.median(step_ratios),
            "log_ms_median": statistics.median(logs) * 1e3,
            # Thread CPU time in the tool's forward hooks, all layers, per step (median step).
            "hook_ms_median": statistics.median(t for b in blocks[s] for t in b["hook_times"]) * 1e3,
            # The logging step spread over the interval, plus the hooks: the tool's own cost.
            "own_ms_per_step": (
                statistics.median(t for b in blocks[s] for t in b["hook_times"]) + statistics.median(logs) / interval
            )
            * 1e3,
            "steps_timed": [len(b["times"]) for b in blocks[s]],
            "logs": [len(b["log_times"]) for b in blocks[s]],
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=int, default=100, help="steps per repetition = every tool's log interval")
    parser.add_argument("--reps", type=int, default=3, help="timed interleaved repetitions")
    parser.add_argument("--warmup", type=int, default=10, help="untimed interleaved steps first")
    parser.add_argument("--acc-steps", type=int, default=20, help="training steps of the accuracy phase")
    parser.add_argument("--batch-size", type=int, default=32, help="also gsam_capped's max_tokens_per_layer")
    parser.add_argument("--n-batches", type=int, default=100, help="distinct batches cycled (first of sst2_train)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS[1:]), choices=SETTINGS)
    parser.add_argument("--no-timing", action="store_true", help="the accuracy phase only")
    parser.add_argument("--no-accuracy", action="store_true", help="the timing phase only")
    parser.add_argument(
        "--quick", action="store_true", help="--interval 10 --reps 2 --warmup 3 --acc-steps 4 --n-batches 10"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.interval, args.reps, args.warmup, args.acc_steps, args.n_batches = 10, 2, 3, 4, 10
    import transformers

    transformers.logging.set_verbosity_error()  # one load report per model copy otherwise
    # Subnormal optimizer state slows every CPU kernel that touches it (examples/hf_finetune_minilm.py).
    torch.set_flush_denormal(True)
    layers = LAYERS

    out: dict[str, Any] = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "corpus": CORPUS,
        "batch_size": args.batch_size,
        "interval": args.interval,
        "reps": args.reps,
        "layers": list(layers),
        "load_before": load(),
    }
    print(f"# {out['load_before']}")
    print(
        f"# MiniLM on {CORPUS}, batch {args.batch_size}, torch {torch.__version__}, {out['threads']} threads; "
        f"layers {layers[0]} ... ({len(layers)})"
    )
    if not args.no_accuracy:
        acc = measure_accuracy(args, layers)
        out["accuracy"] = acc
        rows = acc["rows_per_layer"]
        print(
            f"\n## accuracy over {acc['steps']} steps: covariance vs fp64 np.cov(bias=True) of the non-padding tokens"
            f"\nrows per layer in the window: {rows['tokens']:.0f} non-padding tokens "
            f"({rows['tokens'] / acc['steps']:.0f} per forward); gsam_full {rows['gsam_full']:.0f}, gsam_capped "
            f"{rows['gsam_capped']:.0f}, delve {rows['delve']:.0f} (the last position of each sequence in the last "
            f"forward; padding in {100 * acc['last_position_padding_fraction']:.0f}% of sequences)"
            "\ncolumns: relative Frobenius error of gsam_full, gsam_capped, (a uniform subsample of the capped size), "
            "delve, (delve vs the rows it holds), (the last positions of every step); Delve's saturation (0.99)"
        )
        print(
            f"{'layer':<36}{'gsam_full':>11}{'gsam_capped':>12}{'(uniform)':>11}{'delve':>9}{'(its rows)':>11}"
            f"{'(accum.)':>10}   saturation: tokens/full/capped/delve"
        )
        for name, e in acc["layers"].items():
            sat = e["saturation"]
            print(
                f"{name:<36}{e['error']['gsam_full']:>11.1e}{e['error']['gsam_capped']:>12.3f}{e['uniform_subsample']:>11.3f}"
                f"{e['error']['delve']:>9.3f}{e['delve_vs_its_rows']:>11.1e}{e['delve_accumulated_last_position']:>10.3f}"
                f"   {sat['tokens']:.3f}/{sat['gsam_full']:.3f}/{sat['gsam_capped']:.3f}/{sat['delve']:.3f}"
            )
    if not args.no_timing:
        with tempfile.TemporaryDirectory() as savedir:
            timing = measure_timing(args, layers, savedir)
        out["timing"] = timing
        print(
            f"\n## step time, {args.interval}-step intervals (one log each), {args.reps} interleaved reps; "
            f"baseline {timing['baseline_step_ms']:.1f} ms (hook bracket alone {timing['baseline_hook_ms']:.3f} ms)"
            "\nratio: mean step time (logs included) over the baseline's; hooks: thread CPU time in the tool's "
            "forward hooks per step; own: hooks + log step / interval"
        )
        for s, t in timing.items():
            if not isinstance(t, dict):
                continue
            print(
                f"{s:<14} x{t['ratio_median']:.4f} (reps: {', '.join(f'{r:.4f}' for r in t['ratios'])}); "
                f"median step x{t['median_step_ratio_median']:.4f}; log step {t['log_ms_median']:.1f} ms; "
                f"hooks {t['hook_ms_median']:.2f} ms/step; own {t['own_ms_per_step']:.2f} ms/step"
            )
    out["load_after"] = load()
    print(f"# {out['load_after']}")
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
