"""CUDA precision paths of LayerStats: TF32 and CUDA autocast do not reach the products, a CPU
state fed CUDA rows waits for their copy, and the fp32 product path never syncs the host.

Skipped, with the reason, where no CUDA device is present.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gsam_monitor import LayerStats, metrics
from gsam_monitor.stats import FULL_RATE_FP64_CAPABILITIES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none is present)"),
]


def _rank64(rng: np.random.Generator, n: int = 4000, d: int = 128) -> np.ndarray:
    return (rng.standard_normal((n, 64)) @ rng.standard_normal((64, d)) + 3.0).astype(np.float32)


def _reference(x: np.ndarray) -> tuple[int, float]:
    lam = np.linalg.eigvalsh(np.cov(x.T, ddof=0))
    sup = lam[lam > 1e6 * np.finfo(np.float64).eps * lam.max()]
    n = len(x)
    return len(sup), math.log(n) - 0.5 * len(sup) * (1 + math.log(2 * math.pi)) - 0.5 * float(np.log(sup).sum())


def test_default_products_follow_the_fp64_rate_of_this_gpu() -> None:
    capability = torch.cuda.get_device_capability()
    expected = torch.float64 if capability in FULL_RATE_FP64_CAPABILITIES else torch.float32
    assert LayerStats(8, device="cuda").product_dtype == expected


@pytest.mark.parametrize("setting", ["fp32_precision", "set_float32_matmul_precision"])
def test_tf32_does_not_reach_the_fp32_products(setting: str, rng: np.random.Generator) -> None:
    x = _rank64(rng)
    saved_legacy = torch.get_float32_matmul_precision()
    saved = torch.backends.cuda.matmul.fp32_precision
    try:
        if setting == "fp32_precision":
            torch.backends.cuda.matmul.fp32_precision = "tf32"
        else:
            torch.set_float32_matmul_precision("high")
        s = LayerStats(x.shape[1], device="cuda", product_dtype=torch.float32)
        for part in torch.from_numpy(x).cuda().split(500):
            s.update(part)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # the user's setting is back
    finally:
        torch.set_float32_matmul_precision(saved_legacy)
        torch.backends.cuda.matmul.fp32_precision = saved
    x64 = x.astype(np.float64)
    cov = np.cov(x64.T, ddof=0)
    # TF32 keeps 10 mantissa bits: ~1e-3 relative. IEEE fp32 products: ~1e-7.
    np.testing.assert_allclose(s.covariance().cpu().numpy(), cov, rtol=1e-5, atol=1e-5 * np.abs(cov).max())
    rank, gsam = _reference(x64)
    got = metrics.compute(s, names=["gsam", "rank"])
    assert got["rank"] == rank == 64
    assert got["gsam"] == pytest.approx(gsam, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_does_not_reach_the_products(dtype: torch.dtype, rng: np.random.Generator) -> None:
    x = _rank64(rng)
    s = LayerStats(x.shape[1], device="cuda", product_dtype=torch.float32)
    with torch.autocast("cuda", dtype=dtype):
        for part in torch.from_numpy(x).cuda().split(500):
            s.update(part)
        assert torch.is_autocast_enabled("cuda")
    rank, gsam = _reference(x.astype(np.float64))
    got = metrics.compute(s, names=["gsam", "rank"])
    assert got["rank"] == rank == 64
    assert got["gsam"] == pytest.approx(gsam, rel=1e-5)


def test_cpu_state_fed_cuda_rows_reads_them_after_the_copy(rng: np.random.Generator) -> None:
    # The rows come out of a long GPU computation: a non-blocking copy into host memory would
    # let the CPU read the buffer before the copy landed.
    d = 256
    a = torch.randn(4096, 4096, device="cuda")
    s = LayerStats(d)  # on the CPU
    kept = []
    for k in range(6):
        slow = a @ a @ a  # queue work ahead of the rows
        rows = (slow[:, :d] * 1e-3 + k).contiguous()
        s.update(rows)
        kept.append(rows.cpu().double().numpy())  # a blocking copy, for the reference
    x = np.vstack(kept)
    cov = np.cov(x.T, ddof=0)
    np.testing.assert_allclose(s.mean.numpy(), x.mean(0), rtol=1e-9)
    np.testing.assert_allclose(s.covariance().numpy(), cov, rtol=1e-9, atol=1e-12 * np.abs(cov).max())


def test_fp32_product_path_never_synchronises_with_the_host(rng: np.random.Generator) -> None:
    x = torch.from_numpy(rng.standard_normal((4, 64, 128))).float().cuda()
    mask = torch.from_numpy(rng.random((4, 64)) > 0.2).cuda()
    s = LayerStats(128, device="cuda", product_dtype=torch.float32)
    s.update(x, mask=mask)  # the first update sets the shift and allocates the workspace
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(3):
                s.update(x, mask=mask)
        s.reshift_()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    keep = mask.cpu().numpy()
    rows = x.cpu().double().numpy()[keep]
    z = np.vstack([rows] * 4)
    cov = np.cov(z.T, ddof=0)
    np.testing.assert_allclose(s.covariance().cpu().numpy(), cov, rtol=1e-5, atol=1e-5 * np.abs(cov).max())
