"""GSAMMonitor(reference=...) and pin_reference(): which window each log is compared with, the
drift metrics of the logs against numpy on the rows fed, the reference in the state dict."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.stats
import torch

from gsam_monitor import CollectOptions, ComputeOptions, GSAMMonitor, LayerStats, WindowOptions, metrics
from tests.options import with_defaults
from tests.reference import gsam_pdet, mle_cov
from tests.reference_drift import drift_reference
from tests.tiny_models import Stack

D = 5
DRIFT = list(metrics.DRIFT_METRICS)


def _monitor(model: torch.nn.Module, **kwargs) -> GSAMMonitor:
    kwargs.setdefault("layers", "auto")
    kwargs = with_defaults(kwargs, collection={"max_tokens_per_layer": None})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # every_n_steps < 10 in tests
        return GSAMMonitor(model, **kwargs)


def _batches(n: int, seed: int = 0, rows: int = 12) -> list[torch.Tensor]:
    # A covariance that rotates and a mean that moves a little at every step.
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((D, D))
    return [
        torch.from_numpy(rng.standard_normal((rows, D)) @ (mix + 0.15 * t * np.eye(D)) + 0.05 * t) for t in range(n)
    ]


def _run(monitor: GSAMMonitor, model: torch.nn.Module, batches: list[torch.Tensor]) -> list[dict[str, float]]:
    outs = []
    with torch.no_grad():
        for x in batches:
            model(x)
            out = monitor.step()
            if out:
                outs.append(out)
    return outs


def _assert_drift(out: dict[str, float], rows: np.ndarray, ref_rows: np.ndarray, layer: str = "blocks.0") -> None:
    expected = drift_reference(rows, ref_rows)
    for name in DRIFT:
        assert out[f"{name}/{layer}/eval"] == pytest.approx(expected[name], rel=1e-8), name
    fit = scipy.stats.multivariate_normal(ref_rows.mean(0), mle_cov(ref_rows))
    assert out[f"heldout_loglik/{layer}/eval"] == pytest.approx(float(fit.logpdf(rows).mean()) / D, rel=1e-9)


@pytest.mark.parametrize(("window", "background"), [("interval", False), ("interval", True), ("cumulative", False)])
def test_first_reference_compares_every_log_with_the_first_window(window: str, background: bool) -> None:
    model = Stack(dim=D, depth=1)
    monitor = _monitor(
        model,
        every_n_steps=2,
        windows=WindowOptions(kind=window, reference="first"),
        compute=ComputeOptions(background=background),
    )
    assert set(DRIFT) <= set(monitor.metric_names)  # the default selection gains the drift metrics
    batches = _batches(8)
    with monitor:
        outs = _run(monitor, model, batches)
        outs.append(monitor.flush())
    outs = [o for o in outs if o]
    assert len(outs) == 4
    rows = [np.concatenate([b.numpy() for b in batches[: 2 * (k + 1)]]) if window == "cumulative"
            else np.concatenate([b.numpy() for b in batches[2 * k : 2 * k + 2]]) for k in range(4)]
    assert not any(k.startswith("drift") for k in outs[0])  # no reference before the first log
    for out, x in zip(outs[1:], rows[1:], strict=True):
        _assert_drift(out, x, rows[0])
        assert out["gsam/blocks.0/eval"] == pytest.approx(gsam_pdet(x)[0], rel=1e-9)
    assert outs[3]["drift_w2/blocks.0/eval"] > outs[1]["drift_w2/blocks.0/eval"]  # it drifts further


def test_previous_reference_compares_consecutive_windows() -> None:
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, every_n_steps=2, metrics=["gsam", "heldout_loglik", *DRIFT])
    assert monitor.reference == "previous"
    batches = _batches(6, seed=1)
    with monitor:
        outs = _run(monitor, model, batches)
    rows = [np.concatenate([b.numpy() for b in batches[2 * k : 2 * k + 2]]) for k in range(3)]
    for k in (1, 2):
        _assert_drift(outs[k], rows[k], rows[k - 1])


def test_pinned_reference_from_an_evaluation_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Stack(dim=D, depth=2)
    monitor = _monitor(model, every_n_steps=3, windows=WindowOptions(reference="pinned"))
    base = _batches(3, seed=2)
    later = _batches(9, seed=3)
    fits, factors = [], []
    real = metrics.GaussianFit.from_stats
    monkeypatch.setattr(metrics.GaussianFit, "from_stats", lambda *a, **k: fits.append(1) or real(*a, **k))
    real_spectrum = metrics.GaussianFit.from_spectrum
    monkeypatch.setattr(
        metrics.GaussianFit, "from_spectrum", lambda *a, **k: factors.append(1) or real_spectrum(*a, **k)
    )
    with monitor:
        with pytest.raises(ValueError, match="no window of phase"):
            monitor.pin_reference()
        with torch.no_grad():
            for x in base:
                model(x)
        assert monitor.compute("eval")["blocks.0"]["n"] == 36
        assert monitor.pin_reference() == ["blocks.0/eval", "blocks.1/eval"]
        assert monitor.stats("blocks.0", "eval") is None  # the pinned window restarted
        outs = _run(monitor, model, later)
    base_rows = np.concatenate([b.numpy() for b in base])
    assert len(outs) == 3
    for k, out in enumerate(outs):
        rows = np.concatenate([b.numpy() for b in later[3 * k : 3 * k + 3]])  # the pinned rows are not counted again
        assert out["n/blocks.0/eval"] == len(rows)
        for layer in ("blocks.0", "blocks.1"):
            _assert_drift(out, rows, base_rows, layer)
    assert len(fits) == 2  # one factorisation per pinned (layer, phase), not one per log
    assert len(factors) == 2  # those two only: no log fits its own window, which no later log compares with


def test_no_reference_until_pinned_and_pin_errors() -> None:
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, every_n_steps=2, windows=WindowOptions(reference="pinned"))
    with monitor:
        outs = _run(monitor, model, _batches(4))
    assert outs and not any(k.startswith(("drift", "heldout")) for out in outs for k in out)
    fix = r"construct it with GSAMMonitor\(\.\.\., windows=WindowOptions\(reference='pinned'\)\)"
    with pytest.raises(ValueError, match=fix):
        _monitor(model).pin_reference()
    with pytest.raises(ValueError, match="phase must be one of the monitored phases"):
        _monitor(
            model, windows=WindowOptions(reference="first"), collection=CollectOptions(phases="eval")
        ).pin_reference("train")
    with pytest.raises(ValueError, match=r"WindowOptions\(reference=\) must be one of"):
        _monitor(model, windows=WindowOptions(reference="base"))
    with pytest.raises(ValueError, match="no selected metric compares with it"):
        _monitor(model, windows=WindowOptions(reference="first"), metrics=["gsam", "rank"])
    explicit = _monitor(model, windows=WindowOptions(reference="first"), metrics=["gsam", "drift_w2"])
    assert explicit.metric_names == ("gsam", "drift_w2")  # an explicit selection is kept as it is


def test_pinning_under_first_replaces_the_first_window() -> None:
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, every_n_steps=2, windows=WindowOptions(reference="first"))
    batches = _batches(7, seed=4)
    with monitor:
        first = _run(monitor, model, batches[:4])
        with torch.no_grad():
            model(batches[4])
        monitor.pin_reference()
        after = _run(monitor, model, batches[5:7])
    x0, x1 = (np.concatenate([b.numpy() for b in batches[i : i + 2]]) for i in (0, 2))
    _assert_drift(first[1], x1, x0)
    _assert_drift(after[0], np.concatenate([b.numpy() for b in batches[5:7]]), batches[4].numpy())


@pytest.mark.parametrize("reference", ["first", "pinned"])
def test_a_resumed_run_compares_with_the_same_reference(reference: str, tmp_path) -> None:
    batches = _batches(10, seed=5)
    kwargs = {
        "every_n_steps": 2,
        "windows": WindowOptions(reference=reference),
        "collection": CollectOptions(max_tokens_per_layer=7),
    }

    def start(model):
        monitor = _monitor(model, **kwargs).attach()
        if reference == "pinned":
            with torch.no_grad():
                model(batches[0])
            monitor.pin_reference()
        return monitor

    model = Stack(dim=D, depth=2)
    straight = start(model)
    expected = _run(straight, model, batches[1:])
    straight.detach()
    first = start(model)
    before = _run(first, model, batches[1:6])
    torch.save(first.state_dict(), tmp_path / "m.pt")
    first.detach()
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert state["reference_mode"] == reference and state["reference"]["eval"]
    resumed = _monitor(model, **kwargs)
    resumed.load_state_dict(state)
    resumed.attach()
    got = before + _run(resumed, model, batches[6:])
    assert len(got) == len(expected) == 4
    assert all("drift_w2/blocks.1/eval" in out for out in got[reference == "first" :])
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-12), key
    other = "pinned" if reference == "first" else "first"
    match = f"kept with reference='{reference}'.*construct it with windows=WindowOptions\\(reference='{reference}'\\)"
    with pytest.raises(ValueError, match=match):
        _monitor(model, **{**kwargs, "windows": WindowOptions(reference=other)}).load_state_dict(state)


def test_a_log_fit_is_kept_only_for_the_window_it_was_made_from() -> None:
    """``ReferencePolicy.keep_fit``: a background log's fit reaches the window after the log;
    it is kept only while the reference is still the window the log fitted (same row count),
    not after a reset, a newer reference or a loaded state; fixed references fit themselves."""
    from gsam_monitor.monitor.reference import ReferencePolicy
    from gsam_monitor.monitor.window import Window

    rng = np.random.default_rng(4)
    logged, other = LayerStats(3), LayerStats(3)
    logged.update(torch.from_numpy(rng.standard_normal((10, 3))))
    other.update(torch.from_numpy(rng.standard_normal((12, 3))))
    fit = metrics.compute(logged, names=["n"], with_fit=True).fit
    previous, first = ReferencePolicy("previous"), ReferencePolicy("first")
    window = Window()
    window.set_reference(logged)
    previous.keep_fit(window, fit)
    assert window.fit is fit and previous.for_log(window)() is fit
    window.set_reference(other)  # a newer reference (or a loaded one) before the fit arrived
    previous.keep_fit(window, fit)
    assert window.fit is None and previous.for_log(window)() is other
    window.set_reference(None)  # reset
    previous.keep_fit(window, fit)
    assert window.fit is None and previous.for_log(window)() is None
    window.set_reference(logged)
    first.keep_fit(window, fit)
    assert window.fit is None  # a fixed reference is factorised from itself, at its first use
    made = first.for_log(window)()
    assert made is not fit and made.n == 10 and first.for_log(window)() is made  # once
