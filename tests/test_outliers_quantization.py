"""Outlier dimensions by identity (``monitor.outliers``) and the int8 absmax readiness
(``metrics.int8_absmax_error``, ``monitor.quantization_summary``), against numpy on the rows
the monitor saw and scipy quadrature of the round-off integral."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch

from gsam_monitor import CollectOptions, GSAMMonitor, JsonlSink
from gsam_monitor.metrics import int8_absmax_error
from gsam_monitor.metrics.quantization import expected_roundoff
from gsam_monitor.stats import LayerStats
from tests.tiny_models import Stack

D, ROWS, EVERY = 32, 100, 2
FACTOR = 10.0


def _monitor(model: torch.nn.Module, **kwargs) -> GSAMMonitor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # every_n_steps < 10 in tests
        return GSAMMonitor(
            model,
            "auto",
            every_n_steps=EVERY,
            collection=CollectOptions(steps=None, max_tokens_per_layer=None, phases="train"),
            **kwargs,
        )


def _lower_median(v: np.ndarray) -> float:
    return float(np.sort(v)[(v.size - 1) // 2])  # the rule's median: the lower middle value for even d


def _ratios(x: np.ndarray) -> np.ndarray:
    """The outlier rule in numpy: each dimension's root mean square, less 4 standard errors of
    a Gaussian mean square, over the median root mean square."""
    var, mean = x.var(0), x.mean(0)
    square = var + mean**2
    se = np.sqrt((2 * var**2 + 4 * mean**2 * var) / len(x))
    return np.sqrt(np.clip(square - 4 * se, 0, None) / _lower_median(square))


def _rows(rng: np.random.Generator, step: int) -> np.ndarray:
    """Dimension 3 is wide from the start; 7 gets a massive mean from step 41; 12 is wide
    only in steps 51-54; the rest N(1, 1)."""
    x = rng.standard_normal((ROWS, D)) + 1.0
    x[:, 3] *= 20.0
    if step > 40:
        x[:, 7] += 60.0
    if 50 < step <= 54:
        x[:, 12] *= 15.0
    return x


def test_outliers_by_identity_first_step_peak_and_new_alerts(tmp_path: Path, rng: np.random.Generator) -> None:
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, sinks=[JsonlSink(tmp_path / "m.jsonl")])
    windows: dict[int, np.ndarray] = {}
    current = []
    with monitor:
        for step in range(1, 81):
            x = _rows(rng, step)
            current.append(x)
            model(torch.from_numpy(x))
            monitor.step()
            if step % EVERY == 0:
                windows[step], current = np.concatenate(current), []
    ratios = {step: _ratios(x) for step, x in windows.items()}
    expected = {}
    for step in sorted(ratios):
        for dim in np.flatnonzero(ratios[step] > FACTOR):
            rec = expected.setdefault(int(dim), {"dim": int(dim), "first_step": step, "peak_ratio": -1.0})
            if ratios[step][dim] > rec["peak_ratio"]:
                rec["peak_ratio"], rec["peak_step"] = float(ratios[step][dim]), step
            rec["last_step"] = step
    last = max(ratios)
    got = monitor.outliers("blocks.0")
    assert [r["dim"] for r in got] == [3, 7, 12] == sorted(expected)
    for record in got:
        want = expected[record["dim"]]
        assert record["first_step"] == want["first_step"] and record["peak_step"] == want["peak_step"]
        assert record["last_step"] == want["last_step"]
        assert record["peak_ratio"] == pytest.approx(want["peak_ratio"], rel=1e-9)
        assert record["active"] == bool(ratios[last][record["dim"]] > FACTOR)
    assert [(r["first_step"], r["active"]) for r in got] == [(2, True), (42, True), (52, False)]
    # A new index after the warm-up alerts (no cool-down between new indices); 3 was there from the start.
    new = [(a["step"], a["dims"]) for a in monitor.alerts if a["kind"] == "new_outlier_dim"]
    assert new == [(42, [7]), (52, [12])]
    # JSONL: the active indices at each log where they changed.
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    listed = {line["step"]: line["outliers"]["blocks.0"] for line in lines if "outliers" in line}
    active = {s: np.flatnonzero(r > FACTOR).tolist() for s, r in sorted(ratios.items())}
    steps = sorted(active)
    changed = {s: active[s] for i, s in enumerate(steps) if active[s] != (active[steps[i - 1]] if i else [])}
    assert listed == changed and set(changed) >= {2, 42, 52}
    assert monitor.outliers("blocks.0", "eval") == [] and monitor.outliers("nope") == []


def _quantize(x: np.ndarray, scale: float) -> np.ndarray:
    return scale * np.clip(np.round(x / scale), -127, 127)


@pytest.mark.parametrize(
    ("mu", "sigma", "scale"),
    [(0.3, 2.0, 0.5), (1.0, 0.2, 0.5), (-3.7, 0.05, 0.4), (0.0, 0.7, 1.0), (2.26, 0.0, 0.5)],
)
def test_expected_roundoff_is_the_gaussian_integral(mu: float, sigma: float, scale: float) -> None:
    """E[(x - s round(x/s))^2], x ~ N(mu, sigma^2), by scipy quadrature bin by bin (fp64)."""
    if sigma == 0:
        want = (mu - scale * round(mu / scale)) ** 2
    else:
        dist = scipy.stats.norm(mu, sigma)
        lo, hi = math.floor((mu - 12 * sigma) / scale), math.ceil((mu + 12 * sigma) / scale)
        want = sum(
            scipy.integrate.quad(lambda x, k=k: (x - k * scale) ** 2 * dist.pdf(x), (k - 0.5) * scale,
                                 (k + 0.5) * scale, epsabs=1e-14)[0]
            for k in range(lo, hi + 1)
        )
    f64 = torch.float64
    got = float(expected_roundoff(torch.tensor([mu], dtype=f64), torch.tensor([sigma**2], dtype=f64), scale)[0])
    assert got == pytest.approx(want, rel=1e-7, abs=1e-15)


def test_int8_estimate_matches_quantizing_the_stored_rows(rng: np.random.Generator) -> None:
    """The estimate from the streamed mean, variance and abs-max against quantizing the rows in
    numpy: per-dimension mean squared round-off, total SQNR, and both without the outlier dims."""
    n = 20000
    x = rng.standard_normal((n, D)) * np.linspace(0.02, 3.0, D) + np.linspace(-1, 1, D)
    x[:, 5] = 40.0 * rng.standard_normal(n) + 5.0  # one outlier dimension sets the scale
    stats = LayerStats(D)
    for chunk in np.array_split(x, 7):
        stats.update(torch.from_numpy(chunk))
    np.testing.assert_array_equal(stats.absmax.numpy(), np.abs(x).max(0))  # a maximum: exact
    est = int8_absmax_error(stats, outliers=[5])
    scale = np.abs(x).max() / 127
    err = x - _quantize(x, scale)
    assert est["scale"] == pytest.approx(scale, rel=1e-12) and est["scale_dim"] == 5
    per_dim = expected_roundoff(stats.mean, stats.variance(), scale).numpy()
    np.testing.assert_allclose(per_dim, (err**2).mean(0), rtol=0.06)  # sampling noise of 20k rows
    sqnr = 10 * np.log10((x**2).sum() / (err**2).sum())
    assert est["sqnr_db"] == pytest.approx(sqnr, abs=0.1)
    rest = np.delete(x, 5, axis=1)
    scale_rest = np.abs(rest).max() / 127
    err_rest = rest - _quantize(rest, scale_rest)
    assert est["scale_without_outliers"] == pytest.approx(scale_rest, rel=1e-12)
    assert est["sqnr_db_without_outliers"] == pytest.approx(
        10 * np.log10((rest**2).sum() / (err_rest**2).sum()), abs=0.1
    )
    assert est["sqnr_db_without_outliers"] > est["sqnr_db"] + 5  # the outlier costs ~10 dB here
    with pytest.raises(ValueError, match=r"pass a LayerStats, or mean=, variance= and absmax="):
        int8_absmax_error(mean=stats.mean)
    with pytest.raises(ValueError, match=r"one value per dimension; got lengths 32, 32, 3"):
        int8_absmax_error(mean=stats.mean, variance=stats.variance(), absmax=torch.ones(3))


def test_absmax_survives_merge_reset_decay_and_state_dict(rng: np.random.Generator) -> None:
    a, b = rng.standard_normal((50, 6)) * 3, rng.standard_normal((40, 6)) - 2
    sa, sb = LayerStats(6), LayerStats(6)
    sa.update(torch.from_numpy(a))
    sb.update(torch.from_numpy(b))
    sa.merge(sb)
    np.testing.assert_array_equal(sa.absmax.numpy(), np.abs(np.concatenate([a, b])).max(0))
    sa.decay_(0.5)  # a maximum does not decay
    np.testing.assert_array_equal(sa.absmax.numpy(), np.abs(np.concatenate([a, b])).max(0))
    clone = LayerStats(6)
    clone.load_state_dict(sa.state_dict())
    np.testing.assert_array_equal(clone.absmax.numpy(), sa.absmax.numpy())
    sa.reset()
    assert float(sa.absmax.abs().sum()) == 0.0
    nan_rows = np.array(b)
    nan_rows[0, 0] = np.nan
    sc = LayerStats(6)
    sc.update(torch.from_numpy(nan_rows))  # the dropped row never raises the maximum
    np.testing.assert_array_equal(sc.absmax.numpy(), np.abs(b[1:]).max(0))


def test_quantization_summary_of_the_monitor(tmp_path: Path, rng: np.random.Generator) -> None:
    """The summary of the last logged window, with the tracker's outlier dims, equals
    ``int8_absmax_error`` on numpy's moments and abs-max of that window's rows; close() sends it
    to the JSONL sink once."""
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, sinks=[JsonlSink(tmp_path / "m.jsonl")])
    last_window = []
    with monitor:
        for step in range(1, 7):
            x = _rows(rng, 41 + step)
            if step > 4:
                last_window.append(x)
            model(torch.from_numpy(x))
            monitor.step()
    window = np.concatenate(last_window)
    summary = monitor.quantization_summary()
    entry = summary["blocks.0"]
    assert entry["step"] == 6 and entry["outlier_dims"] == [3, 7]
    want = int8_absmax_error(
        mean=torch.from_numpy(window.mean(0)), variance=torch.from_numpy(window.var(0)),
        absmax=torch.from_numpy(np.abs(window).max(0)), outliers=[3, 7],
    )
    for name in ("scale", "mse", "sqnr_db", "sqnr_db_without_outliers", "scale_without_outliers"):
        assert entry[name] == pytest.approx(want[name], rel=1e-9), name
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    (quant,) = [line for line in lines if "quantization" in line]
    assert quant["step"] == 6 and quant["quantization"]["blocks.0"]["outlier_dims"] == [3, 7]
    with pytest.raises(ValueError, match=r"eval"):
        monitor.quantization_summary("eval")


def test_tensorboard_and_wandb_get_outlier_lists_and_the_int8_summary(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gsam_monitor import TensorBoardSink, WandbSink

    tb = TensorBoardSink(tmp_path / "tb")
    tb.write_outliers({"blocks.0": [3]}, 2)
    tb.write_outliers({"blocks.0": [3]}, 4)  # unchanged: no new text
    tb.write_outliers({"blocks.0": [3, 7]}, 6)
    entry = {"sqnr_db": 25.8, "scale": 1.4, "scale_dim": 7, "sqnr_db_without_outliers": 35.7, "outlier_dims": [3, 7],
             "mse": math.nan}
    tb.write_quantization({"blocks.0": entry}, 6)
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = acc.Tensors("outliers/blocks.0/text_summary")
    assert [(t.step, t.tensor_proto.string_val[0]) for t in texts] == [(2, b"3"), (6, b"3, 7")]
    (quant,) = acc.Tensors("quantization/text_summary")
    line = quant.tensor_proto.string_val[0]
    assert b"SQNR 25.8 dB" in line and b"[3, 7]: 35.7 dB" in line

    class Run:
        def __init__(self) -> None:
            self.summary: dict = {}

    run = Run()
    sink = WandbSink(run)
    sink.write_outliers({"blocks.0": [3, 7]}, 6)
    sink.write_quantization({"blocks.0": entry}, 6)
    assert run.summary["outliers/blocks.0"] == [3, 7]
    assert run.summary["int8/blocks.0/sqnr_db"] == 25.8 and run.summary["int8/blocks.0/outlier_dims"] == [3, 7]
    assert "int8/blocks.0/mse" not in run.summary  # NaN is left out
