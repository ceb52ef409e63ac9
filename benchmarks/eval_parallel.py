"""The eval under ``torchrun`` against one process: wall time, peak memory per rank, equality.

For each corpus (the default ``sst2_300_filtered``, and the first ``--sentences`` sentences of the
bundled SST-2 train split written to a text file), ``python -m gsam_monitor.eval`` runs once in
one process and once under ``torchrun --standalone --nproc-per-node N`` (gloo, CPU), each in its
own process tree. The parent reads the wall time and the peak resident memory of the largest
process in the tree (``os.wait4``'s ``ru_maxrss``: under torchrun, the largest rank) and checks
that the two result files agree (rtol 1e-9 on every layer's metrics, ``n`` equal).

Threads: the one-process run uses torch's default (one per core); under torchrun each rank gets
``OMP_NUM_THREADS=1`` (torchrun's own default), so both use the machine's cores.

Usage::

    python benchmarks/eval_parallel.py                       # MiniLM, 300 and 3,000 sentences, 2 ranks
    python benchmarks/eval_parallel.py --sentences 1000 --ranks 2 --json results/eval_parallel.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import write_json

REPO = Path(__file__).resolve().parents[1]


def run(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of the largest process of the command's tree."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def max_relative_difference(a: dict, b: dict) -> float:
    worst = 0.0
    for la, lb in zip(a["models"][0]["layers"], b["models"][0]["layers"], strict=True):
        if la["n"] != lb["n"] or la["rank"] != lb["rank"]:
            raise SystemExit(f"layer {la['index']}: n or rank differ: {la['n']}/{lb['n']}, {la['rank']}/{lb['rank']}")
        for key, value in la.items():
            if isinstance(value, float) and math.isfinite(value):
                worst = max(worst, abs(value - lb[key]) / max(abs(value), 1e-12))
    return worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--sentences", type=int, default=3000, help="size of the larger corpus (default 3000)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from gsam_monitor.eval.corpus import load_corpus

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"):
        env.pop(var, None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        large = work / f"sst2_train_{args.sentences}.txt"
        large.write_text("\n".join(load_corpus("sst2_train").sentences[: args.sentences]) + "\n", encoding="utf-8")
        print(f"{'corpus':>22} {'ranks':>5} {'wall s':>8} {'peak MiB/rank':>14} {'speed-up':>9} {'max rel diff':>13}")
        for corpus in ("sst2_300_filtered", str(large)):
            base = ["--model", args.model, "--corpus", corpus, "--device", "cpu", "--quiet"]
            one_wall, one_rss = run([sys.executable, "-m", "gsam_monitor.eval", *base, "--output", "one.json"],
                                    work, env)
            many_wall, many_rss = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       f"--nproc-per-node={args.ranks}", "-m", "gsam_monitor.eval", *base,
                                       "--output", "many.json"], work, env)
            one, many = (json.loads((work / f).read_text()) for f in ("one.json", "many.json"))
            diff = max_relative_difference(one, many)
            name = Path(corpus).stem if os.sep in corpus else corpus
            sentences = many["parallel"]["sentences_per_rank"]
            for ranks, wall, rss in ((1, one_wall, one_rss), (args.ranks, many_wall, many_rss)):
                print(f"{name:>22} {ranks:>5} {wall:8.1f} {rss:14.0f} {one_wall / wall:9.2f} {diff:13.1e}")
            rows.append({"corpus": name, "n_sentences": sum(sentences), "sentences_per_rank": sentences,
                         "one_process": {"wall_s": one_wall, "peak_rss_mib": one_rss},
                         "torchrun": {"ranks": args.ranks, "wall_s": many_wall, "peak_rss_mib_per_rank": many_rss},
                         "speedup": one_wall / many_wall, "max_relative_difference": diff})
            if diff > 1e-9:
                raise SystemExit(f"{name}: the torchrun result differs from one process by {diff:.2e} > 1e-9")
    write_json(args.json, {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "model": args.model,
                           "rows": rows})


if __name__ == "__main__":
    main()
