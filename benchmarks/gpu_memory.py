"""The monitor's device memory on an accelerator against its plan, the flush's cost, and no host
sync on a collection step: the memory checks of ``scripts/gpu_check.sh``.

A Llama of 4 blocks at d = 4096 in bf16 (``--tiny``: 2 blocks at d = 64, for the script's CPU
logic), training steps on random tokens (batch 2 x 256, SGD). Checks, one ``PASS``/``FAIL``/``SKIP``
line each:

* ``memory_plan``: the peak ``torch.cuda.max_memory_allocated`` of a run with the monitor (every
  step collected, one log) minus the same run without, within ``monitor.memory_report()``'s
  ``device_bytes`` (the buffers and the update workspace) plus 64 MiB;
* ``flush``: one flush of the 4 windows into the host totals (the device-to-host copy is a
  blocking one), its time per layer;
* ``no_sync``: a collection step under ``torch.cuda.set_sync_debug_mode("error")`` raises nothing
  (the hooks and the buffer updates never read the device from the host).

Not checked yet (no asynchronous copy to check): a flush whose copy is delayed on a side stream,
and a collection inside a CUDA-graph capture.

Usage::

    python benchmarks/gpu_memory.py [--json out.json]
    python benchmarks/gpu_memory.py --device cpu --tiny      # the logic, on a CPU
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json

from gsam_monitor import CollectOptions, GSAMMonitor

MIB = 2**20


def build(device: torch.device, tiny: bool) -> torch.nn.Module:
    import transformers as tr

    d, layers = (64, 2) if tiny else (4096, 4)
    config = tr.LlamaConfig(
        hidden_size=d, intermediate_size=d * 2 if tiny else 11008, num_hidden_layers=layers,
        num_attention_heads=max(1, d // 128) if not tiny else 2, vocab_size=1000,
    )
    torch.manual_seed(0)
    return tr.LlamaForCausalLM(config).to(device, torch.bfloat16)


def run(model: torch.nn.Module, device: torch.device, steps: int, monitor: GSAMMonitor | None) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(1)
    batches = [torch.randint(0, 1000, (2, 256), generator=gen).to(device) for _ in range(steps)]
    if device.type == "cuda":
        torch.cuda.synchronize()  # the batches are on the device before any step is timed or watched
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if monitor is not None:
            monitor.step()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = build(device, args.tiny)
    checks: dict[str, dict] = {}

    def verdict(name: str, status: str, detail: str, **values: float) -> None:
        checks[name] = {"status": status, "detail": detail, **values}
        print(f"{status} {name}: {detail}")

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    run(model, device, args.steps, None)
    base = torch.cuda.max_memory_allocated() if cuda else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # every_n_steps < 10
        monitor = GSAMMonitor(
            model, every_n_steps=args.steps, sinks=[],
            collection=CollectOptions(steps=None, max_tokens_per_layer=None, phases="train"),
        )  # fmt: skip
    plan = monitor.memory_report()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with monitor:
        run(model, device, args.steps, monitor)
        if cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() if cuda else 0
        logged = monitor.n_logs
        if cuda:
            extra = peak - base
            ok = extra <= plan["device_bytes"] + 64 * MIB and logged == 1 and monitor.errors == 0
            verdict(
                "memory_plan", "PASS" if ok else "FAIL",
                f"peak with the monitor - without = {extra / MIB:.0f} MiB, plan {plan['device_bytes'] / MIB:.0f} MiB "
                f"(+64 MiB allowed), {logged} log, {monitor.errors} errors",
                extra_mib=extra / MIB, plan_mib=plan["device_bytes"] / MIB,
            )
        else:
            verdict("memory_plan", "SKIP", "no CUDA device: device memory is not measured")
        run(model, device, 1, None)  # rows in the buffers (the monitor is attached: every step collects)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        monitor._windows.flush()
        seconds = time.perf_counter() - start
        layers = len(monitor.layer_names)
        verdict(
            "flush", "PASS" if monitor.errors == 0 else "FAIL",
            f"{seconds / layers * 1e3:.1f} ms per layer ({layers} layers, blocking device-to-host copy)",
            ms_per_layer=seconds / layers * 1e3,
        )
        if cuda:
            try:
                torch.cuda.set_sync_debug_mode("error")
                run(model, device, 1, None)  # a collection step, no log
                torch.cuda.set_sync_debug_mode("default")
                verdict("no_sync", "PASS", "a collection step under set_sync_debug_mode('error') raised nothing")
            except RuntimeError as err:
                torch.cuda.set_sync_debug_mode("default")
                verdict("no_sync", "FAIL", f"a host sync on a collection step: {err}")
        else:
            verdict("no_sync", "SKIP", "no CUDA device")
    results = {"device": str(device), "tiny": args.tiny, "plan_device_bytes": plan["device_bytes"], "checks": checks}
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    outcome = main()
    sys.exit(1 if any(c["status"] == "FAIL" for c in outcome["checks"].values()) else 0)
