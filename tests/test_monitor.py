"""GSAMMonitor: schedule, windows, held-out scores, collect_steps, faults, state and budget,
against independent fp64 numpy/scipy computations on the rows fed."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from gsam_monitor import CollectOptions, ComputeOptions, GSAMMonitor, LayerStats, WindowOptions, memory_report
from gsam_monitor.monitor import DEFAULT_MAX_STATE_BYTES, state_bytes_per_layer
from tests.options import with_defaults
from tests.reference import gsam_pdet, mle_cov
from tests.reference_metrics import assert_logged_equal
from tests.tiny_models import Stack

D = 3


def _monitor(model: nn.Module, **kwargs) -> GSAMMonitor:
    kwargs.setdefault("layers", "auto")
    kwargs = with_defaults(kwargs, collection={"max_tokens_per_layer": None})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # every_n_steps < 10 in tests
        return GSAMMonitor(model, **kwargs)


def _batches(n_steps: int, seed: int = 0, rows: int = 7) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((D, D))
    return [torch.from_numpy(rng.standard_normal((rows + t % 3, D)) @ mix + t * 0.1) for t in range(n_steps)]


def _weighted_moments(parts: list[np.ndarray], weights: list[float]) -> tuple[float, np.ndarray, np.ndarray]:
    x = np.concatenate(parts)
    w = np.concatenate([np.full(len(p), wt) for p, wt in zip(parts, weights, strict=True)])
    n = w.sum()
    mean = (w[:, None] * x).sum(0) / n
    xc = x - mean
    return n, mean, (w[:, None] * xc).T @ xc / n


@pytest.mark.parametrize("window", ["interval", "cumulative", "ema"])
def test_windows_match_numpy_weighted_moments(window: str) -> None:
    model = Stack(dim=D, depth=1)
    half_life = 2.0
    windows = WindowOptions(kind=window, ema_half_life=half_life if window == "ema" else None)
    monitor = _monitor(model, every_n_steps=3, windows=windows)
    batches = _batches(9)
    logs = {}
    with monitor, torch.no_grad():
        for t, x in enumerate(batches, start=1):
            model(x)
            stats = monitor.stats("blocks.0", "eval")
            snapshot = (float(stats.count), stats.mean.clone(), stats.covariance().clone())
            out = monitor.step()
            assert (out is not None) == (t % 3 == 0)
            if out is not None:
                logs[t] = (out, snapshot)
    parts = [b.numpy() for b in batches]
    for last, (out, (count, mean, cov)) in logs.items():
        if window == "interval":
            used, weights = parts[last - 3 : last], [1.0] * 3
        elif window == "cumulative":
            used, weights = parts[:last], [1.0] * last
        else:  # the newest step weighs 1, each older step 2^(-1/half_life) less
            used, weights = parts[:last], [0.5 ** ((last - j) / half_life) for j in range(1, last + 1)]
        n, m, c = _weighted_moments(used, weights)
        assert count == pytest.approx(n, rel=1e-12)
        np.testing.assert_allclose(mean.numpy(), m, rtol=1e-9)
        np.testing.assert_allclose(cov.numpy(), c, rtol=1e-9)
        assert out["n/blocks.0/eval"] == pytest.approx(n, rel=1e-12)
        if window != "ema":
            assert out["gsam/blocks.0/eval"] == pytest.approx(gsam_pdet(np.concatenate(used))[0], rel=1e-9)


def test_heldout_scores_each_window_under_the_previous_fit() -> None:
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, every_n_steps=2, metrics=["gsam", "heldout_loglik", "rank"])
    batches = _batches(4, seed=1, rows=20)
    outs = []
    with monitor, torch.no_grad():
        for x in batches:
            model(x)
            outs.append(monitor.step())
    assert "heldout_loglik/blocks.0/eval" not in outs[1]  # no earlier window yet
    first = np.concatenate([b.numpy() for b in batches[:2]])
    second = np.concatenate([b.numpy() for b in batches[2:]])
    mvn = scipy.stats.multivariate_normal(first.mean(0), mle_cov(first))
    expected = float(mvn.logpdf(second).mean()) / D
    assert outs[3]["heldout_loglik/blocks.0/eval"] == pytest.approx(expected, rel=1e-9)
    assert outs[3]["rank/blocks.0/eval"] == D


def test_a_log_scores_against_the_fit_its_previous_log_kept(eig_calls: dict[str, int]) -> None:
    # One eigvalsh per layer per log: the previous window is not refactorised (full rank: the
    # fit kept is a Cholesky inverse made at the log that closed it).
    model = Stack(dim=D, depth=2)
    monitor = _monitor(model, every_n_steps=1, metrics=["gsam", "heldout_loglik"])
    batches = _batches(3, seed=2, rows=30)
    outs = []
    with monitor, torch.no_grad():
        for x in batches:
            model(x)
            outs.append(monitor.step())
    assert eig_calls == {"eigvalsh": 3 * 2, "eigh": 0}
    assert {k for k, w in monitor._windows.windows.items() if w.fit is not None} == {
        ("blocks.0", "eval"),
        ("blocks.1", "eval"),
    }
    first, second = batches[1].numpy(), batches[2].numpy()
    expected = float(scipy.stats.multivariate_normal(first.mean(0), mle_cov(first)).logpdf(second).mean()) / D
    assert outs[2]["heldout_loglik/blocks.0/eval"] == pytest.approx(expected, rel=1e-9)


def test_step_schedule_keys_and_global_step() -> None:
    model = Stack(dim=D, depth=2)
    seen = []
    monitor = _monitor(model, every_n_steps=10, sinks=[lambda m, s: seen.append((s, m))])
    x = _batches(1)[0]
    with monitor, torch.no_grad():
        model(x)
        assert monitor.step(global_step=7) is None
        model(x)
        out = monitor.step(global_step=12)  # crossed 10: log
        assert monitor.step(global_step=13) is None
    assert seen == [(12, out)]
    for layer in ("blocks.0", "blocks.1"):
        for metric in ("gsam", "rank", "gsam_oas", "effective_rank", "nonfinite", "n"):
            assert f"{metric}/{layer}/eval" in out
    assert out["gsam_monitor/missing_layers/eval"] == 0 and out["gsam_monitor/errors"] == 0
    assert all(math.isfinite(v) for v in out.values())
    with pytest.raises(ValueError, match="global_step must be a non-negative int"):
        monitor.step(global_step=-1)


def test_compute_and_log_per_phase() -> None:
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, every_n_steps=100, metrics=["gsam", "n"])
    x = _batches(2)
    with monitor:
        model(x[0])  # train phase
        with torch.no_grad():
            model(x[1])
    assert set(monitor.compute()) == {"blocks.0", "blocks.0/eval"}
    assert set(monitor.compute(phase="eval")) == {"blocks.0"}
    assert monitor.compute("eval")["blocks.0"]["n"] == len(x[1])
    flat = monitor.log(global_step=5, phases=["eval"])
    per_layer = {f"{m}/blocks.0/eval" for m in ("gsam", "n", "d", "nonfinite")}  # n, d, nonfinite always
    assert set(flat) == per_layer | {"gsam_monitor/missing_layers/eval", "gsam_monitor/errors"}
    assert float(monitor.stats("blocks.0", "eval").count) == 0  # the eval window restarted
    assert float(monitor.stats("blocks.0", "train").count) == len(x[0])
    with pytest.raises(ValueError, match="phase must be one of the monitored phases"):
        monitor.compute(phase="test")


def test_collect_steps_keeps_hooks_off_between_windows() -> None:
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, every_n_steps=5, collection=CollectOptions(steps=2))
    baseline = len(model.blocks[0]._forward_hooks)
    registered = []
    x = _batches(1)[0]
    with monitor:
        for _ in range(10):
            registered.append(len(model.blocks[0]._forward_hooks) - baseline)
            model(x)  # training forwards: the schedule governs them
            out = monitor.step()
            if out is not None:
                assert out["n/blocks.0"] == 2 * len(x)  # steps 4 and 5 only
        with monitor.collect():  # e.g. a training-mode probe between logs
            assert len(model.blocks[0]._forward_hooks) - baseline == 1
        assert len(model.blocks[0]._forward_hooks) == baseline
    assert registered == [0, 0, 0, 1, 1] * 2
    assert len(model.blocks[0]._forward_hooks) == baseline


def test_evaluation_forwards_between_windows_are_collected_with_the_default_schedule() -> None:
    """Defaults (every 100 steps, the last 10 collected): evaluation forwards at steps 50 and
    70, in ``no_grad``, ``inference_mode`` and eval mode, all reach the eval window, while the
    training window holds steps 91..100 (and the first forward) only, and the layer hooks are
    parked again after each evaluation forward."""
    model = Stack(dim=D, depth=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no setup warning but the missing sink's
        warnings.filterwarnings("ignore", "GSAMMonitor: no sink", UserWarning)
        monitor = GSAMMonitor(model, collection=CollectOptions(max_tokens_per_layer=None))
    assert (monitor.every_n_steps, monitor.collect_steps) == (100, 10)
    train = _batches(100, seed=1)
    evals = _batches(3, seed=2, rows=5)
    logs = []
    with monitor:
        for step, x in enumerate(train, start=1):
            model.train()
            model(x)
            if step == 50:
                assert not monitor.hooks_registered
                with torch.no_grad():
                    model(evals[0])
                with torch.inference_mode():
                    model(evals[1])
                now = monitor.compute("eval")["blocks.1"]
                assert now["n"] == len(evals[0]) + len(evals[1])
                assert not monitor.hooks_registered
            if step == 70:
                model.eval()  # eval mode with gradients on is the eval phase too
                model(evals[2])
                assert not monitor.hooks_registered
            out = monitor.step()
            if out:
                logs.append(out)
    assert len(logs) == 1
    want_eval = np.concatenate([x.numpy() for x in evals])
    # The forward before the first step() is collected too (the "auto" rule for inference scripts).
    want_train = np.concatenate([x.numpy() for x in [train[0], *train[90:]]])
    for layer in ("blocks.0", "blocks.1"):
        assert logs[0][f"n/{layer}/eval"] == len(want_eval)
        assert logs[0][f"gsam/{layer}/eval"] == pytest.approx(gsam_pdet(want_eval)[0], rel=1e-9)
        assert logs[0][f"n/{layer}"] == len(want_train)
        assert logs[0][f"gsam/{layer}"] == pytest.approx(gsam_pdet(want_train)[0], rel=1e-9)


def test_an_evaluation_forward_that_raises_parks_the_hooks_again() -> None:
    class Failing(Stack):
        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
            x = self.blocks[0](x)
            raise RuntimeError("evaluation failed")

    model = Failing(dim=D, depth=2)
    monitor = _monitor(model, every_n_steps=10, collection=CollectOptions(steps=2))
    with monitor:
        monitor.step()
        with torch.no_grad(), pytest.raises(RuntimeError, match="evaluation failed"):
            model(_batches(1)[0])
        assert not monitor.hooks_registered
        assert float(monitor.stats("blocks.0", "eval").count) == len(_batches(1)[0])
        assert monitor.stats("blocks.1", "eval") is None
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_an_evaluation_forward_interrupted_by_ctrl_c_does_not_park_a_reattached_monitor() -> None:
    """KeyboardInterrupt skips the model's always-call hooks, so the interrupted evaluation
    forward never closes the layer hooks it opened; closing and attaching again starts clean."""
    class Interrupted(Stack):
        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
            self.blocks[0](x)
            raise KeyboardInterrupt

    model = Interrupted(dim=D, depth=2)
    monitor = _monitor(model, every_n_steps=10, collection=CollectOptions(steps=2))
    x = _batches(1)[0]
    with pytest.raises(KeyboardInterrupt), monitor:
        monitor.step()
        with torch.no_grad():
            model(x)
    assert not model._forward_pre_hooks and all(not b._forward_hooks for b in model.blocks)
    model.forward = Stack.forward.__get__(model)  # the next run's forwards complete
    with monitor, torch.no_grad():
        model(x)
        assert not monitor.hooks_registered  # parked again after the evaluation forward
        assert float(monitor.stats("blocks.1", "eval").count) == len(x)


def test_eval_forwards_are_not_collected_when_only_training_is_monitored() -> None:
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, every_n_steps=10, collection=CollectOptions(steps=2, phases="train"))
    with monitor:
        monitor.step()
        with torch.no_grad():
            model(_batches(1)[0])
        model(_batches(1)[0])  # a training forward outside the window
        assert monitor.stats("blocks.0", "train") is None
        assert not model._forward_pre_hooks  # nothing on the model between windows


def test_a_collect_handle_keeps_the_hooks_until_it_is_closed_once() -> None:
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, every_n_steps=5, collection=CollectOptions(steps=2))
    baseline = len(model.blocks[0]._forward_hooks)
    x = _batches(1)[0]
    with monitor:  # training forwards: the schedule (and collect()) governs them
        monitor.step()  # step 1: parked until the last 2 steps of the interval
        assert len(model.blocks[0]._forward_hooks) == baseline
        first, second = monitor.collect(), monitor.collect()  # e.g. two probes between logs
        model(x)
        first.close()
        first.close()  # idempotent: the second handle still holds the hooks
        assert len(model.blocks[0]._forward_hooks) - baseline == 1
        model(x)
        second.close()
        assert len(model.blocks[0]._forward_hooks) == baseline
        model(x)  # parked again: not counted
    assert float(monitor.stats("blocks.0", "train").count) == 2 * len(x)


def test_the_report_is_pure_and_its_warnings_are_issued_once_when_published() -> None:
    from gsam_monitor.monitor.report import build_report

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # building a report must warn about nothing
        result = build_report(
            {}, {}, layers=["blocks.0"], phases=["eval"], metric_names=["n"], disabled=(), step=7, want_spectrum=False
        )
    assert result.flat == {} and result.errors == []
    assert [key for key, _ in result.warnings] == ["empty-window"]
    assert "window ending at step 7" in result.warnings[0][1]
    monitor = _monitor(Stack(dim=D, depth=1), every_n_steps=1)
    with monitor, pytest.warns(RuntimeWarning, match="no activations were captured") as caught:
        monitor.step()
        monitor.step()  # the same warning again: logged at debug level, not warned
    assert sum("no activations were captured" in str(w.message) for w in caught) == 1


def test_missing_layer_is_reported_not_logged() -> None:
    class Skipping(Stack):
        skip = False

        def forward(self, x, attention_mask=None):
            x = self.blocks[0](x)
            return x if self.skip else self.blocks[1](x)

    model = Skipping(dim=D, depth=2)
    monitor = _monitor(model, every_n_steps=1)
    x = _batches(1)[0]
    with monitor, torch.no_grad():
        model(x)
        assert monitor.step()["gsam_monitor/missing_layers/eval"] == 0
        model.skip = True
        with pytest.warns(RuntimeWarning, match=r"no activations reached blocks.1/eval .* reported as missing"):
            model(x)
            out = monitor.step()
    assert out["gsam_monitor/missing_layers/eval"] == 1
    assert monitor.missing_layers == ["blocks.1/eval"]
    assert not [k for k in out if "blocks.1" in k]
    assert "gsam/blocks.0/eval" in out


def test_nonfinite_rows_are_dropped_counted_and_logged() -> None:
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, every_n_steps=1)
    x = _batches(1, rows=10)[0]
    bad = x.clone()
    bad[2, 1] = float("nan")
    bad[5, 0] = float("inf")
    with monitor, torch.no_grad():
        model(bad)
        out = monitor.step()
    clean = np.delete(x.numpy(), [2, 5], axis=0)
    assert out["nonfinite/blocks.0/eval"] == 2 and out["n/blocks.0/eval"] == len(clean)
    assert out["gsam/blocks.0/eval"] == pytest.approx(gsam_pdet(clean)[0], rel=1e-9)


def test_empty_window_warns_and_returns_nothing() -> None:
    model = Stack(dim=D, depth=1)
    calls = []
    monitor = _monitor(model, every_n_steps=1, sinks=[lambda m, s: calls.append(s)])
    with monitor, pytest.warns(RuntimeWarning, match="no activations were captured in the window ending at step 1"):
        assert monitor.step() == {}
    assert calls == []


def test_a_raising_sink_is_disabled_after_one_warning() -> None:
    model = Stack(dim=D, depth=1)
    calls = {"bad": 0, "good": 0}

    def bad(metrics, step):
        calls["bad"] += 1
        raise OSError("disk full")

    def good(metrics, step):
        calls["good"] += 1

    monitor = _monitor(model, every_n_steps=1, sinks=[bad, good])
    x = _batches(1)[0]
    with monitor, torch.no_grad():
        with pytest.warns(RuntimeWarning, match=r"sink .* raised OSError: disk full; it is disabled"):
            model(x)
            monitor.step()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            model(x)
            out = monitor.step()
    assert calls == {"bad": 1, "good": 2}
    assert out["gsam_monitor/errors"] == 1


def test_hooks_are_removed_when_the_body_raises() -> None:
    model = Stack(dim=D, depth=2)
    for exc in (RuntimeError("training step failed"), KeyboardInterrupt()):
        monitor = _monitor(model)
        with pytest.raises(type(exc)):
            with monitor:
                assert monitor.hooks_registered
                model(_batches(1)[0])
                raise exc
        assert not monitor.hooks_registered
        assert not model._forward_pre_hooks and not model._forward_hooks
        assert all(not b._forward_hooks for b in model.blocks)


def test_state_dict_round_trip_resumes_mid_window(tmp_path) -> None:
    """Save at step 7 (mid-window, with token subsampling), load with weights_only=True into a
    fresh monitor: the next logs equal those of the uninterrupted run."""
    batches = _batches(15, seed=3, rows=9)
    kwargs = {
        "every_n_steps": 5,
        "collection": CollectOptions(max_tokens_per_layer=4),
        "metrics": ["gsam", "heldout_loglik", "n", "rank"],
    }

    def run(monitor, model, steps):
        outs = []
        with torch.no_grad():
            for t in steps:
                model(batches[t - 1])
                out = monitor.step()
                if out is not None:
                    outs.append(out)
        return outs

    model = Stack(dim=D, depth=2)
    straight = _monitor(model, **kwargs).attach()
    expected = run(straight, model, range(1, 16))
    straight.detach()

    first = _monitor(model, **kwargs).attach()
    before = run(first, model, range(1, 8))
    path = tmp_path / "monitor.pt"
    torch.save(first.state_dict(), path)
    first.detach()
    state = torch.load(path, weights_only=True)
    resumed = _monitor(model, **kwargs)
    resumed.load_state_dict(state)
    resumed.attach()
    after = run(resumed, model, range(8, 16))
    assert resumed.step_count == 15
    got = before + after
    assert len(got) == len(expected) == 3
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-12), key

    with pytest.raises(ValueError, match="the state is for layers"):
        _monitor(model, layers="blocks.0").load_state_dict(state)
    with pytest.raises(ValueError, match="not a GSAMMonitor state"):
        resumed.load_state_dict({"stats": {}})


def test_resuming_with_metrics_that_keep_fewer_moments_drops_them_and_the_logs_go_on(tmp_path) -> None:
    """A state saved with the higher moments (the default metrics: anisotropy, mean_kurtosis) loads
    into a monitor whose metrics= needs none: its windows and references merge with the new rows,
    and the logs after the resume equal numpy on every row of their windows; the other way round
    is refused at load, before anything changes."""
    batches = _batches(15, seed=5, rows=9)
    model = Stack(dim=D, depth=1)
    saved = _monitor(model, every_n_steps=5, metrics="default").attach()
    with torch.no_grad():
        for t in range(7):  # a log at step 5 (its window becomes the reference), then 2 steps of the next
            model(batches[t])
            saved.step()
    saved.detach()
    state = torch.load(_saved(tmp_path, saved.state_dict()), weights_only=True)
    lean = ["n", "gsam", "effective_rank", "heldout_loglik"]
    resumed = _monitor(model, every_n_steps=5, metrics=lean, sinks=[])
    resumed.load_state_dict(state)
    logs = []
    with resumed, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no flush fault
        for t in range(7, 15):
            model(batches[t])
            out = resumed.step()
            if out is not None:
                logs.append(out)
    assert resumed.errors == 0 and len(logs) == 2
    x = [np.concatenate([b.numpy() for b in batches[i : i + 5]]) for i in (0, 5, 10)]
    for logged, rows, previous in zip(logs, x[1:], x[:-1], strict=True):  # the loaded reference, then a new one
        assert_logged_equal(logged, "blocks.0/eval", rows, previous, names=("n", "gsam", "effective_rank"))
        assert not any(key.startswith(("anisotropy/", "mean_kurtosis/")) for key in logged)

    state = torch.load(_saved(tmp_path, resumed.state_dict()), weights_only=True)  # saved without them
    for metrics, named in ((["n", "anisotropy"], "for anisotropy;"), ("default", "for anisotropy, mean_kurtosis;")):
        fresh = _monitor(model, every_n_steps=5, metrics=metrics, sinks=[])
        with pytest.raises(ValueError, match=rf"saved without the higher moments .* needs {named} construct the "
                           r"monitor with the saved run's metrics="):  # fmt: skip
            fresh.load_state_dict(state)
        assert fresh.step_count == 0 and fresh.stats("blocks.0", "eval") is None  # nothing was loaded


def _saved(tmp_path, state: dict) -> str:
    path = tmp_path / "monitor.pt"
    torch.save(state, path)
    return str(path)


def test_reset_and_repr() -> None:
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, every_n_steps=100)
    with monitor, torch.no_grad():
        model(_batches(1)[0])
        monitor.step()
    monitor.reset()
    assert float(monitor.stats("blocks.0", "eval").count) == 0 and monitor.step_count == 1
    assert "every_n_steps=100" in repr(monitor)


def test_configuration_errors_name_the_argument() -> None:
    model = Stack(dim=D, depth=1)
    with pytest.raises(ValueError, match=r"every_n_steps must be a positive int .* got 0"):
        GSAMMonitor(model, every_n_steps=0)
    with pytest.raises(ValueError, match=r"every_n_steps must be a positive int .* got 2.5"):
        GSAMMonitor(model, every_n_steps=2.5)
    with pytest.raises(ValueError, match=r"WindowOptions\(kind=\) must be one of .* got 'sliding'"):
        GSAMMonitor(model, windows=WindowOptions(kind="sliding"))
    with pytest.raises(ValueError, match=r"WindowOptions\(ema_half_life=\) only applies to kind='ema'"):
        GSAMMonitor(model, windows=WindowOptions(ema_half_life=3))
    with pytest.raises(ValueError, match=r"WindowOptions\(ema_half_life=\) must be a positive number"):
        GSAMMonitor(model, windows=WindowOptions(kind="ema", ema_half_life=-1))
    with pytest.raises(ValueError, match=r"CollectOptions\(steps=20\) exceeds every_n_steps=10"):
        GSAMMonitor(model, every_n_steps=10, collection=CollectOptions(steps=20))
    with pytest.raises(ValueError, match=r"CollectOptions\(max_tokens_per_layer=\) must be a positive int"):
        GSAMMonitor(model, collection=CollectOptions(max_tokens_per_layer=0))
    with pytest.raises(ValueError, match=r"metrics: unknown metric name\(s\) 'gsm' \(did you mean 'gsam'\?\)"):
        GSAMMonitor(model, metrics=["gsm"])
    bad_phase = r"CollectOptions\(phases=\) must be a non-empty selection .* got \('train', 'test'\)"
    with pytest.raises(ValueError, match=bad_phase):
        GSAMMonitor(model, collection=CollectOptions(phases=("train", "test")))
    with pytest.raises(TypeError, match=r"ComputeOptions\(state_dtype=\) must be a floating torch dtype"):
        GSAMMonitor(model, compute=ComputeOptions(state_dtype=torch.int32))
    with pytest.raises(TypeError, match=r"CollectOptions\(seed=\) must be an int"):
        GSAMMonitor(model, collection=CollectOptions(seed="0"))
    with pytest.raises(ValueError, match=r"sinks=: unknown sink name 'tensorbord'\. Did you mean 'tensorboard'"):
        GSAMMonitor(model, sinks=["tensorbord"])
    with pytest.raises(TypeError, match="sinks= entries must be Sink objects"):
        GSAMMonitor(model, sinks=[42])
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        GSAMMonitor("bert")
    with pytest.raises(ValueError, match=r"ComputeOptions\(spectrum_every_n_logs=\) must be a positive int"):
        GSAMMonitor(model, compute=ComputeOptions(spectrum_every_n_logs=-2))
    with pytest.warns(UserWarning, match=r"every_n_steps=5\): each log runs one eigendecomposition"):
        GSAMMonitor(model, every_n_steps=5)


class _Wide(nn.Module):
    """Blocks of feature size 8192 whose dimension is known without allocating weights."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.LayerNorm(8192) for _ in range(depth))


