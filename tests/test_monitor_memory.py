"""Memory the monitor holds, counted by role against its plan (``memory_report``): one
accumulation buffer per layer on the device, the totals, references and log copies on the host;
the statistics alive while a background log is in flight stay within the plan, ``detach()`` keeps
the statistics for a re-attach, ``close()`` frees them, and ``state_dict()`` holds host tensors only."""

from __future__ import annotations

import gc
import threading
import warnings
import weakref

import numpy as np
import pytest
import torch

import gsam_monitor.metrics as metrics_module
from gsam_monitor import CollectOptions, ComputeOptions, GSAMMonitor, LayerStats, WindowOptions
from gsam_monitor.monitor import state_bytes_per_layer
from tests.reference import gsam_pdet
from tests.tiny_models import Stack

D = 24
LAYERS = ("blocks.0", "blocks.1")


@pytest.fixture
def live_stats(monkeypatch) -> weakref.WeakSet:
    """Every LayerStats created (constructed or cloned) during the test, while it is alive."""
    alive: weakref.WeakSet = weakref.WeakSet()
    init, clone = LayerStats.__init__, LayerStats.clone

    def tracked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        alive.add(self)

    def tracked_clone(self, device=None):
        new = clone(self, device)
        alive.add(new)
        return new

    monkeypatch.setattr(LayerStats, "__init__", tracked_init)
    monkeypatch.setattr(LayerStats, "clone", tracked_clone)
    return alive


def _held(alive: weakref.WeakSet) -> int:
    gc.collect()
    return sum(s.nbytes for s in alive)


@pytest.mark.parametrize("window", ["interval", "cumulative"])
def test_a_background_log_in_flight_holds_at_most_the_budgeted_copies(monkeypatch, live_stats, window) -> None:
    # Hold the worker inside its first metric until the next window has been collected.
    release, started = threading.Event(), threading.Event()
    real = metrics_module.compute

    def held(*args, **kwargs):
        started.set()
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics_module, "compute", held)
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((40, D)) + i for i in range(6)]
    model = Stack(dim=D, depth=2)
    records: list[dict[str, float]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # every_n_steps < 10
        monitor = GSAMMonitor(
            model,
            "auto",
            every_n_steps=2,
            collection=CollectOptions(steps=None, phases="eval", max_tokens_per_layer=None),
            windows=WindowOptions(kind=window),
            compute=ComputeOptions(background=True),
            metrics=["gsam", "n", "heldout_loglik"],
            sinks=[lambda m, s: records.append(dict(m))],
        )
    per_window = LayerStats.state_bytes(D) - 4 * D * 8  # no higher moments: no power3/power4/unit_sum/absmax
    budget = len(LAYERS) * state_bytes_per_layer(D, phases=["eval"], heldout=True, log_copies=1)
    plan = monitor.memory_report()
    assert monitor.config.log_copies == 1 and plan["host_bytes"] == budget
    workspace = 2 * max(256, 2**22 // D) * D * 8  # two fp64 blocks of the update kernel's chunk of rows
    assert plan["device_bytes"] == len(LAYERS) * LayerStats.state_bytes(D) + workspace
    peaks = []
    with monitor, torch.no_grad():
        for t, x in enumerate(xs, start=1):
            model(torch.from_numpy(x))
            monitor.step()
            if t in (4, 6):  # a log has just been submitted: its worker is held
                assert started.wait(10)
                model(torch.from_numpy(xs[0]))  # the next window starts while the log is in flight
                peaks.append(_held(live_stats))
                started.clear()
                release.set()
                monitor.flush()
                release.clear()
            elif t == 2:
                release.set()
                monitor.flush()
                release.clear()
    # Per layer: the accumulation buffer of the next window and the totals the log took (interval)
    # or copied (cumulative, whose own totals go on: one more), the copy being the next reference;
    # the log in flight holds the previous reference as the GaussianFit its log made (a d² fp64
    # pseudo-inverse, a mean and eigenvalues on the CPU), not as a window.
    per_layer = 2 if window == "interval" else 3
    assert peaks == [per_layer * len(LAYERS) * per_window] * 2
    assert max(peaks) + len(LAYERS) * 8 * (D * D + 2 * D) <= plan["device_bytes"] + plan["host_bytes"]
    assert monitor.errors == 0 and len(records) == 3
    # Step 6 logged xs[0] (fed while the log of step 4 was in flight), xs[4] and xs[5].
    last = np.concatenate([xs[0], *xs[4:6]]) if window == "interval" else np.concatenate([*xs, xs[0]])
    assert records[-1]["gsam/blocks.0/eval"] == pytest.approx(gsam_pdet(last)[0], rel=1e-9)


def test_detach_keeps_the_statistics_and_close_frees_them(live_stats) -> None:
    model = Stack(dim=D, depth=2)
    monitor = GSAMMonitor(
        model, "auto", collection=CollectOptions(max_tokens_per_layer=None), metrics=["gsam", "heldout_loglik"]
    )
    x = torch.randn(30, D, dtype=torch.float64)
    with torch.no_grad():
        monitor.attach()
        model(x)
        monitor.log()  # keeps held-out fits
        model(x)
        monitor.detach()
        model(x)  # not counted
        monitor.attach()
        model(x)  # the window goes on
    assert float(monitor.stats("blocks.0", "eval").count) == 60
    assert float(monitor.stats("blocks.1", "eval").count) == 60
    # Per layer: the totals and the reference (heldout_loglik). The read flushed the buffers: on
    # the host a window's first flush makes the buffer itself its totals, and the next rows get a
    # new buffer.
    assert _held(live_stats) == 2 * len(LAYERS) * (LayerStats.state_bytes(D) - 4 * D * 8)
    refs = [weakref.ref(s) for s in live_stats]
    monitor.close()
    assert _held(live_stats) == 0 and all(r() is None for r in refs)
    assert monitor.stats("blocks.0", "eval") is None and monitor.compute() == {}
    monitor.close()  # idempotent


def test_leaving_the_with_block_keeps_the_statistics_readable(live_stats) -> None:
    model = Stack(dim=D, depth=1)
    x = torch.randn(30, D, dtype=torch.float64)
    with (
        GSAMMonitor(model, "auto", collection=CollectOptions(max_tokens_per_layer=None), metrics=["n"]) as monitor,
        torch.no_grad(),
    ):
        model(x)
    assert monitor.compute("eval")["blocks.0"]["n"] == 30
    monitor.close()
    assert _held(live_stats) == 0


def test_state_dict_holds_host_tensors_only() -> None:
    model = Stack(dim=D, depth=2)
    monitor = GSAMMonitor(model, "auto", metrics="all", collection=CollectOptions(reservoir_size=16))
    with monitor, torch.no_grad():
        model(torch.randn(30, D, dtype=torch.float64))
        monitor.log()
        model(torch.randn(30, D, dtype=torch.float64))
    state = monitor.state_dict()
    tensors = []

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)

    walk(state)
    assert len(tensors) > 10 and all(t.device.type == "cpu" for t in tensors)
    # Copies: the checkpoint does not alias the live statistics.
    live = monitor.stats("blocks.0", "eval")
    assert state["stats"]["eval"]["blocks.0"]["gram"].data_ptr() != live._state["gram"].data_ptr()
