"""Every logged metric recomputed from the activation rows themselves, in fp64 numpy/scipy/
scikit-learn (two-pass, textbook formulas; nothing here imports gsam_monitor), and a check
of a monitor's logged record against them."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pytest
import scipy.stats
from sklearn.covariance import oas

from tests.reference import gsam_pdet, mle_cov, scipy_rank_tol

# Metrics recomputed here; each logged as "{metric}/{layer}" by the monitor.
CHECKED = (
    "n",
    "rank",
    "gsam",
    "gsam_oas",
    "gsam_correlation",
    "effective_rank",
    "participation_ratio",
    "condition_number",
    "top1_variance_fraction",
    "mean_kurtosis",
    "anisotropy",
)


def reference_metrics(x: np.ndarray, previous: np.ndarray | None = None) -> dict[str, float]:
    """The metrics of the rows ``x`` (n, d); ``heldout_loglik`` too when the previous
    window's rows are given."""
    x = np.asarray(x, dtype=np.float64)
    n, _ = x.shape
    gsam, rank = gsam_pdet(x)
    lam = np.linalg.eigvalsh(mle_cov(x))[::-1]
    support = lam[lam > scipy_rank_tol(lam)]
    pos = np.clip(lam, 0.0, None)
    p = pos[pos > 0] / pos.sum()
    shrunk, _ = oas(x)  # scikit-learn's OAS estimate of the covariance
    oas_ll = scipy.stats.multivariate_normal(x.mean(0), shrunk).logpdf(x)
    sd = x.std(0)
    live = sd > 0
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = unit @ unit.T
    out = {
        "n": float(n),
        "rank": float(rank),
        "gsam": gsam,
        "gsam_oas": math.log(n) + float(oas_ll.mean()),
        "gsam_correlation": gsam_pdet((x[:, live] - x[:, live].mean(0)) / sd[live])[0],
        "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
        "participation_ratio": float(pos.sum() ** 2 / (pos**2).sum()),
        "condition_number": float(support.max() / support.min()),
        "top1_variance_fraction": float(pos.max() / pos.sum()),
        "mean_kurtosis": float(np.mean(scipy.stats.kurtosis(x[:, live], axis=0, fisher=True, bias=True))),
        "anisotropy": float((cos.sum() - np.trace(cos)) / (n * (n - 1))),  # mean cosine over pairs i != j
    }
    if previous is not None:
        ref = scipy.stats.multivariate_normal(previous.mean(0), mle_cov(previous), allow_singular=True)
        out["heldout_loglik"] = float(ref.logpdf(x).mean()) / gsam_pdet(previous)[1]
    return out


def assert_logged_equal(
    logged: Mapping[str, float],
    layer: str,
    x: np.ndarray,
    previous: np.ndarray | None = None,
    *,
    rtol: float = 1e-9,
    names: tuple[str, ...] = CHECKED,
) -> None:
    """Every checked metric the monitor logged for ``layer`` equals the reference on ``x``."""
    want = reference_metrics(x, previous)
    keys = [*names, *(["heldout_loglik"] if previous is not None else [])]
    for metric in keys:
        key = f"{metric}/{layer}"
        assert key in logged, f"{key} was not logged (logged: {sorted(logged)[:8]}...)"
        assert logged[key] == pytest.approx(want[metric], rel=rtol, abs=rtol * 1e-3), key
