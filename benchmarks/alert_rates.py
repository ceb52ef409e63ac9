"""False alerts on stationary series, and the delay to a slow rise, for each alert method.

Every rule watches one metric's logged series (``AlertEngine``, the monitor's own engine): here
synthetic series, so that the rates are those of the rules themselves, not of a model. Stationary:
i.i.d. Gaussian and Student-t (3 degrees of freedom: heavy tails) values around 1 with sd 0.05.
Slow rise: the same Gaussian series rising by ``--slope`` sd per log after the 10-log warm-up.
The relative floor is off (``min_relative=0``) and the absolute floor is one tenth of the sd, so
that the rules' own statistics decide.

    python benchmarks/alert_rates.py                  # 200 series of 1,000 logs per kind
    python benchmarks/alert_rates.py --series 50 --out results/alert_rates.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from gsam_monitor import AlertRule
from gsam_monitor.monitor.alerts import AlertEngine

SD = 0.05
RULES = {
    "band 6 MAD (default)": {"method": "band", "threshold": 6.0},
    "fixed 6 MAD": {"method": "fixed", "threshold": 6.0},
    "fixed 8 MAD": {"method": "fixed", "threshold": 8.0},
    "cusum h=8, k=0.5": {"method": "cusum", "threshold": 8.0, "drift": 0.5},
    "cusum h=16, k=1": {"method": "cusum", "threshold": 16.0, "drift": 1.0},
}


def _alerts(fields: dict, values: np.ndarray) -> list[int]:
    rule = AlertRule("anisotropy", "up", min_relative=0.0, min_absolute=0.1 * SD, **fields)
    engine = AlertEngine([rule])
    out = []
    for i, v in enumerate(values):
        out += [a["step"] for a in engine.observe(i, "layer", "train", {"anisotropy": float(v)})]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=int, default=200, help="series per kind")
    parser.add_argument("--logs", type=int, default=1000, help="logs per stationary series")
    parser.add_argument("--slope", type=float, default=0.05, help="rise per log, in sd, after the warm-up")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    gauss = [1.0 + SD * rng.standard_normal(args.logs) for _ in range(args.series)]
    heavy = [1.0 + SD * rng.standard_t(3, args.logs) / np.sqrt(3.0) for _ in range(args.series)]
    rising = []
    for _ in range(args.series):
        x = 1.0 + SD * rng.standard_normal(400)
        x[10:] += args.slope * SD * np.arange(1, 391)
        rising.append(x)
    results = {}
    start = time.perf_counter()
    print(f"{'rule':<22} {'false / 1k logs (gauss)':>24} {'(t3)':>8} {'rise: median delay':>19} {'missed':>7}")
    for name, fields in RULES.items():
        total = args.series * args.logs
        per_k = [1000.0 * sum(len(_alerts(fields, s)) for s in kind) / total for kind in (gauss, heavy)]
        delays = [next((s - 10 for s in _alerts(fields, x) if s >= 10), None) for x in rising]
        found = [d for d in delays if d is not None]
        median = float(np.median(found)) if found else float("nan")
        results[name] = {"false_per_1000_gauss": per_k[0], "false_per_1000_t3": per_k[1],
                         "rise_median_delay_logs": median, "rise_missed": len(delays) - len(found)}
        print(f"{name:<22} {per_k[0]:>24.2f} {per_k[1]:>8.2f} {median:>19.1f} {len(delays) - len(found):>7}")
    print(f"# {args.series} series per kind, {args.logs} stationary logs each, rise {args.slope} sd per log; "
          f"{time.perf_counter() - start:.0f} s")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
