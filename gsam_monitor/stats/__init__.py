"""Streaming accumulators of activations: ``LayerStats`` (moments) and ``ReservoirSample`` (values).

``LayerStats`` keeps, per layer, the sums every metric of ``gsam_monitor.metrics`` needs,
without storing a row; ``ReservoirSample`` keeps a bounded uniform sample of the values for
the distribution analyses. Both update on the activations' device without host syncs.

Modules: ``layer_stats`` (the state registry and its operations), ``moments`` (reading the
moments out of the sums), ``kernel`` (the update of one chunk of rows), ``shift`` (the exact
algebra of moving the reference vector), ``distributed`` (the sum over ranks), ``precision``
(state and product dtypes, the caller-proof numeric context), ``reservoir`` (the sample).
"""

from gsam_monitor.stats.layer_stats import LayerStats
from gsam_monitor.stats.precision import (
    FULL_RATE_FP64_CAPABILITIES,
    exact_numerics,
    fast_fp64,
    resolve_product_dtype,
    resolve_state_dtype,
)
from gsam_monitor.stats.reservoir import ReservoirSample

__all__ = [
    "FULL_RATE_FP64_CAPABILITIES",
    "LayerStats",
    "ReservoirSample",
    "exact_numerics",
    "fast_fp64",
    "resolve_product_dtype",
    "resolve_state_dtype",
]
