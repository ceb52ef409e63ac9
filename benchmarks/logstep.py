"""The logging step of one layer: ``metrics.compute`` against one fp64 ``eigvalsh``.

For each d, rows ``torch.randn(2d, d)`` (fp64, full rank) fill a ``LayerStats``, and this
times, as the median of ``--reps`` runs (one run from d = 2048 up):

* ``eigvalsh``: one fp64 ``torch.linalg.eigvalsh`` of the d x d covariance (the unit);
* ``default``: ``compute(stats)``, the default metrics without a reference;
* ``default+ref``: what a monitor's log does with ``heldout_loglik``: the default metrics
  against the previous window's cached ``GaussianFit``, making this window's fit
  (``with_fit=True``) for the next log;
* ``default+ref (refactorised)`` (``--refactorised``): the reference passed as a window,
  factorised again at every log (the cost before fits were kept);
* ``first-ref default+drift`` (``--fixed``): what a log does under ``reference="first"``:
  the default metrics and the drift metrics against a fixed reference's fit, whose
  eigenvectors were made once (at its first use, outside the timing); no fit of this window;
* one row per metric: ``compute(stats, fit, names=[metric])`` (``--per-metric``; with
  ``--fixed`` the drift metrics too, each alone against the fixed fit);
* the pieces (``--components``): ``cholesky``, a dense ``solve_triangular`` with d right-hand
  sides, the held-out score's solve of a triangular right-hand side by column blocks,
  ``cholesky_inverse`` and ``eigh`` of the same covariance.

Each is printed in seconds and as a ratio to ``eigvalsh``; ``--json`` writes the table.

Usage::

    python benchmarks/logstep.py                               # d = 384, 1024, 2048, 4096
    python benchmarks/logstep.py --dims 384 1024 --per-metric --json results/logstep.json
    python benchmarks/logstep.py --components --refactorised
    python benchmarks/logstep.py --dims 4096 --fixed --per-metric
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch
from _common import median_seconds, write_json

from gsam_monitor import LayerStats, metrics
from gsam_monitor.metrics.scores import _lower_solve_sq_norm

CPU = torch.device("cpu")


def _window(d: int, seed: int) -> LayerStats:
    gen = torch.Generator().manual_seed(seed)
    stats = LayerStats(d, higher_moments=True)
    stats.update(torch.randn(2 * d, d, dtype=torch.float64, generator=gen))
    return stats


def measure(
    d: int, reps: int, per_metric: bool, refactorised: bool, components: bool = False, fixed: bool = False
) -> dict:
    """Seconds of each variant at ``d`` (see the module docstring)."""
    reps = reps if d < 2048 else 1
    warm = 1 if d < 2048 else 0
    stats, previous = _window(d, 0), _window(d, 1)
    fit = metrics.compute(previous, names=["n"], with_fit=True).fit
    cov = stats.covariance().to(torch.float64)
    row: dict = {"d": d, "rows": 2 * d, "reps": reps}
    row["eigvalsh"] = median_seconds(lambda: torch.linalg.eigvalsh(cov), CPU, reps, warm)
    row["default"] = median_seconds(lambda: metrics.compute(stats), CPU, reps, warm)
    row["default+ref"] = median_seconds(lambda: metrics.compute(stats, fit, with_fit=True), CPU, reps, warm)
    if fixed:
        first = metrics.GaussianFit.from_stats(previous)
        first.eigenvectors()  # made once per run, at the reference's first use
        names = [*metrics.DEFAULT_METRICS, *metrics.DRIFT_METRICS]
        row["first-ref default+drift"] = median_seconds(
            lambda: metrics.compute(stats, first, names=names), CPU, reps, warm
        )
    if refactorised:
        row["default+ref (refactorised)"] = median_seconds(lambda: metrics.compute(stats, previous), CPU, reps, warm)
    if components:
        chol = torch.linalg.cholesky(cov)
        row["cholesky"] = median_seconds(lambda: torch.linalg.cholesky(cov), CPU, reps, warm)
        row["solve_triangular"] = median_seconds(
            lambda: torch.linalg.solve_triangular(chol, chol, upper=False), CPU, reps, warm
        )
        row["solve (column blocks)"] = median_seconds(lambda: _lower_solve_sq_norm(chol, chol), CPU, reps, warm)
        row["cholesky_inverse"] = median_seconds(lambda: torch.cholesky_inverse(chol), CPU, reps, warm)
        row["eigh"] = median_seconds(lambda: torch.linalg.eigh(cov), CPU, reps, warm)
    if per_metric:
        names = [m for m in metrics.DEFAULT_METRICS if m not in ("n", "d", "nonfinite")]
        row["per_metric"] = {
            m: median_seconds(lambda m=m: metrics.compute(stats, fit, names=[m]), CPU, reps, warm) for m in names
        }
        if fixed:
            for m in metrics.DRIFT_METRICS:
                row["per_metric"][m] = median_seconds(
                    lambda m=m: metrics.compute(stats, first, names=[m]), CPU, reps, warm
                )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 1024, 2048, 4096])
    parser.add_argument("--reps", type=int, default=3, help="timed runs below d = 2048 (one from 2048 up)")
    parser.add_argument("--per-metric", action="store_true", help="also time each metric asked for alone")
    parser.add_argument("--refactorised", action="store_true", help="also time the reference refactorised per log")
    parser.add_argument("--components", action="store_true", help="also time the factorisations themselves")
    parser.add_argument("--fixed", action="store_true", help="also time a log against a fixed reference")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"# {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, load {load:.2f}")
    rows = []
    for d in args.dims:
        row = measure(d, args.reps, args.per_metric, args.refactorised, args.components, args.fixed)
        rows.append(row)
        unit = row["eigvalsh"]
        timed = [k for k in row if k not in ("d", "rows", "reps", "per_metric")]
        cells = [f"{k} {row[k]:8.3f} s (x{row[k] / unit:5.2f})" for k in timed]
        print(f"d={d:5d}  " + "   ".join(cells), flush=True)
        for m, sec in row.get("per_metric", {}).items():
            print(f"    {m:24s} {sec:8.4f} s (x{sec / unit:5.3f} eigvalsh)", flush=True)
    print(f"# load after {os.getloadavg()[0]:.2f}")
    write_json(args.json, {"machine": platform.machine(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "load_before": load, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
