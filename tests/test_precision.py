"""Precision of LayerStats where users really run it: under autocast and reduced fp32 matmul
precision, with fp32 products (massive activations, MiniLM layers), with a mean that moves.

Every value is compared with a two-pass fp64 numpy/scipy computation on the same data.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from gsam_monitor import CollectOptions, ComputeOptions, LayerStats, WindowOptions, metrics
from gsam_monitor.metrics import MardiaAccumulator
from gsam_monitor.stats import exact_numerics, fast_fp64, resolve_product_dtype, resolve_state_dtype
from tests.reference import gsam_pdet, mle_cov, scipy_rank_tol


def _relerr(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def _feed(x: np.ndarray, parts: int = 8, **kw) -> LayerStats:
    s = LayerStats(x.shape[1], **kw)
    for p in np.array_split(x, parts):
        s.update(torch.from_numpy(np.ascontiguousarray(p)))
    return s


def _numpy_metrics(x: np.ndarray) -> dict[str, float]:
    """Rank, GSAM and condition number of the MLE covariance, fp64, scipy's support rule."""
    lam = np.linalg.eigvalsh(mle_cov(x))
    sup = lam[lam > scipy_rank_tol(lam)]
    gsam, rank = gsam_pdet(x)
    return {"rank": rank, "gsam": gsam, "condition_number": float(sup.max() / sup.min())}


def _rank64(rng: np.random.Generator, d: int = 128) -> np.ndarray:
    # Exactly rank 64 in fp32: 64 latent factors mixed into d > 64 dimensions.
    return (rng.standard_normal((3000, 64)) @ rng.standard_normal((64, d))).astype(np.float32)


def _massive(rng: np.random.Generator, n: int = 8192, d: int = 256) -> np.ndarray:
    # One dimension at 3000 on 0.4 % of the tokens ("massive activations", Sun et al. 2024).
    x = rng.standard_normal((n, d))
    x[rng.random(n) < 0.004, 0] = 3000.0
    return x.astype(np.float32)


# --------------------------------------------------------------------------- the caller's context
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_products_under_cpu_autocast_equal_fp64_numpy(dtype: torch.dtype, rng: np.random.Generator) -> None:
    # Hooks run inside the user's autocast region (HF Trainer bf16=True, Lightning
    # "bf16-mixed"): without the guard the Gram product ran in bf16 (rank 79 of 64, condition
    # number 8.4e3 instead of 29.7) or overflowed in fp16.
    x = _rank64(rng)
    s = LayerStats(x.shape[1], product_dtype=torch.float32)
    with torch.autocast("cpu", dtype=dtype):
        for p in np.array_split(x, 5):
            s.update(torch.from_numpy(p))
    ref = _numpy_metrics(x.astype(np.float64))
    got = metrics.compute(s, names=["gsam", "rank", "condition_number"])
    assert ref["rank"] == 64
    assert got["rank"] == 64
    assert _relerr(got["gsam"], ref["gsam"]) < 1e-5
    assert _relerr(got["condition_number"], ref["condition_number"]) < 1e-4
    np.testing.assert_allclose(s.covariance().numpy(), mle_cov(x.astype(np.float64)), rtol=1e-5, atol=1e-5)


def test_fp32_products_ignore_reduced_float32_matmul_precision(rng: np.random.Generator) -> None:
    # "medium" lets oneDNN run fp32 GEMMs in bf16 on CPUs with AMX (as "high" selects TF32 on
    # CUDA): a covariance error of 3e-4 on such a CPU. The update forces IEEE fp32.
    x = _rank64(rng)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        s = _feed(x, product_dtype=torch.float32)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(saved)
    cov = mle_cov(x.astype(np.float64))
    np.testing.assert_allclose(s.covariance().numpy(), cov, rtol=1e-5, atol=1e-5 * np.abs(cov).max())
    ref = _numpy_metrics(x.astype(np.float64))
    got = metrics.compute(s, names=["gsam", "rank", "condition_number"])
    assert got["rank"] == ref["rank"] == 64
    assert _relerr(got["gsam"], ref["gsam"]) < 1e-5
    assert _relerr(got["condition_number"], ref["condition_number"]) < 1e-4


