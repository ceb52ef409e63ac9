"""Where the monitor keeps what: one accumulation buffer per window where the activations are,
flushed into fp64 host totals (a host copy merged with the shift algebra, a fresh shift after each
flush), EMA decay reaching the totals at the flush, a failing flush counted and its rows kept, and
the memory plan of models of the sizes the monitor exists for."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from gsam_monitor import CollectOptions, GSAMMonitor, MonitorError, WindowOptions, memory_report
from gsam_monitor.monitor.window import host_copy
from tests.reference import gsam_pdet, mle_cov
from tests.tiny_models import Stack, llama_7b_on_meta

D = 12


def _monitor(model: torch.nn.Module, **kwargs) -> GSAMMonitor:
    kwargs.setdefault("collection", CollectOptions(steps=None, max_tokens_per_layer=None, phases="eval"))
    kwargs.setdefault("metrics", ["n", "gsam"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # every_n_steps < 10
        return GSAMMonitor(model, "blocks.0", sinks=[], **kwargs)


def _rows(seed: int, n: int, shift: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, D)) @ rng.standard_normal((D, D)) * 0.3 + shift


def test_a_flush_moves_the_buffer_into_fp64_host_totals_and_the_buffer_starts_afresh() -> None:
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, every_n_steps=100)
    seen: list[tuple[float, np.ndarray]] = []

    def recording(buffer):
        seen.append((float(buffer.count), buffer.shift.numpy().copy()))
        return host_copy(buffer)

    monitor._windows.transfer = recording
    a, b = _rows(0, 40, 1e3), _rows(1, 30, -2e3)  # the mean jumps 3,000 between the two flushes
    with monitor, torch.no_grad():
        model(torch.from_numpy(a))
        first = monitor.stats("blocks.0", "eval")  # a read flushes
        model(torch.from_numpy(b))
        totals = monitor.stats("blocks.0", "eval")
    assert [n for n, _ in seen] == [40, 30]  # each flush moved only the rows since the last one
    # The second buffer took its shift from its own rows, not from the first window's.
    assert np.abs(seen[1][1] - b.mean(0)).max() < np.abs(seen[1][1] - a.mean(0)).min()
    assert totals is first and totals.device.type == "cpu" and totals.state_dtype == torch.float64
    x = np.concatenate([a, b])
    assert float(totals.count) == 70
    np.testing.assert_allclose(totals.mean.numpy(), x.mean(0), rtol=1e-13, atol=1e-10)
    np.testing.assert_allclose(totals.covariance().numpy(), mle_cov(x), rtol=1e-11, atol=1e-11)
    buffer = monitor._windows.buffers.get(("blocks.0", "eval"))
    assert buffer is None or float(buffer.count) == 0  # emptied (or, on the host, become the totals)


def test_a_failing_flush_is_counted_and_warned_once_and_its_rows_reach_the_next_log() -> None:
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, every_n_steps=1)
    failures = {"left": 2}

    def flaky(buffer):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("device-to-host copy failed")
        return host_copy(buffer)

    monitor._windows.transfer = flaky
    parts = [_rows(k, 25, float(k)) for k in range(3)]
    outs = []
    with monitor, torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in parts:
            model(torch.from_numpy(x))
            outs.append(monitor.step())
    flush_warnings = [str(w.message) for w in caught if "the flush of" in str(w.message)]
    assert len(flush_warnings) == 1
    assert "the flush of 'blocks.0/eval' raised RuntimeError: device-to-host copy failed" in flush_warnings[0]
    assert "its rows stay in its buffer for the next flush" in flush_warnings[0]
    assert monitor.errors == 2
    assert "n/blocks.0/eval" not in outs[0] and "n/blocks.0/eval" not in outs[1]
    everything = np.concatenate(parts)  # nothing was lost: the third log holds all 75 rows
    assert outs[2]["n/blocks.0/eval"] == 75
    assert outs[2]["gsam/blocks.0/eval"] == pytest.approx(gsam_pdet(everything)[0], rel=1e-9)


def test_strict_raises_a_failing_flush() -> None:
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, every_n_steps=1, strict=True)

    def broken(buffer):
        raise RuntimeError("no host memory")

    monitor._windows.transfer = broken
    with monitor, torch.no_grad():
        model(torch.from_numpy(_rows(0, 10, 0.0)))
        with pytest.raises(MonitorError, match=r"the flush of 'blocks\.0/eval' raised RuntimeError: no host memory"):
            monitor.step()


def test_ema_decay_reaches_the_totals_at_the_flush_with_training_collection_parked() -> None:
    """Train forwards collected on the last 2 of every 4 steps, nothing read between logs: the
    buffer decays on the device every step, the totals owe their decay until the log's flush."""
    half_life, every = 2.0, 4
    factor = 0.5 ** (1 / half_life)
    model = Stack(dim=D, depth=1)
    monitor = _monitor(
        model,
        every_n_steps=every,
        collection=CollectOptions(steps=2, max_tokens_per_layer=None, phases="train"),
        windows=WindowOptions(kind="ema", ema_half_life=half_life),
    )
    parts = {t: _rows(t, 10 + t, 0.5 * t) for t in range(1, 13)}
    fed: dict[int, np.ndarray] = {}
    logs = {}
    with monitor:
        for t in range(1, 13):
            if monitor.hooks_registered:  # a collected step
                fed[t] = parts[t]
            model(torch.from_numpy(parts[t]).requires_grad_())
            out = monitor.step()
            if out:
                after = monitor.stats("blocks.0")  # read after the log and this step's decay
                logs[t] = (out, float(after.count), after.mean.numpy().copy())
    assert sorted(fed) == [3, 4, 7, 8, 11, 12]
    assert sorted(logs) == [4, 8, 12]
    for last, (out, count_after, mean_after) in logs.items():
        used = [t for t in fed if t <= last]
        weights = np.array([factor ** (last - t) for t in used])
        n = float(sum(w * len(fed[t]) for w, t in zip(weights, used, strict=True)))
        mean = sum(w * fed[t].sum(0) for w, t in zip(weights, used, strict=True)) / n
        assert out["n/blocks.0"] == pytest.approx(n, rel=1e-12)
        assert count_after == pytest.approx(n * factor, rel=1e-12)  # this step's decay, owed then paid
        np.testing.assert_allclose(mean_after, mean, rtol=1e-10, atol=1e-12)