def test_state_budget() -> None:
    # The documented formula: itemsize * (d^2 + 6d) per window; on the host per phase the totals,
    # the reference (held-out fits) and a log's copy.
    buffer = 8 * (8192**2 + 6 * 8192) + 16
    assert LayerStats.state_bytes(8192) == buffer
    assert state_bytes_per_layer(8192) == 4 * buffer
    # The device holds one buffer per layer and the update workspace (two fp64 chunks of 512 rows).
    workspace = 2 * 512 * 8192 * 8
    GSAMMonitor(_Wide(15))
    assert 15 * buffer + workspace <= DEFAULT_MAX_STATE_BYTES < 16 * buffer + workspace
    need = f"{(16 * buffer + workspace) / 2**30:.3f}"
    with pytest.raises(
        ValueError,
        match=rf"ComputeOptions\(max_state_bytes=\): .* need {need} GiB on the device \(16 layers of d = 8192.* "
        r"over max_state_bytes = 8.000 GiB\. Fix: monitor fewer layers.*float32",
    ):
        GSAMMonitor(_Wide(16))
    GSAMMonitor(_Wide(16), compute=ComputeOptions(state_dtype=torch.float32))
    GSAMMonitor(_Wide(16), compute=ComputeOptions(max_state_bytes=None))
    # The host budget, when one is set: 4 layers x 2 phases x (totals + reference) on a CPU model.
    host = 4 * 2 * 2 * buffer
    GSAMMonitor(_Wide(4), compute=ComputeOptions(max_host_bytes=host))
    with pytest.raises(ValueError, match=r"ComputeOptions\(max_host_bytes=\): .* host state would need 8.006 GiB"):
        GSAMMonitor(_Wide(4), compute=ComputeOptions(max_host_bytes=host - 1))
    with pytest.raises(ValueError, match=r"ComputeOptions\(max_state_bytes=\) must be a positive int"):
        GSAMMonitor(_Wide(1), compute=ComputeOptions(max_state_bytes=0))


