"""``LayerStats.all_reduce_`` and ``reduce_`` over a process sub-group that does not contain
global rank 0 (3 gloo processes on CPU, group [1, 2])."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from tests.gloo_worker import run_gloo_worker

D = 5


def _rows(rank: int) -> np.ndarray:
    # Each rank sees a different amount of data, around a different mean.
    rng = np.random.default_rng(40 + rank)
    return rng.standard_t(6, size=(30 + 17 * rank, D)) * (1 + rank) + 100.0 * rank


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    run_gloo_worker(rank, world, init_file, _reduce, out_dir)


def _reduce(rank: int, world: int, out_dir: str) -> None:
    import torch.distributed as dist

    from gsam_monitor import LayerStats

    group = dist.new_group([1, 2])  # every rank takes part in creating it
    s = LayerStats(D)
    x = _rows(rank)
    s.update(torch.from_numpy(x[:10]))
    s.reset()  # the shift of each rank comes from different rows
    s.update(torch.from_numpy(x))
    owned = s.clone()
    if rank in (1, 2):
        s.all_reduce_(group)
        owned.reduce_(1, group)  # group rank 1 = global rank 2
    torch.save(s.state_dict(), f"{out_dir}/rank{rank}.pt")
    torch.save(owned.state_dict(), f"{out_dir}/owned{rank}.pt")


@pytest.mark.distributed
def test_all_reduce_over_a_group_without_global_rank_zero(tmp_path) -> None:
    import torch.multiprocessing as mp

    from gsam_monitor import LayerStats

    world = 3
    mp.start_processes(
        _worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, start_method="spawn"
    )
    states = [LayerStats.from_state_dict(torch.load(tmp_path / f"rank{r}.pt", weights_only=True)) for r in range(3)]
    union = np.vstack([_rows(1), _rows(2)])
    cov = np.cov(union.T, ddof=0)
    for s in states[1:]:
        assert float(s.count) == len(union)
        np.testing.assert_allclose(s.covariance().numpy(), cov, rtol=1e-9, atol=1e-12 * np.abs(cov).max())
        np.testing.assert_allclose(s.mean.numpy(), union.mean(0), rtol=1e-12)
        np.testing.assert_allclose(
            s.excess_kurtosis().numpy(), scipy.stats.kurtosis(union, axis=0, bias=True), rtol=1e-8
        )
    np.testing.assert_array_equal(states[1].shift.numpy(), states[2].shift.numpy())
    # Rank 0 is outside the group: its statistics are its own rows only.
    own = _rows(0)
    assert float(states[0].count) == len(own)
    own_cov = np.cov(own.T, ddof=0)
    np.testing.assert_allclose(states[0].covariance().numpy(), own_cov, rtol=1e-9, atol=1e-12 * np.abs(own_cov).max())

    # reduce_ onto group rank 1 (global rank 2): the sums there equal all_reduce_'s; global
    # rank 1 holds the summed count and nonfinite only.
    owned = [LayerStats.from_state_dict(torch.load(tmp_path / f"owned{r}.pt", weights_only=True)) for r in range(3)]
    np.testing.assert_allclose(owned[2].covariance().numpy(), cov, rtol=1e-9, atol=1e-12 * np.abs(cov).max())
    np.testing.assert_allclose(owned[2].mean.numpy(), union.mean(0), rtol=1e-12)
    kurt = scipy.stats.kurtosis(union, axis=0, bias=True)
    np.testing.assert_allclose(owned[2].excess_kurtosis().numpy(), kurt, rtol=1e-8)
    assert float(owned[1].count) == float(owned[2].count) == len(union)
    assert float(owned[0].count) == len(own)