def test_update_runs_with_autocast_off_and_ieee_fp32_and_restores_the_callers_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gsam_monitor.stats.feed as feed

    seen: list[tuple[bool, str, str]] = []
    original = feed.update_chunk

    def spy(sums, rows, keep_in, product_dtype, *, set_shift):
        seen.append(
            (
                torch.is_autocast_enabled("cpu"),
                torch.backends.mkldnn.matmul.fp32_precision,
                torch.backends.cuda.matmul.fp32_precision,
            )
        )
        return original(sums, rows, keep_in, product_dtype, set_shift=set_shift)

    monkeypatch.setattr(feed, "update_chunk", spy)  # the kernel, called once per chunk of rows
    saved = torch.get_float32_matmul_precision()
    try:
        for precision in ("high", "medium"):
            torch.set_float32_matmul_precision(precision)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                LayerStats(8, product_dtype=torch.float32).update(torch.randn(20, 8))
                assert torch.is_autocast_enabled("cpu")
                assert torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert torch.get_float32_matmul_precision() == precision
    finally:
        torch.set_float32_matmul_precision(saved)
    assert seen == [(False, "ieee", "ieee")] * 2


def test_exact_numerics_restores_the_callers_settings_when_the_body_raises() -> None:
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with pytest.raises(RuntimeError, match="boom"), exact_numerics("cpu"):
                assert not torch.is_autocast_enabled("cpu")
                raise RuntimeError("boom")
            assert torch.is_autocast_enabled("cpu")
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.set_float32_matmul_precision(saved)


def test_update_error_restores_the_callers_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import gsam_monitor.stats.feed as feed

    def fail(sums, rows, keep_in, product_dtype, *, set_shift):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(feed, "update_chunk", fail)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            with pytest.raises(RuntimeError, match="kernel failed"):
                LayerStats(4).update(torch.randn(3, 4))
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(saved)


