"""The monitor's memory plan for the model sizes it exists for, per rank and per node, and the
cost of one flush of an accumulation buffer into the host totals.

Part 1 (no weights are allocated: the models are built on the meta device from their
``transformers`` configs): ``gsam_monitor.memory_report`` with the defaults (both phases,
``heldout_loglik``, background logs on an accelerator) for GPT-Neo-125M (12 x 768),
GPT-Neo-1.3B (24 x 2048), Llama-2-7B (32 x 4096) and a 70B Llama shape (80 x 8192), at world
sizes 1, 8 and 64 with 8 ranks per node, every rank holding every layer and with
``shard_layers=True`` (each rank its own layers): the device's
planned peak (one fp64 accumulation buffer per layer + the update workspace), the host bytes
per rank and per node.

Part 2 (measured here): one flush at d = 4096, a buffer of 20,480 rows merged into host totals
that already hold 20,480 others (a window's second flush: its first takes the host copy itself
as the totals, on a CPU the buffer object, at no cost), median of ``--reps``; on a CPU the host
copy is the buffer itself, so this is the merge's shift algebra (one rank-2 GEMM pass over the
d x d sums) and the buffer's reset: per layer, and for the 32 layers of a 7B model.

Usage::

    python benchmarks/memory.py [--reps 5] [--skip-flush] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json

from gsam_monitor import memory_report
from gsam_monitor.monitor.window import Window
from gsam_monitor.stats import LayerStats

GIB = 2**30
WORLDS = (1, 8, 64)
RANKS_PER_NODE = 8


def shapes() -> dict[str, torch.nn.Module]:
    """The models on the meta device, by name."""
    import transformers as tr

    def neo(layers: int, d: int) -> tr.PretrainedConfig:
        return tr.GPTNeoConfig(
            hidden_size=d, num_layers=layers, num_heads=16, attention_types=[[["global", "local"], layers // 2]],
            vocab_size=50257, max_position_embeddings=2048,
        )

    def llama(layers: int, d: int, ffn: int, kv: int) -> tr.PretrainedConfig:
        return tr.LlamaConfig(
            hidden_size=d, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=d // 128,
            num_key_value_heads=kv, vocab_size=32000,
        )

    configs = {
        "gpt-neo-125M (12 x 768)": (tr.GPTNeoForCausalLM, neo(12, 768)),
        "gpt-neo-1.3B (24 x 2048)": (tr.GPTNeoForCausalLM, neo(24, 2048)),
        "llama-2-7B (32 x 4096)": (tr.LlamaForCausalLM, llama(32, 4096, 11008, 32)),
        "llama-70B (80 x 8192)": (tr.LlamaForCausalLM, llama(80, 8192, 28672, 8)),
    }
    out = {}
    with torch.device("meta"):
        for name, (cls, config) in configs.items():
            out[name] = cls(config)
    return out


def plan_table() -> dict[str, dict[str, dict[str, float]]]:
    results: dict[str, dict[str, dict[str, float]]] = {}
    print(f"{'model':26s} {'ranks':>5s} {'layers':>12s} {'device/rank':>12s} {'host/rank':>10s} {'host/node':>10s}")
    for name, model in shapes().items():
        results[name] = {}
        for world in WORLDS:
            for shard in (False, True):
                if shard and world == 1:
                    continue
                plan = memory_report(model, world, ranks_per_node=RANKS_PER_NODE, compute={"shard_layers": shard})
                row = {
                    "device_gib": plan["device_bytes"] / GIB,
                    "host_gib": plan["host_bytes"] / GIB,
                    "host_per_node_gib": plan["host_bytes_per_node"] / GIB,
                    "layers": len(plan["layers"]),
                }
                results[name][f"{world}{' sharded' if shard else ''}"] = row
                layers = f"{row['layers']}{' (shard)' if shard else ''}"
                print(
                    f"{name:26s} {world:5d} {layers:>12s} {row['device_gib']:9.3f} GiB {row['host_gib']:6.2f} GiB "
                    f"{row['host_per_node_gib']:6.1f} GiB"
                )
    return results


def flush_cost(reps: int) -> dict[str, float]:
    d, rows = 4096, 40_960
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=gen, dtype=torch.float64)
    times = []
    for _ in range(reps):
        window = Window()
        window.buffer = LayerStats(d)
        window.buffer.update(x[: rows // 2])
        window.flush()  # the first flush: on the host the buffer itself becomes the totals
        window.buffer = LayerStats(d)  # what the next rows allocate
        window.buffer.update(x[rows // 2 :])
        start = time.perf_counter()
        window.flush()
        times.append(time.perf_counter() - start)
    per_layer = statistics.median(times)
    out = {"d": d, "per_layer_s": per_layer, "per_log_32_layers_s": 32 * per_layer, "spread_s": max(times) - min(times)}
    print(
        f"flush at d = {d}: {per_layer * 1e3:.0f} ms per layer (spread {out['spread_s'] * 1e3:.0f} ms over {reps}), "
        f"{out['per_log_32_layers_s']:.1f} s per log for 32 layers"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-flush", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}")
    results: dict[str, object] = {"plan": plan_table()}
    if not args.skip_flush:
        results["flush"] = flush_cost(args.reps)
    if args.json is not None:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
