"""Agreement of every streamed metric with a two-pass fp64 numpy/scipy/scikit-learn value.

Data sets: Gaussian, Student t (3 df), logistic, low rank plus noise, badly centred
(mean 1e4 × std), LayerNorm'd rows (rank d − 1), N < d, and fp16 / bf16 inputs. Each is fed to
``LayerStats`` in uneven batches; the script prints the max relative error per metric over
all data sets.

Usage::

    python benchmarks/accuracy.py [--json results/accuracy.json]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import scipy.stats
import torch
from _common import write_json

from gsam_monitor import LayerStats, MardiaAccumulator, metrics

LOG_2PI = math.log(2 * math.pi)


def datasets(rng: np.random.Generator) -> dict[str, np.ndarray]:
    d = 64
    a = rng.standard_normal((d, d))
    ln = rng.standard_normal((3000, d)) @ a
    ln = ln - ln.mean(1, keepdims=True)
    ln = ln / np.sqrt(ln.var(1, keepdims=True) + 1e-5)
    return {
        "gaussian": rng.standard_normal((3000, d)) @ a + 2,
        "student_t3": rng.standard_t(3, size=(3000, d)),
        "logistic": rng.logistic(size=(3000, d)) * np.linspace(0.1, 10, d),
        "lowrank_noise": rng.standard_normal((3000, 5)) @ rng.standard_normal((5, d)) * 10
        + 1e-3 * rng.standard_normal((3000, d)),
        "badly_centred": 1e4 + rng.standard_normal((3000, d)),
        "layernorm": ln,
        "n_below_d": rng.standard_normal((40, d)),
        "fp16": torch.from_numpy(rng.standard_normal((3000, d)) @ a).half().double().numpy(),
        "bf16": torch.from_numpy(rng.standard_normal((3000, d)) @ a).bfloat16().double().numpy(),
    }


def reference(x: np.ndarray, powerlaw_range=(10, 150)) -> dict[str, float]:
    """Two-pass fp64 values, written from the textbook definitions."""
    n, d = x.shape
    cov = np.cov(x.T, ddof=0)
    lam = np.sort(np.linalg.eigvalsh(cov))[::-1]
    tol = 1e6 * np.finfo(np.float64).eps * np.abs(lam).max()
    sup = lam[lam > tol]
    r = len(sup)
    out = {"rank": r}
    out["gsam"] = math.log(n) - 0.5 * r * (1 + LOG_2PI) - 0.5 * float(np.log(sup).sum())
    if r == d:
        out["gsam"] = math.log(n) + float(scipy.stats.multivariate_normal(x.mean(0), cov).logpdf(x).mean())
    sd = x.std(0)
    z = (x - x.mean(0)) / sd
    lz = np.linalg.eigvalsh(np.cov(z.T, ddof=0))
    lz = lz[lz > 1e6 * np.finfo(np.float64).eps * lz.max()]
    out["gsam_correlation"] = math.log(n) - 0.5 * len(lz) * (1 + LOG_2PI) - 0.5 * float(np.log(lz).sum())
    from sklearn.covariance import OAS

    oas = OAS().fit(x).covariance_
    out["gsam_oas"] = math.log(n) + float(scipy.stats.multivariate_normal(x.mean(0), oas).logpdf(x).mean())
    lp = np.clip(lam, 0, None)
    p = lp[lp > 0] / lp.sum()
    out["effective_rank"] = float(np.exp(-(p * np.log(p)).sum()))
    out["participation_ratio"] = float(lp.sum() ** 2 / (lp**2).sum())
    out["condition_number"] = float(sup[0] / sup[-1])
    out["top1_variance_fraction"] = float(lp[0] / lp.sum())
    hi = min(powerlaw_range[1], r)
    k = np.arange(powerlaw_range[0], hi + 1)
    out["powerlaw_alpha"] = -scipy.stats.linregress(np.log(k), np.log(lam[k - 1])).slope
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = u.sum(0)
    out["anisotropy"] = float((s @ s - n) / (n * (n - 1)))
    out["mean_kurtosis"] = float(np.mean(scipy.stats.kurtosis(x, axis=0, bias=True)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    worst: dict[str, tuple[float, str]] = {}
    rank_agree = 0
    sets = datasets(rng)
    for name, x in sets.items():
        s = LayerStats(x.shape[1])
        for part in np.array_split(x, 7):
            s.update(torch.from_numpy(np.ascontiguousarray(part)))
        got = metrics.compute(s)
        ref = reference(x)
        rank_agree += got["rank"] == ref["rank"]
        for k, v in ref.items():
            if k == "rank":
                continue
            err = abs(got[k] - v) / max(abs(v), 1e-300)
            if err >= worst.get(k, (-1.0, ""))[0]:
                worst[k] = (err, name)
    # Mardia's b2 against numpy on one heavy-tailed set.
    x = sets["student_t3"]
    s = LayerStats(x.shape[1])
    s.update(torch.from_numpy(x))
    acc = MardiaAccumulator(s)
    acc.update(torch.from_numpy(x))
    zc = x - x.mean(0)
    b2 = float(np.mean(np.einsum("ij,jk,ik->i", zc, np.linalg.inv(np.cov(x.T, ddof=0)), zc) ** 2))
    worst["mardia_b2"] = (abs(acc.b2() - b2) / b2, "student_t3")
    print(f"rank equal to scipy's rule on {rank_agree}/{len(sets)} data sets")
    print(f"{'metric':24s} {'max rel err':>12s}  worst data set")
    for k, (e, where) in sorted(worst.items()):
        print(f"{k:24s} {e:12.2e}  {where}")
    write_json(args.json, {"rank_agree": rank_agree, "n_sets": len(sets),
                           "max_rel_err": {k: v[0] for k, v in worst.items()}})


if __name__ == "__main__":
    main()