# --------------------------------------------------------------------------- default product dtype
@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ((6, 0), torch.float64),  # P100
        ((7, 0), torch.float64),  # V100
        ((8, 0), torch.float64),  # A100
        ((9, 0), torch.float64),  # H100 / H200
        ((10, 0), torch.float64),  # B200
        ((6, 1), torch.float32),  # GTX 10x0
        ((7, 5), torch.float32),  # T4, RTX 20x0
        ((8, 6), torch.float32),  # RTX 30x0, A10
        ((8, 9), torch.float32),  # RTX 40x0, L4, L40
        ((12, 0), torch.float32),  # RTX 50x0
    ],
)
def test_default_products_are_fp64_where_fp64_runs_at_half_rate(
    capability: tuple[int, int], expected: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda", 0)
    assert fast_fp64(cuda) == (expected == torch.float64)
    assert resolve_product_dtype(None, cuda, torch.float64) == expected
    # An fp32 state gains nothing from fp64 products; an explicit choice always wins.
    assert resolve_product_dtype(None, cuda, torch.float32) == torch.float32
    assert resolve_product_dtype(torch.float32, cuda, torch.float64) == torch.float32
    assert resolve_product_dtype(torch.float64, cuda, torch.float64) == torch.float64


def test_cpu_defaults_are_unchanged() -> None:
    cpu = torch.device("cpu")
    assert LayerStats(4).product_dtype == torch.float64
    assert LayerStats(4).state_dtype == torch.float64
    assert resolve_product_dtype(None, cpu, torch.float32) == torch.float32
    assert resolve_product_dtype("native", cpu, torch.float64) is None


def test_mps_keeps_fp32_state_and_products_on_the_device() -> None:
    mps = torch.device("mps")
    assert not fast_fp64(mps)
    assert resolve_product_dtype(None, mps, torch.float32) == torch.float32
    with pytest.warns(UserWarning, match="MPS has no float64, so the statistics are kept in float32"):
        assert resolve_state_dtype(torch.float64, mps) == torch.float32
    assert resolve_state_dtype(torch.float32, mps) == torch.float32
    with pytest.raises(ValueError, match=r"product_dtype=torch\.float64 is not available on MPS"):
        resolve_product_dtype(torch.float64, mps, torch.float32)
    with pytest.raises(ValueError, match="cannot move an fp64 LayerStats to MPS"):
        LayerStats(3).to("mps")
    with pytest.raises(ValueError, match="state_dtype must be a floating torch dtype"):
        resolve_state_dtype(torch.int64, mps)


# --------------------------------------------------------------------------- fp32 product error model
def test_massive_activation_keeps_every_direction_with_fp32_products(rng: np.random.Generator) -> None:
    # λmax is 3e4 times the rest: a tolerance relative to λmax left rank 1 (GSAM +2.96 instead
    # of -357.9). The per-eigenvector error model keeps all 256 directions.
    x = _massive(rng)
    x64 = x.astype(np.float64)
    ref = _numpy_metrics(x64)
    assert ref["rank"] == 256
    s = _feed(x, product_dtype=torch.float32)
    got = metrics.compute(s, names=["gsam", "rank", "condition_number", "gsam_correlation"])
    assert got["rank"] == 256
    assert _relerr(got["gsam"], ref["gsam"]) < 1e-6
    assert _relerr(got["condition_number"], ref["condition_number"]) < 1e-4
    # The correlation variant standardises every dimension: none may be dropped as "dead".
    z = (x64 - x64.mean(0)) / x64.std(0)
    lz = np.linalg.eigvalsh(mle_cov(z))
    gz = math.log(len(z)) - 0.5 * 256 * (1 + math.log(2 * math.pi)) - 0.5 * float(np.log(lz).sum())
    assert _relerr(got["gsam_correlation"], gz) < 1e-6
    # The same data with fp64 products: scipy's rule, unchanged.
    assert metrics.compute(_feed(x))["rank"] == 256


def test_massive_activation_heldout_and_mardia_with_fp32_products(rng: np.random.Generator) -> None:
    a, b = _massive(rng, n=6000, d=64), _massive(rng, n=3000, d=64)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ref = _feed(a, product_dtype=torch.float32)
    cur = _feed(b, product_dtype=torch.float32)
    fit = scipy.stats.multivariate_normal(a64.mean(0), mle_cov(a64))
    got = metrics.compute(cur, reference=ref, names=["heldout_loglik"])["heldout_loglik"]
    assert _relerr(got, float(fit.logpdf(b64).mean()) / 64) < 1e-6
    acc = MardiaAccumulator(ref)
    acc.update(torch.from_numpy(a))
    assert acc.rank == 64
    z = a64 - a64.mean(0)
    b2 = float(np.mean(np.einsum("ij,jk,ik->i", z, np.linalg.inv(mle_cov(a64)), z) ** 2))
    assert acc.b2() == pytest.approx(b2, rel=1e-5)


def test_fp32_products_drop_the_null_directions_of_rank_deficient_data(rng: np.random.Generator) -> None:
    # The other side of the error model: rounding noise in null directions is not spectrum.
    x = _rank64(rng, d=200)
    got = metrics.compute(_feed(x, product_dtype=torch.float32), names=["gsam", "rank"])
    ref = _numpy_metrics(x.astype(np.float64))
    assert got["rank"] == ref["rank"] == 64
    assert _relerr(got["gsam"], ref["gsam"]) < 1e-5


def test_eigenvalue_tolerance_is_the_per_eigenvector_bound() -> None:
    # Two directions of equal eigenvalue 1e-3: one along a dimension of scale 1, one along a
    # dimension of scale 1e6. Only the second is below its product error
    # c·eps32·(Σ_i |v_i|·sqrt(scale_i))².
    evals = torch.tensor([1e-3, 1e-3], dtype=torch.float64)
    evecs = torch.eye(2, dtype=torch.float64)
    scale = torch.tensor([1.0, 1e6], dtype=torch.float64)
    tol = metrics.eigenvalue_tolerance(evals, evecs, scale, torch.float32)
    bound = metrics.PRODUCT_ERROR_FACTOR * float(np.finfo(np.float32).eps) * np.array([1.0, 1e6])
    np.testing.assert_allclose(tol.numpy(), bound, rtol=1e-12)
    assert (evals > tol).tolist() == [True, False]
    # A spread vector sums |v_i|·sqrt(scale_i) before squaring: (2 · sqrt(0.5))² = 2.
    rot = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2)
    tol_rot = metrics.eigenvalue_tolerance(evals, rot, torch.ones(2, dtype=torch.float64), torch.float32)
    np.testing.assert_allclose(tol_rot.numpy(), 2 * metrics.PRODUCT_ERROR_FACTOR * float(np.finfo(np.float32).eps))
    # fp64 products: scipy's rule for every eigenvalue, whatever the vectors.
    lam = torch.tensor([4.0, 1.0, 1e-12], dtype=torch.float64)
    tol64 = metrics.eigenvalue_tolerance(lam, torch.eye(3, dtype=torch.float64), torch.ones(3), torch.float64)
    np.testing.assert_allclose(tol64.numpy(), scipy_rank_tol(lam.numpy()))


