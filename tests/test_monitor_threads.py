"""Hooks run from several threads at once, as nn.DataParallel runs its replicas (which share the
modules' hooks): every row of every thread reaches the statistics exactly once, and each
thread's padding mask applies to its own forward. On CPU, with plain threads; the DataParallel
run itself is in tests/test_monitor_gpu.py."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from gsam_monitor import CollectOptions, GSAMMonitor, LayerStats
from tests.tiny_models import Stack

D = 48
THREADS = 6
CALLS = 4


def _run_threads(fn) -> None:
    start = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            start.wait()
            with torch.no_grad():
                for k in range(CALLS):
                    fn(i, k)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_concurrent_hooks_on_one_layer_count_every_row_once(monkeypatch) -> None:
    # Each update sleeps for a millisecond, so that threads that are not serialised overlap
    # inside it (without the sleep they overlap only now and then on two cores).
    real = LayerStats.update
    inside: dict[int, int] = {}
    overlaps = []

    def slow_update(self, *args, **kwargs):
        inside[id(self)] = inside.get(id(self), 0) + 1
        if inside[id(self)] > 1:
            overlaps.append(id(self))
        time.sleep(0.001)
        try:
            return real(self, *args, **kwargs)
        finally:
            inside[id(self)] -= 1

    monkeypatch.setattr(LayerStats, "update", slow_update)
    rng = np.random.default_rng(5)
    mix = rng.standard_normal((D, D))
    # All threads released at once race to create the window, to set its shift (each thread's
    # rows sit elsewhere) and to add to it.
    xs = [[rng.standard_normal((300, D)) @ mix + 100.0 * i for _ in range(CALLS)] for i in range(THREADS)]
    model = Stack(dim=D, depth=1)
    monitor = GSAMMonitor(model, "auto", collection=CollectOptions(max_tokens_per_layer=None))
    with monitor:
        _run_threads(lambda i, k: model.blocks[0](torch.from_numpy(xs[i][k])))
    assert monitor.errors == 0 and overlaps == []
    rows = np.concatenate([x for per_thread in xs for x in per_thread])
    stats = monitor.stats("blocks.0", "eval")
    assert float(stats.count) == len(rows)
    np.testing.assert_allclose(stats.mean.numpy(), rows.mean(0), rtol=1e-9)
    np.testing.assert_allclose(stats.covariance().numpy(), np.cov(rows.T, ddof=0), rtol=1e-9, atol=1e-9)


def test_each_thread_forward_uses_its_own_attention_mask() -> None:
    rng = np.random.default_rng(6)
    lengths = [(i % 4) + 2 for i in range(THREADS)]  # a different padding pattern per thread
    xs = [[rng.standard_normal((3, 7, D)) for _ in range(CALLS)] for _ in range(THREADS)]
    masks = []
    for i in range(THREADS):
        m = torch.ones(3, 7, dtype=torch.int64)
        m[:, lengths[i] :] = 0
        masks.append(m)
    model = Stack(dim=D, depth=2)
    monitor = GSAMMonitor(model, "auto", collection=CollectOptions(max_tokens_per_layer=None))
    with monitor:
        _run_threads(lambda i, k: model(torch.from_numpy(xs[i][k]), attention_mask=masks[i]))
    assert monitor.errors == 0
    rows = np.concatenate([x[masks[i].bool().numpy()] for i in range(THREADS) for x in xs[i]])
    for layer in ("blocks.0", "blocks.1"):
        stats = monitor.stats(layer, "eval")
        assert float(stats.count) == len(rows) == 3 * CALLS * sum(lengths)
        np.testing.assert_allclose(stats.covariance().numpy(), np.cov(rows.T, ddof=0), rtol=1e-9, atol=1e-12)
