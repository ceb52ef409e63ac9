"""Numeric policy of the statistics: state and product dtypes, and the caller-proof numeric context.

Product precision is chosen from an error model, not by habit: fp64 Gram products cost little
where fp64 runs at half the fp32 rate or better (CPUs, data-centre GPUs), fp32 elsewhere (the
metrics' rank tolerance then follows the fp32 product's error model,
``gsam_monitor.metrics.linalg.eigenvalue_tolerance``). ``exact_numerics`` makes the update
immune to the caller's autocast and TF32/bf16 matmul settings.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

__all__ = [
    "FULL_RATE_FP64_CAPABILITIES",
    "exact_numerics",
    "fast_fp64",
    "resolve_product_dtype",
    "resolve_state_dtype",
    "shift_dtype",
]


# CUDA parts whose fp64 throughput is at least half their fp32 throughput (P100, V100,
# A100, H100/H200, B200: the data-centre chips). Every other CUDA part (consumer and
# workstation GPUs, the inference parts such as T4/L4/L40) runs fp64 at 1/32-1/64 of fp32.
FULL_RATE_FP64_CAPABILITIES: frozenset[tuple[int, int]] = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})


def fast_fp64(device: torch.device) -> bool:
    """Whether ``device`` runs fp64 GEMMs at half its fp32 rate or better (CPUs, data-centre GPUs).

    MPS has no fp64 at all; other accelerators are assumed not to.
    """
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return tuple(torch.cuda.get_device_capability(device)) in FULL_RATE_FP64_CAPABILITIES
    return False


def resolve_state_dtype(state_dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype of the accumulated sums: fp64 unless the device has none (MPS: fp32).

    Raises:
        ValueError: if ``state_dtype`` is not a floating torch dtype.
    """
    if state_dtype is None:
        state_dtype = torch.float64
    if not isinstance(state_dtype, torch.dtype) or not state_dtype.is_floating_point:
        raise ValueError(f"state_dtype must be a floating torch dtype such as torch.float64; got {state_dtype!r}.")
    if device.type == "mps" and state_dtype == torch.float64:
        # MPS has no float64 tensors. Keeping fp64 state on the CPU instead would copy every
        # batch (or its Gram product) to the host, a synchronisation per hook; fp32 state on
        # the device keeps the hook asynchronous. The metrics' rank tolerance follows.
        warnings.warn(
            "LayerStats: MPS has no float64, so the statistics are kept in float32 on the MPS "
            "device (pass device='cpu' for fp64 state, at the cost of a host copy per batch).",
            UserWarning,
            stacklevel=3,
        )
        return torch.float32
    return state_dtype


def resolve_product_dtype(
    product_dtype: torch.dtype | str | None, device: torch.device, state_dtype: torch.dtype
) -> torch.dtype | None:
    """Choose the dtype the per-batch Gram product is computed in.

    ``None`` (the default) picks fp64 where the device runs fp64 at half its fp32 rate or
    better (CPUs; CUDA compute capability 6.0, 7.0, 8.0, 9.0, 10.0) and the state is fp64, and
    fp32 elsewhere (consumer GPUs, MPS, an fp32 state). ``"native"`` (returned as ``None``)
    multiplies in the activations' own dtype when it is fp32 or fp64, and in fp32 for
    bf16/fp16 activations (shifted half values are not representable in half).

    Raises:
        ValueError: for anything but a floating dtype, ``None`` or ``"native"``.
    """
    if product_dtype == "native":
        return None
    if product_dtype is None:
        return torch.float64 if state_dtype == torch.float64 and fast_fp64(device) else torch.float32
    if isinstance(product_dtype, str) or not isinstance(product_dtype, torch.dtype):
        raise ValueError(f"product_dtype must be a torch floating dtype, None or 'native'; got {product_dtype!r}.")
    if not product_dtype.is_floating_point:
        raise ValueError(f"product_dtype must be a floating dtype; got {product_dtype}.")
    if device.type == "mps" and product_dtype == torch.float64:
        raise ValueError("product_dtype=torch.float64 is not available on MPS (no float64); use torch.float32.")
    return product_dtype


@contextlib.contextmanager
def exact_numerics(device_type: str) -> Iterator[None]:
    """Autocast off for ``device_type`` and fp32 matmuls in IEEE precision, the caller's
    settings restored on exit (also on an exception). Host-side flags only: no sync.

    TF32 (CUDA) and bf16 (oneDNN on AMX CPUs) are both selected by
    ``torch.set_float32_matmul_precision("high"/"medium")``; the per-backend
    ``fp32_precision`` properties are read and written directly, because the legacy getter
    raises once a program has mixed the legacy and the per-backend APIs.
    """
    cuda_mm = torch.backends.cuda.matmul
    cpu_mm = torch.backends.mkldnn.matmul
    saved = (cuda_mm.fp32_precision, cpu_mm.fp32_precision)
    with torch.autocast(device_type, enabled=False):
        try:
            cuda_mm.fp32_precision = "ieee"
            cpu_mm.fp32_precision = "ieee"
            yield
        finally:
            cuda_mm.fp32_precision, cpu_mm.fp32_precision = saved


def shift_dtype(product_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a shift must be representable in: the update subtracts it in the product
    dtype (fp32 unless the products are fp64), so a shift that dtype holds exactly keeps
    ``mean = K + sum / n`` exact."""
    return torch.float64 if product_dtype == torch.float64 else torch.float32