def test_fp32_products_keep_a_direction_above_the_error_bound_and_drop_one_below() -> None:
    """Two pairs of large, almost equal dimensions (a = 100) that differ by a small independent
    part: along (e_i - e_j)/sqrt(2) the eigenvalue is 2.6 times the fp32 product bound
    eps32 · (Σ |v_i| sqrt(scale_i))² = eps32 · 2a² (c = 1, as documented) for the first pair,
    0.3 times it for the second. The first direction is kept, the second dropped: rank 3 of 4."""
    rng = np.random.default_rng(11)
    n, a, eps32 = 4096, 100.0, float(np.finfo(np.float32).eps)
    base = np.linalg.qr(rng.standard_normal((n, 4)))[0] * math.sqrt(n)  # orthogonal columns
    base -= base.mean(0)
    z1, w1, z2, w2 = (base[:, k] / base[:, k].std() for k in range(4))
    small = [math.sqrt(ratio * eps32) * a for ratio in (2.6, 0.3)]  # lambda = 2 e² = ratio · eps32 · 2a²
    x = np.stack([a * z1 + small[0] * w1, a * z1 - small[0] * w1, a * z2 + small[1] * w2, a * z2 - small[1] * w2], 1)
    x = x.astype(np.float32).astype(np.float64)  # what the fp32 update sees
    lam, vec = np.linalg.eigh(mle_cov(x))
    bound = eps32 * (np.abs(vec) * np.sqrt(x.var(0))[:, None]).sum(0) ** 2
    ratios = np.sort(lam / bound)[:2]
    np.testing.assert_allclose(ratios, [0.3, 2.6], rtol=0.02)  # the construction
    got = metrics.compute(_feed(x.astype(np.float32), product_dtype=torch.float32), names=["rank"])
    assert got["rank"] == 3


# --------------------------------------------------------------------------- MiniLM layers
@pytest.fixture(scope="module")
def minilm_layers() -> list[np.ndarray]:
    from tests.minilm_states import minilm_hidden_states

    return minilm_hidden_states()


def _closed_form(x: np.ndarray) -> dict[str, float]:
    # GSAM from numpy's eigenvalues with scipy's support rule (test_metrics pins this closed
    # form against scipy's logpdf; the full logpdf of 6,456 rows x 7 layers is slow here).
    n = len(x)
    lam = np.linalg.eigvalsh(mle_cov(x))
    sup = lam[lam > scipy_rank_tol(lam)]
    gsam = math.log(n) - 0.5 * len(sup) * (1 + math.log(2 * math.pi)) - 0.5 * float(np.log(sup).sum())
    return {"rank": len(sup), "gsam": gsam}


