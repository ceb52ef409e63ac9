"""Soak test (issue 9, item 4): a long run keeps its memory constant and its numbers exact.

Three monitors (interval windows with held-out fits, a cumulative window, an EMA window) watch
the same model for ``GSAM_SOAK_STEPS`` optimizer steps (default 500, what CI runs; the full
soak is ``GSAM_SOAK_STEPS=10000``). After a warm-up of two windows (statistics, held-out fits,
workspaces and generators allocated), the number of live tensors must not change, nor the
number of Python objects the garbage collector tracks (to 50), and the memory Python allocates
(tracemalloc) must stay under a bound that does not depend on the number of steps; and the last
logs must equal fp64 numpy on the same rows to 1e-9, with the cumulative window holding every
one of the run's rows.
"""

from __future__ import annotations

import gc
import math
import os
import tracemalloc
import warnings

import numpy as np
import pytest
import scipy.stats
import torch

from gsam_monitor import CollectOptions, GSAMMonitor, WindowOptions
from tests.reference import gsam_pdet, mle_cov, scipy_rank_tol
from tests.tiny_models import Stack

STEPS = int(os.environ.get("GSAM_SOAK_STEPS", "500"))
EVERY = 50
D, B, T = 8, 2, 4
HALF_LIFE = 25.0


class LastWrite:
    """A sink that keeps only its latest write (so the test itself does not grow)."""

    def __init__(self) -> None:
        self.step = -1
        self.metrics: dict[str, float] = {}
        self.n_writes = 0
        self.all_finite = True

    def write(self, metrics: dict[str, float], step: int) -> None:
        self.step, self.metrics = step, dict(metrics)
        self.n_writes += 1
        self.all_finite = self.all_finite and all(math.isfinite(v) for v in metrics.values())


def _live_counts() -> tuple[int, int]:
    gc.collect()
    objects = gc.get_objects()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on deprecated lazy module attributes warns
        return len(objects), sum(1 for o in objects if isinstance(o, torch.Tensor))