def test_runtime_budget_skips_layers_whose_size_was_unknown() -> None:
    class Opaque(nn.Module):  # no parameters: the feature size is only known at run time
        def forward(self, x):
            return x * 1.0

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = Opaque()
            self.b = Opaque()

        def forward(self, x):
            return self.b(self.a(x))

    net = Net()
    # Room for what a layer of d = D takes as the construction check counts it (its buffer and the
    # update workspace, memory_report's device_bytes), not a byte more: the same accounting at run time.
    one = memory_report(Stack(dim=D, depth=1), layers="blocks.0")["device_bytes"]
    assert one > LayerStats.state_bytes(D)  # the workspace is counted
    for budget, kept in ((one, ["a"]), (one - 1, [])):
        monitor = _monitor(net, layers=["a", "b"], compute=ComputeOptions(max_state_bytes=budget))
        with monitor, torch.no_grad(), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            net(torch.randn(4, D))
        assert [n for n in "ab" if monitor.stats(n, "eval") is not None] == kept
        warned = [str(w.message) for w in seen if "over max_state_bytes" in str(w.message)]
        assert len(warned) == 2 - len(kept)  # once per layer left out
        held = f"2 accumulation buffer(s) of d = {D}, {D}" if kept else f"1 accumulation buffer(s) of d = {D}"
        workspace = one - LayerStats.state_bytes(D)
        assert f"layer '{'b' if kept else 'a'}' (d = {D}) would take the device to " in warned[0]
        assert f"({held}, plus {workspace / 2**20:.3f} MiB of update workspace), over max_state_bytes = " in warned[0]
        assert f"max_state_bytes = {budget / 2**20:.3f} MiB; it is not monitored" in warned[0]  # not 0.000 GiB


