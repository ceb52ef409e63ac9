"""Forwards under torch.inference_mode() (generation, evaluation loops), torch.no_grad() and eval
mode, before, between and after training steps, leave every log intact and exact: everything the
monitor creates (windows, held-out fits, copies, reservoir samples) is an ordinary tensor."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.stats
import torch

from gsam_monitor import CollectOptions, ComputeOptions, GSAMMonitor, WindowOptions
from tests.reference import gsam_pdet, mle_cov
from tests.tiny_models import Stack

D = 3


@pytest.mark.parametrize(("window", "background"), [("interval", False), ("cumulative", True)])
def test_inference_mode_no_grad_and_eval_forwards_leave_every_log_exact(window: str, background: bool) -> None:
    rng = np.random.default_rng(4)
    mix = rng.standard_normal((D, D))
    xs = [rng.standard_normal((6 + i % 3, D)) @ mix + 0.2 * i for i in range(11)]
    model = Stack(dim=D, depth=1)
    records: list[tuple[int, dict[str, float]]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # every_n_steps < 10
        monitor = GSAMMonitor(
            model,
            "auto",
            every_n_steps=2,
            collection=CollectOptions(steps=None, max_tokens_per_layer=None, reservoir_size=40),
            windows=WindowOptions(kind=window),
            compute=ComputeOptions(background=background),
            metrics=["gsam", "n", "heldout_loglik"],
            sinks=[lambda m, s: records.append((s, dict(m)))],
        )

    def train(i: int) -> None:
        model.train()
        model(torch.from_numpy(xs[i]).requires_grad_()).sum().backward()

    def infer(i: int) -> None:
        with torch.inference_mode():
            model(torch.from_numpy(xs[i]))

    with monitor:
        infer(0)  # the very first activation: the windows are created under inference mode
        train(1)
        monitor.step()
        with torch.no_grad():
            model(torch.from_numpy(xs[2]))
        train(3)
        monitor.step()  # log at 2: train 1, 3; eval 0, 2
        model.eval()
        infer(4)
        train(5)
        monitor.step()
        train(6)
        infer(7)
        with torch.inference_mode():
            monitor.step()  # log at 4 called from inside an inference-mode block: train 5, 6; eval 4, 7
        infer(8)
        train(9)
        monitor.step()
        train(10)
        monitor.step()  # log at 6: train 9, 10; eval 8
    assert monitor.errors == 0
    train_parts = [[1, 3], [5, 6], [9, 10]]
    eval_parts = [[0, 2], [4, 7], [8]]
    assert [s for s, _ in records] == [2, 4, 6]
    for k, (_, logged) in enumerate(records):
        for phase, parts, suffix in (("train", train_parts, ""), ("eval", eval_parts, "/eval")):
            used = [i for p in (parts[: k + 1] if window == "cumulative" else parts[k : k + 1]) for i in p]
            rows = np.concatenate([xs[i] for i in used])
            assert logged[f"n/blocks.0{suffix}"] == len(rows), (k, phase)
            assert logged[f"gsam/blocks.0{suffix}"] == pytest.approx(gsam_pdet(rows)[0], rel=1e-9), (k, phase)
            if k > 0:  # each window under the previous logged window's fit
                prev = [i for p in (parts[:k] if window == "cumulative" else parts[k - 1 : k]) for i in p]
                fit = np.concatenate([xs[i] for i in prev])
                mvn = scipy.stats.multivariate_normal(fit.mean(0), mle_cov(fit))
                expected = float(mvn.logpdf(rows).mean()) / D
                assert logged[f"heldout_loglik/blocks.0{suffix}"] == pytest.approx(expected, rel=1e-9), (k, phase)
    # The reservoir, first created under inference mode, kept sampling the training rows.
    sample = monitor.sample("blocks.0", "train").values()
    fed = np.concatenate([xs[i] for i in (1, 3, 5, 6, 9, 10)]).ravel()
    assert len(sample) == 40 and np.isin(sample, fed.astype(np.float32)).all()  # the sample keeps fp32
    for stats in [*monitor._windows.live.values(), *monitor._windows.references.values()]:
        assert not any(t.is_inference() for t in stats._state.values())
