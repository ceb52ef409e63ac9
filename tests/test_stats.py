"""LayerStats against a two-pass fp64 numpy computation on the whole data matrix."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gsam_monitor import LayerStats


def _feed(x: np.ndarray, splits: list[int], **kw) -> LayerStats:
    s = LayerStats(x.shape[1], **kw)
    for part in np.split(x, splits):
        s.update(torch.from_numpy(part))
    return s


DATASETS = {
    "gaussian": lambda r: r.standard_normal((500, 24)) @ r.standard_normal((24, 24)),
    "student_t": lambda r: r.standard_t(3.0, size=(500, 24)),
    "logistic": lambda r: r.logistic(size=(500, 24)) * np.linspace(0.1, 10, 24),
    "lowrank_noise": lambda r: (
        r.standard_normal((500, 3)) @ r.standard_normal((3, 24)) * 10 + 1e-3 * r.standard_normal((500, 24))
    ),
    "badly_centred": lambda r: 1e4 + r.standard_normal((500, 24)),
}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_moments_match_two_pass_numpy(name: str, rng: np.random.Generator) -> None:
    x = DATASETS[name](rng)
    s = _feed(x, [7, 100, 101, 390])
    assert float(s.count) == x.shape[0]
    np.testing.assert_allclose(s.mean.numpy(), x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        s.covariance(ddof=0).numpy(), np.cov(x.T, ddof=0), rtol=1e-9, atol=1e-12 * np.abs(np.cov(x.T)).max()
    )
    np.testing.assert_allclose(
        s.covariance(ddof=1).numpy(), np.cov(x.T, ddof=1), rtol=1e-9, atol=1e-12 * np.abs(np.cov(x.T)).max()
    )
    np.testing.assert_allclose(s.variance().numpy(), x.var(0), rtol=1e-9)
    np.testing.assert_allclose(
        s.excess_kurtosis().numpy(), scipy.stats.kurtosis(x, axis=0, fisher=True, bias=True), rtol=1e-8, atol=1e-9
    )
    np.testing.assert_allclose(s.skewness().numpy(), scipy.stats.skew(x, axis=0, bias=True), rtol=1e-7, atol=1e-9)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(s.unit_sum.numpy(), unit.sum(0), rtol=1e-10, atol=1e-9)


def test_badly_centred_fp32_input_keeps_the_variance(rng: np.random.Generator) -> None:
    # |mean| = 1e4 x std: the unshifted formula sum(x^2)/n - mean^2 loses every digit here.
    x = (1e4 + rng.standard_normal((2000, 8))).astype(np.float32)
    s = LayerStats(8)
    for part in np.split(x, 10):
        s.update(torch.from_numpy(part))
    np.testing.assert_allclose(s.variance().numpy(), x.astype(np.float64).var(0), rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_equal_fp64_of_the_same_values(dtype: torch.dtype, rng: np.random.Generator) -> None:
    xt = torch.from_numpy(rng.standard_normal((300, 16)) * 3 + 2).to(dtype)
    x = xt.double().numpy()  # the exact values the update sees
    s = LayerStats(16)
    for part in xt.split(64):
        s.update(part)
    np.testing.assert_allclose(s.covariance().numpy(), np.cov(x.T, ddof=0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s.mean.numpy(), x.mean(0), rtol=1e-12)


def test_mask_and_nonfinite_rows_are_dropped_and_counted(rng: np.random.Generator) -> None:
    x = rng.standard_normal((4, 10, 6))
    mask = rng.random((4, 10)) > 0.3
    x[0, 1, 2] = np.nan
    x[2, 3, 0] = np.inf
    mask[0, 1] = True
    mask[2, 3] = False  # a masked non-finite row is padding, not a fault
    s = LayerStats(6)
    s.update(torch.from_numpy(x), mask=torch.from_numpy(mask))
    keep = mask & np.isfinite(x).all(-1)
    ref = x[keep]
    assert float(s.count) == keep.sum()
    assert int(s.nonfinite) == 1
    np.testing.assert_allclose(s.covariance().numpy(), np.cov(ref.T, ddof=0), rtol=1e-10)
    np.testing.assert_allclose(s.mean.numpy(), ref.mean(0), rtol=1e-12)


def test_first_batch_fully_masked_still_exact(rng: np.random.Generator) -> None:
    x = rng.standard_normal((50, 5)) + 100
    s = LayerStats(5)
    s.update(torch.from_numpy(x[:10]), mask=torch.zeros(10, dtype=torch.bool))
    s.update(torch.from_numpy(x[10:]))
    np.testing.assert_allclose(s.covariance().numpy(), np.cov(x[10:].T, ddof=0), rtol=1e-9)


@settings(max_examples=40, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=120), min_size=0, max_size=6),
    order=st.randoms(use_true_random=False),
    offset=st.floats(min_value=-1e3, max_value=1e3),
)
def test_any_split_and_merge_order_gives_the_same_moments(cuts, order, offset) -> None:
    r = np.random.default_rng(7)
    x = r.standard_normal((120, 9)) * np.arange(1, 10) + offset
    parts = np.split(x, sorted(set(cuts)))
    states = []
    for p in parts:
        s = LayerStats(9)
        if len(p):
            s.update(torch.from_numpy(p))
        states.append(s)
    order.shuffle(states)
    total = states[0]
    for s in states[1:]:
        total.merge(s)
    assert float(total.count) == 120
    scale = np.abs(np.cov(x.T)).max()
    np.testing.assert_allclose(total.covariance().numpy(), np.cov(x.T, ddof=0), rtol=1e-9, atol=1e-12 * scale)
    np.testing.assert_allclose(total.mean.numpy(), x.mean(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        total.excess_kurtosis().numpy(), scipy.stats.kurtosis(x, axis=0, bias=True), rtol=1e-7, atol=1e-8
    )


def test_reset_decay_and_state_dict_roundtrip(tmp_path, rng: np.random.Generator) -> None:
    x = rng.standard_normal((40, 4))
    s = LayerStats(4)
    s.update(torch.from_numpy(x))
    path = tmp_path / "s.pt"
    torch.save(s.state_dict(), path)
    loaded = LayerStats(4)
    loaded.load_state_dict(torch.load(path, weights_only=True))
    np.testing.assert_array_equal(loaded.covariance().numpy(), s.covariance().numpy())
    # Exponential decay: weights 0.5 for the first batch, 1 for the second.
    y = rng.standard_normal((30, 4)) + 3
    s.decay_(0.5)
    s.update(torch.from_numpy(y))
    w = np.r_[np.full(40, 0.5), np.ones(30)]
    z = np.vstack([x, y])
    np.testing.assert_allclose(float(s.count), w.sum())
    np.testing.assert_allclose(s.covariance().numpy(), np.cov(z.T, aweights=w, ddof=0), rtol=1e-10)
    s.reset()
    assert float(s.count) == 0
    assert all(float(t.abs().sum()) == 0 for t in s.state_tensors().values())
    s.update(torch.from_numpy(y))
    np.testing.assert_allclose(s.covariance().numpy(), np.cov(y.T, ddof=0), rtol=1e-10)


def test_fp32_state_is_close(rng: np.random.Generator) -> None:
    x = rng.standard_normal((1000, 32))
    s = LayerStats(32, state_dtype=torch.float32)
    for p in np.split(x, 10):
        s.update(torch.from_numpy(p).float())
    assert s.nbytes < LayerStats(32).nbytes
    np.testing.assert_allclose(s.covariance().numpy(), np.cov(x.T, ddof=0), rtol=1e-4, atol=1e-5)


def test_injected_all_reduce_sums_shards_exactly(rng: np.random.Generator) -> None:
    # Two "ranks" simulated in one process: the injected collectives sum over both states.
    x = rng.standard_normal((200, 6)) * 5 + 40
    a, b = LayerStats(6), LayerStats(6)
    a.update(torch.from_numpy(x[:120]))
    b.update(torch.from_numpy(x[120:] + 0.0))
    ranks = [a, b]

    # Run both ranks step by step: each collective call sums the matching tensors.
    import threading

    barrier = threading.Barrier(2)
    calls: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def collective(rank: int):
        def all_reduce(t, op=None, group=None):
            calls[rank].append(t)
            barrier.wait()
            if rank == 0:
                combine = torch.maximum if op == torch.distributed.ReduceOp.MAX else torch.add
                total = combine(calls[0][-1], calls[1][-1])
                calls[0][-1].copy_(total)
                calls[1][-1].copy_(total)
            barrier.wait()

        return all_reduce

    threads = []
    for r, s in enumerate(ranks):
        threads.append(threading.Thread(target=s.all_reduce_, kwargs={"all_reduce": collective(r)}))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in ranks:
        assert float(s.count) == 200
        np.testing.assert_allclose(s.covariance().numpy(), np.cov(x.T, ddof=0), rtol=1e-9)
        np.testing.assert_allclose(s.mean.numpy(), x.mean(0), rtol=1e-12)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="dim must be a positive int"):
        LayerStats(0)
    with pytest.raises(ValueError, match="state_dtype must be a floating"):
        LayerStats(3, state_dtype=torch.int32)
    with pytest.raises(ValueError, match="product_dtype must be"):
        LayerStats(3, product_dtype="fast")
    s = LayerStats(3)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 3\)"):
        s.update(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mask must have shape"):
        s.update(torch.zeros(2, 3), mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="floating tensor"):
        s.update(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="ddof must be 0"):
        s.covariance(ddof=2)
    with pytest.raises(ValueError, match="cannot merge LayerStats of dim 4"):
        s.merge(LayerStats(4))
    with pytest.raises(ValueError, match=r"factor must be in \[0, 1\]"):
        s.decay_(1.5)
    with pytest.raises(ValueError, match="state_dict is for dim 4"):
        s.load_state_dict(LayerStats(4).state_dict())
    with pytest.raises(RuntimeError, match="higher_moments=True"):
        LayerStats(3, higher_moments=False).excess_kurtosis()


def test_update_under_inference_mode_leaves_later_updates_working(rng: np.random.Generator) -> None:
    x = rng.standard_normal((64, 8))
    with torch.inference_mode():
        LayerStats(8).update(torch.from_numpy(x))
    s = LayerStats(8)
    s.update(torch.from_numpy(x))  # reuses the workspace first allocated under inference_mode
    np.testing.assert_allclose(s.covariance().numpy(), np.cov(x.T, ddof=0), rtol=1e-10)


@pytest.mark.parametrize("dim", [5, 700])
def test_gram_state_is_the_full_symmetric_shifted_product(dim: int, rng: np.random.Generator) -> None:
    # Every reader of the state (all_reduce, state_dict, merges, reshifts) sees the full
    # symmetric sum of shifted outer products.
    x = rng.standard_normal((300, dim)) + 2.0
    a = _feed(x, [100, 220])
    shift = a.state_dict()["shift"].numpy()
    xs = x - shift
    gram = a.state_dict()["gram"].numpy()
    # Symmetric by construction where the state is read (state_dict, covariance, merges,
    # reshifts): a BLAS GEMM's two triangles may differ in the last bit on some CPUs, so
    # neither side is compared bitwise. A formula that kept one triangle, or an unshifted
    # product, misses xs.T @ xs by far more than these tolerances.
    scale = np.abs(xs.T @ xs).max()
    np.testing.assert_allclose(gram, gram.T, rtol=0, atol=1e-14 * scale)
    np.testing.assert_allclose(gram, xs.T @ xs, rtol=1e-10, atol=1e-12 * scale)
    np.testing.assert_allclose(a.state_tensors()["gram"].numpy(), gram, rtol=0, atol=1e-14 * scale)
    # A merged, then further updated, then re-shifted state still equals the two-pass numpy.
    b = _feed(x[:50], [])
    b.merge(a)
    b.update(torch.from_numpy(x[50:80]))
    b.reshift_(torch.zeros(dim, dtype=torch.float64))
    z = np.vstack([x[:50], x, x[50:80]])
    np.testing.assert_allclose(b.covariance().numpy(), np.cov(z.T, ddof=0), rtol=1e-9, atol=1e-12)
    g0 = b.state_dict()["gram"].numpy()
    np.testing.assert_allclose(g0, z.T @ z, rtol=1e-10)


@pytest.mark.parametrize("product_dtype", [torch.float64, torch.float32])
def test_one_update_with_more_rows_than_a_chunk_equals_numpy(product_dtype, rng: np.random.Generator) -> None:
    # The update processes 2**22 // d rows at a time (262,144 at d = 16): one call with 2.3
    # chunks' worth of rows, a third of them padding, equals the two-pass result.
    d = 16
    x = (rng.standard_normal((600_000, d)) * np.linspace(0.5, 4, d) + 7).astype(np.float32)
    mask = rng.random(600_000) > 0.3
    s = LayerStats(d, product_dtype=product_dtype)
    s.update(torch.from_numpy(x), mask=torch.from_numpy(mask))
    kept = x[mask].astype(np.float64)
    rtol = 1e-9 if product_dtype == torch.float64 else 1e-5
    assert float(s.count) == mask.sum()
    cov = np.cov(kept.T, ddof=0)
    np.testing.assert_allclose(s.covariance().numpy(), cov, rtol=rtol, atol=rtol * np.abs(cov).max())
    np.testing.assert_allclose(s.mean.numpy(), kept.mean(0), rtol=1e-3 * rtol)
    np.testing.assert_allclose(
        s.excess_kurtosis().numpy(), scipy.stats.kurtosis(kept, axis=0, bias=True), rtol=100 * rtol, atol=rtol
    )


def _state_with_its_own_shift(part: np.ndarray, how: int, r: np.random.Generator) -> LayerStats:
    """A state of ``part`` whose shift differs from the others': its first rows' mean, a
    reset-and-refed one (shift from a later batch), or an explicit far reference."""
    s = LayerStats(part.shape[1])
    if how == 1 and len(part):
        s.update(torch.from_numpy(part[::-1].copy() + 50.0))
        s.reset()  # the next rows set a new shift
    if how == 2:
        s.reshift_(torch.from_numpy(r.standard_normal(part.shape[1]) * 20))
    if len(part):
        s.update(torch.from_numpy(part))
    return s


@settings(max_examples=30, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=150), min_size=1, max_size=5),
    hows=st.lists(st.integers(min_value=0, max_value=2), min_size=6, max_size=6),
    order=st.randoms(use_true_random=False),
)
def test_merge_is_exact_for_states_with_different_shifts(cuts, hows, order) -> None:
    r = np.random.default_rng(11)
    x = r.standard_normal((150, 5)) * np.arange(1, 6) + np.linspace(-30, 30, 150)[:, None]  # the mean drifts
    parts = np.split(x, sorted(set(cuts)))  # at most 6 parts, one "how" each
    states = [_state_with_its_own_shift(p, how, r) for p, how in zip(parts, hows[: len(parts)], strict=True)]
    order.shuffle(states)
    total = states[0]
    for s in states[1:]:
        total.merge(s)
    cov = np.cov(x.T, ddof=0)
    assert float(total.count) == 150
    np.testing.assert_allclose(total.covariance().numpy(), cov, rtol=1e-9, atol=1e-12 * np.abs(cov).max())
    np.testing.assert_allclose(total.mean.numpy(), x.mean(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(total.excess_kurtosis().numpy(), scipy.stats.kurtosis(x, axis=0, bias=True), rtol=1e-8)


def _threaded_all_reduce(states: list[LayerStats], dst: int | None = None) -> None:
    """Run ``all_reduce_`` (or, with ``dst``, ``reduce_`` onto ``dst``) of every "rank" in its
    own thread, with injected collectives that combine the matching tensors of all ranks as
    torch.distributed's do: SUM or MAX into every rank's tensor, or SUM into ``dst``'s only."""
    import threading

    barrier = threading.Barrier(len(states))
    pending: dict[int, torch.Tensor] = {}

    def collective(rank: int, only: int | None = None):
        def combine(t, op=None, group=None, group_dst=None):
            pending[rank] = t
            barrier.wait()
            if rank == 0:
                parts = [pending[k].clone() for k in range(len(states))]
                if op == torch.distributed.ReduceOp.MAX:
                    total = torch.stack(parts).amax(0)
                else:
                    total = sum(parts)
                for k in range(len(states)) if only is None else [group_dst]:
                    pending[k].copy_(total)
            barrier.wait()

        return combine

    errors: list[BaseException] = []

    def run(rank: int, s: LayerStats) -> None:
        try:
            if dst is None:
                s.all_reduce_(all_reduce=collective(rank))
            else:
                s.reduce_(dst, all_reduce=collective(rank), reduce=collective(rank, only=dst))
        except BaseException as err:  # surfaced below: a thread's exception is otherwise lost
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(k, s)) for k, s in enumerate(states)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_reduce_sums_onto_the_owner_and_takes_the_abs_max_of_every_shard(rng: np.random.Generator) -> None:
    """Two shards whose per-dimension abs-max lies in different shards: ``reduce_`` onto rank 1
    gives the union's moments there and the union's abs-max on both ranks."""
    x = rng.standard_normal((200, 4))
    x[17, 0], x[150, 1] = -40.0, 35.0  # dimension 0's extreme in shard 0, dimension 1's in shard 1
    r = np.random.default_rng(5)
    states = [_state_with_its_own_shift(x[:100], 1, r), _state_with_its_own_shift(x[100:], 2, r)]
    _threaded_all_reduce(states, dst=1)
    want_absmax = np.abs(x).max(0)
    assert want_absmax[0] == 40.0 and want_absmax[1] == 35.0
    for s in states:
        assert float(s.count) == 200
        np.testing.assert_array_equal(s.absmax.numpy(), want_absmax)
    cov = np.cov(x.T, ddof=0)
    np.testing.assert_allclose(states[1].covariance().numpy(), cov, rtol=1e-9, atol=1e-12 * np.abs(cov).max())
    np.testing.assert_allclose(states[1].mean.numpy(), x.mean(0), rtol=1e-12, atol=1e-14)


