"""Values made JSON-ready: numpy and torch numbers to Python ones, non-finite numbers to null.

A leaf module, shared by the JSONL sink and the eval's results document, so that both write
strict JSON (``json.dumps(..., allow_nan=False)``) the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["finite_or_none", "plain"]


def plain(value: Any) -> Any:
    """``value`` with numpy and torch scalars and arrays turned into Python numbers and lists,
    recursively (mapping keys become strings); NaN and Inf are kept."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return plain(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return value


def finite_or_none(value: Any) -> Any:
    """``plain(value)`` with every NaN and Inf written as ``None`` (JSON has no NaN)."""
    return _nulls(plain(value))


def _nulls(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nulls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nulls(v) for v in value]
    return value
