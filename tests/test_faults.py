"""Monitor faults by kind: each (kind, place) warns once and is counted, so a failing sink never
hides a later failure of a metric or of another layer's hook; ``strict=True`` raises
``MonitorError`` from the original exception instead, where the failure happens."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import gsam_monitor.metrics as metrics_module
from gsam_monitor import GSAMMonitor, LayerStats, MonitorError
from tests.options import with_defaults
from tests.tiny_models import Stack

D = 3


def _monitor(model: torch.nn.Module, **kwargs) -> GSAMMonitor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # every_n_steps < 10
        kwargs = with_defaults(kwargs, collection={"max_tokens_per_layer": None, "phases": "eval"})
        return GSAMMonitor(model, every_n_steps=1, **kwargs)


def _x(seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((8, D)))


def _failing_update(layer_of: dict[int, str], failing: set[str]):
    real = LayerStats.update

    def update(self, *args, **kwargs):
        if layer_of.get(id(self)) in failing:
            raise RuntimeError("update failed")
        return real(self, *args, **kwargs)

    return update


def test_each_kind_and_place_warns_once_and_every_error_is_counted(monkeypatch) -> None:
    model = Stack(dim=D, depth=2)

    def bad_sink(metrics, step):
        raise OSError("disk full.")  # its period is dropped before the warning's "; it is disabled"

    monitor = _monitor(model, sinks=[bad_sink])
    real_compute = metrics_module.compute
    calls = {"n": 0}

    def compute(stats, *args, **kwargs):  # the second layer's metrics fail at the second log
        calls["n"] += 1
        if calls["n"] == 4:
            raise ValueError("metric failed")
        return real_compute(stats, *args, **kwargs)

    monkeypatch.setattr(metrics_module, "compute", compute)
    with monitor, torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(3):
            model(_x(seed))
            monitor.step()
    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
    sink = [m for m in messages if "the sink of" in m]
    metric = [m for m in messages if "the metrics of 'blocks.1/eval' raised ValueError: metric failed" in m]
    assert len(sink) == 1 and "raised OSError: disk full; it is disabled and training goes on" in sink[0]
    assert ".;" not in sink[0]
    assert len(metric) == 1  # not silenced by the sink's earlier warning
    assert monitor.errors == 2  # the sink once (then disabled), the metric once
    assert monitor.last_metrics["gsam_monitor/errors"] == 2


def test_hook_errors_warn_once_per_layer(monkeypatch) -> None:
    model = Stack(dim=D, depth=2)
    monitor = _monitor(model, sinks=[])
    with monitor, torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(_x())  # creates both windows
        buffers = monitor._windows.buffers  # what the hooks update: each layer's accumulation buffer
        layer_of = {id(buffers[(f"blocks.{i}", "eval")]): f"blocks.{i}" for i in range(2)}
        monkeypatch.setattr(LayerStats, "update", _failing_update(layer_of, {"blocks.0", "blocks.1"}))
        for _ in range(3):
            assert torch.equal(model(_x()), _x())  # the model runs on
    hooks = [str(w.message) for w in caught if "the hook of" in str(w.message)]
    assert len(hooks) == 2
    assert {h.split(" raised")[0] for h in hooks} == {
        "GSAMMonitor: the hook of 'blocks.0'", "GSAMMonitor: the hook of 'blocks.1'"
    }
    assert monitor.errors == 6


def test_strict_raises_the_first_error_where_it_happens(monkeypatch) -> None:
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, sinks=[], strict=True)
    with monitor, torch.no_grad():
        model(_x())
        layer_of = {id(monitor._windows.buffers[("blocks.0", "eval")]): "blocks.0"}
        monkeypatch.setattr(LayerStats, "update", _failing_update(layer_of, {"blocks.0"}))
        with pytest.raises(MonitorError, match=r"the hook of 'blocks\.0' raised RuntimeError: update failed") as info:
            model(_x())
        assert isinstance(info.value.__cause__, RuntimeError)
    assert monitor.errors == 0

    def bad_sink(metrics, step):
        raise OSError("disk full.")  # its period is dropped before the warning's "; it is disabled"

    sinking = _monitor(Stack(dim=D, depth=1), sinks=[bad_sink], strict=True)
    with sinking, torch.no_grad():
        sinking.model(_x())
        with pytest.raises(MonitorError, match=r"the sink of .* raised OSError: disk full") as info:
            sinking.step()
        assert isinstance(info.value.__cause__, OSError)

    def compute(*args, **kwargs):
        raise ValueError("metric failed")

    monkeypatch.setattr(metrics_module, "compute", compute)
    failing = _monitor(Stack(dim=D, depth=1), sinks=[], strict=True)
    with failing, torch.no_grad():
        failing.model(_x())
        with pytest.raises(MonitorError, match=r"the metrics of 'blocks\.0/eval' raised ValueError: metric failed"):
            failing.log()
