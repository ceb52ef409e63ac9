"""A bf16 autocast training step of a ~0.1B-parameter GPT-NeoX on one GPU, with GSAMMonitor
watching 13 layers (one of width 4096): the checks `scripts/gpu_check.sh` runs.

The model: GPT-NeoX, d_model 768, 12 layers, 12 heads, MLP width 4096, vocabulary 8192
(about 116M parameters), random init, next-token loss on random tokens (batch 8 x 512, some
rows right-padded), AdamW, the forward under ``torch.autocast(dtype=torch.bfloat16)``. The
monitored layers: blocks 0-10 (d = 768), the final norm (d = 768) and block 11's MLP
up-projection output (d = 4096), with every other setting at its default.

Checks, one ``PASS``/``FAIL`` line each (``SKIP`` where the device cannot measure it):

* ``all_layers_logged``: every log holds finite GSAM for the 13 layers, with the widths above,
  and the monitor counted no error.
* ``overhead``: median over repetitions of (mean step time over one whole logging interval
  with the monitor) / (the same without), the log included, blocks interleaved; at most
  ``--max-overhead``.
* ``peak_memory``: peak allocated device memory with the monitor minus without, at most what
  the monitor should hold at a log: the live and held-out windows, the background snapshot
  of both (``2 · Σ state_bytes_per_layer(d, heldout=True)``), two d x d covariances being
  read off the device, the update's workspace (two 2²² fp64 buffers) and 64 MiB of slack.
* ``no_host_sync``: on non-logging collection steps, the monitor's hooks and ``step()`` run
  under ``torch.cuda.set_sync_debug_mode("error")`` (switched on and off by hooks placed
  around the monitor's own, so the model's own synchronisations do not count); a
  synchronisation there raises inside the hook, which the monitor counts as an error.
* ``log_time``: the time ``step()`` holds the training thread on a logging step with
  ``background=True``, at most ``--max-log-fraction`` of the inline (``background=False``)
  logging step.

Usage::

    python benchmarks/gpu_step.py                                  # the GPU run (about a minute on an H200)
    python benchmarks/gpu_step.py --json results/gpu_step.json     # also write the results
    python benchmarks/gpu_step.py --device cpu --steps 3 --tiny    # smoke test of the logic on CPU

Exit status: 0 when no check failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _common import sync, write_json
from overhead import run_block

from gsam_monitor import ComputeOptions, GSAMMonitor
from gsam_monitor.monitor import state_bytes_per_layer

WIDE = "gpt_neox.layers.11.mlp.dense_h_to_4h"
LAYERS = [*(f"gpt_neox.layers.{i}" for i in range(11)), "final_norm", WIDE]

FULL = {"hidden": 768, "mlp": 4096, "heads": 12, "vocab": 8192, "batch": 8, "seq": 512}
TINY = {"hidden": 32, "mlp": 128, "heads": 4, "vocab": 256, "batch": 2, "seq": 16}


def build(device: torch.device, size: dict[str, int], seed: int = 0) -> tuple[torch.nn.Module, Callable[[], None]]:
    """The model and one bf16-autocast optimizer step as a closure."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=size["vocab"], hidden_size=size["hidden"], num_hidden_layers=12,
        num_attention_heads=size["heads"], intermediate_size=size["mlp"], max_position_embeddings=size["seq"],
    )
    model = GPTNeoXForCausalLM(config).to(device).train()
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, size["seq"] // 2 :] = 0  # one right-padded row: the padding path runs too
        batches.append((ids.to(device), mask.to(device), ids.masked_fill(mask == 0, -100).to(device)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    state = {"i": 0}

    def step() -> None:
        ids, mask, labels = batches[state["i"] % len(batches)]
        state["i"] += 1
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def monitor_for(model: torch.nn.Module, every: int, logs: list[dict] | None = None, **kwargs) -> GSAMMonitor:
    """The monitor at its defaults on ``LAYERS``; what it writes is appended to ``logs``."""
    sinks = [lambda metrics, step: logs.append(dict(metrics))] if logs is not None else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # every_n_steps < 10 in --tiny smoke runs
        return GSAMMonitor(model, LAYERS, every_n_steps=every, sinks=sinks, **kwargs)


def run_interval(step: Callable[[], None], monitor: GSAMMonitor | None, n: int, device: torch.device) -> dict:
    """``overhead.run_block`` (one logging interval of ``n`` steps; per-step seconds with
    ``monitor.step()`` included, and the logging step's), then the background log written
    outside the timing, so that it does not run into the next block."""
    block = run_block(step, monitor, n, device)
    if monitor is not None:
        monitor.flush()
    return block


def check_logs(logs: list[dict], errors: int, size: dict[str, int]) -> tuple[bool, str]:
    widths = {name: size["hidden"] for name in LAYERS} | {WIDE: size["mlp"]}
    if not logs:
        return False, "no log arrived"
    for log in logs:
        for name, d in widths.items():
            if log.get(f"d/{name}") != d or not math.isfinite(log.get(f"gsam/{name}", math.nan)):
                return False, f"{name}: d={log.get(f'd/{name}')} (expected {d}), gsam={log.get(f'gsam/{name}')}"
    if errors:
        return False, f"{errors} monitor errors"
    return True, f"{len(logs)} logs x {len(widths)} layers (d = {size['hidden']} x 12, {size['mlp']} x 1), 0 errors"


def expected_monitor_bytes(size: dict[str, int]) -> int:
    dims = [size["mlp"] if name == WIDE else size["hidden"] for name in LAYERS]
    state = sum(state_bytes_per_layer(d, phases=("train",), heldout=True) for d in dims)
    return 2 * state + 2 * 8 * max(dims) ** 2 + 2 * (1 << 22) * 8 + 64 * 2**20


def sync_free_collection(model, step, every: int, device: torch.device) -> tuple[bool | None, str]:
    """Non-logging collection steps with the monitor's hooks and step() under sync-debug "error"."""
    monitor = monitor_for(model, every)
    if monitor.collect_steps < 3:
        return False, f"collect_steps={monitor.collect_steps}: need 3 collection steps before the log"
    monitor.attach()
    monitor.step(global_step=every - monitor.collect_steps)  # to the start of the collection steps
    step()  # first collection step outside the check: allocates the statistics
    monitor.step()
    cuda = device.type == "cuda"

    def strict(*_: object) -> None:
        if cuda:
            torch.cuda.set_sync_debug_mode("error")

    def lenient(*_: object) -> None:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")

    handles = [model.register_forward_pre_hook(strict, prepend=True), model.register_forward_pre_hook(lenient)]
    for t in monitor.targets:
        register = t.module.register_forward_hook if t.kind == "output" else t.module.register_forward_pre_hook
        handles += [register(strict, prepend=True), register(lenient)]
    counts = {name: float(monitor.stats(name).count) for name in monitor.layer_names}
    checked = 0
    try:
        while monitor.step_count % every < every - 1:  # stop before the logging step
            step()
            strict()
            try:
                monitor.step()
            finally:
                lenient()
            checked += 1
    finally:
        lenient()
        for h in handles:
            h.remove()
    grown = all(float(monitor.stats(name).count) > counts[name] for name in monitor.layer_names)
    errors = monitor.errors
    monitor.close()
    if not grown:
        return False, "the hooks did not collect during the checked steps"
    detail = f"{checked} collection steps, 13 layers, {errors} errors"
    if not cuda:
        return None, detail + " (set_sync_debug_mode needs CUDA: logic only)"
    return errors == 0, detail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=100, help="steps per logging interval = every_n_steps (100)")
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions for the overhead ratio (2)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same shape (CPU smoke test)")
    parser.add_argument("--max-overhead", type=float, default=1.10)
    parser.add_argument("--max-log-fraction", type=float, default=0.25)
    parser.add_argument("--json", type=Path, default=None, help="default: $OUT/gpu_step.json when OUT is set")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    size = TINY if args.tiny else FULL
    json_path = args.json or (Path(os.environ["OUT"]) / "gpu_step.json" if os.environ.get("OUT") else None)
    model, step = build(device, size)
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# gpu_step: {n_params / 1e6:.1f}M-parameter GPT-NeoX on {name}, torch {torch.__version__}, "
          f"bf16 autocast, batch {size['batch']} x {size['seq']}, {len(LAYERS)} monitored layers, "
          f"every_n_steps={args.steps}")
    results: dict = {"device": name, "torch": torch.__version__, "params": n_params, "size": size,
                     "every_n_steps": args.steps, "reps": args.reps, "checks": {}}
    cuda = device.type == "cuda"

    def report(check: str, ok: bool | None, detail: str, **values: float) -> None:
        verdict = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        print(f"{verdict} {check}: {detail}")
        results["checks"][check] = {"verdict": verdict, "detail": detail, **values}

    for _ in range(3):
        step()
    sync(device)
    # Overhead and memory: baseline and monitor blocks interleaved, a fresh monitor per block.
    blocks: dict[str, list[dict]] = {"baseline": [], "monitor": []}
    peaks: dict[str, int] = {}
    logs: list[dict] = []
    errors = 0
    warm = monitor_for(model, args.steps)
    run_interval(step, warm, args.steps, device)  # warm-up: workspaces, the first eigendecompositions
    warm.close()
    del warm
    for rep in range(args.reps):
        order = ["baseline", "monitor"] if rep % 2 == 0 else ["monitor", "baseline"]
        for setting in order:
            monitor = monitor_for(model, args.steps, logs) if setting == "monitor" else None
            if cuda:
                sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            block = run_interval(step, monitor, args.steps, device)
            if cuda:
                peaks[setting] = max(peaks.get(setting, 0), torch.cuda.max_memory_allocated(device) - before)
            blocks[setting].append(block)
            if monitor is not None:
                errors += monitor.errors
                monitor.close()
                del monitor

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    ratios = [mean(m["times"]) / mean(b["times"]) for m, b in zip(blocks["monitor"], blocks["baseline"], strict=True)]
    base_ms = statistics.median(mean(b["times"]) for b in blocks["baseline"]) * 1e3
    report("all_layers_logged", *check_logs(logs, errors, size))
    ratio = statistics.median(ratios)
    report("overhead", ratio <= args.max_overhead,
           f"x{ratio:.4f} per interval (reps {', '.join(f'{r:.4f}' for r in ratios)}; max {args.max_overhead}); "
           f"baseline step {base_ms:.1f} ms", ratio=ratio, baseline_step_ms=base_ms)
    expected = expected_monitor_bytes(size)
    if cuda:
        delta = peaks["monitor"] - peaks["baseline"]
        report("peak_memory", delta <= expected,
               f"+{delta / 2**20:.1f} MiB with the monitor (peak {peaks['monitor'] / 2**20:.0f} MiB vs "
               f"{peaks['baseline'] / 2**20:.0f} MiB); at most {expected / 2**20:.1f} MiB expected",
               delta_bytes=delta, expected_bytes=expected, **{f"peak_{k}_bytes": v for k, v in peaks.items()})
    else:
        report("peak_memory", None, f"device memory is measured on CUDA only; {expected / 2**20:.1f} MiB expected")
    ok, detail = sync_free_collection(model, step, args.steps, device)
    report("no_host_sync", ok, detail)
    # Log time on the training thread: background=True vs inline, one interval each.
    log_ms = {}
    for background in (True, False):
        monitor = monitor_for(model, args.steps, compute=ComputeOptions(background=background))
        block = run_interval(step, monitor, args.steps, device)
        monitor.close()
        log_ms[background] = statistics.median(block["log_times"]) * 1e3
    fraction = log_ms[True] / log_ms[False]
    report("log_time", fraction <= args.max_log_fraction,
           f"{log_ms[True]:.1f} ms on the training thread with background=True vs {log_ms[False]:.1f} ms inline "
           f"(x{fraction:.3f}; max {args.max_log_fraction})",
           background_ms=log_ms[True], inline_ms=log_ms[False])
    write_json(json_path, results)
    return 1 if any(c["verdict"] == "FAIL" for c in results["checks"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
