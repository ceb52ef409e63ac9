"""The update kernel: one chunk of rows added to the sums, on the device, without host syncs.

Rows to drop (masked or non-finite) are zeroed and weighted 0 instead of being indexed away,
so a CUDA update never waits. (A CPU chunk reads its total once, with no device to wait for:
when it is finite and no row is masked, the masking is skipped.) Every n x d temporary lives
in a reused per-thread workspace; ``LayerStats.update`` feeds rows in chunks of
``chunk_rows(d)`` = ``2**22 // d`` (at least 256), so the workspace stays bounded whatever
the batch.
"""

from __future__ import annotations

import math
import threading

import torch

from gsam_monitor.stats.precision import shift_dtype
from gsam_monitor.stats.shift import shift_power_sums

__all__ = ["chunk_rows", "update_chunk"]

_WORKSPACE_ELEMENTS = 1 << 22  # rows per chunk x dim; 32 MB per fp64 buffer
_workspace_cache = threading.local()


def chunk_rows(dim: int) -> int:
    """Rows per update chunk: bounds the workspace, large enough to keep the GEMM efficient."""
    return max(256, _WORKSPACE_ELEMENTS // dim)


def _workspace(device: torch.device, dtype: torch.dtype, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two reusable (n, d) buffers per (thread, device, dtype), grown on demand."""
    cache = getattr(_workspace_cache, "buffers", None)
    if cache is None:
        cache = _workspace_cache.buffers = {}
    key = (device, dtype)
    need = n * d
    buf = cache.get(key)
    if buf is None or buf.numel() < 2 * need:
        # A normal tensor, even when first needed under inference_mode: an inference tensor
        # could not be written in place by a later update outside it.
        with torch.inference_mode(False):
            buf = torch.empty(2 * need, dtype=dtype, device=device)
        cache[key] = buf
    return buf[:need].view(n, d), buf[need : 2 * need].view(n, d)



def update_chunk(
    st: dict[str, torch.Tensor],
    rows: torch.Tensor,
    keep_in: torch.Tensor | None,
    product_dtype: torch.dtype | None,
    *,
    set_shift: bool,
) -> None:
    """Add one chunk of rows (n, d) to the sums in ``st``, in place, without host syncs.

    Args:
        st: The state tensors by name (``LayerStats``' registry).
        rows: The rows, on the state's device; at most ``chunk_rows(d)`` of them.
        keep_in: Bool (n,) mask of the rows to count, or ``None`` for all.
        product_dtype: The dtype of the Gram products (``None``: the rows' own, fp32 for halves).
        set_shift: Set ``st["shift"]`` from these rows first (the window's first rows).
    """
    higher = "power3" in st
    sd = st["sum"].dtype
    # Products run in product_dtype; half activations are widened to fp32 first, since
    # the shifted values x - K are no longer representable in bf16/fp16.
    work = product_dtype or rows.dtype
    if work in (torch.float16, torch.bfloat16):
        work = torch.float32
    n = rows.shape[0]
    # Every n x d temporary lives in a reused workspace: fresh multi-megabyte buffers per
    # op cost page faults that, on CPU, took longer than the arithmetic itself.
    xs, tmp = _workspace(rows.device, work, n, rows.shape[1])
    xs.copy_(rows)
    if keep_in is None and rows.device.type == "cpu" and math.isfinite(float(xs.sum())):
        # Every row kept and finite (a finite total proves it; an overflowing one takes the
        # general path). A CPU read costs no device wait: the common case skips the masking,
        # which at a few dozen rows costs more than the products.
        keep_w = None
        kept = torch.tensor(float(n), dtype=st["count"].dtype)
    else:
        finite = torch.isfinite(xs.sum(dim=1))
        if keep_in is None:
            keep = finite
            st["nonfinite"] += n - finite.sum()
        else:
            keep = keep_in & finite
            st["nonfinite"] += (keep_in & ~finite).sum()
        xs.masked_fill_(~keep[:, None], 0.0)  # dropped rows (padding, NaN/Inf) become 0
        keep_w = keep.to(work)
        kept = keep_w.sum(dtype=st["count"].dtype)
    if higher:  # zeroed rows never raise a maximum of |x|
        torch.maximum(st["absmax"], torch.abs(xs, out=tmp).amax(0).to(sd), out=st["absmax"])
    st["count"] += kept
    if set_shift:
        # First batch: K = mean of its kept rows (0 if none), computed on the device, held
        # exactly by the product dtype.
        st["shift"].copy_((xs.sum(0) / kept.clamp_min(1)).to(shift_dtype(product_dtype)).to(sd))
    if higher:
        norm = torch.linalg.vector_norm(xs, dim=1).clamp_min(torch.finfo(work).tiny)
        inv_norm = norm.reciprocal_() if keep_w is None else keep_w / norm
        if work == torch.float64:
            st["unit_sum"] += (inv_norm @ xs).to(sd)
        else:  # a pairwise column sum: an fp32 GEMV sums each column's rows one by one
            st["unit_sum"] += torch.mul(xs, inv_norm[:, None], out=tmp).sum(0).to(sd)
    if work == torch.float64:
        if keep_w is None:
            xs.sub_(st["shift"].to(work))  # x - K
        else:
            xs.addr_(keep_w, st["shift"].to(work), alpha=-1.0)  # x - K on kept rows, 0 elsewhere
        st["sum"] += xs.sum(0).to(sd)
        if work == sd:
            st["gram"].addmm_(xs.T, xs)
        else:
            st["gram"] += (xs.T @ xs).to(sd)
        if higher:  # column sums of the powers (a column vector_norm is ~10x slower here)
            torch.mul(xs, xs, out=tmp)
            st["power3"] += xs.mul_(tmp).sum(0).to(sd)
            st["power4"] += tmp.mul_(tmp).sum(0).to(sd)
        return  # (a product_sq kept from narrower products before to() gains nothing)
    # Narrower products centre each chunk on its own mean m and move its sums to the
    # window's shift K in the state dtype, exactly (Chan, Golub & LeVeque 1979's pairwise
    # update): the GEMM never sees an offset, so a mean far from K (a window that
    # drifted, a batch that jumped) costs fp32 products no digits.
    local = xs.sum(0) / kept.clamp_min(1).to(work)
    if keep_w is None:
        xs.sub_(local)  # x - m
    else:
        xs.addr_(keep_w, local, alpha=-1.0)  # x - m on kept rows, 0 elsewhere
    delta = local.to(sd) - st["shift"]  # x - K = (x - m) + delta
    s_b = xs.sum(0).to(sd)
    n_b = kept.to(sd)
    st["sum"] += s_b + n_b * delta
    st["gram"].add_(xs.T @ xs)  # widened as it is added: no d x d temporary in sd
    # + s δᵀ + δ sᵀ + n δδᵀ = u δᵀ + δ uᵀ with u = s + n δ / 2: one pass over the state.
    u = s_b + 0.5 * n_b * delta
    st["gram"].addmm_(torch.stack([u, delta], 1), torch.stack([delta, u]))
    # Power sums as pairwise column sums of the powers (an fp32 vector_norm of x² lost
    # 1e-4 of Σx⁴ over 1e5 rows). xs is not needed after them.
    torch.mul(xs, xs, out=tmp)
    p2 = tmp.sum(0).to(sd)
    st["product_sq"] += p2
    if higher:
        p3 = xs.mul_(tmp).sum(0).to(sd)
        p4 = tmp.mul_(tmp).sum(0).to(sd)
        p3, p4 = shift_power_sums(n_b, s_b, p2, p3, p4, delta)
        st["power3"] += p3
        st["power4"] += p4

