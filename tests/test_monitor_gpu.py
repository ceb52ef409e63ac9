"""CUDA path of the monitor's hooks: no host synchronisation, statistics on the device, the
background worker's device and stream, host checkpoints, nn.DataParallel replicas.

Skipped, with the reason, where no CUDA device is present.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from gsam_monitor import CollectOptions, ComputeOptions, GSAMMonitor
from tests.tiny_models import Stack

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none is present)"),
]


def test_hook_path_never_synchronises_with_the_host() -> None:
    model = Stack(dim=64, depth=2).cuda()
    x = torch.randn(4, 50, 64, dtype=torch.float64, device="cuda")
    mask = (torch.rand(4, 50, device="cuda") > 0.3).long()
    monitor = GSAMMonitor(model, "auto", collection=CollectOptions(max_tokens_per_layer=32), every_n_steps=100)
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
    monitor = GSAMMonitor(model, "auto", collection=CollectOptions(max_tokens_per_layer=None))
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
            model,
            "auto",
            every_n_steps=2,
            collection=CollectOptions(steps=None, max_tokens_per_layer=None),
            compute=ComputeOptions(background=background, product_dtype=torch.float64),
            sinks=[lambda m, s, r=records: r.append((s, dict(m)))],
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


def test_background_logs_run_on_the_statistics_device_and_one_stream() -> None:
    # The worker thread sets the statistics' device (no stray context on GPU 0 of another
    # rank) and reuses one side stream per monitor for every log.
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    model = Stack(dim=16, depth=1).to(device)
    monitor = GSAMMonitor(
        model,
        "auto",
        every_n_steps=2,
        collection=CollectOptions(steps=None, max_tokens_per_layer=None),
        compute=ComputeOptions(background=True, product_dtype=torch.float64),
        metrics=["gsam", "n"],
    )
    seen = []
    real = monitor._logs._metrics_of

    def spying(*args, **kwargs):
        seen.append((threading.current_thread().name, torch.cuda.current_device(), torch.cuda.current_stream()))
        return real(*args, **kwargs)

    monitor._logs._metrics_of = spying
    xs = [torch.randn(50, 16, dtype=torch.float64, device=device) * 2 + 1 for _ in range(6)]
    outs = {}
    with monitor, torch.no_grad():
        for x in xs:
            model(x)
            outs.update(monitor.step() or {})
        monitor.flush()
    assert len(seen) == 3 and all(name.startswith("gsam-monitor") for name, _, _ in seen)
    assert {dev for _, dev, _ in seen} == {device.index}
    streams = {s.cuda_stream for _, _, s in seen}
    assert len(streams) == 1 and streams != {torch.cuda.default_stream(device).cuda_stream}
    rows = torch.cat(xs[4:]).cpu().numpy()
    _, logdet = np.linalg.slogdet(np.cov(rows.T, ddof=0))
    expected = np.log(len(rows)) - 0.5 * 16 * (1 + np.log(2 * np.pi)) - 0.5 * logdet
    assert monitor.last_metrics["gsam/blocks.0/eval"] == pytest.approx(expected, rel=1e-9)


def test_state_dict_of_cuda_statistics_is_on_the_host() -> None:
    model = Stack(dim=16, depth=2).cuda()
    monitor = GSAMMonitor(model, "auto", metrics="all")
    with monitor, torch.no_grad():
        model(torch.randn(40, 16, dtype=torch.float64, device="cuda"))
    assert monitor.stats("blocks.0", "eval").device.type == "cuda"
    state = monitor.state_dict()
    grams = [sd["gram"] for sd in state["stats"]["eval"].values()]
    assert len(grams) == 2 and all(g.device.type == "cpu" for g in grams)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nn.DataParallel needs 2 CUDA devices (fewer present)")
def test_data_parallel_replicas_feed_one_window_exactly() -> None:
    model = Stack(dim=16, depth=2).cuda()
    dp = nn.DataParallel(model, device_ids=[0, 1])
    monitor = GSAMMonitor(dp, "auto", collection=CollectOptions(max_tokens_per_layer=None), metrics=["gsam", "n"])
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((4, 9, 16)) for _ in range(5)]
    mask = torch.ones(4, 9, dtype=torch.int64)
    mask[0, 5:] = 0
    mask[3, 2:] = 0  # the second replica's half has its own padding
    with monitor, torch.no_grad():
        for x in xs:
            dp(torch.from_numpy(x).cuda(), attention_mask=mask.cuda())
    assert monitor.errors == 0
    rows = np.concatenate([x[mask.bool().numpy()] for x in xs])
    for layer in ("blocks.0", "blocks.1"):
        stats = monitor.stats(layer, "eval")
        assert stats.device == torch.device("cuda", 0)  # where the model lives, not ping-ponging
        assert float(stats.count) == len(rows)
        np.testing.assert_allclose(stats.covariance().cpu().numpy(), np.cov(rows.T, ddof=0), rtol=1e-9, atol=1e-12)
