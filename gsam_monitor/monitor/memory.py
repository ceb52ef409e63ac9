"""The monitor's memory plan: what the accelerator holds, what the host holds, per layer.

Placement (``gsam_monitor.monitor.window``): per monitored layer the device holds one
accumulation buffer, ``LayerStats.state_bytes(d)`` = ``itemsize·(d² + 6d)`` bytes in the state
dtype, for the phase being collected (a second phase collected at the same time, e.g. an
evaluation forward inside a collection window, adds its own buffer, checked against the
budget at its first forward), plus the update kernel's workspace once (two chunk x d blocks
in the product's working dtype, and a d x d product where that dtype is narrower than the
state's). Buffers are freed at the end of each logged window. Everything else lives on the
host, in fp64: each (layer, phase)'s totals, its reference window when ``heldout_loglik`` or a drift
metric is selected, and the copy a background log (or a cumulative/EMA window kept as a
reference or summed over ranks) takes. A log computes its metrics on the host, as before: the
covariance is read back there for the eigendecomposition.

Under ``torch.distributed`` every rank holds every layer by default (the windows are summed over
ranks for each log), so per-rank bytes do not fall with the world size; with
``ComputeOptions(shard_layers=True)`` a rank holds only the layers it owns (``MonitorConfig.plan``
plans the rank owning the most bytes). Host bytes per node are the per-rank bytes times the
ranks on a node.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from gsam_monitor.stats import LayerStats
from gsam_monitor.stats.kernel import chunk_rows
from gsam_monitor.stats.precision import resolve_product_dtype

__all__ = ["gib", "host_bytes_per_layer", "layer_plan", "plan_product_dtype", "plan_report", "workspace_bytes"]


def host_bytes_per_layer(
    dim: int, *, state_dtype: torch.dtype, phases: int, heldout: bool, log_copies: int
) -> int:
    """Host bytes of one layer: per phase its totals, plus its reference (``heldout``), plus
    ``log_copies`` copies a log holds."""
    return LayerStats.state_bytes(dim, state_dtype) * phases * (1 + int(heldout) + log_copies)


def workspace_bytes(dim: int, *, state_dtype: torch.dtype, product_dtype: torch.dtype | None) -> int:
    """The update kernel's workspace for rows of ``dim``: two ``chunk_rows(dim) x dim`` blocks in
    the working dtype (fp64 for fp64 products, else fp32), and a ``dim x dim`` product in it when
    it is narrower than the state."""
    work = torch.float64 if product_dtype == torch.float64 else torch.float32
    size = work.itemsize
    blocks = 2 * chunk_rows(dim) * dim * size
    return blocks + (dim * dim * size if work != state_dtype else 0)


def plan_product_dtype(
    product_dtype: torch.dtype | str | None, device: torch.device, state_dtype: torch.dtype
) -> torch.dtype | None:
    """The product dtype the buffers on ``device`` will use; a model on the meta device is
    planned as on a data-centre GPU (fp64 products for an fp64 state)."""
    if device.type == "meta":
        device = torch.device("cpu")  # the same policy: fp64 runs at half rate or better
    return resolve_product_dtype(product_dtype, device, state_dtype)


def layer_plan(
    dim: int,
    *,
    state_dtype: torch.dtype,
    phases: int,
    heldout: bool,
    log_copies: int,
) -> dict[str, int]:
    """One layer's plan: ``{"dim", "device_bytes" (its accumulation buffer), "host_bytes"}``."""
    return {
        "dim": dim,
        "device_bytes": LayerStats.state_bytes(dim, state_dtype),
        "host_bytes": host_bytes_per_layer(
            dim, state_dtype=torch.float64, phases=phases, heldout=heldout, log_copies=log_copies
        ),  # the totals are fp64 whatever the buffers' dtype
    }


def plan_report(
    dims: Iterable[tuple[str, int | None]],
    *,
    state_dtype: torch.dtype,
    product_dtype: torch.dtype | str | None,
    device: torch.device,
    phases: Sequence[str],
    heldout: bool,
    log_copies: int,
    world_size: int = 1,
    ranks_per_node: int | None = None,
) -> dict[str, Any]:
    """The memory plan per rank, as ``memory_report`` returns it.

    Returns:
        ``{"device_bytes", "host_bytes", "host_bytes_per_node", "world_size", "ranks_per_node",
        "workspace_bytes", "layers": {name: {"dim", "device_bytes", "host_bytes"}},
        "unknown_layers": [...]}`` (layers whose width is known only at their first activation
        are listed, not counted).
    """
    product = plan_product_dtype(product_dtype, device, state_dtype)
    layers: dict[str, dict[str, int]] = {}
    unknown: list[str] = []
    for name, dim in dims:
        if dim is None:
            unknown.append(name)
            continue
        layers[name] = layer_plan(
            dim, state_dtype=state_dtype, phases=len(phases), heldout=heldout, log_copies=log_copies
        )
    workspace = max(
        (workspace_bytes(p["dim"], state_dtype=state_dtype, product_dtype=product) for p in layers.values()),
        default=0,
    )
    host = sum(p["host_bytes"] for p in layers.values())
    per_node = min(world_size, ranks_per_node) if ranks_per_node else world_size
    return {
        "device_bytes": sum(p["device_bytes"] for p in layers.values()) + workspace,  # the workspace once
        "host_bytes": host,
        "host_bytes_per_node": host * per_node,
        "world_size": world_size,
        "ranks_per_node": per_node,
        "workspace_bytes": workspace,
        "layers": layers,
        "unknown_layers": unknown,
    }


def gib(n: float) -> str:
    """``n`` bytes with three decimals in GiB, or in MiB or KiB below those (a small budget
    reads ``0.250 MiB``, not ``0.000 GiB``), or in bytes below 1 KiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3f} {unit}"
    return f"{int(n)} bytes"
