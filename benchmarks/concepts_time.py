"""Wall time of ``python -m gsam_monitor.eval --analyses concepts``, phase by phase.

Runs the command in a child process with ``-v`` and reads its phase timings from the log
(SAE training, firing pass, per-layer analyses), its wall time and peak resident memory
(``os.wait4``'s ``ru_maxrss``), and the 1-minute load average before and after (the machine
is shared: a load above the core count means the numbers are inflated).

Usage::

    python benchmarks/concepts_time.py                       # the default: middle block of MiniLM
    python benchmarks/concepts_time.py --args "--layers all" --json results/concepts_time.json
    python benchmarks/concepts_time.py --args "--sae-seeds 3"  # three SAEs per layer
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from _common import write_json

PHASES = {
    "sae_training": re.compile(r"concepts: SAE training ([\d.]+) s"),
    "firing_pass": re.compile(r"concepts: firing pass ([\d.]+) s"),
}
LAYER = re.compile(r"concepts: layer (\d+) analyses ([\d.]+) s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--args", default="", help="extra arguments for the eval, e.g. '--layers all'")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    command = [sys.executable, "-m", "gsam_monitor.eval", "--analyses", "concepts", "--device", "cpu", "-v",
               *shlex.split(args.args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    stderr = child.stderr.read() if child.stderr is not None else ""
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"the eval failed:\n{stderr[-3000:]}")
    phases = {name: float(m.group(1)) for name, rx in PHASES.items() if (m := rx.search(stderr))}
    layers = {int(m.group(1)): float(m.group(2)) for m in LAYER.finditer(stderr)}
    result = {
        "command": " ".join(command[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "load_1min_before": load_before,
        "load_1min_after": load_after,
        "phases_s": phases,
        "layer_analyses_s": layers,
    }
    print(f"# {result['command']}\n# {result['machine']}, load {load_before:.2f} before, {load_after:.2f} after")
    print(f"wall {wall:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB")
    for name, seconds in phases.items():
        print(f"  {name:<14} {seconds:7.1f} s")
    for layer, seconds in sorted(layers.items()):
        print(f"  layer {layer} analyses {seconds:7.1f} s")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
