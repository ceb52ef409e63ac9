"""What ``--dtype bfloat16`` inference costs in accuracy: per-layer GSAM and rank against float32.

The model runs in each dtype over the default corpus (``sst2_300_filtered``) with the token
protocol; the statistics are accumulated in fp64 from products in fp64 (CPU) or fp32 (GPU),
never in bf16, so every difference comes from the model's own bf16 arithmetic. Prints, per
layer, the rank and GSAM in each dtype, the GSAM difference (nats, and relative) and the
effective ranks.

Usage::

    python benchmarks/eval_dtype.py                    # MiniLM on the CPU
    python benchmarks/eval_dtype.py --model tiny:llama --device cuda --json results/eval_dtype.json
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch
from _common import write_json

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--corpus", default="sst2_300_filtered")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from gsam_monitor.eval.corpus import load_corpus
    from gsam_monitor.eval.models import load_model
    from gsam_monitor.eval.protocols import run_token_protocol

    corpus = load_corpus(args.corpus)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        loaded = load_model(args.model, device=args.device, dtype=dtype)
        results[str(dtype).removeprefix("torch.")] = run_token_protocol(loaded, corpus).layers
    rows = []
    print(f"{args.model} on {args.device}, {args.corpus}: bfloat16 inference against float32")
    print(f"{'layer':>5} {'rank fp32':>9} {'rank bf16':>9} {'gsam fp32':>10} {'gsam bf16':>10} {'diff':>7} "
          f"{'rel':>7} {'eff_rank fp32':>13} {'eff_rank bf16':>13}")
    for a, b in zip(results["float32"], results["bfloat16"], strict=True):
        diff = b["gsam"] - a["gsam"]
        row = {"index": a["index"], "rank_fp32": a["rank"], "rank_bf16": b["rank"], "gsam_fp32": a["gsam"],
               "gsam_bf16": b["gsam"], "gsam_diff": diff, "gsam_rel": diff / abs(a["gsam"]),
               "effective_rank_fp32": a["effective_rank"], "effective_rank_bf16": b["effective_rank"]}
        rows.append(row)
        print(f"{a['index']:>5} {a['rank']:>9} {b['rank']:>9} {a['gsam']:10.3f} {b['gsam']:10.3f} {diff:7.3f} "
              f"{row['gsam_rel']:7.2%} {a['effective_rank']:13.2f} {b['effective_rank']:13.2f}")
    write_json(args.json, {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "model": args.model,
                           "device": args.device, "corpus": args.corpus, "layers": rows})


if __name__ == "__main__":
    main()
