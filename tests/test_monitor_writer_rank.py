"""Metrics are written only on rank zero of the monitor's process group, its group rank (a group
[1, 2] writes on global rank 1), and each window is computed on its owner, a group rank too: the
first window's is group rank zero, so here (one window) the other rank computes nothing. torch.distributed is
injected (torchmetrics-style), so no processes are needed; tests/test_distributed.py pins the
owners with two and four real gloo processes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import gsam_monitor.metrics as metrics_module
import gsam_monitor.monitor.ranks as ranks_module
from gsam_monitor import CollectOptions, GSAMMonitor, LayerStats
from tests.reference import gsam_pdet
from tests.tiny_models import Stack

D = 3


class _FakeDist:
    """A process in a group of two: ``global_rank`` in the world, ``group_rank`` in ``group``."""

    ReduceOp = torch.distributed.ReduceOp

    def __init__(self, global_rank: int, group_rank: int, group: object) -> None:
        self.global_rank, self.group_rank, self.group = global_rank, group_rank, group

    def get_rank(self, group: object = None) -> int:
        if group is None:
            return self.global_rank
        assert group is self.group
        return self.group_rank

    def get_world_size(self, group: object = None) -> int:
        return 2

    def get_backend(self, group: object = None) -> str:
        return "gloo"

    def all_reduce(self, tensor: torch.Tensor, op: object = None, group: object = None) -> None:
        assert group is self.group  # the window sizes agreed over the monitor's group
        # Both ranks hold the same windows: MAX leaves the sizes as they are.

    def gather_object(self, obj: object, gathered: list | None, group: object = None, group_dst: int = 0) -> None:
        assert group is self.group and group_dst == 0  # gathered on the group's writer
        assert (gathered is not None) == (self.group_rank == 0)
        if gathered is not None:  # the peer owned no window: an empty share
            gathered[:] = [obj, type(obj)(obj.step)]


@pytest.mark.parametrize(("global_rank", "group_rank"), [(1, 0), (0, 1)])
def test_only_group_rank_zero_computes_and_writes(monkeypatch, global_rank: int, group_rank: int) -> None:
    group = object()
    monkeypatch.setattr(ranks_module, "active_dist", lambda: _FakeDist(global_rank, group_rank, group))
    # The peer saw the same rows: the sum over the group is the window twice.
    def twice(self, dst, group=None, **kw):
        assert dst == 0 and group is group_  # the only window's owner: group rank 0
        return self.merge(self.clone())

    group_ = group
    monkeypatch.setattr(LayerStats, "reduce_", twice)
    computed = []
    real = metrics_module.compute

    def counting(*args, **kwargs):
        computed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics_module, "compute", counting)
    written: list[dict[str, float]] = []
    model = Stack(dim=D, depth=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # every_n_steps < 10
        monitor = GSAMMonitor(
            model,
            "auto",
            every_n_steps=2,
            process_group=group,
            collection=CollectOptions(max_tokens_per_layer=None, phases="eval"),
            metrics=["gsam", "n"],  # one window, owned by group rank 0
            sinks=[lambda m, s: written.append(dict(m))],
        )
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((9, D)) for _ in range(2)]
    outs = []
    with monitor, torch.no_grad():
        for x in xs:
            model(torch.from_numpy(x))
            outs.append(monitor.step())
    assert monitor.errors == 0
    assert float(monitor.stats("blocks.0", "eval").count) == 0  # every rank started a new window
    if group_rank == 0:
        rows = np.concatenate(xs * 2)
        assert len(computed) == 1 and len(written) == 1 and outs[1] == written[0]
        assert written[0]["n/blocks.0/eval"] == len(rows)
        assert written[0]["gsam/blocks.0/eval"] == pytest.approx(gsam_pdet(rows)[0], rel=1e-9)
    else:  # global rank 0 is not the group's writer: it synced and computed nothing
        assert computed == [] and written == [] and outs == [None, {}]
        assert monitor.last_metrics == {}
