"""``JsonlSink``: one strict-JSON object per write, appended to a file (NaN/Inf written as null)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gsam_monitor._jsonable import finite_or_none

__all__ = ["JsonlSink"]


class JsonlSink:
    """One JSON object per write, ``{"step": step, **metrics}``, appended to ``path``; alerts
    and outlier dimensions as lines of their own, ``{"step", "alerts": [...]}`` and
    ``{"step", "outliers": {layer: [indices]}}`` (when a list changes), and at ``close()`` of the monitor the int8
    readiness, ``{"step", "quantization": {layer: {...}}}``.

    Args:
        path: The file; its directory is created at the first write.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"JsonlSink(path=) must be a file path; got {type(path).__name__}.")
        self.path = Path(path)
        self._file: Any = None
        self._outliers: dict[str, list[int]] = {}  # the lists last written, per layer key

    def write(self, metrics: Mapping[str, float], step: int) -> None:
        self._append({"step": int(step), **finite_or_none(dict(metrics))})

    def write_alerts(self, alerts: list[Mapping[str, Any]], step: int) -> None:
        self._append({"step": int(step), "alerts": finite_or_none([dict(a) for a in alerts])})

    def write_outliers(self, outliers: Mapping[str, list[int]], step: int) -> None:
        """A line when some layer's list differs from the last one written (none before: ``[]``)."""
        current = {k: list(v) for k, v in outliers.items()}
        if all(self._outliers.get(k, []) == v for k, v in current.items()):
            return
        self._outliers.update(current)
        self._append({"step": int(step), "outliers": finite_or_none(current)})

    def write_quantization(self, summary: Mapping[str, Mapping[str, Any]], step: int) -> None:
        self._append({"step": int(step), "quantization": finite_or_none({k: dict(v) for k, v in summary.items()})})

    def _append(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def __repr__(self) -> str:
        return f"JsonlSink({str(self.path)!r})"
