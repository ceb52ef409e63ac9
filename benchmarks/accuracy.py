"""Agreement of every streamed metric with a two-pass fp64 numpy/scipy/scikit-learn value.

Data sets: Gaussian, Student t (3 df), logistic, low rank plus noise, badly centred
(mean 1e4 × std), LayerNorm'd rows (rank d − 1), N < d, and fp16 / bf16 inputs. Each is fed to
``LayerStats`` in uneven batches; the script prints the max relative error per metric over
all data sets.

``--precision`` prints instead the accuracy of every Gram product path (fp64, fp32, fp32
under bf16 autocast, and fp32 judged by the former λmax-relative rank rule, with an fp64
state; and fp32 products into an fp32 state, what MPS runs) on
MiniLM's layers (the hidden states of the 300 bundled sentences), a massive-activation
dimension, a mean 1e4 sd from the origin, a mean drifting 2000 sd per window (interval and
cumulative windows), and an ill-conditioned Gaussian: GSAM relative error, rank, and
covariance relative error against fp64 numpy two-pass; each path twice: straight into one
``LayerStats``, and through the monitor's path (``(window)``: an accumulation buffer per window
in the path's dtypes, flushed into fp64 host totals at each window's log). ``--error-model`` measures the fp32
product's errors against the model behind its rank tolerance (``metrics.PRODUCT_ERROR_FACTOR``).

Usage::

    python benchmarks/accuracy.py [--json results/accuracy.json]
    python benchmarks/accuracy.py --precision [--json results/precision.json]
    python benchmarks/accuracy.py --error-model
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import sys
from pathlib import Path

import numpy as np
import scipy.stats
import torch
from _common import write_json

from gsam_monitor import LayerStats, metrics
from gsam_monitor.metrics import MardiaAccumulator
from gsam_monitor.monitor.window import Window

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


def minilm_hidden_states() -> list[np.ndarray]:
    """Token hidden states of every MiniLM layer on the 300 bundled sentences (the tests' helper)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests/
    from tests.minilm_states import minilm_hidden_states as collect

    return collect()


def _gsam_rank(x: np.ndarray) -> tuple[float, int, np.ndarray]:
    """fp64 two-pass GSAM on scipy's support, its rank, and the MLE covariance."""
    cov = np.cov(x.T, ddof=0)
    lam = np.linalg.eigvalsh(cov)
    sup = lam[lam > 1e6 * np.finfo(np.float64).eps * lam.max()]
    gsam = math.log(len(x)) - 0.5 * len(sup) * (1 + LOG_2PI) - 0.5 * float(np.log(sup).sum())
    return gsam, len(sup), cov


PATHS = {
    "fp64 products": {"product_dtype": torch.float64},
    "fp32 products": {"product_dtype": torch.float32},
    "fp32 under bf16 autocast": {"product_dtype": torch.float32, "autocast": torch.bfloat16},
    "fp32, λmax rule (before)": {"product_dtype": torch.float32, "rank_rtol": 1e3 * float(np.finfo(np.float32).eps)},
    "fp32 state+products (MPS)": {"product_dtype": torch.float32, "state_dtype": torch.float32},
}


def _windows(rng: np.random.Generator) -> list[np.ndarray]:
    # Four windows of 2000 rows; the mean moves 2000 sd from each window to the next.
    a = rng.standard_normal((64, 64)) * 0.3
    return [(2000.0 * k + rng.standard_normal((2000, 64)) @ a).astype(np.float32) for k in range(4)]


def precision_sets(rng: np.random.Generator, minilm: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Each entry: the windows fed in turn; metrics of the last (interval) or of all."""
    n, d = 8192, 256
    massive = rng.standard_normal((n, d))
    massive[rng.random(n) < 0.004, 0] = 3000.0
    a = rng.standard_normal((64, 64)) * 0.5
    far = 1e4 + rng.standard_normal((8000, 64)) @ a
    ill = rng.standard_normal((4096, d)) @ rng.standard_normal((d, d)) * 0.1 + 3.0
    sets = {f"MiniLM layer {i}": [h] for i, h in enumerate(minilm)}
    sets["massive activation (d=256)"] = [massive.astype(np.float32)]
    sets["mean 1e4 sd from origin"] = [far.astype(np.float32)]
    sets["drifting mean, interval window"] = _windows(rng)
    sets["drifting mean, cumulative window"] = sets["drifting mean, interval window"]
    sets["ill-conditioned (cond ~6e5)"] = [ill.astype(np.float32)]
    return sets


def _fed(windows: list[np.ndarray], path: dict, cumulative: bool) -> LayerStats:
    """The rows straight into one ``LayerStats`` (in 8 updates per window)."""
    s = LayerStats(windows[0].shape[1], product_dtype=path["product_dtype"], state_dtype=path.get("state_dtype"))
    for k, w in enumerate(windows):
        if k and not cumulative:
            s.reset()  # an interval window: the next window's rows set the shift
        _feed(s, w, path)
        if cumulative:
            s.reshift_()  # what GSAMMonitor does at each log of a window that never resets
    return s


def _feed(s: LayerStats, w: np.ndarray, path: dict) -> None:
    ctx = torch.autocast("cpu", dtype=path["autocast"]) if "autocast" in path else contextlib.nullcontext()
    with ctx:
        for part in np.array_split(w, 8):
            s.update(torch.from_numpy(np.ascontiguousarray(part)))


def _through_window(windows: list[np.ndarray], path: dict, cumulative: bool) -> LayerStats:
    """The monitor's path: each window's rows into an accumulation buffer (the path's dtypes),
    flushed at its "log" into the fp64 host totals (``Window.flush``), which a cumulative window
    keeps and re-centres, an interval window restarts."""
    d = windows[0].shape[1]
    window = Window()
    for w in windows:
        if not cumulative:
            window.stats = None  # an interval window: the next one starts afresh
        window.buffer = LayerStats(d, product_dtype=path["product_dtype"], state_dtype=path.get("state_dtype"))
        _feed(window.buffer, w, path)
        window.flush(release=True)
        if cumulative:
            window.stats.reshift_()
    return window.stats


def precision_row(name: str, windows: list[np.ndarray], path: dict, *, via_window: bool = False) -> dict[str, float]:
    cumulative = name.endswith("cumulative window")
    s = _through_window(windows, path, cumulative) if via_window else _fed(windows, path, cumulative)
    x = np.vstack(windows if cumulative else windows[-1:]).astype(np.float64)
    gsam, rank, cov = _gsam_rank(x)
    got = metrics.compute(s, names=["gsam", "rank"], rank_rtol=path.get("rank_rtol"))
    return {
        "gsam_rel_err": abs(got["gsam"] - gsam) / abs(gsam),
        "rank": got["rank"],
        "rank_fp64_numpy": rank,
        "cov_rel_err": float(np.abs(s.covariance().numpy() - cov).max() / np.abs(cov).max()),
    }


def precision_table() -> dict[str, dict[str, dict[str, float]]]:
    sets = precision_sets(np.random.default_rng(0), minilm_hidden_states())
    out: dict[str, dict[str, dict[str, float]]] = {}
    print(f"{'data':34s} {'path':36s} {'GSAM rel err':>12s} {'rank':>11s} {'cov rel err':>11s}")
    for name, windows in sets.items():
        out[name] = {}
        for label, path in PATHS.items():
            for via_window in (False, True):
                tag = f"{label}{' (window)' if via_window else ''}"
                r = out[name][tag] = precision_row(name, windows, path, via_window=via_window)
                rank = f"{r['rank']}/{r['rank_fp64_numpy']}"
                print(f"{name:34s} {tag:36s} {r['gsam_rel_err']:12.1e} {rank:>11s} {r['cov_rel_err']:11.1e}")
    return out


def error_model() -> dict[str, dict[str, float]]:
    """The fp32 product's error against its model, per data set and rows per update:

    * ``entry``: max_ij |δC_ij| / (eps32 · sqrt(scale_i · scale_j)),
    * ``eig``: max |δλ| / bound over the directions fp64 resolves, bound = eps32 ·
      (Σ_i |v_i| · sqrt(scale_i))² (``metrics.eigenvalue_tolerance`` with c = 1),
    * ``null``: max |λ| / tolerance over the directions fp64 finds null (rounding noise;
      tolerance = max(bound, scipy's fp64 rule), as ``metrics.eigenvalue_tolerance``),
    * ``min_real``: min λ / bound over the resolved directions (below 1: dropped by c = 1).
    """
    eps = float(np.finfo(np.float32).eps)
    rng = np.random.default_rng(1)
    sets = {name: w[0] for name, w in precision_sets(rng, minilm_hidden_states()).items() if len(w) == 1}
    for dd in (128, 512):
        low = rng.standard_normal((8000, 64)) @ rng.standard_normal((64, dd))
        sets[f"rank 64 in d={dd}"] = low.astype(np.float32)
    ln = rng.standard_normal((8000, 256)) @ rng.standard_normal((256, 256))
    ln = (ln - ln.mean(1, keepdims=True)) / ln.std(1, keepdims=True)
    sets["LayerNorm'd, affine (d=256)"] = (ln * rng.uniform(0.5, 2, 256) + rng.standard_normal(256)).astype(np.float32)
    out: dict[str, dict[str, float]] = {}
    print(f"{'data':34s} {'rows/update':>11s} {'entry':>7s} {'eig':>7s} {'null':>9s} {'min_real':>9s}")
    for name, x in sets.items():
        for rows in (512, len(x)):
            s64, s32 = LayerStats(x.shape[1]), LayerStats(x.shape[1], product_dtype=torch.float32)
            for part in np.array_split(x, max(1, len(x) // rows)):
                s64.update(torch.from_numpy(np.ascontiguousarray(part)))
                s32.update(torch.from_numpy(np.ascontiguousarray(part)))
            scale = s32.product_scale().numpy()
            c64, c32 = s64.covariance().numpy(), s32.covariance().numpy()
            live = scale > 0
            entry = np.abs(c32 - c64)[np.ix_(live, live)] / (eps * np.sqrt(np.outer(scale[live], scale[live])))
            l64 = np.linalg.eigvalsh(c64)
            l32, v32 = np.linalg.eigh(c32)
            bound = eps * (np.abs(v32) * np.sqrt(scale)[:, None]).sum(0) ** 2
            real = l64 > 1e6 * np.finfo(np.float64).eps * l64.max()
            tol = np.maximum(bound, 1e6 * np.finfo(np.float64).eps * np.abs(l32).max())
            r = {
                "entry": float(entry.max()),
                "eig": float((np.abs(l32 - l64) / bound)[real].max()),
                "null": float((np.abs(l32) / tol)[~real].max()) if (~real).any() else math.nan,
                "min_real": float((l64 / bound)[real].min()),
            }
            out[f"{name}, {rows} rows per update"] = r
            print(f"{name:34s} {rows:11d} {r['entry']:7.2f} {r['eig']:7.3f} {r['null']:9.2e} {r['min_real']:9.3g}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--precision", action="store_true", help="the product paths' accuracy table")
    p.add_argument("--error-model", action="store_true", help="measure the fp32 error model's factor c")
    args = p.parse_args()
    if args.precision or args.error_model:
        print(f"# {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
        result = {"precision": precision_table()} if args.precision else {}
        if args.error_model:
            result["error_model"] = error_model()
        write_json(args.json, result)
        return
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