def test_all_reduce_is_exact_over_ranks_with_different_shifts_and_an_empty_rank(rng: np.random.Generator) -> None:
    x = rng.standard_normal((300, 6)) * 3 + np.linspace(0, 900, 300)[:, None]  # each rank sees another mean
    r = np.random.default_rng(3)
    states = [_state_with_its_own_shift(x[:120], 1, r), LayerStats(6), _state_with_its_own_shift(x[120:], 2, r)]
    shifts = [s.shift.clone() for s in states]
    assert not torch.equal(shifts[0], shifts[2])
    _threaded_all_reduce(states)
    cov = np.cov(x.T, ddof=0)
    common = (shifts[0] + shifts[2]).numpy() / 2  # the plain mean of the ranks that hold data
    for s in states:
        assert float(s.count) == 300
        np.testing.assert_allclose(s.shift.numpy(), common, rtol=1e-12)
        np.testing.assert_allclose(s.covariance().numpy(), cov, rtol=1e-9, atol=1e-12 * np.abs(cov).max())
        np.testing.assert_allclose(s.mean.numpy(), x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(s.excess_kurtosis().numpy(), scipy.stats.kurtosis(x, axis=0, bias=True), rtol=1e-8)
    # Ranks with no data anywhere stay empty and keep no shift.
    empty = [LayerStats(6), LayerStats(6)]
    _threaded_all_reduce(empty)
    assert all(float(s.count) == 0 for s in empty)
    e = empty[0]
    e.update(torch.from_numpy(x[:10] + 1e4))  # the first rows still set the shift
    np.testing.assert_allclose(e.shift.numpy(), (x[:10] + 1e4).mean(0), rtol=1e-12)


def _kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows per call of the update path (``feed.add_rows``), recorded."""
    import gsam_monitor.stats.layer_stats as layer_stats_module

    calls: list[int] = []
    original = layer_stats_module.add_rows

    def spy(sums, rows, keep_in, product_dtype, *, set_shift):
        calls.append(rows.shape[0])
        return original(sums, rows, keep_in, product_dtype, set_shift=set_shift)

    monkeypatch.setattr(layer_stats_module, "add_rows", spy)
    return calls


def test_a_row_buffer_adds_small_cpu_updates_together_and_reads_add_nothing(
    monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator
) -> None:
    # d = 64: updates under min(2**16, d²/2) = 2048 elements (32 rows) wait in the buffer; the
    # kernel runs once per 32 held rows or at flush(). Reading the statistics adds nothing.
    from gsam_monitor.stats.feed import RowBuffer

    calls = _kernel_calls(monkeypatch)
    d = 64
    x = rng.standard_normal((200, d)) * np.linspace(0.5, 3, d) + 5
    x[13, 7] = np.nan  # a non-finite row among the held ones: dropped and counted when added
    s = LayerStats(d)
    buffer = RowBuffer(s)
    for i in range(0, 96, 4):  # 24 updates of 4 rows
        buffer.add(torch.from_numpy(x[i : i + 4]))
    assert calls == [32, 32] and buffer.n_rows == 32  # two full holds added; 32 rows still held
    assert float(s.count) == 63 and int(s.nonfinite) == 1  # a read: the held rows stay held
    np.testing.assert_allclose(s.covariance().numpy(), np.cov(np.delete(x[:64], 13, 0).T, ddof=0), rtol=1e-10)
    assert calls == [32, 32] and buffer.n_rows == 32
    assert buffer.flush() is s and calls == [32, 32, 32] and buffer.n_rows == 0
    kept = np.delete(x[:96], 13, axis=0)
    assert float(s.count) == 95
    np.testing.assert_allclose(s.covariance().numpy(), np.cov(kept.T, ddof=0), rtol=1e-10, atol=1e-13)
    # A large update adds what is held first, then itself; padding is dropped before holding.
    buffer.add(torch.from_numpy(x[96:100]))
    buffer.add(torch.from_numpy(x[100:200]))
    assert calls[-2:] == [4, 100]
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[0, :2] = True
    buffer.add(torch.from_numpy(np.stack([x[:3], x[3:6]])), mask=mask)
    buffer.flush()
    kept = np.vstack([np.delete(x, 13, axis=0), x[:2]])
    np.testing.assert_allclose(s.covariance().numpy(), np.cov(kept.T, ddof=0), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(s.mean.numpy(), kept.mean(0), rtol=1e-12)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 64\)"):
        buffer.add(torch.zeros(2, 5))  # checked by update at once, not at the flush


def test_a_row_buffer_keeps_dtypes_apart_and_its_copies_outlive_inference_mode(rng: np.random.Generator) -> None:
    from gsam_monitor.stats.feed import RowBuffer

    d = 48
    x = rng.standard_normal((30, d)) + 2
    y = rng.standard_normal((20, d)).astype(np.float32)  # another dtype: what is held is added first
    u = LayerStats(d)
    buffer = RowBuffer(u)
    buffer.add(torch.from_numpy(x[:8]))
    buffer.add(torch.from_numpy(y))
    buffer.flush()
    both = np.vstack([x[:8], y.astype(np.float64)])
    np.testing.assert_allclose(u.covariance().numpy(), np.cov(both.T, ddof=0), rtol=1e-10, atol=1e-13)
    buffer.add(torch.from_numpy(x[:4]))
    buffer.clear()  # the rows' window is reset
    u.reset()
    buffer.add(torch.from_numpy(x[4:12]))
    buffer.flush()
    np.testing.assert_allclose(u.covariance().numpy(), np.cov(x[4:12].T, ddof=0), rtol=1e-10, atol=1e-13)
    # held under inference_mode, added outside it
    v = LayerStats(d)
    held = RowBuffer(v)
    with torch.inference_mode():
        held.add(torch.from_numpy(x[:6]))
    held.add(torch.from_numpy(x[6:12]))
    held.flush()
    np.testing.assert_allclose(v.covariance().numpy(), np.cov(x[:12].T, ddof=0), rtol=1e-10, atol=1e-13)