def test_a_llama_7b_shape_is_accepted_with_its_buffers_on_the_device_and_its_totals_on_the_host() -> None:
    pytest.importorskip("transformers")
    model = llama_7b_on_meta()
    plan = memory_report(model)
    buffer = 8 * (4096**2 + 6 * 4096) + 16  # one fp64 d x d accumulation buffer (and 6 vectors)
    workspace = 2 * 1024 * 4096 * 8  # the update kernel's two fp64 chunks of 2**22 / 4096 rows
    assert plan["device_bytes"] == 32 * buffer + workspace
    assert plan["device_bytes"] <= 4.3 * 2**30
    # Host, per layer: 2 phases x (totals + the reference of heldout_loglik + a background log's copy).
    assert plan["host_bytes"] == 32 * 2 * 3 * buffer
    assert plan["world_size"] == 1 and plan["unknown_layers"] == []
    monitor = GSAMMonitor(model, sinks=[])  # the defaults are accepted
    assert monitor.memory_report()["device_bytes"] == plan["device_bytes"]
    assert memory_report(model, 8, ranks_per_node=8)["host_bytes_per_node"] == 8 * plan["host_bytes"]
    with pytest.raises(ValueError, match=r"world_size must be a positive int"):
        memory_report(model, 0)


def test_memory_report_finds_what_the_monitor_holds_after_a_run() -> None:
    model = Stack(dim=D, depth=2)
    monitor = _monitor(model, every_n_steps=2, metrics=["n", "gsam", "heldout_loglik"])
    with monitor, torch.no_grad():
        for t in range(3):  # a log at step 2 keeps references; step 3's rows are in the buffers
            model(torch.from_numpy(_rows(t, 20, 0.0)))
            monitor.step()
            if t == 1:  # the log's window ended: its buffer left the device
                assert monitor.memory_report()["held"]["device_bytes"] == 0
        report = monitor.memory_report()
    per_window = 8 * (D * D + 2 * D) + 16  # Gram, sum and shift in fp64, count and nonfinite (no higher moments)
    held = report["held"]
    # blocks.0 only ("blocks.0" is monitored): its buffer on the device; its reference on the host
    # (interval window: its totals went to the reference at the log, the next ones start at the flush).
    assert held["device_bytes"] == per_window
    assert held["host_bytes"] == per_window
    assert held["device_bytes"] <= report["device_bytes"] and held["host_bytes"] <= report["host_bytes"]


def test_a_frozen_forward_inside_every_training_step_gets_its_own_buffer_and_no_flush_per_step() -> None:
    """A no_grad forward inside each training step (a reference model's, DPO-style, or an
    evaluation probe) goes to the eval window's own buffer: the buffers are flushed at the logs
    only, never per step, and both windows equal numpy on their rows."""
    model = Stack(dim=D, depth=1)
    monitor = _monitor(
        model,
        every_n_steps=5,
        collection=CollectOptions(steps=None, max_tokens_per_layer=None),
        metrics=["n", "gsam"],
    )
    flushed: list[tuple[str, int]] = []

    def counting(buffer):
        flushed.append((monitor.step_count, int(buffer.count)))
        return host_copy(buffer)

    monitor._windows.transfer = counting
    train = [_rows(t, 15, 0.0) for t in range(10)]
    frozen = [_rows(100 + t, 6, 5.0) for t in range(10)]
    outs = []
    with monitor:
        for t in range(10):
            model(torch.from_numpy(train[t]).requires_grad_()).sum().backward()
            with torch.no_grad():
                model(torch.from_numpy(frozen[t]))
            outs.append(monitor.step())
    # Two logs (steps 5 and 10), each flushing the two windows' buffers once: 4 transfers in all.
    assert [step for step, _ in flushed] == [5, 5, 10, 10]
    assert sorted(n for _, n in flushed) == [30, 30, 75, 75]
    assert outs[9]["gsam/blocks.0"] == pytest.approx(gsam_pdet(np.concatenate(train[5:]))[0], rel=1e-9)
    assert outs[9]["gsam/blocks.0/eval"] == pytest.approx(gsam_pdet(np.concatenate(frozen[5:]))[0], rel=1e-9)
