"""torch.compile: a model compiled and run before the monitor attaches (a warm-up, a Trainer that
compiles first, a resumed run) is monitored exactly, with the default collect_steps, under the
aot_eager and inductor backends and with fullgraph=True; the logs equal the eager run's and an
fp64 numpy computation on the rows each window collected."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from gsam_monitor import CollectOptions, GSAMMonitor
from tests.reference import gsam_pdet
from tests.tiny_models import Stack

D = 3
EVERY = 12  # collect_steps="auto" -> 10: the hooks are off for 2 steps of each interval


def _data(n: int) -> list[tuple[np.ndarray, torch.Tensor]]:
    rng = np.random.default_rng(11)
    out = []
    for t in range(n):
        x = rng.standard_normal((2, 5, D)) @ rng.standard_normal((D, D)) + 0.1 * t
        mask = torch.ones(2, 5, dtype=torch.int64)
        mask[t % 2, 3 + t % 2 :] = 0
        out.append((x, mask))
    return out


def _eager_logs(data, warmup: int) -> list:
    """The same training, eager: ``warmup`` steps without the monitor, then with it."""
    model = Stack(dim=D, depth=2)
    monitor = _monitor(model)
    logs = []
    for t, (x, mask) in enumerate(data):
        if t == warmup:
            monitor.attach()
        model(torch.from_numpy(x).requires_grad_(), mask).pow(2).sum().backward()
        if t >= warmup:
            out = monitor.step()
            if out is not None:
                logs.append(out)
    monitor.close()
    return logs


def _collected(data, warmup: int) -> list[np.ndarray]:
    """The non-padding rows each logged window saw, from the schedule's definition: every
    forward before the first step(), then the last 10 steps of each interval of 12."""
    windows: list[list[np.ndarray]] = [[], []]
    for k, (x, mask) in enumerate(data[warmup:], start=1):  # k-th forward after attach
        if k == 1 or (k - 1) % EVERY >= EVERY - 10:
            windows[(k - 1) // EVERY].append(x[mask.bool().numpy()])
    return [np.concatenate(w) for w in windows]


def _monitor(run: torch.nn.Module) -> GSAMMonitor:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all: not the empty-window one either
        return GSAMMonitor(
            run,
            "auto",
            every_n_steps=EVERY,
            collection=CollectOptions(phases="train"),
            metrics=["gsam", "n", "rank"],
            sinks=[],
        )


@pytest.mark.parametrize(
    ("backend", "fullgraph", "warmup", "watch"),
    [
        ("aot_eager", False, 3, "compiled"),
        ("aot_eager", True, 3, "compiled"),
        ("aot_eager", False, 0, "compiled"),  # attached first: the first compile traces the hooks
        # The monitor on the model inside the compiled wrapper (what the HF Trainer's callback
        # gets when accelerate compiles): the root's hooks are traced too.
        ("aot_eager", True, 3, "inner"),
        pytest.param("inductor", False, 3, "compiled", marks=pytest.mark.slow),
    ],
)
def test_attach_after_compiled_warmup_steps_logs_what_eager_logs(
    backend: str, fullgraph: bool, warmup: int, watch: str
) -> None:
    from torch._dynamo.utils import counters

    data = _data(warmup + 2 * EVERY)
    eager_logs = _eager_logs(data, warmup)
    torch._dynamo.reset()
    model = Stack(dim=D, depth=2)
    compiled = torch.compile(model, backend=backend, fullgraph=fullgraph)
    monitor = _monitor(compiled if watch == "compiled" else model)
    graphs = []
    logs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # e.g. "no activations were captured"
        for t, (x, mask) in enumerate(data):
            if t == warmup:
                assert counters["stats"]["unique_graphs"] >= (1 if warmup else 0)  # the warm-up ran compiled
                monitor.attach()
            compiled(torch.from_numpy(x).requires_grad_(), mask).pow(2).sum().backward()
            if t >= warmup:
                out = monitor.step()
                if out is not None:
                    logs.append(out)
                    graphs.append(counters["stats"]["unique_graphs"])
    monitor.close()
    assert monitor.errors == 0 and not monitor.hooks_registered
    # Hooks on and off across the second interval recompiled nothing: the variants are cached.
    assert graphs[0] == graphs[1]
    assert len(logs) == len(eager_logs) == 2
    for got, want, rows in zip(logs, eager_logs, _collected(data, warmup), strict=True):
        assert got.keys() == want.keys()
        for layer in ("blocks.0", "blocks.1"):
            assert got[f"n/{layer}"] == want[f"n/{layer}"] == len(rows)
            assert got[f"gsam/{layer}"] == pytest.approx(want[f"gsam/{layer}"], rel=1e-6)
            assert got[f"gsam/{layer}"] == pytest.approx(gsam_pdet(rows)[0], rel=1e-6)
            assert got[f"rank/{layer}"] == D


def test_hooks_stay_registered_once_compiled_and_detach_removes_them() -> None:
    torch._dynamo.reset()
    model = Stack(dim=D, depth=1)
    compiled = torch.compile(model, backend="aot_eager")
    monitor = _monitor(compiled)
    x, mask = _data(1)[0]
    with monitor:
        for t in range(EVERY + 2):
            compiled(torch.from_numpy(x).requires_grad_(), mask).sum().backward()
            monitor.step()
            # Compiled graphs traced the hooks: they stay, switched by the schedule's flag.
            assert len(model.blocks[0]._forward_hooks) == 1, t
    assert len(model.blocks[0]._forward_hooks) == 0
    # Detached: the compiled model runs without the monitor, and counts nothing more.
    before = float(monitor.stats("blocks.0", "train").count)
    compiled(torch.from_numpy(x).requires_grad_(), mask).sum().backward()
    assert float(monitor.stats("blocks.0", "train").count) == before


def test_a_layer_without_hidden_states_warns_from_step_and_never_breaks_a_fullgraph_compile() -> None:
    class Flags(torch.nn.Module):  # returns no floating tensor: nothing to monitor
        def forward(self, x):
            return (x > 0,)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(D, D, dtype=torch.float64), Flags()])

        def forward(self, x):
            y = self.blocks[0](x)
            self.blocks[1](y)
            return y

    torch._dynamo.reset()
    model = Net()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # a graph break would raise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        monitor = GSAMMonitor(
            model, ["blocks.0", "blocks.1"], every_n_steps=2, collection=CollectOptions(max_tokens_per_layer=None)
        )
    xs = [torch.randn(5, D, dtype=torch.float64) for _ in range(2)]
    with monitor, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in xs:
            compiled(x).sum().backward()
            out = monitor.step()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert sum("'blocks.1' produced an output with no floating tensor" in m for m in messages) == 1
    assert any("no activations reached blocks.1 " in m for m in messages)  # and it is reported missing
    assert monitor.errors == 0
    rows = torch.cat([model.blocks[0](x) for x in xs]).detach().numpy()
    assert out["n/blocks.0"] == 10
    assert out["gsam/blocks.0"] == pytest.approx(gsam_pdet(rows)[0], rel=1e-9)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_evaluation_forwards_between_windows_are_collected(backend: str) -> None:
    """A compiled model with the hooks traced in a window, then an evaluation forward (its own
    graph) where the schedule has parked the training hooks: it reaches the eval window, and a
    training forward there does not reach the training window."""
    torch._dynamo.reset()
    model = Stack(dim=D, depth=2)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        monitor = GSAMMonitor(
            model, every_n_steps=EVERY, collection=CollectOptions(max_tokens_per_layer=None), sinks=[]
        )
    rng = np.random.default_rng(5)
    first, parked, evaluated = (rng.standard_normal((6, D)) for _ in range(3))
    with monitor:
        compiled(torch.from_numpy(first).requires_grad_()).sum().backward()  # before step(): collected
        monitor.step()
        compiled(torch.from_numpy(parked).requires_grad_()).sum().backward()  # step 2: parked
        with torch.no_grad():
            compiled(torch.from_numpy(evaluated))
        now = monitor.compute()
    assert monitor.errors == 0
    assert now["blocks.1"]["n"] == len(first)
    assert now["blocks.1/eval"]["n"] == len(evaluated)
    assert now["blocks.1/eval"]["gsam"] == pytest.approx(gsam_pdet(evaluated)[0], rel=1e-9)
