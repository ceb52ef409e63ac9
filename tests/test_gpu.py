"""CUDA paths of LayerStats: exactness per product dtype and no host synchronisation.

Skipped, with the reason, where no CUDA device is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gsam_monitor import LayerStats, metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none is present)"),
]


def test_update_never_synchronises_with_the_host(rng: np.random.Generator) -> None:
    x = torch.from_numpy(rng.standard_normal((4, 64, 128))).float().cuda()
    mask = torch.from_numpy(rng.random((4, 64)) > 0.2).cuda()
    x[0, 3, 5] = float("nan")
    s = LayerStats(128, device="cuda")
    s.update(x, mask=mask)  # first update sets the shift; warm up allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            s.update(x, mask=mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize(
    ("product_dtype", "rtol"), [(torch.float64, 1e-9), (torch.float32, 1e-5), (None, 1e-5)]
)
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_moments_match_fp64_numpy(product_dtype, rtol, act_dtype, rng: np.random.Generator) -> None:
    xt = torch.from_numpy(rng.standard_normal((2000, 96)) * 2 + 1).to(act_dtype)
    x = xt.double().numpy()
    s = LayerStats(96, device="cuda", product_dtype=product_dtype)
    for part in xt.cuda().split(300):
        s.update(part)
    cov = np.cov(x.T, ddof=0)
    np.testing.assert_allclose(s.covariance().cpu().numpy(), cov, rtol=rtol, atol=rtol * np.abs(cov).max())
    np.testing.assert_allclose(s.mean.cpu().numpy(), x.mean(0), rtol=1e-6, atol=1e-6)
    if product_dtype == torch.float64:
        cpu = LayerStats(96)
        cpu.update(torch.from_numpy(x))
        assert metrics.compute(s)["gsam"] == pytest.approx(metrics.compute(cpu)["gsam"], rel=1e-9)