def test_model_moved_to_another_dtype_after_attach() -> None:
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, every_n_steps=2)
    x = _batches(2)
    with monitor, torch.no_grad():
        model(x[0])
        model.float()
        model(x[1].float())
        out = monitor.step(global_step=2)
    rows = np.concatenate([x[0].numpy(), x[1].float().double().numpy()])
    assert out["gsam/blocks.0/eval"] == pytest.approx(gsam_pdet(rows)[0], rel=1e-6)


@pytest.mark.parametrize("window", ["interval", "cumulative"])
def test_background_logs_equal_inline_logs_at_the_same_steps(window: str) -> None:
    # background=True computes each scheduled log on a worker thread from a snapshot taken on
    # schedule; the sinks must get the same values at the same steps as inline logging, and
    # every log must arrive (the last one at close()).
    batches = _batches(12)
    written: dict[bool, list[tuple[int, dict[str, float]]]] = {}
    returned: dict[bool, dict[str, float]] = {}
    for background in (False, True):
        model = Stack(dim=D, depth=2)
        torch.manual_seed(0)
        records: list[tuple[int, dict[str, float]]] = []
        monitor = _monitor(
            model,
            every_n_steps=3,
            windows=WindowOptions(kind=window), compute=ComputeOptions(background=background),
            metrics="all",
            sinks=[lambda m, s, r=records: r.append((s, dict(m)))],
        )
        assert monitor.background is background
        got: dict[str, float] = {}
        with monitor, torch.no_grad():
            for x in batches:
                model(x)
                got.update(monitor.step() or {})
        written[background] = records
        returned[background] = got
    assert [s for s, _ in written[True]] == [3, 6, 9, 12]
    assert [s for s, _ in written[True]] == [s for s, _ in written[False]]
    for (_, bg), (_, inline) in zip(written[True], written[False], strict=True):
        assert bg.keys() == inline.keys()
        for key, value in inline.items():
            assert bg[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    # Inline: step() returns each log; background: the logs finished before the last step.
    assert returned[False] == written[False][-1][1]
    assert returned[True] in [m for _, m in written[True]]
    # The values themselves, every background log against numpy/scipy on the rows: the
    # interval window holds the last 3 steps' batches, the cumulative one every batch so far;
    # the held-out score rates it under the previous log's fit.
    def rows(step: int) -> np.ndarray:
        first = step - 3 if window == "interval" else 0
        return np.concatenate([b.numpy() for b in batches[first:step]])

    for step, logged in written[True]:
        for layer in ("blocks.0", "blocks.1"):
            previous = rows(step - 3) if step > 3 else None
            assert_logged_equal(logged, f"{layer}/eval", rows(step), previous, rtol=1e-9)


def test_background_errors_are_counted_and_training_goes_on(monkeypatch) -> None:
    from gsam_monitor import metrics as metrics_module

    calls = {"n": 0}
    real = metrics_module.compute

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise FloatingPointError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics_module, "compute", flaky)
    model = Stack(dim=D, depth=1)
    records: list[tuple[int, dict[str, float]]] = []
    monitor = _monitor(
        model,
        every_n_steps=2,
        compute=ComputeOptions(background=True),
        sinks=[lambda m, s: records.append((s, dict(m)))],
    )
    with pytest.warns(RuntimeWarning, match="FloatingPointError: injected"):
        with monitor, torch.no_grad():
            for x in _batches(6):
                model(x)
                monitor.step()
    assert monitor.errors == 1
    assert [s for s, _ in records] == [2, 4, 6]
    assert "gsam/blocks.0/eval" not in records[0][1]  # the failed computation logged nothing for it
    assert records[0][1]["gsam_monitor/errors"] == 1.0
    rows = np.concatenate([b.numpy() for b in _batches(6)[4:]])
    assert records[-1][1]["gsam/blocks.0/eval"] == pytest.approx(gsam_pdet(rows)[0], rel=1e-9)