def test_minilm_layers_with_fp32_products_match_fp64_numpy(minilm_layers: list[np.ndarray]) -> None:
    for i, h in enumerate(minilm_layers):
        ref = _closed_form(h.astype(np.float64))
        got = metrics.compute(_feed(h, parts=13, product_dtype=torch.float32), names=["gsam", "rank"])
        assert got["rank"] == ref["rank"], i
        assert _relerr(got["gsam"], ref["gsam"]) < 1e-5, i
        # Under bf16 autocast too (the hook of a mixed-precision run sees these fp32 rows).
        s = LayerStats(h.shape[1], product_dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s.update(torch.from_numpy(h))
        got = metrics.compute(s, names=["gsam", "rank"])
        assert got["rank"] == ref["rank"] and _relerr(got["gsam"], ref["gsam"]) < 1e-5, i


# --------------------------------------------------------------------------- the shift follows the data
def test_after_reset_the_next_windows_rows_set_the_shift(rng: np.random.Generator) -> None:
    # The mean moves 2000 sd between windows: an old shift cost fp32 products 65 % of the
    # covariance; the new window's own first rows keep every digit.
    first = rng.standard_normal((500, 16)).astype(np.float32)
    second = (2000.0 + rng.standard_normal((500, 16))).astype(np.float32)
    s = _feed(first, product_dtype=torch.float32)
    s.reset()
    for p in np.array_split(second, 4):
        s.update(torch.from_numpy(p))
    x = second.astype(np.float64)
    np.testing.assert_allclose(s.covariance().numpy(), mle_cov(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s.mean.numpy(), x.mean(0), rtol=1e-9)
    assert float(s.count) == 500


def test_fp32_products_keep_every_digit_when_the_mean_jumps_within_a_window(rng: np.random.Generator) -> None:
    # 50 rows at 0, then 2000 rows 2000 sd away, in one window: each chunk's product is taken
    # around the chunk's own mean and moved to the window's shift exactly in fp64.
    blocks = [rng.standard_normal((50, 12))] + [2000.0 + rng.standard_normal((500, 12)) for _ in range(4)]
    blocks = [b.astype(np.float32) for b in blocks]
    s = LayerStats(12, product_dtype=torch.float32)
    for b in blocks:
        s.update(torch.from_numpy(b))
    x = np.vstack(blocks).astype(np.float64)
    cov = mle_cov(x)
    np.testing.assert_allclose(s.covariance().numpy(), cov, rtol=1e-6, atol=1e-9 * np.abs(cov).max())
    np.testing.assert_allclose(s.mean.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(
        s.excess_kurtosis().numpy(), scipy.stats.kurtosis(x, axis=0, bias=True), rtol=1e-6
    )
    got = metrics.compute(s, names=["gsam", "rank"])
    ref = _numpy_metrics(x)
    # The window's variance is 1e5 along the jump; the product error follows the
    # within-chunk spread (1), so every direction stays resolved.
    assert got["rank"] == ref["rank"] == 12
    assert _relerr(got["gsam"], ref["gsam"]) < 1e-6


def test_reshift_is_exact_and_defaults_to_the_mean(rng: np.random.Generator) -> None:
    x = rng.standard_t(5, size=(300, 7)) * 3 + 500
    s = _feed(x, parts=3)
    s.reshift_()
    np.testing.assert_allclose(s.shift.numpy(), x.mean(0), rtol=1e-12)
    s.reshift_(torch.full((7,), 510.0, dtype=torch.float64))  # any reference: 3 sd off here
    assert s.shift.tolist() == [510.0] * 7
    s.update(torch.from_numpy(x[:40]))
    z = np.vstack([x, x[:40]])
    np.testing.assert_allclose(s.covariance().numpy(), mle_cov(z), rtol=1e-9, atol=1e-12 * np.abs(mle_cov(z)).max())
    np.testing.assert_allclose(s.mean.numpy(), z.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.excess_kurtosis().numpy(), scipy.stats.kurtosis(z, axis=0, bias=True), rtol=1e-8)
    # An empty state has no mean to move to; an explicit shift is simply taken.
    empty = LayerStats(7)
    empty.reshift_()
    assert float(empty.count) == 0 and float(empty.shift.abs().sum()) == 0
    empty.reshift_(torch.full((7,), 499.0, dtype=torch.float64))
    assert empty.shift.tolist() == [499.0] * 7
    empty.update(torch.from_numpy(x))
    assert empty.shift.tolist() == [499.0] * 7  # the first rows do not override it
    np.testing.assert_allclose(empty.covariance().numpy(), mle_cov(x), rtol=1e-9, atol=1e-12 * np.abs(mle_cov(x)).max())


def test_cumulative_monitor_recentres_its_windows_at_each_log(rng: np.random.Generator) -> None:
    from gsam_monitor import GSAMMonitor
    from tests.tiny_models import Stack

    model = Stack(dim=6, depth=1)
    with pytest.warns(UserWarning, match=r"every_n_steps=1\)"):
        monitor = GSAMMonitor(
            model,
            ["blocks.0"],
            every_n_steps=1,
            windows=WindowOptions(kind="cumulative"),
            collection=CollectOptions(max_tokens_per_layer=None, steps=None),
            compute=ComputeOptions(product_dtype=torch.float32),
            metrics=["n", "gsam"],
        )
    seen = []
    with monitor:
        for step in range(3):
            x = torch.from_numpy((3000.0 * step + rng.standard_normal((40, 6))).astype(np.float32)).double()
            model(x)
            seen.append(x.numpy())  # the identity blocks' output
            monitor.step()
            stats = monitor.stats("blocks.0")
            np.testing.assert_allclose(stats.shift.numpy(), np.vstack(seen).mean(0), rtol=1e-6, atol=1e-6)
    x = np.vstack(seen)
    np.testing.assert_allclose(stats.covariance().numpy(), mle_cov(x), rtol=1e-5, atol=1e-6 * np.abs(mle_cov(x)).max())
