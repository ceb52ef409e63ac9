"""Statistics first created or updated under ``torch.inference_mode()`` (generation, an eval
loop) are ordinary tensors: later updates, resets, merges, decays and state_dicts outside it
work, and every value equals the two-pass numpy result."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from gsam_monitor import LayerStats
from gsam_monitor.metrics import MardiaAccumulator
from gsam_monitor.stats import ReservoirSample


def _check(s: LayerStats, x: np.ndarray) -> None:
    cov = np.cov(x.T, ddof=0)
    assert float(s.count) == len(x)
    np.testing.assert_allclose(s.covariance().numpy(), cov, rtol=1e-9, atol=1e-12 * np.abs(cov).max())
    np.testing.assert_allclose(s.mean.numpy(), x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.excess_kurtosis().numpy(), scipy.stats.kurtosis(x, axis=0, bias=True), rtol=1e-8)


def _ordinary(s: LayerStats) -> bool:
    return not any(t.is_inference() for t in s._state.values())


@pytest.mark.parametrize("product_dtype", [None, torch.float32])
def test_inference_mode_update_then_normal_update_reset_update(product_dtype, rng: np.random.Generator) -> None:
    a, b, c = (rng.standard_normal((n, 6)) * 2 + 5 for n in (40, 30, 25))
    if product_dtype == torch.float32:  # the values fp32 products see
        a, b, c = (v.astype(np.float32).astype(np.float64) for v in (a, b, c))
    check = _check if product_dtype is None else _check_fp32
    with torch.inference_mode():
        s = LayerStats(6, product_dtype=product_dtype)
        s.update(torch.from_numpy(a))
    assert _ordinary(s)
    check(s, a)
    s.update(torch.from_numpy(b))  # failed with "Inplace update to inference tensor outside InferenceMode"
    check(s, np.vstack([a, b]))
    s.reset()
    s.update(torch.from_numpy(c))
    check(s, c)
    # ...and back into inference mode and out again, with a decay in between.
    with torch.inference_mode():
        s.update(torch.from_numpy(a))
    s.decay_(0.5)
    s.update(torch.from_numpy(b))
    z = np.vstack([c, a, b])
    w = np.r_[np.full(len(c) + len(a), 0.5), np.ones(len(b))]
    np.testing.assert_allclose(float(s.count), w.sum())
    rtol = 1e-9 if product_dtype is None else 1e-5
    np.testing.assert_allclose(s.covariance().numpy(), np.cov(z.T, aweights=w, ddof=0), rtol=rtol, atol=rtol)


def _check_fp32(s: LayerStats, x: np.ndarray) -> None:
    cov = np.cov(x.T, ddof=0)
    assert float(s.count) == len(x)
    np.testing.assert_allclose(s.covariance().numpy(), cov, rtol=1e-5, atol=1e-6 * np.abs(cov).max())
    np.testing.assert_allclose(s.mean.numpy(), x.mean(0), rtol=1e-7)


def test_everything_made_under_inference_mode_is_ordinary(rng: np.random.Generator) -> None:
    a, b = rng.standard_normal((50, 5)) + 3, rng.standard_normal((20, 5)) - 1
    with torch.inference_mode():
        s = LayerStats(5)
        s.update(torch.from_numpy(a))
        made = {
            "clone": s.clone(),
            "to": s.clone().to("cpu"),
            "from_state_dict": LayerStats.from_state_dict(s.state_dict()),
            "merged": LayerStats(5).merge(s),
            "reshifted": s.clone().reshift_(),
        }
        loaded = LayerStats(5)
        loaded.load_state_dict(s.state_dict())
        made["load_state_dict"] = loaded
        saved = s.state_dict()
    assert not any(v.is_inference() for v in saved.values() if isinstance(v, torch.Tensor))
    for name, t in made.items():
        assert _ordinary(t), name
        _check(t, a)
        t.update(torch.from_numpy(b))
        _check(t, np.vstack([a, b]))
        t.merge(LayerStats.from_state_dict(saved))
        _check(t, np.vstack([a, b, a]))
        t.reset()
        t.update(torch.from_numpy(b))
        _check(t, b)
        t.decay_(0.25)
        assert float(t.count) == pytest.approx(0.25 * len(b))
        assert all(not v.is_inference() for v in t.state_dict().values() if isinstance(v, torch.Tensor))


def test_mardia_made_under_inference_mode_keeps_accumulating(rng: np.random.Generator) -> None:
    x = rng.standard_t(6, size=(400, 4)) @ rng.standard_normal((4, 4))
    s = LayerStats(4)
    s.update(torch.from_numpy(x))
    with torch.inference_mode():
        acc = MardiaAccumulator(s)
        acc.update(torch.from_numpy(x[:150]))
    acc.update(torch.from_numpy(x[150:]))
    z = x - x.mean(0)
    maha = np.einsum("ij,jk,ik->i", z, np.linalg.inv(np.cov(x.T, ddof=0)), z)
    assert acc.b2() == pytest.approx(float(np.mean(maha**2)), rel=1e-9)


def test_reservoir_made_under_inference_mode_keeps_sampling(rng: np.random.Generator) -> None:
    x = rng.standard_normal((30, 3)).astype(np.float32)
    with torch.inference_mode():
        sample = ReservoirSample(1000, dims=[1], seed=0)
        sample.update(torch.from_numpy(x[:10]))
        sd = sample.state_dict()
    assert not any(v.is_inference() for v in sd.values() if isinstance(v, torch.Tensor))
    sample.update(torch.from_numpy(x[10:]))  # below capacity: every value, in stream order
    np.testing.assert_array_equal(sample.values(), x.reshape(-1).astype(np.float64))
    np.testing.assert_array_equal(sample.values(dim=1), x[:, 1].astype(np.float64))
    sample.reset()
    sample.update(torch.from_numpy(x[:4]))
    np.testing.assert_array_equal(sample.values(), x[:4].reshape(-1).astype(np.float64))