def test_background_argument_is_checked() -> None:
    with pytest.raises(TypeError, match=r"ComputeOptions\(background=\) must be True, False or None"):
        GSAMMonitor(Stack(dim=D, depth=1), compute=ComputeOptions(background="yes"))
    assert GSAMMonitor(Stack(dim=D, depth=1)).background is False  # CPU model: inline by default


@pytest.mark.parametrize(("every", "expected"), [(5, 5), (10, 10), (50, 10), (100, 10), (1000, 100)])
def test_default_collect_steps_is_the_last_tenth_but_at_least_ten_steps(every: int, expected: int) -> None:
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, every_n_steps=every)
    assert monitor.collect_steps == expected
    x = _batches(1)[0]
    on = []
    logged = []
    with monitor:
        for _ in range(every):
            on.append(monitor.hooks_registered)
            model(x)  # training forwards: the schedule governs them
            out = monitor.step()
            if out:
                logged.append(out["n/blocks.0"])
    # Before the first step() every forward counts (inference scripts never step); then the
    # hooks are on for the last `expected` steps of each interval only.
    first = min(expected + 1, every)
    assert on == [True] + [False] * (every - 1 - (first - 1)) + [True] * (first - 1)
    assert logged == [first * len(x)]


@pytest.mark.parametrize("window", ["interval", "ema"])
def test_rows_the_hooks_hold_back_reach_every_read_of_the_monitor(window: str) -> None:
    """d = 64 with forwards of 4 rows: the hooks hold them (``RowBuffer``) and every read
    (``stats()``, ``compute()``, ``state_dict()``, the log, the EMA decay) sees all of them."""
    d = 64
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((4, d)) + 3 for _ in range(10)]
    model = Stack(dim=d, depth=1)
    monitor = _monitor(
        model,
        every_n_steps=5,
        collection=CollectOptions(steps=None, phases="eval"),
        windows=WindowOptions(kind=window, ema_half_life=2.0 if window == "ema" else None),
        metrics=["n", "gsam"],
        sinks=[],
    )
    with monitor, torch.no_grad():
        for x in xs[:3]:
            model(torch.from_numpy(x))
        assert monitor._windows.windows[("blocks.0", "eval")].held_rows == 12  # held, not in the sums yet
        seen = np.concatenate(xs[:3])
        assert float(monitor.stats("blocks.0", "eval").count) == 12
        assert monitor.compute("eval")["blocks.0"]["gsam"] == pytest.approx(gsam_pdet(seen)[0], rel=1e-9)
        model(torch.from_numpy(xs[3]))
        saved = monitor.state_dict()
        assert float(LayerStats.from_state_dict(saved["stats"]["eval"]["blocks.0"]).count) == 16
        logs = []
        for step, x in enumerate(xs[4:], start=1):
            model(torch.from_numpy(x))
            out = monitor.step()
            if out:
                logs.append((step, out))
    ((step, out),) = [(s, o) for s, o in logs if s == 5]
    rows = np.concatenate(xs[:9])
    if window == "interval":
        assert out["n/blocks.0/eval"] == len(rows)
        assert out["gsam/blocks.0/eval"] == pytest.approx(gsam_pdet(rows)[0], rel=1e-9)
    else:  # each step() decays what came before it, held rows included: x0..x4 by f^4, ..., x8 by 1
        f = 0.5 ** (1 / 2.0)
        weights = [f**4] * 5 + [f**3, f**2, f, 1.0]
        n, _, cov = _weighted_moments(xs[:9], weights)
        assert out["n/blocks.0/eval"] == pytest.approx(n, rel=1e-12)
        lam = np.linalg.eigvalsh(cov)  # 36 rows in d = 64: scored on the support
        lam = lam[lam > 1e6 * np.finfo(np.float64).eps * lam.max()]
        want = math.log(n) - len(lam) / 2 * (1 + math.log(2 * math.pi)) - np.log(lam).sum() / 2
        assert out["gsam/blocks.0/eval"] == pytest.approx(want, rel=1e-9)
