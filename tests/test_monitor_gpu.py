"""CUDA path of the monitor's hooks: no host synchronisation, statistics on the device.

Skipped, with the reason, where no CUDA device is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gsam_monitor import GSAMMonitor
from tests.tiny_models import Stack

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none is present)"),
]


def test_hook_path_never_synchronises_with_the_host() -> None:
    model = Stack(dim=64, depth=2).cuda()
    x = torch.randn(4, 50, 64, dtype=torch.float64, device="cuda")
    mask = (torch.rand(4, 50, device="cuda") > 0.3).long()
    monitor = GSAMMonitor(model, "auto", max_tokens_per_layer=32, every_n_steps=100)
    with monitor, torch.no_grad():
        model(x, attention_mask=mask)  # first call allocates the statistics and the generator
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                model(x, attention_mask=mask)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    stats = monitor.stats("blocks.1", "eval")
    assert stats.device.type == "cuda" and monitor.errors == 0
    # Each forward keeps min(32, valid) rows per sequence batch: 32 here (far more are valid).
    assert float(stats.count) == 4 * 32


def test_cuda_statistics_match_numpy_on_the_valid_rows() -> None:
    model = Stack(dim=16, depth=1).cuda()
    x = torch.randn(3, 20, 16, dtype=torch.float64, device="cuda") * 3 + 1
    mask = torch.ones(3, 20, dtype=torch.long, device="cuda")
    mask[0, 12:] = 0
    monitor = GSAMMonitor(model, "auto", max_tokens_per_layer=None)
    with monitor, torch.no_grad():
        model(x, attention_mask=mask)
    rows = x[mask.bool()].cpu().numpy()
    stats = monitor.stats("blocks.0", "eval")
    np.testing.assert_allclose(stats.mean.cpu().numpy(), rows.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.covariance().cpu().numpy(), np.cov(rows.T, ddof=0), rtol=1e-5, atol=1e-6)


def test_background_logs_on_cuda_equal_inline_logs() -> None:
    # A CUDA model logs in the background by default: the metrics are computed on a side
    # stream from snapshots and must equal the inline computation at the same steps.
    torch.manual_seed(0)
    xs = [torch.randn(4, 30, 16, dtype=torch.float64, device="cuda") * 2 + 1 for _ in range(6)]
    written = {}
    for background in (None, False):
        model = Stack(dim=16, depth=2).cuda()
        records = []
        monitor = GSAMMonitor(
            model, "auto", every_n_steps=2, collect_steps=None, max_tokens_per_layer=None, background=background,
            product_dtype=torch.float64, sinks=[lambda m, s, r=records: r.append((s, dict(m)))],
        )
        assert monitor.background is (background is None)
        with monitor, torch.no_grad():
            for x in xs:
                model(x)
                monitor.step()
        written[background] = records
    assert [s for s, _ in written[None]] == [2, 4, 6] == [s for s, _ in written[False]]
    for (_, bg), (_, inline) in zip(written[None], written[False], strict=True):
        assert bg.keys() == inline.keys()
        for key, value in inline.items():
            assert bg[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
    rows = torch.cat(xs[4:]).reshape(-1, 16).cpu().numpy()
    _, logdet = np.linalg.slogdet(np.cov(rows.T, ddof=0))
    expected = np.log(len(rows)) - 0.5 * 16 * (1 + np.log(2 * np.pi)) - 0.5 * logdet
    assert written[None][-1][1]["gsam/blocks.0/eval"] == pytest.approx(expected, rel=1e-9)