def _weighted_gsam(x: np.ndarray, w: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(n, gsam, mean, cov) of weighted rows: the EMA window's definition, written out."""
    n = float(w.sum())
    mean = (w[:, None] * x).sum(0) / n
    xc = x - mean
    cov = (w[:, None] * xc).T @ xc / n
    lam = np.linalg.eigvalsh(cov)
    lam = lam[lam > scipy_rank_tol(lam)]
    gsam = math.log(n) - 0.5 * lam.size * (1 + math.log(2 * math.pi)) - 0.5 * float(np.log(lam).sum())
    return n, gsam, mean, cov


@pytest.mark.slow
def test_soak_constant_memory_and_exact_numbers() -> None:
    steps = max(STEPS, 4 * EVERY) // EVERY * EVERY
    rng = np.random.default_rng(2024)
    mix = rng.standard_normal((D, D))
    # Far from the origin and drifting: the shifted sums must stay exact over the whole run.
    data = rng.standard_normal((steps, B, T, D)) @ mix + 1e3 + np.linspace(0, 5, steps)[:, None, None, None]
    mask = rng.random((steps, B, T)) > 0.2
    mask[:, 0, 0] = True
    nan_steps = np.arange(7, steps, 97)  # now and then a NaN row that is not padding
    data[nan_steps, 1, 1, 3] = np.nan
    mask[nan_steps, 1, 1] = True
    mask_t = torch.from_numpy(mask.astype(np.int64))
    data_t = torch.from_numpy(data)

    model = Stack(dim=D, depth=2)
    sinks = {"interval": LastWrite(), "cumulative": LastWrite(), "ema": LastWrite()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        monitors = {
            "interval": GSAMMonitor(
                model,
                every_n_steps=EVERY,
                collection=CollectOptions(steps=None, max_tokens_per_layer=None),
                sinks=[sinks["interval"]],
            ),
            "cumulative": GSAMMonitor(
                model,
                every_n_steps=EVERY,
                windows=WindowOptions(kind="cumulative"),
                collection=CollectOptions(steps=None, max_tokens_per_layer=None),
                metrics=["gsam", "rank", "n", "nonfinite", "mean_kurtosis"],
                sinks=[sinks["cumulative"]],
            ),
            "ema": GSAMMonitor(
                model,
                every_n_steps=EVERY,
                windows=WindowOptions(kind="ema", ema_half_life=HALF_LIFE),
                collection=CollectOptions(steps=None, max_tokens_per_layer=None),
                metrics=["gsam", "rank", "n"],
                sinks=[sinks["ema"]],
            ),
        }
    for monitor in monitors.values():
        monitor.attach()

    def run(first: int, last: int) -> None:
        # The NaN rows' one warning is tested elsewhere; here it would only clutter the output.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "GSAMMonitor: rows holding NaN/Inf", RuntimeWarning)
            for t in range(first, last):
                model(data_t[t], attention_mask=mask_t[t])
                for monitor in monitors.values():
                    monitor.step()

    warm = 2 * EVERY
    run(0, warm)
    objects_before, tensors_before = _live_counts()
    tracemalloc.start()
    try:
        traced_before = tracemalloc.get_traced_memory()[0]
        run(warm, steps)
        gc.collect()
        traced_growth = tracemalloc.get_traced_memory()[0] - traced_before
    finally:
        tracemalloc.stop()
    objects_after, tensors_after = _live_counts()

    # Constant memory: nothing accumulates per step or per log.
    assert tensors_after == tensors_before
    assert objects_after - objects_before <= 50, (objects_before, objects_after)
    # Python-level allocations (tracemalloc) settle after the first windows: measured here
    # +23 KB over 400 steps and +51 KB over 9,900 (torch's own caches filling), so a bound
    # independent of the run's length catches any per-step leak of 13 bytes or more at 10,000 steps.
    assert traced_growth < 128 * 1024, traced_growth
    for name, sink in sinks.items():
        assert sink.n_writes == steps // EVERY and sink.step == steps and sink.all_finite, name
        assert monitors[name].errors == 0, name

    # Exact numbers at the end of the run.
    finite = np.isfinite(data).all(-1)
    kept = mask & finite
    window = slice(steps - EVERY, steps)
    last = data[window][kept[window]]
    previous = data[steps - 2 * EVERY : steps - EVERY][kept[steps - 2 * EVERY : steps - EVERY]]
    everything = data[kept]
    out_i, out_c, out_e = (sinks[k].metrics for k in ("interval", "cumulative", "ema"))
    fit = scipy.stats.multivariate_normal(previous.mean(0), mle_cov(previous))
    heldout = float(fit.logpdf(last).mean()) / D
    n_nonfinite = int((mask & ~finite).sum())
    for name in ("blocks.0", "blocks.1"):
        layer = f"{name}/eval"  # forwards under no_grad: the eval phase
        assert out_i[f"n/{layer}"] == len(last)
        assert out_i[f"gsam/{layer}"] == pytest.approx(gsam_pdet(last)[0], rel=1e-9)
        assert out_i[f"heldout_loglik/{layer}"] == pytest.approx(heldout, rel=1e-9)
        assert out_c[f"n/{layer}"] == len(everything)
        assert out_c[f"nonfinite/{layer}"] == n_nonfinite == len(nan_steps)
        assert out_c[f"gsam/{layer}"] == pytest.approx(gsam_pdet(everything)[0], rel=1e-9)
        kurt = float(np.mean(scipy.stats.kurtosis(everything, axis=0)))
        assert out_c[f"mean_kurtosis/{layer}"] == pytest.approx(kurt, rel=1e-9)
        stats = monitors["cumulative"].stats(name, "eval")
        np.testing.assert_allclose(stats.mean.numpy(), everything.mean(0), rtol=1e-12)
        np.testing.assert_allclose(stats.covariance().numpy(), mle_cov(everything), rtol=1e-9)
        # EMA: the newest step weighs 1, each older one 2^(-1/half_life) less.
        ages = np.repeat(steps - 1 - np.arange(steps), kept.reshape(steps, -1).sum(1))
        n, gsam, _, _ = _weighted_gsam(everything, 0.5 ** (ages / HALF_LIFE))
        assert out_e[f"n/{layer}"] == pytest.approx(n, rel=1e-9)
        assert out_e[f"gsam/{layer}"] == pytest.approx(gsam, rel=1e-9)
    for monitor in monitors.values():
        monitor.close()  # frees the statistics read above
