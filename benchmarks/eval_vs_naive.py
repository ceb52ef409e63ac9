"""The eval's streaming token protocol against the naive approach, at growing corpus sizes.

* ``streaming``: ``gsam_monitor.eval`` 's token protocol (``run_token_protocol``): every layer's
  moments in a ``LayerStats`` (O(d²) memory), every metric of ``metrics.METRIC_NAMES``
  including Mardia's kurtosis from a second pass that replays the first pass's hidden states
  (kept in memory up to ``--max-memory``, beyond it in a temporary spill file; see
  ``gsam_monitor.eval.cache``). The last column says where they were kept.
* ``naive``: keep every non-padding hidden state of every layer (O(tokens·d) memory), then per
  layer ``np.cov`` and ``scipy.stats.multivariate_normal(..., allow_singular=True).logpdf`` of
  every row: GSAM = log N + mean log p(x_i).

Each (method, size) runs in its own process; the parent reads its wall time and peak resident
memory (``os.wait4``'s ``ru_maxrss``) and checks that both methods give the same last-layer
GSAM. Sentences are the bundled SST-2 dev set (872) repeated to the size asked for (cost
depends on token count, not on which sentences), or ``--corpus`` (a TSV with a ``sentence``
column, e.g. GLUE's SST-2 train.tsv).

Usage::

    python benchmarks/eval_vs_naive.py                        # sizes 300 3000 30000, MiniLM, CPU
    python benchmarks/eval_vs_naive.py --sizes 300 3000 --json results/eval_vs_naive.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _common import write_json

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _corpus(n: int, path: str | None):
    from gsam_monitor.eval.corpus import Corpus, load_corpus

    base = load_corpus(path or "sst2_dev")
    reps = math.ceil(n / len(base))
    sentences = (tuple(base.sentences) * reps)[:n]
    return Corpus(name=f"{base.name} x{n}", sentences=sentences, labels=None, sha256=base.sha256, path=base.path)


def child(method: str, n: int, model: str, batch_size: int, corpus_path: str | None,
          max_memory: str | None = None) -> dict:
    import numpy as np
    import scipy.stats
    import torch

    from gsam_monitor.eval.models import load_model
    from gsam_monitor.eval.protocols import _batches, run_token_protocol

    loaded = load_model(model, device="cpu")
    corpus = _corpus(n, corpus_path)
    extra: dict = {}
    t0 = time.perf_counter()
    if method == "streaming":
        kwargs = {} if max_memory is None else {"max_memory": max_memory}
        result = run_token_protocol(loaded, corpus, batch_size=batch_size, **kwargs)
        gsam = [layer["gsam"] for layer in result.layers]
        tokens = result.layers[-1]["n"]
        extra["second_pass"] = result.second_pass
    else:
        stored: list[list[np.ndarray]] = []
        with torch.no_grad():
            for inputs, _ in _batches(loaded, corpus, batch_size, None):
                hidden = loaded.model(**inputs, output_hidden_states=True).hidden_states
                keep = inputs["attention_mask"].bool()
                if not stored:
                    stored = [[] for _ in hidden]
                for layer, h in zip(stored, hidden, strict=True):
                    layer.append(h[keep].float().numpy().copy())
        gsam = []
        for layer in stored:
            x = np.concatenate(layer).astype(np.float64)
            layer.clear()
            cov = np.cov(x, rowvar=False, bias=True)
            dist = scipy.stats.multivariate_normal(x.mean(0), cov, allow_singular=True)
            gsam.append(float(math.log(len(x)) + dist.logpdf(x).mean()))
            tokens = len(x)
            del x
    return {"method": method, "n": n, "tokens": int(tokens), "seconds_inside": time.perf_counter() - t0, "gsam": gsam,
            **extra}


def run_child(method: str, n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--sizes", str(n), "--model", args.model,
           "--batch-size", str(args.batch_size)]
    if args.corpus:
        cmd += ["--corpus", args.corpus]
    if args.max_memory is not None:
        cmd += ["--max-memory", args.max_memory]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{method} at {n} sentences failed with exit code {proc.returncode}")
    row = json.loads(out.decode().strip().splitlines()[-1])
    row["wall_s"] = wall
    row["peak_rss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    # CPU seconds: less sensitive than wall time to other jobs on a shared machine.
    row["cpu_s"] = usage.ru_utime + usage.ru_stime
    return row


def _second_pass_note(info: dict) -> str:
    if not info:
        return "no second pass"
    return (f"pass 2: {info['replayed']} batches replayed ({info['where']}, "
            f"{info['bytes_in_memory'] / 1e6:.0f} MB in memory, {info['bytes_spilled'] / 1e6:.0f} MB spilled), "
            f"{info['rerun']} re-run")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 3000, 30000])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--corpus", default=None)
    parser.add_argument("--max-memory", default=None,
                        help="the streaming protocol's budget for kept hidden states (default: its own)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", choices=("streaming", "naive"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.sizes[0], args.model, args.batch_size, args.corpus,
                               args.max_memory)))
        return []
    import torch

    threads = torch.get_num_threads()
    print(f"# {args.model} on cpu ({platform.machine()}), torch {torch.__version__}, {threads} threads, "
          f"batch {args.batch_size}")
    print(f"{'sentences':>9} {'tokens':>9} {'stream s':>9} {'naive s':>9} {'time x':>7} "
          f"{'stream MB':>10} {'naive MB':>10} {'mem x':>7} {'max rel diff gsam':>18} "
          f"{'stream cpu s':>12} {'naive cpu s':>11}  second pass")
    rows = []
    for n in args.sizes:
        s = run_child("streaming", n, args)
        v = run_child("naive", n, args)
        diff = max(abs(a - b) / abs(b) for a, b in zip(s["gsam"], v["gsam"], strict=True))
        row = {
            "sentences": n,
            "tokens": s["tokens"],
            "streaming": s,
            "naive": v,
            "time_ratio_naive_over_streaming": v["wall_s"] / s["wall_s"],
            "memory_ratio_naive_over_streaming": v["peak_rss_mb"] / s["peak_rss_mb"],
            "max_rel_diff_gsam": diff,
        }
        rows.append(row)
        print(f"{n:>9} {s['tokens']:>9} {s['wall_s']:>9.1f} {v['wall_s']:>9.1f} "
              f"{row['time_ratio_naive_over_streaming']:>7.2f} {s['peak_rss_mb']:>10.0f} {v['peak_rss_mb']:>10.0f} "
              f"{row['memory_ratio_naive_over_streaming']:>7.2f} {diff:>18.2e} "
              f"{s['cpu_s']:>12.1f} {v['cpu_s']:>11.1f}  "
              f"{_second_pass_note(s.get('second_pass', {}))}", flush=True)
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
